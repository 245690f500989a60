//! Where the db-client resumes: at the offsets stored with the totals, whatever Kafka's
//! committed offsets say (an operator reset them to the end), and never past a recreated
//! topic without an operator's word.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::support::{accept_gap_flags, Pipeline};

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
    let deadline = Instant::now() + TIMEOUT;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let made = p.try_tally(&["init"]).await;
        let exists = admin
            .inner()
            .fetch_metadata(Some(&p.topics.sums), Duration::from_secs(5))
            .is_ok_and(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.partitions().len() == 6 && t.error().is_none())
            });
        if made && exists {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sums topic was not created again"
        );
    }
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
