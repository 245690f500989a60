//! The transactional producer of a consume-transform-produce stage, and its sends.

use std::time::Duration;

use anyhow::Context;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::Serialize;

use crate::args::KafkaArgs;
use crate::kafka;

/// A stage's transactional producer.
pub type TxnProducer = ThreadedProducer<DefaultProducerContext>;

/// Creates the producer with this `transactional.id` and initialises its transactions (which
/// fences, and aborts the open transaction of, any earlier producer with the same id).
pub fn create(
    args: &KafkaArgs,
    transactional_id: &str,
    transaction_timeout: Duration,
) -> anyhow::Result<TxnProducer> {
    let mut config =
        kafka::transactional_producer_config(args, transactional_id, transaction_timeout);
    // A bounded send queue: a full queue makes the stage wait, so memory stays flat.
    config.set("queue.buffering.max.kbytes", "65536");
    kafka::apply_overrides(&mut config, args);
    let producer: TxnProducer = config
        .create()
        .map_err(kafka::quiet)
        .context("cannot create the Kafka producer")?;
    producer
        .init_transactions(Duration::from_secs(60))
        .context("cannot initialise Kafka transactions")?;
    Ok(producer)
}

/// Sends `payload` to `topic`, to `partition` (or where librdkafka's partitioner puts `key`),
/// waiting while the send queue is full.
pub fn send(
    producer: &TxnProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&str>,
    payload: &[u8],
) -> Result<(), KafkaError> {
    let mut record = BaseRecord::<str, [u8]>::to(topic).payload(payload);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    if let Some(key) = key {
        record = record.key(key);
    }
    kafka::send_waiting(producer, record)
}

/// Sends `record` as JSON to `topic`, partitioned by `key` (librdkafka's partitioner).
pub fn send_json(
    producer: &TxnProducer,
    topic: &str,
    key: Option<&str>,
    record: &impl Serialize,
) -> Result<(), KafkaError> {
    let payload = serde_json::to_vec(record).expect("serialisable");
    send(producer, topic, None, key, &payload)
}

/// Sends sums (all of `partition`) of `period` (its start; `None` with periods off) to
/// `topic` as binary records of at most [`PAIRS_PER_RECORD`] pairs ([`tally_model::codec`]).
pub fn send_sums(
    producer: &TxnProducer,
    topic: &str,
    partition: i32,
    period: Option<i64>,
    sums: &[(i64, i64)],
) -> Result<(), KafkaError> {
    for chunk in sums.chunks(PAIRS_PER_RECORD) {
        send(
            producer,
            topic,
            Some(partition),
            None,
            &tally_model::codec::encode_sums(period, chunk),
        )?;
    }
    Ok(())
}

/// Sends what a [`tally_model::sums::Merger`] let leave, each batch with its period.
pub fn send_leaving(
    producer: &TxnProducer,
    topic: &str,
    partition: i32,
    leaving: tally_model::sums::Leaving,
) -> Result<u64, KafkaError> {
    let mut pairs = 0;
    for (period, sums) in leaving {
        pairs += sums.len() as u64;
        send_sums(producer, topic, partition, period, &sums)?;
    }
    Ok(pairs)
}

/// Pairs per sums record: at most ~20 bytes each (binary, usually 2 to 6), well under the
/// 1 MB record limit.
pub const PAIRS_PER_RECORD: usize = 20_000;
