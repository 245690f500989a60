//! The parser's done-set (`tally_parser::doneset`) against the real broker: a partition's done
//! records are read up to its high watermark, so a transaction that wrote done-states (the
//! previous owner's last one, committed with its markers still on the way, or a dead
//! instance's, still open) is waited for until it ends. What it committed is never missed: a
//! missed state makes its units look undone, and counts them again when announced again.

use std::sync::mpsc;
use std::time::Duration;

use rdkafka::producer::Producer;
use tally_core::txn::producer;
use tally_core::KafkaArgs;
use tally_model::messages::StreamDone;
use tally_model::ranges::Ranges;
use tally_parser::doneset::DoneSet;

/// A done-state of `stream` with its first `summed` bytes counted.
fn state(stream: &str, summed: u64) -> Vec<u8> {
    let mut ranges = Ranges::new();
    ranges.insert(0, summed);
    serde_json::to_vec(&StreamDone {
        stream: stream.to_owned(),
        file_id: format!("{stream}-v1"),
        path: format!("/data/{stream}"),
        file_bytes: 1000,
        fingerprint: 7,
        summed: ranges,
        rejected: Ranges::new(),
    })
    .unwrap()
}

/// Loads partition 0 of `topic` on a thread; the done-set comes back once the load ends.
fn load_in_background(
    args: &KafkaArgs,
    topic: &str,
) -> mpsc::Receiver<anyhow::Result<(bool, DoneSet)>> {
    let (tx, rx) = mpsc::channel();
    let (args, topic) = (args.clone(), topic.to_owned());
    std::thread::spawn(move || {
        let reader = tally_testkit::unique("done-reader");
        let loaded = DoneSet::new(&args, &topic, &reader, Duration::from_secs(60))
            .and_then(|mut set| Ok((set.load(0, &mut || true)?, set)));
        let _ = tx.send(loaded);
    });
    rx
}

/// Whether the load is still going after `wait`.
fn still_loading(
    pending: &mpsc::Receiver<anyhow::Result<(bool, DoneSet)>>,
    wait: Duration,
) -> bool {
    matches!(
        pending.recv_timeout(wait),
        Err(mpsc::RecvTimeoutError::Timeout)
    )
}

/// The bytes of `stream` the loaded set has as summed.
fn summed(set: &DoneSet, stream: &str) -> Option<Ranges> {
    set.get(0, stream).map(|s| s.summed.clone())
}

/// The range of the first `end` bytes.
fn first(end: u64) -> Option<Ranges> {
    let mut r = Ranges::new();
    r.insert(0, end);
    Some(r)
}

#[test]
fn a_load_waits_for_a_transaction_that_wrote_done_states() {
    let (args, topic, writer) =
        crate::compacted_topic_with_writer("doneset", |prefix| format!("{prefix}.done"));
    let send = |stream: &str, summed: u64| {
        producer::send(
            &writer,
            &topic,
            Some(0),
            Some(stream),
            &state(stream, summed),
        )
        .unwrap();
    };

    // A committed state, then a transaction left open with two more.
    writer.begin_transaction().unwrap();
    send("a", 1000);
    writer.commit_transaction(Duration::from_secs(30)).unwrap();
    writer.begin_transaction().unwrap();
    send("b", 400);
    send("a", 600);
    writer.flush(Duration::from_secs(30)).unwrap();

    let pending = load_in_background(&args, &topic);
    assert!(
        still_loading(&pending, Duration::from_secs(4)),
        "the load ended while a transaction that wrote done-states was open"
    );
    writer.commit_transaction(Duration::from_secs(30)).unwrap();
    let (loaded, set) = pending
        .recv_timeout(Duration::from_secs(30))
        .expect("the load did not end once the transaction committed")
        .unwrap();
    assert!(loaded);
    assert_eq!(summed(&set, "a"), first(600), "a's later state was missed");
    assert_eq!(summed(&set, "b"), first(400), "b's state was missed");

    // An aborted transaction is waited for too, and none of its states count.
    writer.begin_transaction().unwrap();
    send("c", 10);
    send("a", 20);
    writer.flush(Duration::from_secs(30)).unwrap();
    let pending = load_in_background(&args, &topic);
    assert!(still_loading(&pending, Duration::from_secs(2)));
    writer.abort_transaction(Duration::from_secs(30)).unwrap();
    let (_, set) = pending
        .recv_timeout(Duration::from_secs(30))
        .expect("the load did not end once the transaction aborted")
        .unwrap();
    assert_eq!(summed(&set, "c"), None, "an aborted state was loaded");
    assert_eq!(summed(&set, "a"), first(600), "an aborted state was loaded");
    assert_eq!(summed(&set, "b"), first(400));
}

/// A load leaves its reader fetching nothing: written after the loads, a partition's records
/// reach no reader. Partitions with nothing to read, and partitions read to their end. An
/// assignment taken back before its fetch started once left librdkafka fetching the
/// partition for good: each parser polled the broker 20 times a second for its empty done
/// partitions and buffered whatever came.
#[test]
fn a_loaded_partition_is_no_longer_fetched() {
    const PARTITIONS: i32 = 12;
    let (args, topic, writer) = crate::topic_with_writer(
        "doneset-idle",
        |prefix| format!("{prefix}.done"),
        PARTITIONS,
        true,
    );
    let write = |partitions: std::ops::Range<i32>, summed: u64| {
        writer.begin_transaction().unwrap();
        for p in partitions {
            let stream = format!("s{p}");
            producer::send(
                &writer,
                &topic,
                Some(p),
                Some(&stream),
                &state(&stream, summed),
            )
            .unwrap();
        }
        writer.commit_transaction(Duration::from_secs(30)).unwrap();
    };
    // A third of the partitions hold a state (and the commit's marker), the rest nothing.
    write(PARTITIONS * 2 / 3..PARTITIONS, 100);

    // Three readers, each loading every partition once: each load is a chance for the race.
    let mut sets = Vec::new();
    for _ in 0..3 {
        let mut set = DoneSet::new(
            &args,
            &topic,
            &tally_testkit::unique("done-reader"),
            Duration::from_secs(60),
        )
        .unwrap();
        for p in 0..PARTITIONS {
            assert!(set.load(p, &mut || true).unwrap());
        }
        for p in PARTITIONS * 2 / 3..PARTITIONS {
            assert_eq!(
                set.get(p, &format!("s{p}")).map(|s| s.summed.clone()),
                first(100)
            );
        }
        sets.push(set);
    }

    // A fetch sent before a load ended may still answer: its answer is let in first.
    std::thread::sleep(Duration::from_secs(1));
    let seen: Vec<Vec<_>> = sets
        .iter()
        .map(|set| (0..PARTITIONS).map(|p| set.reader_watermarks(p)).collect())
        .collect();
    write(0..PARTITIONS, 200);
    std::thread::sleep(Duration::from_secs(2));
    for (set, seen) in sets.iter().zip(&seen) {
        for p in 0..PARTITIONS {
            assert_eq!(
                set.reader_watermarks(p),
                seen[p as usize],
                "a reader still fetches done partition {p} after its load"
            );
        }
    }
}
