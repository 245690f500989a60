//! Reading a pipeline's topics back: committed records, unit-end markers, a group's lag.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tally_core::KafkaArgs;
use tally_model::messages::{DeadLetter, SumsRecord, UnitDone};

use super::Pipeline;

impl Pipeline {
    /// Sends `(key, payload)` records to the files topic in one transaction, as a producer
    /// would.
    pub fn announce_raw(&self, records: &[(String, String)]) {
        let producer: BaseProducer = tally_core::kafka::transactional_producer_config(
            &self.kafka,
            &crate::unique("raw"),
            Duration::from_secs(60),
        )
        .create()
        .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        for (key, payload) in records {
            producer
                .send(
                    BaseRecord::<str, str>::to(&self.topics.files)
                        .key(key)
                        .payload(payload),
                )
                .unwrap();
        }
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
    }

    /// Every committed record of `topic`, as `(partition, payload)`.
    pub fn read_topic(&self, topic: &str) -> Vec<(i32, Vec<u8>)> {
        read_committed(&self.kafka, topic)
    }

    /// The committed unit-end markers (one per unit and transaction; from sums partition 0,
    /// as every unit ends in every partition).
    pub fn unit_ends(&self) -> Vec<UnitDone> {
        self.unit_ends_in(&self.topics.sums)
    }

    /// [`Pipeline::unit_ends`] of `topic` (`tally.sums`, or the aggregators' `tally.totals`).
    pub fn unit_ends_in(&self, topic: &str) -> Vec<UnitDone> {
        self.read_topic(topic)
            .into_iter()
            .filter(|(partition, v)| *partition == 0 && v.starts_with(br#"{"type":"unit-end""#))
            .map(|(_, v)| match tally_model::codec::decode(&v).unwrap() {
                SumsRecord::UnitEnd { unit, .. } => unit,
                SumsRecord::Sums { .. } => unreachable!(),
            })
            .collect()
    }

    /// How many times each unit was committed as summed (must be once).
    pub fn summed_units(&self) -> HashMap<String, usize> {
        let mut summed = HashMap::new();
        for unit in self.unit_ends() {
            *summed.entry(unit.unit_id).or_default() += 1;
        }
        summed
    }

    /// Bytes summed per file version, over every committed unit.
    pub fn summed_bytes(&self) -> HashMap<String, u64> {
        let mut bytes = HashMap::new();
        for unit in self.unit_ends() {
            *bytes.entry(unit.file_id).or_default() += unit.bytes;
        }
        bytes
    }

    /// The dead letters, once `done` says they are complete; panics after `within`.
    pub async fn dead_letters_until(
        &self,
        within: Duration,
        done: impl Fn(&[DeadLetter]) -> bool,
    ) -> Vec<DeadLetter> {
        crate::eventually(within, "the dead letters expected", || async {
            let dead: Vec<DeadLetter> = self
                .read_topic(&self.topics.dead_letter)
                .iter()
                .map(|(_, v)| serde_json::from_slice(v).unwrap())
                .collect();
            if done(&dead) {
                Ok(dead)
            } else {
                Err(format!("{dead:?}"))
            }
        })
        .await
    }

    /// Waits until the parser group has committed every announced unit.
    pub async fn wait_files_consumed(&self, timeout: Duration) {
        crate::eventually(timeout, "the parser group consumed every unit", || async {
            let (k, t) = (self.kafka.clone(), self.topics.clone());
            let lag = tokio::task::spawn_blocking(move || group_lag(&k, &t.parser_group, &t.files))
                .await
                .unwrap();
            crate::holds(lag == 0, || format!("a lag of {lag}"))
        })
        .await;
    }
}

/// Reads every committed record of `topic` (all partitions) up to the high watermarks.
pub fn read_committed(kafka: &KafkaArgs, topic: &str) -> Vec<(i32, Vec<u8>)> {
    read_records(kafka, topic)
        .into_iter()
        .map(|(p, _, v)| (p, v.unwrap_or_default()))
        .collect()
}

/// A record as read: partition, key, payload (none: a tombstone).
pub type Record = (i32, Option<Vec<u8>>, Option<Vec<u8>>);

/// Reads every committed record of `topic` with its key, tombstones included.
pub fn read_records(kafka: &KafkaArgs, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer =
        tally_core::kafka::consumer_config(kafka, &crate::unique("reader"))
            .create()
            .unwrap();
    let partitions = tally_core::kafka::partition_count(&consumer, topic).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = HashMap::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        high.insert(p, high_watermark(&consumer, topic, p));
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut records = Vec::new();
    loop {
        let behind = (0..partitions)
            .any(|p| tally_core::kafka::position_of(&consumer, topic, p).unwrap() < high[&p]);
        if !behind {
            return records;
        }
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        // An error (a broker that was just restarted) is retried by the next poll.
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            records.push((
                m.partition(),
                m.key().map(<[u8]>::to_vec),
                m.payload().map(<[u8]>::to_vec),
            ));
        }
    }
}

/// The high watermark of `topic`/`partition`, asked again for up to a minute while the broker
/// cannot answer yet (a test that has just restarted it).
fn high_watermark(consumer: &BaseConsumer, topic: &str, partition: i32) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((_, high)) => return high,
            Err(error) if Instant::now() < deadline => {
                eprintln!("watermarks of {topic}/{partition}: {error}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => panic!("no watermarks of {topic}/{partition}: {error}"),
        }
    }
}

/// Committed records of `topic` that `group` has not consumed: read from its committed
/// offsets to the ends, so that transaction markers (one per transaction, and several
/// producers' transactions interleave) never count as lag.
pub fn group_lag(kafka: &KafkaArgs, group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = tally_core::kafka::consumer_config(kafka, &crate::unique("lag"))
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let backlog = tally_core::backlog::backlog(kafka, &consumer, group, topic, |_| 0).unwrap();
    i64::try_from(backlog.records).unwrap()
}
