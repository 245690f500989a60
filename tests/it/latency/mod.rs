//! No timer on the critical path: a stage whose input is drained ends its batch at once, so a
//! file's totals do not wait out a flush interval or a batch wait.

use std::time::{Duration, Instant};

use crate::support::Pipeline;

mod batches;
mod watch;

/// With a 60 s aggregator flush interval and a 60 s db-client batch wait, a file's totals are
/// in within seconds of its arrival: every stage commits as soon as its input is drained.
#[tokio::test(flavor = "multi_thread")]
async fn drained_stages_commit_at_once_whatever_their_intervals() {
    let mut p = Pipeline::new("latency").await;
    let _watch = p.spawn("watch", &p.watch_args(&["--settle-ms", "50"]));
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _aggregator = p.spawn(
        "aggregator",
        &[
            "aggregator",
            "--instance-id",
            "g",
            "--flush-interval-ms",
            "60000",
        ],
    );
    let _db = p.spawn(
        "db-client",
        &["db-client", "--from-totals", "--batch-wait-ms", "60000"],
    );
    // A first file: the stages have joined their groups once it is in.
    let (_, mut expected) = p.generate(1, 200_000, 300, 11).await;
    p.wait_ingested(1, Duration::from_secs(120)).await;
    p.assert_totals(&expected, "the first file").await;
    for (n, seed) in [(2, 12), (3, 13)] {
        let started = Instant::now();
        let (_, more) = p.generate(1, 200_000, 300, seed).await;
        for (consumer, amount) in more {
            *expected.entry(consumer).or_default() += amount;
        }
        p.wait_ingested(n, Duration::from_secs(50)).await;
        let took = started.elapsed();
        p.assert_totals(&expected, "a later file").await;
        assert!(
            took < Duration::from_secs(15),
            "file {n} took {took:?}: a stage waited out its interval"
        );
        eprintln!("file {n}: from written to totals in {took:?}");
    }
}

/// A stage's commit costs a broker round trip: no poll step of the client library in it.
/// Before, each commit of a threaded producer slept out rust-rdkafka's 100 ms flush step (the
/// producer's own polling thread took the delivery reports the flush waited for): 100 ms per
/// parser transaction and per announced file.
#[test]
fn a_commit_waits_out_no_poll_step() {
    let args = tally_core::KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique("quick"),
    );
    let topic = crate::liveness::input_topic(&args);
    let producer = tally_core::txn::producer::create(
        &args,
        &format!("{}.quick", args.topic_prefix),
        Duration::from_secs(60),
    )
    .unwrap();
    let mut commits = Vec::new();
    for i in 0..12 {
        rdkafka::producer::Producer::begin_transaction(&producer).unwrap();
        for partition in 0..2 {
            let payload = format!("record {i}");
            tally_core::txn::producer::send(
                &producer,
                &topic,
                Some(partition),
                None,
                payload.as_bytes(),
            )
            .unwrap();
        }
        let started = Instant::now();
        tally_core::txn::commit(&producer).unwrap();
        commits.push(started.elapsed());
    }
    commits.sort();
    let median = commits[commits.len() / 2];
    assert!(
        median < Duration::from_millis(60),
        "a commit takes {median:?} (median of {commits:?}): it waits out a poll step"
    );
}
