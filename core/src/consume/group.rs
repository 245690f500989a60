//! A stage's side of its consumer group: which input partitions it holds, the state it loads
//! for each ([`PartitionState`]), and batches of records polled from them.
//!
//! Rebalance callbacks run inside `poll`, which is called only between transactions, so a
//! rebalance never cuts a transaction in two. No record of a newly assigned partition is
//! processed before its state is loaded (the parser's done-set); meanwhile the group consumer
//! keeps being polled (heartbeats, `max.poll.interval.ms`, further rebalances), so a long load
//! never costs the membership, and anything polled meanwhile is kept in order, never dropped
//! (see [`super::intake`], also for why partitions are not paused for the load).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::intake::Intake;
pub use super::load::{Loaded, PartitionState, Stop};
use crate::backoff::Backoff;
use crate::liveness::{self, Liveness};
use crate::rebalance::{RebalanceEvent, RebalanceLog};
use crate::shutdown::CancellationToken;
use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

/// Bounds of one batch (one transaction's input).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records.
    pub records: usize,
    /// Most weight ([`PartitionState::weight`]: unit bytes for the parser, payload bytes for
    /// the aggregator, bytes of memory for the db-client); a record heavier than that alone
    /// is a batch of its own.
    pub weight: u64,
    /// Once the batch has a record, a poll that waits this long for the next one ends it.
    pub idle: Duration,
    /// Longest time a batch is collected, from its first record on.
    pub max_wait: Duration,
    /// Whether a drained batch waits (up to `max_wait`) for a transaction open upstream on a
    /// partition held: for stages that merge what they read (the aggregator, the db-client),
    /// where waiting writes each consumer once instead of twice.
    pub wait_for_open: bool,
    /// Whether a batch reads on to the end of the partitions that have records on their way
    /// (no end told since their last record), past `idle` and `max_wait`: for the db-client,
    /// whose interval bounds waiting for more, not the reading of what is there. A transaction
    /// upstream whose records take longer than the interval to fetch is then written in one
    /// batch, not cut in two (the second part waiting for the first one's write). Waiting for
    /// a transaction open upstream still ends at `max_wait`, and a poll that brings nothing for
    /// half a second ends the batch.
    pub read_through: bool,
    /// Whether a batch ends as soon as every partition held is read up to the high watermark
    /// the client last heard of (past its last record, at most that record's transaction
    /// marker), instead of when the end is told: librdkafka tells it only with the next fetch
    /// response, which the broker holds for `fetch.wait.max.ms`. For the db-client, whose
    /// writers commit seldom, and for the aggregator once the parsers have no unit left
    /// ([`PartitionState::upstream_drained`]); until then it keeps that wait, in which it sees
    /// a parser's next transaction open and merges it into the same batch.
    pub end_at_watermark: bool,
}

/// The partitions this instance holds and what it knows of them.
pub struct Group {
    pub(super) consumer: BaseConsumer<RebalanceLog>,
    pub(super) events: RebalanceLog,
    pub(super) topic: String,
    /// Partitions whose state is loaded: their records may be processed.
    pub(super) assigned: HashSet<i32>,
    /// Partitions assigned whose state is not loaded yet (their records are stashed meanwhile).
    pub(super) loading: BTreeSet<i32>,
    /// Records polled while states were loading, and which partitions were heard of.
    pub(super) intake: Intake,
    pub(super) liveness: Liveness,
    pub(super) shutdown: CancellationToken,
    /// Assigned partitions whose end (the last stable offset) was reached, with nothing read
    /// since: when every one is, a batch ends at once instead of waiting out its idle time.
    pub(super) at_end: HashSet<i32>,
    /// The offset of the last record read from each partition held, until its end is told.
    pub(super) last_read: HashMap<i32, i64>,
}

impl Group {
    /// A group consumer of `stage` from `config` for `topic` (not subscribed yet).
    pub fn new(
        stage: &'static str,
        config: &ClientConfig,
        topic: &str,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let events = RebalanceLog::for_stage(&liveness);
        let mut config = config.clone();
        // A client id of its own (unless one was set by hand), so that the watchdog finds this
        // member among the group's.
        if config.get("client.id") == Some("tally") {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let id = format!("tally-{stage}-{}-{nanos:08x}", std::process::id());
            config.set("client.id", id);
        }
        if let (Some(group), Some(id)) = (config.get("group.id"), config.get("client.id")) {
            liveness.set_member(group, topic, id);
        }
        config.set(
            "statistics.interval.ms",
            crate::rebalance::STATISTICS_INTERVAL_MS,
        );
        // The end of each partition is told (past any trailing transaction marker), so that a
        // drained input ends its batch at once.
        config.set("enable.partition.eof", "true");
        let consumer: BaseConsumer<RebalanceLog> = config
            .create_with_context(events.clone())
            .map_err(crate::kafka::quiet)
            .context("cannot create the Kafka consumer")?;
        Ok(Self {
            consumer,
            events,
            topic: topic.to_owned(),
            assigned: HashSet::new(),
            loading: BTreeSet::new(),
            intake: Intake::new(stage, topic, liveness.clone()),
            liveness,
            shutdown,
            at_end: HashSet::new(),
            last_read: HashMap::new(),
        })
    }

    /// Bounds the records kept while partition states load to `bytes` of payload (64 MiB by
    /// default): past it, the partitions that fetch are paused until every state is loaded
    /// (the bound is passed by at most a record of each partition).
    pub fn with_stash_limit(mut self, bytes: u64) -> Self {
        self.intake.limit = bytes;
        self
    }

    /// The most payload bytes kept at once while partition states loaded.
    pub fn stash_peak(&self) -> u64 {
        self.intake.peak
    }

    /// Whether a record or the end of every partition held came since it was assigned.
    pub fn all_heard(&self) -> bool {
        self.intake.all_heard()
    }

    /// Number of partitions of `topic` (a metadata request).
    pub fn partition_count(&self, topic: &str) -> anyhow::Result<i32> {
        Ok(crate::kafka::partition_count(&self.consumer, topic)?)
    }

    /// Joins the group.
    pub fn subscribe(&self) -> anyhow::Result<()> {
        Ok(self.consumer.subscribe(&[&self.topic])?)
    }

    /// Leaves the group.
    pub fn leave(&self) {
        self.consumer.unsubscribe();
    }

    /// The input topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partitions whose state is loaded.
    pub fn loaded(&self) -> Vec<i32> {
        let mut loaded: Vec<i32> = self.assigned.iter().copied().collect();
        loaded.sort_unstable();
        loaded
    }

    /// The committed offsets of `partitions` (one request).
    pub fn committed(&self, partitions: &[i32]) -> anyhow::Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        Ok(self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))?)
    }

    /// The consumer's group metadata (KIP-447 fencing), if it is a member right now.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// Polls a batch of records, bounded by `limits`, handling rebalances as they come.
    pub fn collect(
        &mut self,
        limits: BatchLimits,
        state: &mut dyn PartitionState,
    ) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut weight = 0u64;
        // A batch's age counts from its first record, not from the wait for it.
        let called = Instant::now();
        let mut started = called;
        // Why the batch ended, for the debug log.
        let mut why = "bounds";
        while batch.len() < limits.records && weight < limits.weight {
            let polled = match self.intake.pop() {
                Some(message) => Some(Ok(message)),
                None => {
                    let wait = if batch.is_empty() || (limits.read_through && self.reading(&batch))
                    {
                        // Reading on to the partitions' end, the next fetch brings records or
                        // that end, whatever the interval.
                        Duration::from_millis(500)
                    } else {
                        limits
                            .idle
                            .min(limits.max_wait.saturating_sub(started.elapsed()))
                    };
                    self.consumer.poll(wait).map(|r| r.map(|m| m.detach()))
                }
            };
            self.handle_rebalance(&mut batch, state);
            if !self.loading.is_empty() {
                self.load_pending(&mut batch, state)?;
            }
            if self.loading.is_empty() {
                self.intake.release(&self.consumer);
            }
            if self.shutdown.is_cancelled() {
                why = "shutdown";
                break;
            }
            match polled {
                None => {
                    why = "nothing polled";
                    break;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                    self.intake.heard(partition);
                    if self.assigned.contains(&partition) {
                        self.at_end.insert(partition);
                    }
                    self.last_read.remove(&partition);
                    // Drained: no timer on the critical path.
                    if !batch.is_empty()
                        && self.drained()
                        && !(limits.wait_for_open && self.open_upstream())
                    {
                        why = "end told";
                        break;
                    }
                }
                Some(Err(error)) => {
                    self.intake.consumer_error(&error);
                    why = "consumer error";
                    break;
                }
                Some(Ok(message)) => {
                    if self.loading.contains(&message.partition()) {
                        // Its state is not loaded yet: keep it for after the load.
                        self.intake.push(message);
                        continue;
                    }
                    self.intake.heard(message.partition());
                    if !self.assigned.contains(&message.partition()) {
                        continue;
                    }
                    self.at_end.remove(&message.partition());
                    let heavy = state.weight(&message);
                    if !batch.is_empty() && weight.saturating_add(heavy) > limits.weight {
                        // A batch stays within its weight (a record heavier alone goes alone).
                        self.intake.put_back(message);
                        why = "weight";
                        break;
                    }
                    if batch.is_empty() {
                        started = Instant::now();
                    }
                    weight += heavy;
                    let (partition, offset) = (message.partition(), message.offset());
                    self.last_read.insert(partition, offset);
                    batch.push(message);
                    if limits.end_at_watermark
                        && self.read_to_watermark(partition, offset)
                        && self.caught_up()
                        && !(limits.wait_for_open && self.open_upstream())
                        && state.upstream_drained()
                    {
                        why = "watermark";
                        break;
                    }
                }
            }
            let age = if batch.is_empty() { called } else { started };
            if age.elapsed() >= limits.max_wait && !(limits.read_through && self.reading(&batch)) {
                why = "max wait";
                break;
            }
        }
        if !batch.is_empty() {
            tracing::debug!(records = batch.len(), why, "batch collected");
        }
        self.liveness.positions(&self.consumer, &self.topic);
        Ok(batch)
    }

    /// Applies assignment changes: revoked partitions leave the batch, the stash and the
    /// stage's state; assigned ones wait in `loading` until their state is loaded.
    pub(super) fn handle_rebalance(
        &mut self,
        batch: &mut Vec<OwnedMessage>,
        state: &mut dyn PartitionState,
    ) {
        for event in self.events.take() {
            match event {
                RebalanceEvent::Revoked(parts) => {
                    tracing::info!(?parts, "partitions revoked");
                    batch.retain(|m| !parts.contains(&m.partition()));
                    self.intake.revoked(&parts);
                    state.revoked(&parts);
                    for p in &parts {
                        self.assigned.remove(p);
                        self.loading.remove(p);
                        self.at_end.remove(p);
                        self.last_read.remove(p);
                    }
                }
                RebalanceEvent::Assigned(parts) => {
                    tracing::info!(?parts, "partitions assigned");
                    self.intake.assigned(&parts);
                    for p in parts {
                        self.assigned.remove(&p);
                        self.at_end.remove(&p);
                        self.last_read.remove(&p);
                        self.loading.insert(p);
                    }
                }
            }
        }
    }

    /// Commits `offsets` (partition → next offset) to the group without waiting: for lag
    /// tools, when the stage's checkpoint is elsewhere.
    pub fn commit_async(&self, offsets: &std::collections::BTreeMap<i32, i64>) {
        // Not while a rebalance is being handled: librdkafka's unassign waits for commits in
        // flight, and one sent to a coordinator that just went away can hold the consumer in
        // `wait-unassign-to-complete` (the next batch commits these offsets anyway).
        if !self.events.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in offsets {
            if let Err(error) =
                tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(*next))
            {
                tracing::debug!(%error, "bad offset");
            }
        }
        if let Err(error) = self
            .consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Async)
        {
            tracing::debug!(%error, "kafka offset commit failed (harmless)");
        }
    }

    /// Moves the consumer back to the committed offsets of `partitions`, so that the records of
    /// an aborted transaction are read again. Without the committed offsets there is no safe
    /// position, so this waits for the broker; a seek that keeps failing restarts the process
    /// (resuming from the committed offsets, as after a crash) rather than skip a record.
    pub fn rewind(&mut self, partitions: &HashSet<i32>) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let consumer = &self.consumer;
        let committed = liveness::retry(&self.shutdown, "read the committed offsets", || {
            Ok(consumer.committed_offsets(tpl.clone(), Duration::from_secs(30))?)
        })?;
        for element in committed.elements() {
            let partition = element.partition();
            if !self.assigned.contains(&partition) {
                continue;
            }
            self.at_end.remove(&partition);
            self.last_read.remove(&partition);
            // Polled past the committed offset and kept for the next batch (the record a full
            // batch put back, or one served during a load): read again from Kafka, not first.
            self.intake.retain(|m| m.partition() != partition);
            let offset = match element.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            let mut tries = 0;
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
            while let Err(error) =
                self.consumer
                    .seek(&self.topic, partition, offset, Duration::from_secs(30))
            {
                tries += 1;
                tracing::warn!(%error, partition, tries, "rewind failed");
                if tries == 3 {
                    tracing::error!(
                        partition,
                        "cannot rewind to the committed offset; restarting in place"
                    );
                    liveness::restart_in_place();
                }
                std::thread::sleep(backoff.next_delay());
            }
        }
        Ok(())
    }
}

impl super::Input for Group {
    fn collect(
        &mut self,
        limits: BatchLimits,
        state: &mut dyn PartitionState,
    ) -> anyhow::Result<Vec<OwnedMessage>> {
        Group::collect(self, limits, state)
    }

    fn rewind(&mut self, partitions: &HashSet<i32>) -> anyhow::Result<()> {
        Group::rewind(self, partitions)
    }
}
