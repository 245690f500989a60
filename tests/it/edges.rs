//! Exactly once at the edges an operator meets: a name reused before parsing; notifications
//! that name what no parser may read (a FIFO, a range outside the file, ids with control
//! characters or of absurd length), each dead-lettered with a reason, nothing summed from bytes
//! that are not the announced file's, and no partition wedged; sums deleted (retention) before
//! the db-client applied them, which stops it until an operator accepts the loss.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tally_model::messages::{DeadLetter, WorkUnit};

use crate::support::{accept_gap_flags, Pipeline, Stage};

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

#[tokio::test(flavor = "multi_thread")]
async fn records_deleted_before_they_were_applied_stop_the_db_client() {
    let mut p = Pipeline::new("gap").await;
    let (first, mut expected) = p.generate(1, 300_000, 500, 31).await;
    let (lost, _) = p.generate(1, 300_000, 500, 32).await;
    let (last, expected_last) = p.generate(1, 300_000, 500, 33).await;
    let expected_first = expected.clone();
    for (k, v) in expected_last {
        *expected.entry(k).or_default() += v;
    }
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let mut db = p.spawn("db-client", &["db-client"]);
    p.publish("100000", &first).await;
    p.wait_ingested(1, TIMEOUT).await;
    assert!(db.terminate(Duration::from_secs(20)), "db-client stops");

    // While the db-client is down, the second file's sums are deleted (as retention would)...
    p.publish("100000", &lost).await;
    p.wait_files_consumed(TIMEOUT).await;
    let admin: AdminClient<DefaultClientContext> =
        tally_core::kafka::base_config(&p.kafka).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for partition in 0..tally_core::kafka::SUMS_PARTITIONS {
        tpl.add_partition_offset(&p.topics.sums, partition, Offset::End)
            .unwrap();
    }
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .unwrap();
    // ...and a third file arrives after them.
    p.publish("100000", &last).await;
    p.wait_files_consumed(TIMEOUT).await;
    // `tally status` names the halted partitions and exits 1.
    let out = p
        .output(&["status", "--json"], &[], Duration::from_secs(60))
        .await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let halted = report["halted"].as_array().unwrap();
    assert!(!halted.is_empty(), "{report:#}");
    assert!(halted.iter().all(|h| h["topic"] == p.topics.sums.as_str()
        && h["next_offset"].as_i64() < h["log_start"].as_i64()));

    // The db-client refuses to write past the hole, says so, and exits non-zero; nothing of
    // the third file is in the totals. Accepting each reported gap (only that one) lets it on.
    let mut accepted: Vec<String> = Vec::new();
    let mut stopped = 0;
    loop {
        let mut args = vec!["db-client".to_owned()];
        for gap in &accepted {
            args.extend(["--accept-gap".to_owned(), gap.clone()]);
        }
        let mut db = p.spawn("db-client", &args);
        let Some(status) = db.exit_within(Duration::from_secs(20)).await else {
            break; // running past every gap
        };
        assert!(!status.success(), "a gap is an error exit");
        let log = db.log_text();
        assert!(log.contains("NOT in the totals"), "{log}");
        if stopped == 0 {
            assert_eq!(p.files_ingested().await, 1, "nothing written past the gap");
            p.assert_totals(&expected_first, "a gap (nothing past it)")
                .await;
        }
        let new: Vec<String> = accept_gap_flags(&log)
            .into_iter()
            .filter(|gap| !accepted.contains(gap))
            .collect();
        assert!(!new.is_empty(), "no new gap named: {log}");
        accepted.extend(new);
        stopped += 1;
        assert!(stopped <= 6, "more gaps than partitions: {accepted:?}");
    }
    assert!(stopped >= 1, "the gap went unnoticed");
    p.wait_ingested(2, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "accepting the gaps").await;
    let out = p
        .output(&["status", "--json"], &[], Duration::from_secs(60))
        .await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["halted"], serde_json::json!([]), "{report:#}");
    assert_eq!(out.status.code(), Some(0), "{report:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn db_clients_under_rebalances_apply_each_record_once() {
    let mut p = Pipeline::new("rebalance").await;
    let (files, expected) = p.generate(16, 200_000, 2_000, 41).await;
    let _parser = p.spawn("parser", &p.parser_args("a"));
    // Three db-clients without instance ids: every SIGTERM is a leave, hence a rebalance of
    // the others, often inside their batch collection window. (Without the in-batch dedupe this
    // failed about one run in three; db-client/tests/it/batch.rs shows the rule itself.)
    let db_args = ["db-client", "--batch-wait-ms", "500"];
    let mut dbs: Vec<Stage> = (0..3)
        .map(|i| p.spawn(&format!("db-client-{i}"), &db_args))
        .collect();
    for (round, file) in files.iter().enumerate() {
        p.tally(&["producer", "--unit-bytes", "65536", "publish", file])
            .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let victim = round % dbs.len();
        dbs[victim].terminate(Duration::from_secs(20));
        dbs[victim] = p.spawn(&format!("db-client-{victim}"), &db_args);
    }
    p.wait_ingested(files.len() as i64, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "db-client rebalances").await;
    let overcounted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ingested_units WHERE partitions_seen > partitions_total",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert_eq!(overcounted, 0, "an end marker applied twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_in_place_is_announced_once_it_settled() {
    use std::io::Write;
    let mut p = Pipeline::new("settle").await;
    let _watch = p.spawn("watch", &p.watch_args(&["--settle-ms", "1500"]));
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    // No rename, no lock: the writer appends a line every 300 ms for three seconds.
    let mut file = std::fs::File::create(p.data.join("inplace.txt")).unwrap();
    for _ in 0..10 {
        file.write_all(b"9 1\n").unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(file);
    p.wait_ingested(1, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        p.totals().await,
        HashMap::from([(9, 10)]),
        "all ten lines, once"
    );
    let dead = p.read_topic(&p.topics.dead_letter);
    assert!(
        dead.is_empty(),
        "nothing rejected: {} dead letters",
        dead.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_with_rejected_units_are_kept_and_listed_not_deleted() {
    let mut p = Pipeline::new("lifecycle").await;
    let _watch = p.spawn(
        "watch",
        &p.watch_args(&["--settle-ms", "0", "--after-done", "delete"]),
    );
    // Under --bad-lines=fail a unit with a bad line is rejected: not in the totals.
    let mut parser_args = p.parser_args("a");
    parser_args.extend(["--bad-lines".to_owned(), "fail".to_owned()]);
    let _parser = p.spawn("parser", &parser_args);
    let _db = p.spawn("db-client", &["db-client"]);
    for (name, body) in [("good.txt", "1 1\n"), ("bad.txt", "2 2\nnot a line\n")] {
        let tmp = p.data.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, p.data.join(name)).unwrap();
    }
    let listed = p.data.join(".tally-rejected");
    let deadline = Instant::now() + TIMEOUT;
    while p.data.join("good.txt").exists()
        || !std::fs::read_to_string(&listed).is_ok_and(|l| l.contains("bad.txt"))
    {
        assert!(
            Instant::now() < deadline,
            "good.txt deleted: {}, rejected list: {:?}",
            !p.data.join("good.txt").exists(),
            std::fs::read_to_string(&listed)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        p.data.join("bad.txt").exists(),
        "a file that is not in the totals must not be deleted"
    );
    let line = std::fs::read_to_string(&listed).unwrap();
    // Rejected bytes of the file's bytes: all 15 of them.
    assert!(line.contains(" 15/15 "), "{line}");
    // Done (parsed, in Kafka) comes before "in the totals": wait for the db-client.
    p.wait_ingested(1, TIMEOUT).await;
    assert_eq!(p.totals().await, HashMap::from([(1, 1)]));
}

#[tokio::test(flavor = "multi_thread")]
async fn tally_init_keeps_records_longer_than_the_broker_default() {
    use rdkafka::admin::ResourceSpecifier;
    let p = Pipeline::new("retention").await;
    let admin: AdminClient<DefaultClientContext> =
        tally_core::kafka::base_config(&p.kafka).create().unwrap();
    let topics = [
        &p.topics.files,
        &p.topics.sums,
        &p.topics.totals,
        &p.topics.dead_letter,
    ];
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let described = admin
        .describe_configs(&specifiers, &AdminOptions::new())
        .await
        .unwrap();
    let thirty_days = (30u64 * 24 * 3600 * 1000).to_string();
    for (topic, resource) in topics.iter().zip(described) {
        let resource = resource.unwrap();
        let retention = resource
            .get("retention.ms")
            .and_then(|e| e.value.clone())
            .unwrap_or_default();
        assert_eq!(retention, thirty_days, "{topic}");
    }
    // The done topic: compacted, with segments that roll hourly so compaction can run.
    let done = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(p.topics.done.as_str())],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let value = |key: &str| {
        done.get(key)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("cleanup.policy"), "compact");
    assert_eq!(value("segment.ms"), "3600000");
}
