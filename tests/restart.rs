//! Kafka and PostgreSQL restart under a running pipeline: every stage keeps going (no stage is
//! restarted), and the totals are exact.
//!
//! A test binary of its own: cargo runs test binaries one at a time, so restarting the shared
//! services here cannot disturb other tests. It restarts them with `scripts/services`, so it
//! needs the services that script runs (scripts/test starts them).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

fn services(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services");
    let status = Command::new(script)
        .arg(action)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/services {action} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_and_postgres_restart_under_load() {
    let env = String::from_utf8(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
            .arg("env")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let bootstrap = tally_testkit::services().kafka_bootstrap;
    assert!(
        env.contains(&format!("KAFKA_BOOTSTRAP_SERVERS={bootstrap}")),
        "this test restarts the services of scripts/services; the tests use others ({bootstrap})"
    );

    let mut p = support::Pipeline::new("restart").await;
    let data = p.data.to_str().unwrap().to_owned();
    let expect = p.dir.join("expected.txt");
    p.tally(&[
        "producer",
        "generate",
        "--no-announce",
        "--dir",
        &data,
        "--files",
        "10",
        "--size",
        "8000000",
        "--consumers",
        "20000",
        "--seed",
        "4",
        "--expect",
        expect.to_str().unwrap(),
    ])
    .await;
    let expected = support::read_expected(&expect);
    let _a = p.spawn("parser-a", &p.parser_args("a"));
    let _b = p.spawn("parser-b", &p.parser_args("b"));
    let _db = p.spawn("db-client", &["db-client"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut publish = vec![
        "producer".to_owned(),
        "--unit-bytes".into(),
        "1000000".into(),
        "publish".into(),
    ];
    for entry in std::fs::read_dir(&p.data).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "txt") {
            publish.push(path.to_str().unwrap().to_owned());
        }
    }
    p.tally(&publish.iter().map(String::as_str).collect::<Vec<_>>())
        .await;

    // Both services go away mid-stream, stay away a while, and come back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::spawn_blocking(|| {
        services("down");
        std::thread::sleep(Duration::from_secs(3));
        services("up");
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
