//! Network faults between the stages and Kafka: every stage of one pipeline (watch, two
//! parsers, an aggregator, a `--from-totals` db-client) talks to the broker only through a
//! fault-injecting proxy (`tally_testkit::proxy`), on a broker listener that advertises the
//! proxy's address (`scripts/services`: `TALLY_KAFKA_PROXY_LISTEN`), so other tests on the
//! broker are not touched. Connections are cut at random moments, blackholed for longer than
//! the group session and the transaction timeout, and delayed; after each fault a new file must be in the totals within a
//! bound, and at the end every file is exact and every unit summed once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tally_testkit::proxy::FaultProxy;

use crate::support::{clock_rng, Pipeline};

/// Group sessions of the stages here (librdkafka's default is 45 s): a blackhole longer than
/// this costs every member its membership.
const SESSION_MS: &str = "10000";
/// The stages' transaction timeout (60 s by default): shorter than the blackhole.
const TRANSACTION_MS: u64 = 10_000;
/// A stage must have resumed by itself within this after a fault ends (the watchdog's limit is
/// 120 s, and a transaction cut in flight may wait for its 60 s timeout).
const RESUME_WITHIN: Duration = Duration::from_secs(150);

/// The arguments of a stage, with the short session (for `producer …`, before its
/// subcommand: the Kafka options are the producer's).
fn with_session(mut args: Vec<String>) -> Vec<String> {
    let at = if args[0] == "producer" { 1 } else { args.len() };
    args.splice(
        at..at,
        ["-X".into(), format!("session.timeout.ms={SESSION_MS}")],
    );
    args
}

/// Writes a new file of `seed` and about `size` bytes, counting it in `expected`.
async fn add(
    p: &Pipeline,
    expected: &mut HashMap<i64, i128>,
    files: &mut i64,
    seed: u64,
    size: u64,
) {
    let (_, more) = p.generate(1, size, 2_000, seed).await;
    for (consumer, amount) in more {
        *expected.entry(consumer).or_default() += amount;
    }
    *files += 1;
}

/// Writes a new file of `seed` and waits until it is in the totals; how long that took.
async fn lands(
    p: &Pipeline,
    expected: &mut HashMap<i64, i128>,
    files: &mut i64,
    seed: u64,
    after: &str,
) -> Duration {
    let started = Instant::now();
    add(p, expected, files, seed, 300_000).await;
    p.wait_ingested(*files, RESUME_WITHIN).await;
    tally_testkit::eventually(RESUME_WITHIN, after, || async {
        let totals = p.totals().await;
        let wrong = expected
            .iter()
            .filter(|(c, v)| totals.get(c) != Some(v))
            .count();
        tally_testkit::holds(wrong == 0, || {
            format!("{after}: {wrong} consumers not exact yet")
        })
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_blackholed_and_slow_connections_to_kafka_lose_nothing_and_count_once() {
    let listen = std::env::var("TALLY_KAFKA_PROXY_LISTEN").expect(
        "TALLY_KAFKA_PROXY_LISTEN (scripts/services env; `down` then `up` adds the listener)",
    );
    let upstream =
        std::env::var("TALLY_KAFKA_PROXIED_UPSTREAM").expect("TALLY_KAFKA_PROXIED_UPSTREAM");
    let proxy = FaultProxy::start(&listen, &upstream).await.unwrap();
    let mut p = Pipeline::on_kafka("network", &listen).await;
    // Transactions that the broker times out within the blackhole below: their stages must
    // notice and redo them (a stuck commit replaced its producer; an aborted one is redone).
    p.envs.push((
        "TALLY_TRANSACTION_TIMEOUT_MS".into(),
        TRANSACTION_MS.to_string(),
    ));
    let mut rng = clock_rng("network");
    let (_, mut expected) = p.generate(4, 4_000_000, 2_000, 301).await;
    let mut files = 4i64;
    let watch = with_session(p.watch_args(&["--settle-ms", "100"]));
    let stages = [
        ("watch", watch),
        ("parser-a", with_session(p.parser_args("a"))),
        ("parser-b", with_session(p.parser_args("b"))),
        ("aggregator", with_session(p.aggregator_args("g"))),
        (
            "db-client",
            with_session(vec!["db-client".into(), "--from-totals".into()]),
        ),
    ];
    let _stages: Vec<_> = stages
        .iter()
        .map(|(name, args)| p.spawn(name, args))
        .collect();
    let mut took = Vec::new();

    // Cuts at random moments, while files keep arriving and are parsed and summed.
    let until = Instant::now() + Duration::from_secs(20);
    let mut cuts = 0;
    let mut seed = 400;
    while Instant::now() < until {
        seed += 1;
        add(&p, &mut expected, &mut files, seed, 2_000_000).await;
        tokio::time::sleep(Duration::from_millis(100 + rng() % 2000)).await;
        proxy.cut();
        cuts += 1;
    }
    took.push((
        "cuts",
        lands(&p, &mut expected, &mut files, 302, "after cuts").await,
    ));

    // Slow: every chunk waits, so transactions take long; files arrive.
    proxy.delay(Duration::from_millis(150));
    took.push((
        "delay",
        lands(&p, &mut expected, &mut files, 305, "while delayed").await,
    ));
    add(&p, &mut expected, &mut files, 303, 6_000_000).await;
    add(&p, &mut expected, &mut files, 313, 6_000_000).await;
    // A blackhole twice as long as the session and the transaction timeout while those are in
    // flight: members lose the group, the broker aborts open transactions.
    tokio::time::sleep(Duration::from_millis(500 + rng() % 1500)).await;
    proxy.blackhole(true);
    let blackhole = SESSION_MS.parse::<u64>().unwrap().max(TRANSACTION_MS) * 2;
    tokio::time::sleep(Duration::from_millis(blackhole)).await;
    proxy.blackhole(false);
    took.push((
        "blackhole",
        lands(
            &p,
            &mut expected,
            &mut files,
            304,
            "after a blackhole, delayed",
        )
        .await,
    ));
    proxy.delay(Duration::ZERO);
    took.push((
        "healed",
        lands(&p, &mut expected, &mut files, 306, "healed").await,
    ));

    p.assert_totals(&expected, "after every fault").await;
    let summed = p.summed_units();
    assert!(
        summed.values().all(|n| *n == 1),
        "a unit summed twice: {summed:?}"
    );
    eprintln!("network faults: {cuts} cuts; a new file in the totals after each: {took:?}");
}
