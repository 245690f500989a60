//! Crashes: parsers and the db-client are SIGKILLed at random moments, several times, and
//! restarted; the totals must still equal the generator's, and no finished unit may be redone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tally_core::messages::{Outcome, UnitDone};

use crate::support::{read_expected, Pipeline, Stage};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_parsers_and_db_client_at_random_moments() {
    let mut p = Pipeline::new("crash").await;
    let data = p.data.to_str().unwrap().to_owned();
    let expect = p.dir.join("expected.txt");
    // 8 files × 2.5 MB in 512 KB units: 40 units, two per transaction, so kills land inside
    // transactions, between them, and inside database batches.
    p.tally(&[
        "producer",
        "--unit-bytes",
        "524288",
        "generate",
        "--dir",
        &data,
        "--files",
        "8",
        "--size",
        "2500000",
        "--consumers",
        "5000",
        "--seed",
        "9",
        "--expect",
        expect.to_str().unwrap(),
    ])
    .await;
    let expected = read_expected(&expect);

    let parser_args = |i: &str| p.parser_args(i);
    let (args_a, args_b) = (parser_args("a"), parser_args("b"));
    let mut stages: Vec<(String, Vec<String>, Stage)> = Vec::new();
    for (name, args) in [
        ("parser-a", args_a),
        ("parser-b", args_b),
        ("db-client", vec!["db-client".to_owned()]),
    ] {
        let stage = p.spawn(name, &args);
        stages.push((name.to_owned(), args, stage));
    }

    // A seed from the clock, printed so that a failure can be replayed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test seed {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut kills = 0;
    let chaos_until = Instant::now() + Duration::from_secs(40);
    while Instant::now() < chaos_until && p.files_ingested().await < 8 {
        tokio::time::sleep(Duration::from_millis(300 + next() % 1500)).await;
        let victim = (next() % stages.len() as u64) as usize;
        let (name, args, stage) = &mut stages[victim];
        stage.kill9();
        kills += 1;
        // Sometimes come back at once (same transactional id: fences the dead one), sometimes
        // after a pause (the group rebalances to the survivor first).
        if next() % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(next() % 3000)).await;
        }
        *stage = p.spawn(name, args);
    }
    eprintln!("{kills} kills");
    assert!(
        kills >= 3,
        "the chaos loop must actually kill (only {kills})"
    );

    p.wait_ingested(8, Duration::from_secs(240)).await;
    let totals = p.totals().await;
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| totals.get(k) != Some(v))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty() && totals.len() == expected.len(),
        "totals differ after {kills} kills: {wrong:?}"
    );

    // The checkpoint: no unit was committed as summed twice, so no restarted parser redid
    // finished work (it resumed from the committed offsets and the done-set).
    let mut summed: HashMap<String, usize> = HashMap::new();
    for (_, v) in p.read_topic(&p.topics.done) {
        let done: UnitDone = serde_json::from_slice(&v).unwrap();
        assert_eq!(done.outcome, Outcome::Summed);
        *summed.entry(done.unit_id).or_default() += 1;
    }
    assert_eq!(summed.len(), 40);
    assert!(summed.values().all(|&n| n == 1), "units redone: {summed:?}");
}
