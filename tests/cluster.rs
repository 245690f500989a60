//! A 3-broker Kafka cluster (`scripts/services up --brokers 3`: replication 3,
//! `min.insync.replicas=2`) loses a broker to kill -9 under a running pipeline, and gets it
//! back: every stage keeps going without a restart, and the totals are exact.
//!
//! A test binary of its own: it starts the cluster beside the single node, and stops it after.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use tally_testkit::pipeline as support;

use std::collections::HashMap;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(240);

fn add(into: &mut HashMap<i64, i128>, from: HashMap<i64, i128>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_under_load_loses_nothing_and_stops_nothing() {
    tokio::task::spawn_blocking(|| support::services(&["up", "--brokers", "3"]))
        .await
        .unwrap();
    let env = support::services_output(&["env", "--brokers", "3"]);
    let bootstrap = env
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP_SERVERS="))
        .unwrap()
        .to_owned();
    assert_eq!(bootstrap.split(',').count(), 3, "{bootstrap}");

    let mut p = support::Pipeline::on_kafka("cluster", &bootstrap).await;
    // Every topic is replicated three times, writes need two in sync.
    let (before, mut expected) = p.generate(4, 3_000_000, 5_000, 1).await;
    let (during, e2) = p.generate(4, 3_000_000, 5_000, 2).await;
    let (after, e3) = p.generate(2, 3_000_000, 5_000, 3).await;
    add(&mut expected, e2);
    add(&mut expected, e3);

    let mut stages = vec![
        p.spawn("parser-a", &p.parser_args("a")),
        p.spawn("parser-b", &p.parser_args("b")),
        p.spawn("aggregator", &p.aggregator_args("agg")),
        p.spawn("db-client", &["db-client", "--from-totals"]),
    ];
    let publish = |files: &[String]| {
        let mut args = vec!["producer", "--unit-bytes", "1000000", "publish"];
        args.extend(files.iter().map(String::as_str));
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // Bounded: an announcement that cannot reach two in-sync replicas must fail the test, not
    // hang it.
    let announce = |args: Vec<String>| {
        let p = &p;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = p.output(&args, &[], Duration::from_secs(120)).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    announce(publish(&before)).await;

    // Mid-stream, a broker (a different one from run to run) dies.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = 1 + std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 3;
    eprintln!("killing broker {victim}");
    let kill = format!("kafka-{victim}");
    tokio::task::spawn_blocking(move || support::services(&["kill", &kill]))
        .await
        .unwrap();

    // With two of three, files announced now are counted too.
    announce(publish(&during)).await;
    p.wait_ingested(8, TIMEOUT).await;

    // The broker comes back; more files, all counted.
    tokio::task::spawn_blocking(|| support::services(&["up", "--brokers", "3"]))
        .await
        .unwrap();
    announce(publish(&after)).await;
    p.wait_ingested(10, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "a broker killed and brought back")
        .await;
    let summed = p.summed_units();
    assert!(summed.values().all(|&n| n == 1), "units redone: {summed:?}");

    // No stage exited or restarted itself.
    for stage in &mut stages {
        assert!(stage.child.try_wait().unwrap().is_none(), "a stage exited");
        let log = stage.log_text();
        assert!(
            !log.contains("restarting this process in place"),
            "a stage restarted:\n{log}"
        );
    }
    drop(stages);
    tokio::task::spawn_blocking(|| support::services(&["down", "--brokers", "3"]))
        .await
        .unwrap();
}
