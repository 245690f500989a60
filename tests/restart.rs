//! Kafka and PostgreSQL restart under a running pipeline: every stage keeps going (no stage is
//! restarted), and the totals are exact.
//!
//! A test binary of its own: cargo runs test binaries one at a time, so restarting the shared
//! services here cannot disturb other tests. It restarts them with `scripts/services`, so it
//! needs the services that script runs (scripts/test starts them).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use tally_testkit::pipeline as support;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn kafka_and_postgres_restart_under_load() {
    support::assert_services_of_the_script();

    let mut p = support::Pipeline::new("restart").await;
    let (files, expected) = p.generate(10, 8_000_000, 20_000, 4).await;
    let _a = p.spawn("parser-a", &p.parser_args("a"));
    let _b = p.spawn("parser-b", &p.parser_args("b"));
    let _db = p.spawn("db-client", &["db-client"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut publish = vec!["producer", "--unit-bytes", "1000000", "publish"];
    publish.extend(files.iter().map(String::as_str));
    p.tally(&publish).await;

    // Both services go away mid-stream, stay away a while, and come back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::spawn_blocking(|| {
        support::services(&["down"]);
        std::thread::sleep(Duration::from_secs(3));
        support::services(&["up"]);
    })
    .await
    .unwrap();

    p.wait_ingested(10, Duration::from_secs(240)).await;
    assert_eq!(
        p.totals().await,
        expected,
        "totals after Kafka and PostgreSQL restarts"
    );
    let summed = p.summed_units();
    // 10 files of just over 8 MB: nine 1 MB units each.
    assert_eq!(summed.len(), 90);
    assert!(summed.values().all(|&n| n == 1), "units redone: {summed:?}");
}
