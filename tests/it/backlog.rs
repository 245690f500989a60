//! `tally_core::backlog` against the real broker: a look at a group's backlog reads the
//! records past its committed offsets, then leaves the reader fetching nothing, so that a
//! long-lived one (the ingest server's throttle, a look every few seconds) costs the broker
//! nothing between looks.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::producer::Producer;
use tally_core::backlog;
use tally_core::kafka;
use tally_core::txn::producer;

#[test]
fn a_backlog_reader_fetches_nothing_between_looks() {
    const PARTITIONS: i32 = 3;
    let (args, topic, writer) = crate::topic_with_writer(
        "backlog-idle",
        |prefix| format!("{prefix}.files"),
        PARTITIONS,
        false,
    );
    let write = |records: usize| {
        writer.begin_transaction().unwrap();
        for i in 0..records {
            let p = (i % PARTITIONS as usize) as i32;
            producer::send(&writer, &topic, Some(p), None, b"12").unwrap();
        }
        writer.commit_transaction(Duration::from_secs(30)).unwrap();
    };
    write(6);

    let group = tally_testkit::unique("backlog-group");
    let reader = kafka::reader(&args, &group, kafka::Ends::Reported).unwrap();
    let look = backlog::backlog(&args, &reader, &group, &topic, |p| p.len() as u64).unwrap();
    assert_eq!(look.records, 6);
    assert_eq!(look.measured, Some(12));
    // A fetch sent before the look ended may still answer: its answer is let in first.
    std::thread::sleep(Duration::from_secs(1));
    let seen: Vec<_> = (0..PARTITIONS)
        .map(|p| kafka::cached_watermarks(reader.client(), &topic, p))
        .collect();
    assert!(
        seen.iter().all(Option::is_some),
        "the look read no partition"
    );
    write(6);
    std::thread::sleep(Duration::from_secs(2));
    for p in 0..PARTITIONS {
        assert_eq!(
            kafka::cached_watermarks(reader.client(), &topic, p),
            seen[p as usize],
            "the reader still fetches partition {p} after the look"
        );
    }
    let again = backlog::backlog(&args, &reader, &group, &topic, |p| p.len() as u64).unwrap();
    assert_eq!(again.records, 12, "a later look reads the new records");
}
