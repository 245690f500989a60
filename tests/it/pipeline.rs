//! The pipeline end to end, as separate processes: producer → parsers → db-client → PostgreSQL;
//! hostile notifications (a FIFO, ranges outside the file, absurd ids) dead-lettered with a
//! reason, wedging nothing.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use tally_model::messages::{DeadLetter, WorkUnit};

use crate::support::{read_expected, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(180);

/// A hand-written file with bad lines, and what it contributes.
const MESSY: &str = "5 10\r\nbad\n6 -1\n\n7 1 2\n5 5\n9223372036854775807 1\n 8 1\n7 20";
fn messy_expected() -> HashMap<i64, i128> {
    HashMap::from([(5, 15), (7, 20), (i64::MAX, 1)])
}
const MESSY_BAD_LINES: i64 = 5;

fn add(into: &mut HashMap<i64, i128>, from: &HashMap<i64, i128>) {
    for (k, v) in from {
        *into.entry(*k).or_default() += v;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_exact_totals_with_duplicates_and_poison() {
    let mut p = Pipeline::new("e2e").await;
    let data = p.data.to_str().unwrap().to_owned();
    let expect = p.dir.join("expected.txt");
    // Different sizes; with 1 MB units the largest file is cut into five units.
    for (seed, files, size) in [("1", "2", "4500000"), ("2", "1", "200000")] {
        p.tally(&[
            "producer",
            "--unit-bytes",
            "1000000",
            "generate",
            "--dir",
            &data,
            "--files",
            files,
            "--size",
            size,
            "--consumers",
            "3000",
            "--distribution",
            "zipf",
            "--seed",
            seed,
            "--prefix",
            &format!("gen{seed}"),
            "--expect",
            expect.to_str().unwrap(),
            "--no-announce",
        ])
        .await;
        std::fs::rename(&expect, p.dir.join(format!("expected-{seed}.txt"))).unwrap();
    }
    let mut expected = read_expected(&p.dir.join("expected-1.txt"));
    add(&mut expected, &read_expected(&p.dir.join("expected-2.txt")));
    std::fs::write(p.data.join("messy.txt"), MESSY).unwrap();
    add(&mut expected, &messy_expected());
    // An empty file and a file still being written (lock file beside it): the watcher takes the
    // first, and leaves the second alone until its lock goes.
    std::fs::write(p.data.join("empty.txt"), "").unwrap();
    std::fs::write(p.data.join("late.txt"), "42 1000\n").unwrap();
    std::fs::write(p.data.join("late.txt.lock"), "").unwrap();
    std::fs::write(p.data.join("ignored.part"), "1 1\n").unwrap();

    let mut parser_a = p.spawn("parser-a", &p.parser_args("a"));
    let mut parser_b = p.spawn("parser-b", &p.parser_args("b"));
    let mut db = p.spawn("db-client", &["db-client"]);
    let mut watch = p.spawn(
        "watch",
        &[
            "producer",
            "--unit-bytes",
            "1000000",
            "watch",
            "--dir",
            &data,
            "--rescan-interval-ms",
            "200",
        ],
    );

    // gen1 ×2, gen2, messy, empty.
    p.wait_ingested(5, TIMEOUT).await;
    std::fs::remove_file(p.data.join("late.txt.lock")).unwrap();
    expected.insert(42, 1000);
    p.wait_ingested(6, TIMEOUT).await;
    assert_eq!(p.totals().await, expected, "totals after the first pass");

    // The ledger knows every file, its units and its bad lines.
    let (files, bad): (i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(bad_lines)::bigint FROM ingested_files WHERE complete",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert_eq!((files, bad), (6, MESSY_BAD_LINES));
    let units: i64 = sqlx::query_scalar("SELECT max(units_ingested)::bigint FROM ingested_files")
        .fetch_one(&p.pool)
        .await
        .unwrap();
    assert_eq!(units, 5, "the 4.5 MB file is five 1 MB units");

    // Duplicates: publish every file again, and restart the watcher with its state gone.
    assert!(
        watch.terminate(Duration::from_secs(20)),
        "watch exits cleanly on SIGTERM"
    );
    let mut all: Vec<String> = std::fs::read_dir(&p.data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.extension().is_some_and(|x| x == "txt"))
        .map(|path| path.to_str().unwrap().to_owned())
        .collect();
    all.sort();
    let mut publish = vec!["producer", "--unit-bytes", "1000000", "publish"];
    publish.extend(all.iter().map(String::as_str));
    p.tally(&publish).await;
    std::fs::remove_file(p.data.join(".tally-producer")).unwrap();
    p.tally(&[
        "producer",
        "--unit-bytes",
        "1000000",
        "watch",
        "--dir",
        &data,
        "--once",
    ])
    .await;

    // Poison: a notification that is not JSON, and a unit outside the data root.
    let outside = p.dir.join("outside.txt");
    std::fs::write(&outside, "1 1000000\n").unwrap();
    let stranger = WorkUnit {
        stream: "stranger".into(),
        file_id: "stranger".into(),
        unit_id: "stranger/0-10".into(),
        path: outside.to_str().unwrap().into(),
        file_bytes: 10,
        fingerprint: 0,
        start: 0,
        end: 10,
        file_time: None,
    };
    p.announce_raw(&[
        ("x".to_owned(), "{not json".to_owned()),
        (
            "stranger/0".to_owned(),
            serde_json::to_string(&stranger).unwrap(),
        ),
    ]);
    // ...and a new file after the poison: the pipeline must go on.
    std::fs::write(p.data.join("after.txt"), "77 7\n").unwrap();
    p.tally(&[
        "producer",
        "publish",
        p.data.join("after.txt").to_str().unwrap(),
    ])
    .await;
    expected.insert(77, 7);
    p.wait_ingested(7, TIMEOUT).await;
    p.wait_files_consumed(TIMEOUT).await;

    // Give duplicates every chance to be (wrongly) counted before looking.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let dead = p.read_topic(&p.topics.dead_letter);
        let kinds: Vec<DeadLetter> = dead
            .iter()
            .map(|(_, v)| serde_json::from_slice(v).unwrap())
            .collect();
        let bad_lines = kinds
            .iter()
            .filter(|d| matches!(d, DeadLetter::BadLine { .. }))
            .count();
        let bad_notes = kinds
            .iter()
            .filter(|d| matches!(d, DeadLetter::BadNotification { .. }))
            .count();
        let rejected = kinds
            .iter()
            .filter(|d| matches!(d, DeadLetter::RejectedUnit { reason, .. } if reason.contains("outside the data root")))
            .count();
        if bad_notes == 1 && rejected == 1 {
            assert_eq!(
                bad_lines as i64, MESSY_BAD_LINES,
                "every bad line dead-lettered once"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "poison not dead-lettered: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every duplicate was consumed by the parsers; let the db-client catch up with anything
    // they (wrongly) produced before looking.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        p.totals().await,
        expected,
        "totals after duplicates and poison"
    );

    // No unit was ever completed twice.
    let summed = p.summed_units();
    assert!(
        summed.values().all(|&n| n == 1),
        "a unit was summed twice: {summed:?}"
    );
    // gen1: 2 files × 5 units; gen2, messy, empty, late, after: one unit each.
    assert_eq!(summed.len(), 10 + 5, "units summed");

    // `tally verify` agrees, and the stages stop cleanly on SIGTERM.
    let expected_file = p.dir.join("expected-all.txt");
    let mut lines: Vec<_> = expected.iter().map(|(k, v)| format!("{k} {v}")).collect();
    lines.sort();
    std::fs::write(&expected_file, lines.join("\n") + "\n").unwrap();
    let out = p
        .tally(&["verify", "--expect", expected_file.to_str().unwrap()])
        .await;
    assert!(out.contains("match"), "{out}");
    assert!(
        db.terminate(Duration::from_secs(20)),
        "db-client exits 0 on SIGTERM: {}",
        db.log_text()
    );
    for parser in [&mut parser_a, &mut parser_b] {
        assert!(
            parser.terminate(Duration::from_secs(30)),
            "parser exits 0 on SIGTERM: {}",
            parser.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_archived_or_deleted_only_once_done() {
    let mut p = Pipeline::new("life").await;
    let archive = p.dir.join("archive");
    std::fs::write(p.data.join("a.txt"), "1 10\n2 20\n").unwrap();
    std::fs::write(p.data.join("b.txt"), "1 1\n").unwrap();
    // Still being written: announced only when its lock goes, archived only after that.
    std::fs::write(p.data.join("c.txt"), "3 3\n").unwrap();
    std::fs::write(p.data.join("c.txt.lock"), "").unwrap();
    let after = format!("done=archive:{}", archive.display());
    let _watch = p.spawn(
        "watch",
        &p.watch_args(&["--rescan-interval-ms", "200", "--after", &after]),
    );
    // Nothing is done before a parser runs: nothing may move.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(p.data.join("a.txt").exists() && !archive.join("a.txt").exists());
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(2, TIMEOUT).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !(archive.join("a.txt").exists() && archive.join("b.txt").exists()) {
        assert!(std::time::Instant::now() < deadline, "files not archived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!p.data.join("a.txt").exists() && !p.data.join("b.txt").exists());
    assert!(p.data.join("c.txt").exists(), "a locked file is left alone");
    std::fs::remove_file(p.data.join("c.txt.lock")).unwrap();
    p.wait_ingested(3, TIMEOUT).await;
    while !archive.join("c.txt").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "c.txt not archived after its lock went"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(p.totals().await, HashMap::from([(1, 11), (2, 20), (3, 3)]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_appended_after_announcement_counts_only_its_new_lines() {
    let mut p = Pipeline::new("changed").await;
    let _watch = p.spawn("watch", &p.watch_args(&[]));
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    let path = p.data.join("a.txt");
    std::fs::write(&path, "1 10\n").unwrap();
    p.wait_ingested(1, TIMEOUT).await;

    // The writer appends after the file was announced and summed: the same file (device,
    // inode, birth time), a new version, announced again; only the new line is counted.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"1 5\n")
        .unwrap();
    p.wait_ingested(2, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.totals().await, HashMap::from([(1, 15)]));

    // A new file under the same name (quite likely on a recycled inode number) is new, even
    // with the same content as the old one: counted whole.
    std::fs::remove_file(&path).unwrap();
    let tmp = p.data.join(".b.tmp");
    std::fs::write(&tmp, "1 10\n1 5\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    p.wait_ingested(3, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.totals().await, HashMap::from([(1, 30)]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_distinct_consumers_are_exact_through_an_aggregator() {
    let mut p = Pipeline::new("million").await;
    // 1,200,000 distinct ids, most seen once, every tenth twice (in another file), with
    // amounts up to 10^12: sums merged across units and files, totals exact.
    let mut expected: HashMap<i64, i128> = HashMap::new();
    for (f, step) in [(0u64, 1usize), (1, 10)] {
        let mut text = String::with_capacity(30 << 20);
        for id in (0..1_200_000i64).step_by(step) {
            let amount = (id * 7_919 + f as i64) % 1_000_000_000_000;
            text.push_str(&format!("{} {amount}\n", 5_000_000_000 + id));
            *expected.entry(5_000_000_000 + id).or_default() += i128::from(amount);
        }
        let tmp = p.data.join(format!(".m{f}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, p.data.join(format!("m{f}.txt"))).unwrap();
    }
    // 4 MB units: a file's units are merged in its transactions.
    let data = p.data.to_str().unwrap().to_owned();
    let watch = [
        "producer",
        "--unit-bytes",
        "4000000",
        "watch",
        "--dir",
        &data,
        "--settle-ms",
        "0",
    ];
    let _watch = p.spawn("watch", &watch);
    let _a = p.spawn("parser-a", &p.parser_args("a"));
    let _b = p.spawn("parser-b", &p.parser_args("b"));
    // Through an aggregator whose memory budget (64 MiB: 32 MiB for the process, a 16 MiB
    // table, 262,144 keys) holds less than a quarter of the consumers: its merged sums leave early, in parts, and still add
    // up, and its peak resident set stays within the budget.
    let mut aggregator = p.aggregator_args("agg");
    aggregator.extend(["--memory-max".to_owned(), "64MiB".to_owned()]);
    let agg = p.spawn("aggregator", &aggregator);
    let _db = p.spawn("db-client", &["db-client", "--from-totals"]);
    p.wait_ingested(2, TIMEOUT).await;
    assert_eq!(expected.len(), 1_200_000);
    p.assert_totals(&expected, "1.2 million consumers").await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agg.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("aggregator peak RSS: {peak_kib} KiB");
    assert!(
        peak_kib < 64 << 10,
        "the aggregator peaked at {peak_kib} KiB, over its 64 MiB"
    );
}

/// Other partition counts than the defaults (`tally init --files-partitions 3
/// --sums-partitions 4`): every stage follows the topics' counts, the ledger counts a unit's
/// end markers over 4 partitions, and the totals are exact through an aggregator.
#[tokio::test(flavor = "multi_thread")]
async fn other_partition_counts_are_followed_by_every_stage() {
    let mut p = Pipeline::with_init(
        "layout",
        &["--files-partitions", "3", "--sums-partitions", "4"],
    )
    .await;
    let (files, expected) = p.generate(5, 400_000, 3_000, 61).await;
    let _a = p.spawn("parser-a", &p.parser_args("a"));
    let _b = p.spawn("parser-b", &p.parser_args("b"));
    let _agg = p.spawn("aggregator", &p.aggregator_args("agg"));
    let _db = p.spawn("db-client", &["db-client", "--from-totals"]);
    p.publish("100000", &files).await;
    p.wait_ingested(5, TIMEOUT).await;
    p.assert_totals(&expected, "3 files and 4 sums partitions")
        .await;
    let partitions: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT partitions_total FROM ingested_units")
            .fetch_all(&p.pool)
            .await
            .unwrap();
    assert_eq!(partitions, vec![4]);
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
    let real_id = tally_model::identity::file_id(&meta);
    let unit = |file_id: &str, path: &std::path::Path, start, end, bytes| WorkUnit {
        stream: file_id.into(),
        file_id: file_id.into(),
        unit_id: WorkUnit::unit_id(file_id, start, end),
        path: path.to_str().unwrap().into(),
        file_bytes: bytes,
        fingerprint: 0,
        start,
        end,
        file_time: None,
    };
    let long = "x".repeat(200_000);
    let hostile = [
        unit("fifo", &fifo, 0, 0, 0),
        unit("nul\0id", &real, 0, 5, 5),
        unit(&long, &real, 0, 5, 5),
        unit(&real_id, &real, 0, 50, 5),
        unit(&real_id, &real, 4, 2, 5),
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
    let dead = p
        .dead_letters_until(TIMEOUT, |d| d.len() >= hostile.len())
        .await;
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| match d {
            DeadLetter::RejectedUnit { reason, .. }
            | DeadLetter::BadNotification { reason, .. } => reason.as_str(),
            DeadLetter::BadLine { reason, .. } => reason.as_str(),
            DeadLetter::BadLinesSummary { .. } => "a summary",
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
