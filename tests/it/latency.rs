//! No timer on the critical path: a stage whose input is drained ends its batch at once, so a
//! file's totals do not wait out a flush interval or a batch wait.

use std::time::{Duration, Instant};

use crate::support::Pipeline;

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
