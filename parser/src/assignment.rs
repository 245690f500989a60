//! The parser's side of its consumer group: which `tally.files` partitions it holds, their
//! done-sets, and batches of units polled from them.
//!
//! Rebalance callbacks run inside `poll`, which is called only between transactions, so a
//! rebalance never cuts a transaction in two. A newly assigned partition is paused until its
//! done-set is loaded; meanwhile the group consumer keeps being polled (heartbeats,
//! `max.poll.interval.ms`, further rebalances), so a long load never costs the membership, and
//! anything polled meanwhile is kept in order, never dropped.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{self, Liveness, Throttle};
use tally_core::messages::WorkUnit;
use tally_core::rebalance::{RebalanceEvent, RebalanceLog};
use tally_core::shutdown::CancellationToken;

use crate::doneset::DoneSet;

/// Bounds of one batch of units.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most units.
    pub units: usize,
    /// Most unit bytes.
    pub bytes: u64,
}

/// The partitions this instance holds and what it knows of them.
pub struct Assignment {
    consumer: BaseConsumer<RebalanceLog>,
    events: RebalanceLog,
    topic: String,
    done: DoneSet,
    /// Partitions whose done-set is loaded: their units may be processed.
    assigned: HashSet<i32>,
    /// Partitions assigned whose done-set is not loaded yet (paused meanwhile).
    loading: BTreeSet<i32>,
    /// Units polled while done-sets were loading, in order; processed before new polls.
    stash: VecDeque<OwnedMessage>,
    /// Consumer errors (a broker outage), logged at a bounded rate.
    errors: Throttle,
    liveness: Liveness,
    shutdown: CancellationToken,
}

impl Assignment {
    /// A group consumer from `config` for `topic` (not subscribed yet), with `done` for its
    /// done-sets.
    pub fn new(
        config: &ClientConfig,
        topic: &str,
        done: DoneSet,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let events = RebalanceLog::default();
        let consumer: BaseConsumer<RebalanceLog> = config
            .create_with_context(events.clone())
            .context("cannot create the Kafka consumer")?;
        Ok(Self {
            consumer,
            events,
            topic: topic.to_owned(),
            done,
            assigned: HashSet::new(),
            loading: BTreeSet::new(),
            stash: VecDeque::new(),
            errors: Throttle::new(Duration::from_secs(10)),
            liveness,
            shutdown,
        })
    }

    /// Number of partitions of `topic` (a metadata request).
    pub fn partition_count(&self, topic: &str) -> anyhow::Result<i32> {
        Ok(tally_core::kafka::partition_count(&self.consumer, topic)?)
    }

    /// Joins the group.
    pub fn subscribe(&self) -> anyhow::Result<()> {
        Ok(self.consumer.subscribe(&[&self.topic])?)
    }

    /// Leaves the group.
    pub fn leave(&self) {
        self.consumer.unsubscribe();
    }

    /// Partitions whose done-set is loaded.
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

    /// The done-set of the loaded partitions.
    pub fn done(&self) -> &DoneSet {
        &self.done
    }

    /// Records what a committed transaction did to the done-set.
    pub fn done_mut(&mut self) -> &mut DoneSet {
        &mut self.done
    }

    /// Polls a batch of units, bounded in count and bytes, handling rebalances as they come.
    pub fn collect(&mut self, limits: BatchLimits) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut bytes = 0u64;
        let started = Instant::now();
        while batch.len() < limits.units && bytes < limits.bytes {
            let polled = match self.stash.pop_front() {
                Some(message) => Some(Ok(message)),
                None => {
                    let wait = if batch.is_empty() {
                        Duration::from_millis(500)
                    } else {
                        Duration::from_millis(20)
                    };
                    self.consumer.poll(wait).map(|r| r.map(|m| m.detach()))
                }
            };
            self.handle_rebalance(&mut batch);
            if !self.loading.is_empty() {
                self.load_pending(&mut batch);
            }
            if self.shutdown.is_cancelled() {
                break;
            }
            match polled {
                None => break,
                Some(Err(error)) => {
                    liveness::restart_if_fatal("parser", &error);
                    if let Some(skipped) = self.errors.allow() {
                        tracing::warn!(%error, skipped, "consumer error");
                    }
                    break;
                }
                Some(Ok(message)) => {
                    if self.loading.contains(&message.partition()) {
                        // Polled before its partition was paused: keep it for after the load.
                        self.stash.push_back(message);
                        continue;
                    }
                    if !self.assigned.contains(&message.partition()) {
                        continue;
                    }
                    if let Some(unit) = message
                        .payload()
                        .and_then(|p| serde_json::from_slice::<WorkUnit>(p).ok())
                    {
                        bytes += unit.end.saturating_sub(unit.start);
                    }
                    batch.push(message);
                }
            }
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        self.liveness.positions(&self.consumer, &self.topic);
        Ok(batch)
    }

    /// Applies assignment changes: revoked partitions leave the batch, the stash and the
    /// done-set; assigned ones wait in `loading` until their done-set is loaded.
    fn handle_rebalance(&mut self, batch: &mut Vec<OwnedMessage>) {
        for event in self.events.take() {
            match event {
                RebalanceEvent::Revoked(parts) => {
                    tracing::info!(?parts, "partitions revoked");
                    batch.retain(|m| !parts.contains(&m.partition()));
                    self.stash.retain(|m| !parts.contains(&m.partition()));
                    self.done.forget(&parts);
                    for p in &parts {
                        self.assigned.remove(p);
                        self.loading.remove(p);
                    }
                }
                RebalanceEvent::Assigned(parts) => {
                    tracing::info!(?parts, "partitions assigned, loading done-set");
                    for p in parts {
                        self.assigned.remove(&p);
                        self.loading.insert(p);
                    }
                }
            }
        }
    }

    /// Loads the done-set of every partition in `loading`. No unit of a partition is processed
    /// before its done-set is complete, so this retries through broker outages rather than
    /// guess (the watchdog restarts the process if the broker answers and it still does not
    /// finish). Returns early only on shutdown.
    fn load_pending(&mut self, batch: &mut Vec<OwnedMessage>) {
        let _step = self.liveness.step("load the done-set");
        let mut backoff = Duration::from_millis(200);
        let mut failures = Throttle::new(Duration::from_secs(10));
        while let Some(&partition) = self.loading.first() {
            if self.shutdown.is_cancelled() {
                return;
            }
            self.pause_assignment(true);
            let consumer = &self.consumer;
            let events = &self.events;
            let stash = &mut self.stash;
            let errors = &mut self.errors;
            let mut keep_alive = || {
                serve_group(consumer, stash, errors);
                events.is_empty()
            };
            match self.done.load(partition, &mut keep_alive) {
                Ok(true) => {
                    self.loading.remove(&partition);
                    self.assigned.insert(partition);
                    backoff = Duration::from_millis(200);
                }
                Ok(false) => {} // a rebalance came in: handled below
                Err(error) => {
                    if let Some(skipped) = failures.allow() {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            partition,
                            skipped,
                            "cannot load the done-set, retrying"
                        );
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && keep_alive() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            self.handle_rebalance(batch);
        }
        self.pause_assignment(false);
    }

    /// Pauses (or resumes) every partition assigned to this instance.
    fn pause_assignment(&self, pause: bool) {
        let result = self.consumer.assignment().and_then(|tpl| {
            if pause {
                self.consumer.pause(&tpl)
            } else {
                self.consumer.resume(&tpl)
            }
        });
        // Harmless: whatever is polled meanwhile is stashed, not lost.
        if let Err(error) = result {
            tracing::debug!(%error, pause, "cannot pause or resume the assignment");
        }
    }

    /// Moves the consumer back to the committed offsets of `partitions`, so that the units of
    /// an aborted transaction are read again. Without the committed offsets there is no safe
    /// position, so this waits for the broker; a seek that keeps failing restarts the process
    /// (resuming from the committed offsets, as after a crash) rather than skip a unit.
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
            let offset = match element.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            let mut tries = 0;
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
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Ok(())
    }
}

/// Polls the group consumer without taking work: keeps the instance in its group while a
/// long step runs. Anything it returns (only from partitions not yet paused) is kept in order.
fn serve_group(
    consumer: &BaseConsumer<RebalanceLog>,
    stash: &mut VecDeque<OwnedMessage>,
    errors: &mut Throttle,
) {
    match consumer.poll(Duration::ZERO) {
        None => {}
        Some(Ok(message)) => stash.push_back(message.detach()),
        Some(Err(error)) => {
            liveness::restart_if_fatal("parser", &error);
            if let Some(skipped) = errors.allow() {
                tracing::warn!(%error, skipped, "consumer error");
            }
        }
    }
}
