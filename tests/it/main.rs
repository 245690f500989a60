//! Whole-system tests against a real Kafka broker and a real PostgreSQL server
//! (`scripts/services up`; see tally-testkit for how they are found). Stages run as separate
//! OS processes of the `tally` binary, as in production.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod api;
mod backlog;
mod broker;
mod config;
mod consume;
mod crash;
mod current_period;
mod db_batches;
mod doneset;
mod files;
mod hostile;
mod ingest;
mod latency;
mod liveness;
mod network;
mod ops;
mod periods;
mod pipeline;
mod resume;
mod secrets;
mod secure;
mod standalone;
mod status;
mod sum_cli;
mod write_races;

/// The pipeline harness (tally-testkit).
use tally_testkit::pipeline as support;

/// A compacted topic of one partition, named `topic(prefix)` under a new prefix labelled
/// `label`, and a transactional producer for it (transaction timeout 60 s): what the tests of
/// a reader that must wait for open transactions write with. Returns `(args, topic, writer)`.
fn compacted_topic_with_writer(
    label: &str,
    topic: impl Fn(&str) -> String,
) -> (tally_core::KafkaArgs, String, tally_core::txn::TxnProducer) {
    topic_with_writer(label, topic, 1, true)
}

/// [`compacted_topic_with_writer`] with `partitions` partitions, compacted or deleting.
fn topic_with_writer(
    label: &str,
    topic: impl Fn(&str) -> String,
    partitions: i32,
    compacted: bool,
) -> (tally_core::KafkaArgs, String, tally_core::txn::TxnProducer) {
    use tally_core::kafka::{self, TopicSpec};
    let args = tally_core::KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique(label),
    );
    let topic = topic(&args.topic_prefix);
    let spec = TopicSpec {
        name: topic.clone(),
        partitions,
        compacted,
        retention: None,
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(kafka::ensure_topics(&args, &[spec]))
        .unwrap();
    let id = format!("{}.{label}.writer", args.topic_prefix);
    let writer =
        tally_core::txn::producer::create(&args, &id, std::time::Duration::from_secs(60)).unwrap();
    (args, topic, writer)
}
