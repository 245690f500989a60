//! The pipeline on testcontainers alone: Kafka and PostgreSQL from the repository's images
//! (`scripts/images`), started by tally-testkit through testcontainers, no scripts/services.
//!
//! Run by `scripts/test-containers` (which unsets KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL and
//! runs these tests one at a time: one of them restarts the broker). `cargo test` leaves this
//! binary out (`test = false` in Cargo.toml); `cargo test --test containers` runs it.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use tally_testkit::pipeline as support;

use std::time::{Duration, Instant};

use support::{clock_rng, Pipeline, Stage};

/// The containers; fails (never skips) when the services are not containers started here.
fn on_containers() -> &'static tally_testkit::containers::Containers {
    tally_testkit::containers().expect(
        "this suite runs on testcontainers alone: unset KAFKA_BOOTSTRAP_SERVERS and \
         DATABASE_URL (scripts/test-containers does)",
    )
}

/// Parsers, an aggregator and a db-client reading its totals, as long-running stages.
fn stages(p: &mut Pipeline) -> Vec<(String, Vec<String>, Stage)> {
    let roles = [
        ("parser-a", p.parser_args("a")),
        ("parser-b", p.parser_args("b")),
        ("aggregator", p.aggregator_args("agg")),
        (
            "db-client",
            vec!["db-client".to_owned(), "--from-totals".to_owned()],
        ),
    ];
    roles
        .into_iter()
        .map(|(name, args)| {
            let stage = p.spawn(name, &args);
            (name.to_owned(), args, stage)
        })
        .collect()
}

/// No unit was committed as summed twice.
fn assert_units_once(p: &Pipeline, units: usize) {
    let summed = p.summed_units();
    assert_eq!(summed.len(), units, "units summed");
    assert!(summed.values().all(|&n| n == 1), "units redone: {summed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_to_totals_through_every_stage() {
    on_containers();
    let mut p = Pipeline::new("ct_flow").await;
    let _stages = stages(&mut p);
    let _watch = p.spawn("watch", &p.watch_args(&[]));
    // Written by the generator (temp file + rename) while the watcher runs: one unit each.
    let (_, expected) = p.generate(8, 1_000_000, 3000, 31).await;
    p.wait_ingested(8, Duration::from_secs(240)).await;
    p.assert_totals(&expected, "watch → parsers → aggregator → db-client")
        .await;
    assert_units_once(&p, 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_stages_on_containers() {
    on_containers();
    let mut p = Pipeline::new("ct_kill").await;
    // 12 files of 1 MB in 256 KiB units: 48 units, two per parser transaction.
    let (files, expected) = p.generate(12, 1_000_000, 3000, 32).await;
    let mut stages = stages(&mut p);
    let mut next = clock_rng("containers kill test");
    let mut kills = 0;
    for file in &files {
        p.tally(&["producer", "--unit-bytes", "262144", "publish", file])
            .await;
        tokio::time::sleep(Duration::from_millis(200 + next() % 1000)).await;
        let victim = (next() % stages.len() as u64) as usize;
        let (name, args, stage) = &mut stages[victim];
        stage.kill9();
        kills += 1;
        if next().is_multiple_of(2) {
            tokio::time::sleep(Duration::from_millis(next() % 2000)).await;
        }
        *stage = p.spawn(name, args);
    }
    p.wait_ingested(12, Duration::from_secs(240)).await;
    p.assert_totals(&expected, &format!("{kills} kills")).await;
    assert_units_once(&p, 48);
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_container_stop_and_start_under_load() {
    let containers = on_containers();
    let mut p = Pipeline::new("ct_restart").await;
    let (files, expected) = p.generate(10, 3_900_000, 5000, 33).await;
    let _stages = stages(&mut p);
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.publish("1000000", &files).await;

    // The broker goes away mid-stream, stays away a while, and comes back at the same address.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = Instant::now();
    tokio::task::spawn_blocking(move || containers.restart_kafka(Duration::from_secs(3)))
        .await
        .unwrap()
        .unwrap();
    eprintln!("broker back after {:?}", started.elapsed());

    p.wait_ingested(10, Duration::from_secs(300)).await;
    p.assert_totals(&expected, "a stop and start of the Kafka container")
        .await;
    // 10 files of 3.9 MB: four 1 MB units each.
    assert_units_once(&p, 40);
}
