//! Reading `tally.done` to learn when every unit of a pending file is done, and how many of
//! its units were rejected.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{Liveness, Throttle};
use tally_core::messages::{Outcome, UnitDone};
use tally_core::{KafkaArgs, Topics};

/// Tracks `tally.done` to learn when every unit of a pending file is done.
pub(super) struct DoneTracker {
    consumer: BaseConsumer,
    topic: String,
    /// file id → (units of the file, ids of its units seen done, how many were rejected).
    progress: HashMap<String, (u32, HashSet<String>, u32)>,
    /// Read errors (a broker outage), logged at a bounded rate.
    errors: Throttle,
}

impl DoneTracker {
    pub(super) fn new(kafka: &KafkaArgs, topics: &Topics) -> anyhow::Result<Self> {
        let group = format!("{}.producer-done-reader", topics.parser_group);
        let consumer: BaseConsumer = tally_core::kafka::consumer_config(kafka, &group)
            .create()
            .context("cannot create the done-topic consumer")?;
        let metadata = consumer
            .fetch_metadata(Some(&topics.done), Duration::from_secs(30))
            .context("cannot read done-topic metadata")?;
        let mut tpl = TopicPartitionList::new();
        for topic in metadata.topics() {
            for p in topic.partitions() {
                tpl.add_partition_offset(&topics.done, p.id(), Offset::Beginning)?;
            }
        }
        if tpl.count() == 0 {
            bail!("topic {} has no partitions (run `tally init`)", topics.done);
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            topic: topics.done.clone(),
            progress: HashMap::new(),
            errors: Throttle::new(Duration::from_secs(10)),
        })
    }

    /// Reads done records for up to `wait`; returns files whose units are all done.
    pub(super) fn poll(
        &mut self,
        wait: Duration,
        pending: &HashMap<String, PathBuf>,
        liveness: &Liveness,
    ) -> Vec<FileDone> {
        let mut complete = Vec::new();
        let deadline = Instant::now() + wait;
        while let Some(message) = self
            .consumer
            .poll(deadline.saturating_duration_since(Instant::now()))
        {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    // A broker outage: the consumer reconnects by itself; keep polling.
                    if let Some(skipped) = self.errors.allow() {
                        tracing::warn!(%error, skipped, "done-topic read failed");
                    }
                    break;
                }
            };
            liveness.progress();
            let Some(done) = message
                .payload()
                .and_then(|p| serde_json::from_slice::<UnitDone>(p).ok())
            else {
                continue;
            };
            if !pending.contains_key(&done.file_id) {
                continue;
            }
            let entry = self
                .progress
                .entry(done.file_id.clone())
                .or_insert_with(|| (done.units, HashSet::new(), 0));
            if entry.1.insert(done.unit_id) && done.outcome == Outcome::Rejected {
                entry.2 += 1;
            }
            if entry.1.len() as u32 >= entry.0 {
                let (units, _, rejected) = entry.clone();
                self.progress.remove(&done.file_id);
                complete.push(FileDone {
                    id: done.file_id,
                    units,
                    rejected,
                });
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        liveness.positions(&self.consumer, &self.topic);
        complete
    }
}

/// A file whose units are all done.
pub(super) struct FileDone {
    pub(super) id: String,
    pub(super) units: u32,
    /// Units rejected (dead-lettered, not in the totals).
    pub(super) rejected: u32,
}
