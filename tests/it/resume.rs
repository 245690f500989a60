//! Where the db-client resumes: at the offsets stored with the totals, whatever Kafka's
//! committed offsets say (an operator reset them to the end), and never past a recreated
//! topic without an operator's word; records deleted before they were applied stop it until an
//! operator accepts the loss; db-clients under rebalances apply each record once.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::support::{accept_gap_flags, Pipeline, Stage};

const TIMEOUT: Duration = Duration::from_secs(120);

fn add(to: &mut HashMap<i64, i128>, from: HashMap<i64, i128>) {
    for (k, v) in from {
        *to.entry(k).or_default() += v;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_db_client_resumes_at_its_stored_offsets_and_stops_at_a_recreated_topic() {
    let mut p = Pipeline::new("resume").await;
    let (first, mut expected) = p.generate(1, 300_000, 500, 41).await;
    let (second, expected_second) = p.generate(1, 300_000, 500, 42).await;
    let (third, expected_third) = p.generate(1, 300_000, 500, 43).await;
    let mut parser = p.spawn("parser", &p.parser_args("a"));
    let mut db = p.spawn("db-client", &["db-client"]);
    p.publish("100000", &first).await;
    p.wait_ingested(1, TIMEOUT).await;
    assert!(db.terminate(Duration::from_secs(20)), "db-client stops");

    // While the db-client is down, the second file's sums arrive, and an operator moves the
    // db-client group's Kafka offsets to the end (`kafka-consumer-groups --reset-offsets
    // --to-latest`): the records of the second file are behind them.
    p.publish("100000", &second).await;
    p.wait_files_consumed(TIMEOUT).await;
    let group: BaseConsumer =
        tally_core::kafka::consumer_config(&p.kafka, &p.topics.db_client_group)
            .create()
            .unwrap();
    let mut ends = TopicPartitionList::new();
    for partition in 0..tally_core::kafka::SUMS_PARTITIONS {
        let (_, high) = group
            .fetch_watermarks(&p.topics.sums, partition, Duration::from_secs(10))
            .unwrap();
        ends.add_partition_offset(&p.topics.sums, partition, Offset::Offset(high))
            .unwrap();
    }
    group.commit(&ends, CommitMode::Sync).unwrap();
    drop(group);
    let mut db = p.spawn("db-client", &["db-client"]);
    add(&mut expected, expected_second);
    p.wait_ingested(2, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "Kafka's offsets reset to the end")
        .await;

    // The sums topic is deleted and created again (empty) under the stopped stages; a third
    // file arrives in the new topic.
    assert!(db.terminate(Duration::from_secs(20)), "db-client stops");
    assert!(parser.terminate(Duration::from_secs(20)), "parser stops");
    let admin: AdminClient<DefaultClientContext> =
        tally_core::kafka::base_config(&p.kafka).create().unwrap();
    admin
        .delete_topics(&[&p.topics.sums], &AdminOptions::new())
        .await
        .unwrap();
    tally_testkit::eventually(TIMEOUT, "the sums topic created again", || async {
        let made = p.try_tally(&["init"]).await;
        let exists = admin
            .inner()
            .fetch_metadata(Some(&p.topics.sums), Duration::from_secs(5))
            .is_ok_and(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.partitions().len() == 6 && t.error().is_none())
            });
        tally_testkit::holds(made && exists, || {
            format!("init ok: {made}, topic: {exists}")
        })
    })
    .await;
    let _parser = p.spawn("parser", &p.parser_args("b"));
    p.publish("100000", &third).await;
    p.wait_files_consumed(TIMEOUT).await;

    // The db-client does not take the new log's records for ones it already counted (their
    // offsets are below the stored ones): it stops, names the partitions, and waits for the
    // operator. Accepting reads the new log from its start.
    let mut db = p.spawn("db-client", &["db-client"]);
    let status = db
        .exit_within(Duration::from_secs(30))
        .await
        .expect("the db-client stops at a recreated topic");
    assert!(!status.success(), "a recreated topic is an error exit");
    let log = db.log_text();
    assert!(log.contains("was recreated or truncated"), "{log}");
    p.assert_totals(&expected, "a recreated topic (nothing applied)")
        .await;
    let accept = accept_gap_flags(&log);
    assert!(!accept.is_empty(), "no partition named: {log}");
    let mut args = vec!["db-client".to_owned()];
    for a in &accept {
        args.extend(["--accept-gap".to_owned(), a.clone()]);
    }
    let _db = p.spawn("db-client", &args);
    add(&mut expected, expected_third);
    p.wait_ingested(3, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "after accepting the recreated topic")
        .await;
}

/// Adding an aggregator to a running pipeline: a db-client started on the totals topic while
/// the totals follow the sums topic stops (it would count the sums again); the documented
/// switch (the aggregator group starts at the sums offsets stored with the totals, then one
/// start with `--switch-input`) counts every file once.
#[tokio::test(flavor = "multi_thread")]
async fn switching_the_input_to_the_aggregator_needs_the_operators_word() {
    let mut p = Pipeline::new("switch").await;
    let (first, mut expected) = p.generate(1, 300_000, 500, 51).await;
    let (second, expected_second) = p.generate(1, 300_000, 500, 52).await;
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let mut db = p.spawn("db-client", &["db-client"]);
    p.publish("100000", &first).await;
    p.wait_ingested(1, TIMEOUT).await;
    assert!(db.terminate(Duration::from_secs(20)), "db-client stops");

    let mut db = p.spawn("db-client", &["db-client", "--from-totals"]);
    let status = db
        .exit_within(Duration::from_secs(30))
        .await
        .expect("the db-client refuses to switch on its own");
    assert!(!status.success());
    assert!(
        db.log_text().contains("--switch-input"),
        "{}",
        db.log_text()
    );

    // The procedure: the aggregator group starts where the totals include the sums up to.
    let stored: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM kafka_offsets WHERE topic = $1")
            .bind(&p.topics.sums)
            .fetch_all(&p.pool)
            .await
            .unwrap();
    assert!(!stored.is_empty());
    let group: BaseConsumer =
        tally_core::kafka::consumer_config(&p.kafka, &p.topics.aggregator_group)
            .create()
            .unwrap();
    let mut at = TopicPartitionList::new();
    for (partition, next) in stored {
        at.add_partition_offset(&p.topics.sums, partition, Offset::Offset(next))
            .unwrap();
    }
    group.commit(&at, CommitMode::Sync).unwrap();
    drop(group);
    let _agg = p.spawn("aggregator", &p.aggregator_args("agg"));
    let _db = p.spawn(
        "db-client",
        &["db-client", "--from-totals", "--switch-input"],
    );
    p.publish("100000", &second).await;
    add(&mut expected, expected_second);
    p.wait_ingested(2, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "after switching to the aggregator")
        .await;
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
