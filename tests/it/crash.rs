//! Crashes: parsers, aggregators and the db-client are SIGKILLed at random moments, several
//! times, and restarted; the totals (running and per period) must still equal the generator's,
//! and no finished unit may be redone (nor forwarded twice by an aggregator).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::periods;
use crate::support::{clock_rng, Pipeline, Stage};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_parsers_and_db_client_at_random_moments() {
    chaos("crash", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_parsers_aggregators_and_db_client_at_random_moments() {
    chaos("crash-agg", true).await;
}

/// Announces 16 files one per round while a random stage is SIGKILLed each round; with
/// `aggregators`, two aggregators run between the parsers and a `--from-totals` db-client.
async fn chaos(name: &str, aggregators: bool) {
    let mut p = Pipeline::new(name).await;
    // 16 files of 1.2 MB in 256 KiB units: 80 units, two per transaction, so kills land inside
    // transactions, between them, and inside database batches.
    let (files, expected) = p.generate(16, 1_200_000, 5000, 9).await;
    // File times 25 minutes apart across a month boundary: the hourly period totals must be
    // as exact as the running totals.
    let timed: Vec<(String, i64)> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.clone(), periods::OCT_31_22H + i as i64 * 1500))
        .collect();
    for (file, time) in &timed {
        periods::set_mtime(std::path::Path::new(file), *time);
    }

    let mut roles = vec![
        ("parser-a", p.parser_args("a")),
        ("parser-b", p.parser_args("b")),
    ];
    if aggregators {
        roles.push(("aggregator-a", p.aggregator_args("agg-a")));
        roles.push(("aggregator-b", p.aggregator_args("agg-b")));
        roles.push((
            "db-client",
            vec!["db-client".to_owned(), "--from-totals".to_owned()],
        ));
    } else {
        roles.push(("db-client", vec!["db-client".to_owned()]));
    }
    let mut stages: Vec<(String, Vec<String>, Stage)> = Vec::new();
    for (name, args) in roles {
        let stage = p.spawn(name, &args);
        stages.push((name.to_owned(), args, stage));
    }

    let mut next = clock_rng("crash test");
    // Files keep arriving while the stages crash: one file announced per round.
    let mut kills = 0;
    let chaos_until = Instant::now() + Duration::from_secs(60);
    let mut pending = files.iter();
    loop {
        let file = pending.next();
        if file.is_none() && (Instant::now() >= chaos_until || p.files_ingested().await >= 16) {
            break;
        }
        if let Some(file) = file {
            p.tally(&["producer", "--unit-bytes", "262144", "publish", file])
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200 + next() % 1200)).await;
        let victim = (next() % stages.len() as u64) as usize;
        let (name, args, stage) = &mut stages[victim];
        stage.kill9();
        kills += 1;
        // Sometimes come back at once (same transactional id: fences the dead one), sometimes
        // after a pause (the group rebalances to the survivor first).
        if matches!(next() % 2, 0) {
            tokio::time::sleep(Duration::from_millis(next() % 3000)).await;
        }
        *stage = p.spawn(name, args);
    }
    eprintln!("{kills} kills");
    assert!(
        kills >= 16,
        "one kill per announced file at least (only {kills})"
    );

    p.wait_ingested(16, Duration::from_secs(240)).await;
    p.assert_totals(&expected, &format!("{kills} kills")).await;
    periods::assert_periods(
        &p,
        &periods::expected_periods(&timed, 3600),
        &format!("{kills} kills"),
    )
    .await;

    // The checkpoint: no unit was committed as summed twice, so no restarted parser redid
    // finished work (it resumed from the committed offsets and the done-set).
    let summed = p.summed_units();
    assert_eq!(summed.len(), 80);
    assert!(summed.values().all(|&n| n == 1), "units redone: {summed:?}");
    if aggregators {
        // Each unit's end marker reached the totals once per partition: no aggregator
        // forwarded a batch twice, none dropped one.
        let mut forwarded: HashMap<String, usize> = HashMap::new();
        for unit in p.unit_ends_in(&p.topics.totals) {
            *forwarded.entry(unit.unit_id).or_default() += 1;
        }
        assert_eq!(forwarded, summed, "unit-end markers on the totals topic");
    }
}
