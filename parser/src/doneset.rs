//! The done-set: the done-state of every stream (file) of a `tally.files` partition, read from
//! the compacted `tally.done` topic (co-partitioned: files partition p ↔ done partition p; the
//! latest record per stream wins, a tombstone removes it). One entry per file, however many
//! units and announcements it had.
//!
//! On assignment, a partition's done records are read with `read_committed` up to the high
//! watermark captured at that moment ([`tally_core::kafka::BrokerProbe::log_ends`]), before any unit of that
//! partition is processed. Reading only to the last stable offset would not do: the previous
//! owner's last transaction may have committed with its markers not yet written (the last
//! stable offset still stops before it), or be open still, from an instance that died; the
//! units it counted would look undone, and be counted again when announced again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::backoff::Backoff;
use tally_core::kafka::BrokerProbe;
use tally_core::liveness::{self, Throttle};
use tally_core::KafkaArgs;
use tally_model::messages::StreamDone;

/// A stream's done-state and when it was last written (ms since the epoch).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The state.
    pub done: StreamDone,
    /// Time of its record.
    pub at_ms: i64,
}

/// Done-state per stream, per partition.
pub struct DoneSet {
    reader: BaseConsumer,
    /// Asks for the high watermark (the reader would answer the last stable offset).
    ends: BrokerProbe,
    /// How long one partition's load may wait.
    load_timeout: Duration,
    topic: String,
    streams: HashMap<i32, HashMap<String, Entry>>,
}

/// How long to wait for one partition's done records at least (an open transaction of a dead
/// instance delays them by up to its transaction timeout: see [`DoneSet::new`]).
const LOAD_TIMEOUT: Duration = Duration::from_secs(180);

impl DoneSet {
    /// A done-set reading `topic`, written in transactions of `transaction_timeout`: a load
    /// waits that long and a minute more for a transaction left open, at least three minutes.
    pub fn new(
        kafka: &KafkaArgs,
        topic: &str,
        group: &str,
        transaction_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let reader = tally_core::kafka::reader(kafka, group, tally_core::kafka::Ends::Silent)?;
        let ends = BrokerProbe::log_ends(kafka);
        Ok(Self {
            reader,
            ends,
            load_timeout: LOAD_TIMEOUT.max(transaction_timeout + Duration::from_secs(60)),
            topic: topic.to_owned(),
            streams: HashMap::new(),
        })
    }

    /// The done-state of `stream` in `partition`, if any.
    pub fn get(&self, partition: i32, stream: &str) -> Option<&StreamDone> {
        self.streams
            .get(&partition)
            .and_then(|s| s.get(stream))
            .map(|e| &e.done)
    }

    /// Records a state written by a committed transaction.
    pub fn insert(&mut self, partition: i32, done: StreamDone) {
        let at_ms = now_ms();
        self.streams
            .entry(partition)
            .or_default()
            .insert(done.stream.clone(), Entry { done, at_ms });
    }

    /// Removes a stream pruned by a committed transaction.
    pub fn remove(&mut self, partition: i32, stream: &str) {
        if let Some(s) = self.streams.get_mut(&partition) {
            s.remove(stream);
        }
    }

    /// The streams of `partition`.
    pub fn entries(&self, partition: i32) -> impl Iterator<Item = &Entry> {
        self.streams
            .get(&partition)
            .into_iter()
            .flat_map(|s| s.values())
    }

    /// The log start and high watermark of `partition` as the reader last saw them from its
    /// own fetches (`None`: it never fetched the partition). Once a load has ended the reader
    /// fetches nothing, so these stay as the load left them, whatever is written after.
    pub fn reader_watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        tally_core::kafka::cached_watermarks(self.reader.client(), &self.topic, partition)
    }

    /// Forgets revoked partitions.
    pub fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.streams.remove(p);
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
        let (deadline, timeout) = (Instant::now() + self.load_timeout, self.load_timeout);
        let mut outage = Throttle::new(Duration::from_secs(10));
        let mut transient = |error: &KafkaError| -> anyhow::Result<()> {
            if !liveness::is_transient(error) {
                return Err(anyhow::anyhow!("{error}")).context("cannot read the done topic");
            }
            if Instant::now() >= deadline {
                return Err(anyhow::anyhow!("{error}")).with_context(|| {
                    format!("done partition {partition} unreadable for {timeout:?}")
                });
            }
            if let Some(skipped) = outage.allow() {
                tracing::warn!(%error, partition, skipped, "done-set load waits for the broker");
            }
            Ok(())
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let (low, high) = loop {
            match self.ends.watermarks(&self.topic, partition) {
                Ok(ends) => break ends,
                Err(error) => transient(&error)?,
            }
            if !keep_alive() {
                return Ok(false);
            }
            std::thread::sleep(backoff.next_delay());
        };
        let set = self.streams.entry(partition).or_default();
        set.clear();
        if high <= low {
            // Nothing to read, and nothing assigned: an assignment taken back before its
            // fetch started can leave librdkafka fetching the partition for good (an idle
            // parser was seen fetching its empty done partitions 20 times a second, each
            // poll of the broker's, and buffering whatever came).
            tracing::info!(partition, streams = 0, high, "done-set loaded");
            return Ok(true);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Beginning)?;
        self.reader.assign(&tpl)?;
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
                    let stream = message.key().map(String::from_utf8_lossy);
                    match (stream, message.payload()) {
                        // A tombstone: the stream was pruned.
                        (Some(stream), None) => {
                            set.remove(stream.as_ref());
                        }
                        (_, Some(payload)) => {
                            if let Ok(done) = serde_json::from_slice::<StreamDone>(payload) {
                                let at_ms = message.timestamp().to_millis().unwrap_or_else(now_ms);
                                set.insert(done.stream.clone(), Entry { done, at_ms });
                            }
                        }
                        (None, None) => {}
                    }
                }
            }
        };
        self.reader.unassign()?;
        if loaded {
            tracing::info!(partition, streams = set.len(), high, "done-set loaded");
        }
        Ok(loaded)
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
