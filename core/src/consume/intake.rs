//! What a stage's group consumer polled before the stage could take it: records kept in order
//! while partition states load (the stash), bounded in bytes, and which assigned partitions
//! have not been heard of yet.
//!
//! librdkafka starts fetching a newly assigned partition once its committed offset arrives from
//! the group coordinator, a moment after the assignment. A pause or a resume from the
//! application numbers a new version of the partition (a barrier); one numbered after that
//! start but handled before it makes librdkafka drop the start as outdated, and the partition
//! then sits assigned and silent for good (librdkafka's "received outdated op FETCH_START").
//! So nothing here pauses a partition it has not heard from (a record or its end): the stash
//! takes what comes while states load, and only past [`STASH_BYTES`] are the partitions that
//! already fetch paused, until every state is loaded. Should a partition stay unheard of
//! anyway, a liveness step stays open, and the watchdog restarts the process once that outlasts
//! its limit while the broker answers.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::TopicPartitionList;

use crate::liveness::{self, Liveness, Step, Throttle};
use crate::rebalance::RebalanceLog;

/// Payload bytes the stash holds before the partitions it fills from are paused (the default
/// of [`Intake::limit`]).
pub(super) const STASH_BYTES: u64 = 64 << 20;

/// See the module documentation.
pub(super) struct Intake {
    stage: &'static str,
    topic: String,
    liveness: Liveness,
    /// Records polled while states were loading, in order; processed before new polls.
    stash: VecDeque<OwnedMessage>,
    /// The payload bytes in `stash`.
    bytes: u64,
    /// The bytes past which the partitions heard of are paused.
    pub(super) limit: u64,
    /// The most bytes `stash` held.
    pub(super) peak: u64,
    /// Assigned partitions neither a record nor their end came from since their assignment.
    unheard: HashSet<i32>,
    /// Open while `unheard` is not empty (see the module documentation).
    waiting: Option<Step>,
    /// Partitions paused because the stash was full: resumed by [`Intake::release`].
    held: Vec<i32>,
    /// Consumer errors (a broker outage), logged at a bounded rate.
    errors: Throttle,
}

impl Intake {
    pub(super) fn new(stage: &'static str, topic: &str, liveness: Liveness) -> Self {
        Self {
            stage,
            topic: topic.to_owned(),
            liveness,
            stash: VecDeque::new(),
            bytes: 0,
            limit: STASH_BYTES,
            peak: 0,
            unheard: HashSet::new(),
            waiting: None,
            held: Vec::new(),
            errors: Throttle::new(Duration::from_secs(10)),
        }
    }

    /// `partitions` were assigned: unheard of until a record or their end comes.
    pub(super) fn assigned(&mut self, partitions: &[i32]) {
        self.unheard.extend(partitions);
        if !self.unheard.is_empty() && self.waiting.is_none() {
            let step = "a first record or end of every assigned partition";
            self.waiting = Some(self.liveness.step(step));
        }
    }

    /// `partitions` were taken away: their stashed records go (the rebalance callback resumed
    /// the held ones already, see `RebalanceLog`).
    pub(super) fn revoked(&mut self, partitions: &[i32]) {
        self.retain(|m| !partitions.contains(&m.partition()));
        self.held.retain(|p| !partitions.contains(p));
        for p in partitions {
            self.unheard.remove(p);
        }
        self.check_heard();
    }

    /// A record or the end of `partition` came.
    pub(super) fn heard(&mut self, partition: i32) {
        if self.unheard.remove(&partition) {
            self.check_heard();
        }
    }

    fn check_heard(&mut self) {
        if self.unheard.is_empty() {
            self.waiting = None;
        }
    }

    /// Whether every assigned partition was heard of.
    pub(super) fn all_heard(&self) -> bool {
        self.unheard.is_empty()
    }

    /// Whether no record is stashed.
    pub(super) fn is_empty(&self) -> bool {
        self.stash.is_empty()
    }

    /// The oldest stashed record.
    pub(super) fn pop(&mut self) -> Option<OwnedMessage> {
        let message = self.stash.pop_front()?;
        self.bytes -= weight(&message);
        Some(message)
    }

    /// Puts `message`, just popped or polled, back as the oldest stashed record: it opens the
    /// next batch instead of overfilling this one.
    pub(super) fn put_back(&mut self, message: OwnedMessage) {
        self.bytes += weight(&message);
        self.peak = self.peak.max(self.bytes);
        self.stash.push_front(message);
    }

    /// Stashes `message` (its partition was heard of).
    pub(super) fn push(&mut self, message: OwnedMessage) {
        self.heard(message.partition());
        self.bytes += weight(&message);
        self.peak = self.peak.max(self.bytes);
        self.stash.push_back(message);
    }

    /// Keeps the stashed records `keep` says yes to.
    pub(super) fn retain(&mut self, keep: impl Fn(&OwnedMessage) -> bool) {
        self.stash.retain(keep);
        self.bytes = self.stash.iter().map(weight).sum();
    }

    /// Polls the group consumer once without taking work: keeps the instance in its group
    /// while a long step runs. A record it returns is stashed; once the stash passes
    /// [`STASH_BYTES`], the partitions heard of are paused (see the module documentation).
    pub(super) fn serve(&mut self, consumer: &BaseConsumer<RebalanceLog>) {
        match consumer.poll(Duration::ZERO) {
            None => {}
            Some(Ok(message)) => {
                self.push(message.detach());
                if self.bytes >= self.limit {
                    self.hold(consumer);
                }
            }
            // A partition's end: the next batch learns it again.
            Some(Err(KafkaError::PartitionEOF(partition))) => self.heard(partition),
            Some(Err(error)) => self.consumer_error(&error),
        }
    }

    /// A consumer error (a broker outage): restarts the process if it is fatal, else logs it
    /// at a bounded rate.
    pub(super) fn consumer_error(&mut self, error: &KafkaError) {
        liveness::restart_if_fatal(self.stage, error);
        if let Some(skipped) = self.errors.allow() {
            tracing::warn!(%error, skipped, "consumer error");
        }
    }

    /// Pauses the assigned partitions heard of and not held yet.
    fn hold(&mut self, consumer: &BaseConsumer<RebalanceLog>) {
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for element in assignment.elements_for_topic(&self.topic) {
            let p = element.partition();
            if !self.unheard.contains(&p) && !self.held.contains(&p) {
                tpl.add_partition(&self.topic, p);
            }
        }
        if tpl.count() == 0 {
            return;
        }
        // A pause that fails only lets the stash grow: nothing is lost.
        match consumer.pause(&tpl) {
            Ok(()) => {
                self.held
                    .extend(tpl.elements().iter().map(|e| e.partition()));
                tracing::info!(held = ?self.held, bytes = self.bytes, "stash full: partitions paused while states load");
            }
            Err(error) => tracing::warn!(%error, "cannot pause the partitions"),
        }
    }

    /// Resumes the partitions [`Intake::hold`] paused (once no state loads). A resume that
    /// fails is tried again on the next call.
    pub(super) fn release(&mut self, consumer: &BaseConsumer<RebalanceLog>) {
        if self.held.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &self.held {
            tpl.add_partition(&self.topic, p);
        }
        match consumer.resume(&tpl) {
            Ok(()) => self.held.clear(),
            Err(error) => tracing::warn!(%error, "cannot resume the partitions, retrying"),
        }
    }
}

fn weight(message: &OwnedMessage) -> u64 {
    message.payload().map_or(0, |p| p.len() as u64)
}
