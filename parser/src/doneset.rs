//! The done-set: unit ids already completed, per `tally.files` partition, read from the
//! compacted `tally.done` topic (co-partitioned: files partition p ↔ done partition p).
//!
//! On assignment, a partition's done records are read with `read_committed` up to the high
//! watermark captured at that moment, before any unit of that partition is processed. Reading
//! only to the last stable offset would not do: an open transaction of a dead instance holds it
//! back until aborted, and units it completed would look undone.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{self, Throttle};
use tally_core::messages::UnitDone;
use tally_core::KafkaArgs;

/// Completed unit ids per partition.
pub struct DoneSet {
    reader: BaseConsumer,
    topic: String,
    units: HashMap<i32, HashSet<String>>,
}

/// How long to wait for one partition's done records (an open transaction of a dead instance
/// delays them by up to its transaction timeout).
const LOAD_TIMEOUT: Duration = Duration::from_secs(180);

impl DoneSet {
    /// A done-set reading `topic`.
    pub fn new(kafka: &KafkaArgs, topic: &str, group: &str) -> anyhow::Result<Self> {
        let reader: BaseConsumer = tally_core::kafka::consumer_config(kafka, group)
            .create()
            .context("cannot create the done-topic reader")?;
        Ok(Self {
            reader,
            topic: topic.to_owned(),
            units: HashMap::new(),
        })
    }

    /// Whether `unit_id` of `partition` is done.
    pub fn contains(&self, partition: i32, unit_id: &str) -> bool {
        self.units
            .get(&partition)
            .is_some_and(|s| s.contains(unit_id))
    }

    /// Records units completed by a committed transaction.
    pub fn insert(&mut self, partition: i32, unit_id: String) {
        self.units.entry(partition).or_default().insert(unit_id);
    }

    /// Forgets revoked partitions.
    pub fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.units.remove(p);
        }
    }

    /// Loads the done records of `partition` up to its current high watermark. Returns
    /// `Ok(false)` when `keep_alive` (called every 200 ms, to serve the group consumer) asks
    /// to stop: a rebalance came in.
    ///
    /// A broker outage is not a failure of the load: transient client errors (all brokers
    /// down, transport failures, timeouts, also ones queued during an earlier outage) are
    /// logged at a bounded rate and the load goes on until its own deadline.
    pub fn load(
        &mut self,
        partition: i32,
        keep_alive: &mut dyn FnMut() -> bool,
    ) -> anyhow::Result<bool> {
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let mut outage = Throttle::new(Duration::from_secs(10));
        let mut transient = |error: &KafkaError| -> anyhow::Result<()> {
            if !liveness::is_transient(error) {
                return Err(anyhow::anyhow!("{error}")).context("cannot read the done topic");
            }
            if Instant::now() >= deadline {
                return Err(anyhow::anyhow!("{error}")).with_context(|| {
                    format!("done partition {partition} unreadable for {LOAD_TIMEOUT:?}")
                });
            }
            if let Some(skipped) = outage.allow() {
                tracing::warn!(%error, partition, skipped, "done-set load waits for the broker");
            }
            Ok(())
        };
        let high = loop {
            match self
                .reader
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
            {
                Ok((_, high)) => break high,
                Err(error) => transient(&error)?,
            }
            if !keep_alive() {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Beginning)?;
        self.reader.assign(&tpl)?;
        let set = self.units.entry(partition).or_default();
        set.clear();
        let loaded = loop {
            match tally_core::kafka::position_of(&self.reader, &self.topic, partition) {
                Ok(position) if position >= high => break true,
                Ok(_) => {}
                Err(error) => transient(&error)?,
            }
            if Instant::now() >= deadline {
                bail!("done partition {partition} not readable up to offset {high} (an open transaction?)");
            }
            if !keep_alive() {
                break false;
            }
            match self.reader.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(error)) => transient(&error)?,
                Some(Ok(message)) => {
                    if let Some(done) = message
                        .payload()
                        .and_then(|p| serde_json::from_slice::<UnitDone>(p).ok())
                    {
                        set.insert(done.unit_id);
                    }
                }
            }
        };
        self.reader.unassign()?;
        if loaded {
            tracing::debug!(partition, units = set.len(), high, "done-set loaded");
        }
        Ok(loaded)
    }
}
