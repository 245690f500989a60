//! The broker set-up supports exactly-once: transactions commit and abort atomically, aborted
//! records are invisible to `read_committed` readers, and offsets sent to a transaction become
//! the group's committed offsets only when it commits. librdkafka's mock cluster fails this test
//! (it shows aborted records and drops transactional offset commits). `tally init` keeps records
//! longer than the broker's default.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tally_core::kafka::{self, TopicSpec};
use tally_core::KafkaArgs;

use crate::support::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(30);

fn kafka_args(prefix: &str) -> KafkaArgs {
    KafkaArgs::plaintext(&tally_testkit::services().kafka_bootstrap, prefix)
}

/// Reads `topic` partition 0 from the beginning up to its high watermark.
fn read_all(args: &KafkaArgs, topic: &str, isolation: &str) -> Vec<String> {
    let mut config = kafka::consumer_config(args, &tally_testkit::unique("reader"));
    config.set("isolation.level", isolation);
    let consumer: BaseConsumer = config.create().expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, TIMEOUT)
        .expect("watermarks");
    let deadline = Instant::now() + TIMEOUT;
    let mut values = Vec::new();
    loop {
        // The position passes the high watermark only once every record and control marker
        // before it was read (for read_committed: up to the last stable offset).
        if kafka::position_of(&consumer, topic, 0).expect("position") >= high {
            break;
        }
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("consume");
            values
                .push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned());
        }
    }
    values
}

#[test]
fn transactions_commit_and_abort_atomically_with_group_offsets() {
    let prefix = tally_testkit::unique("txn");
    let args = kafka_args(&prefix);
    let input = format!("{prefix}.in");
    let output = format!("{prefix}.out");
    let group = format!("{prefix}.group");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(kafka::ensure_topics(
        &args,
        &[input.clone(), output.clone()].map(|name| TopicSpec {
            name,
            partitions: 1,
            compacted: false,
            retention: None,
        }),
    ))
    .expect("create topics");

    // Ten input records, written without a transaction.
    let plain: BaseProducer = kafka::base_config(&args).create().expect("producer");
    for i in 0..10 {
        plain
            .send(BaseRecord::<(), _>::to(&input).payload(&format!("in-{i}")))
            .expect("send");
    }
    plain.flush(TIMEOUT).expect("flush");

    // A member of the group consumes them (its metadata is what fences zombies, KIP-447).
    let consumer: BaseConsumer = kafka::consumer_config(&args, &group)
        .create()
        .expect("consumer");
    consumer.subscribe(&[&input]).expect("subscribe");
    let mut consumed = 0;
    let deadline = Instant::now() + TIMEOUT;
    while consumed < 10 {
        assert!(Instant::now() < deadline, "timed out consuming the input");
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            m.expect("consume");
            consumed += 1;
        }
    }

    let producer: BaseProducer = kafka::transactional_producer_config(
        &args,
        &format!("{prefix}.txn"),
        Duration::from_secs(60),
    )
    .create()
    .expect("transactional producer");
    producer
        .init_transactions(TIMEOUT)
        .expect("init_transactions");
    let offsets_at = |next: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&input, 0, Offset::Offset(next))
            .expect("tpl");
        tpl
    };

    // Committed: five records plus offset 5.
    producer.begin_transaction().expect("begin");
    for i in 0..5 {
        producer
            .send(BaseRecord::<(), _>::to(&output).payload(&format!("committed-{i}")))
            .expect("send");
    }
    producer
        .send_offsets_to_transaction(
            &offsets_at(5),
            &consumer.group_metadata().expect("group metadata"),
            TIMEOUT,
        )
        .expect("send offsets");
    producer.commit_transaction(TIMEOUT).expect("commit");

    // Aborted: three records plus offset 8.
    producer.begin_transaction().expect("begin");
    for i in 0..3 {
        producer
            .send(BaseRecord::<(), _>::to(&output).payload(&format!("aborted-{i}")))
            .expect("send");
    }
    producer
        .flush(TIMEOUT)
        .expect("flush aborted records to the log");
    producer
        .send_offsets_to_transaction(
            &offsets_at(8),
            &consumer.group_metadata().expect("group metadata"),
            TIMEOUT,
        )
        .expect("send offsets");
    producer.abort_transaction(TIMEOUT).expect("abort");

    let committed = read_all(&args, &output, "read_committed");
    assert_eq!(
        committed,
        (0..5).map(|i| format!("committed-{i}")).collect::<Vec<_>>()
    );
    // The aborted records did reach the log: only the isolation level hides them.
    let uncommitted = read_all(&args, &output, "read_uncommitted");
    assert_eq!(uncommitted.len(), 8, "{uncommitted:?}");

    let committed_offsets = consumer
        .committed_offsets(offsets_at(0), TIMEOUT)
        .expect("committed offsets");
    let offset = committed_offsets
        .find_partition(&input, 0)
        .expect("partition")
        .offset();
    assert_eq!(offset, Offset::Offset(5));
}

/// Each topic's value of config `key`, as the broker describes it ("" when unset).
async fn topic_config(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&String],
    key: &str,
) -> Vec<String> {
    use rdkafka::admin::ResourceSpecifier;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let values: Vec<String> = admin
        .describe_configs(&specifiers, &AdminOptions::new())
        .await
        .unwrap()
        .into_iter()
        .map(|resource| {
            resource
                .unwrap()
                .get(key)
                .and_then(|e| e.value.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(values.len(), topics.len(), "one answer per topic");
    values
}

#[tokio::test(flavor = "multi_thread")]
async fn tally_init_sets_retention_compaction_and_index_size() {
    let p = Pipeline::new("retention").await;
    let admin: AdminClient<DefaultClientContext> =
        tally_core::kafka::base_config(&p.kafka).create().unwrap();
    let t = &p.topics;
    let deleting = [&t.files, &t.sums, &t.totals, &t.dead_letter];
    let thirty_days = (30u64 * 24 * 3600 * 1000).to_string();
    for (topic, retention) in deleting
        .iter()
        .zip(topic_config(&admin, &deleting, "retention.ms").await)
    {
        assert_eq!(retention, thirty_days, "{topic}");
    }
    // The done and ingested topics: compacted (never deleted), with segments that roll
    // hourly so compaction can run.
    let compacted = [&t.done, &t.ingested];
    for (key, want) in [("cleanup.policy", "compact"), ("segment.ms", "3600000")] {
        for (topic, value) in compacted
            .iter()
            .zip(topic_config(&admin, &compacted, key).await)
        {
            assert_eq!(value, want, "{topic}: {key}");
        }
    }
    // Every topic: 1 MiB segment indexes, whose first write costs little where the block
    // device reads ahead far (tally_core::kafka::SEGMENT_INDEX_BYTES).
    let all = t.all();
    for (topic, value) in all
        .iter()
        .zip(topic_config(&admin, &all, "segment.index.bytes").await)
    {
        assert_eq!(value, tally_core::kafka::SEGMENT_INDEX_BYTES, "{topic}");
    }
}
