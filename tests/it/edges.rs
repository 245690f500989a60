//! Exactly once at the edges an operator meets: a name reused before parsing, and
//! notifications that name what no parser may read (a FIFO, a range outside the file, ids with
//! control characters or of absurd length). Each is dead-lettered with a reason, nothing is
//! summed from bytes that are not the announced file's, and no partition wedges.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tally_core::messages::{DeadLetter, WorkUnit};

use crate::support::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Dead letters of `p` until `done` says they are complete; panics after `TIMEOUT`.
async fn dead_letters_until(p: &Pipeline, done: impl Fn(&[DeadLetter]) -> bool) -> Vec<DeadLetter> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let dead: Vec<DeadLetter> = p
            .read_topic(&p.topics.dead_letter)
            .iter()
            .map(|(_, v)| serde_json::from_slice(v).unwrap())
            .collect();
        if done(&dead) {
            return dead;
        }
        assert!(Instant::now() < deadline, "dead letters so far: {dead:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_reused_before_parsing_counts_only_the_new_file() {
    let mut p = Pipeline::new("reused").await;
    // A is announced while no parser runs...
    let path = p.data.join("usage.txt");
    std::fs::write(&path, "1 100\n2 200\n").unwrap();
    p.tally(&["producer", "publish", path.to_str().unwrap()])
        .await;
    // ...then B, of the same size, is renamed over A's name and announced too.
    let tmp = p.data.join(".b.tmp");
    std::fs::write(&tmp, "3 300\n4 400\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    p.tally(&["producer", "publish", path.to_str().unwrap()])
        .await;

    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(1, TIMEOUT).await;
    let dead = dead_letters_until(&p, |d| !d.is_empty()).await;
    match &dead[..] {
        [DeadLetter::RejectedUnit { reason, .. }] => {
            assert!(reason.contains("not the announced file"), "{reason}")
        }
        other => panic!("A's unit must be rejected, once: {other:?}"),
    }
    p.wait_files_consumed(TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        p.totals().await,
        HashMap::from([(3, 300), (4, 400)]),
        "B counted once, nothing read as A"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_notifications_are_dead_lettered_and_wedge_nothing() {
    let mut p = Pipeline::new("hostile").await;
    // A FIFO inside the data root: opening it for reading would block until a writer came.
    let fifo = p.data.join("fifo.txt");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let real = p.data.join("real.txt");
    std::fs::write(&real, "5 50\n").unwrap();
    let meta = std::fs::metadata(&real).unwrap();
    let real_id = tally_core::identity::file_id(&meta);
    let unit = |file_id: &str, unit_id: &str, path: &std::path::Path, start, end, bytes| WorkUnit {
        file_id: file_id.into(),
        unit_id: unit_id.into(),
        path: path.to_str().unwrap().into(),
        file_bytes: bytes,
        start,
        end,
        index: 0,
        units: 1,
    };
    let long = "x".repeat(200_000);
    let hostile = [
        unit("fifo", "fifo/0", &fifo, 0, 0, 0),
        unit("nul\0id", "nul\0id/0", &real, 0, 5, 5),
        unit(&long, &format!("{long}/0"), &real, 0, 5, 5),
        unit(&real_id, &format!("{real_id}/0"), &real, 0, 50, 5),
        unit(&real_id, &format!("{real_id}/0"), &real, 4, 2, 5),
    ];
    let records: Vec<(String, String)> = hostile
        .iter()
        .enumerate()
        .map(|(i, u)| (format!("hostile-{i}"), serde_json::to_string(u).unwrap()))
        .collect();
    p.announce_raw(&records);
    // Some of them land in every files partition's way: a real file announced after them.
    let after = p.data.join("after.txt");
    std::fs::write(&after, "6 60\n").unwrap();
    p.tally(&[
        "producer",
        "publish",
        after.to_str().unwrap(),
        real.to_str().unwrap(),
    ])
    .await;

    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(2, TIMEOUT).await;
    let dead = dead_letters_until(&p, |d| d.len() >= hostile.len()).await;
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| match d {
            DeadLetter::RejectedUnit { reason, .. }
            | DeadLetter::BadNotification { reason, .. } => reason.as_str(),
            DeadLetter::BadLine { reason, .. } => reason.as_str(),
        })
        .collect();
    for expected in [
        "is a FIFO",
        "contains a control character",
        "bytes long",
        "byte range 0..50 is not inside",
        "byte range 4..2 is not inside",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no dead letter says `{expected}`: {reasons:?}"
        );
    }
    assert_eq!(
        dead.len(),
        hostile.len(),
        "each dead-lettered once: {reasons:?}"
    );
    // No dead letter echoes a 200 kB id.
    assert!(p
        .read_topic(&p.topics.dead_letter)
        .iter()
        .all(|(_, v)| v.len() < 10_000));
    p.wait_files_consumed(TIMEOUT).await;
    assert_eq!(p.totals().await, HashMap::from([(5, 50), (6, 60)]));
}
