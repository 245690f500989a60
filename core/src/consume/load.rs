//! A newly assigned partition's state, loaded before any of its records is processed (the
//! parser's done-set; the db-client's stored offset, where the partition resumes), while the
//! group consumer keeps being served.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::Offset;
use std::collections::VecDeque;

use super::Group;
use crate::backoff::Backoff;
use crate::liveness::{self, Throttle};
use crate::rebalance::RebalanceLog;

/// How long a seek refused because the partition is not ready yet is retried before it
/// counts as a failure (see [`Group::seek_when_ready`]).
const SEEK_READY_WITHIN: Duration = Duration::from_secs(2);
/// The pause between those retries.
const SEEK_READY_STEP: Duration = Duration::from_millis(5);

/// Whether `error` is librdkafka refusing a seek on a partition whose fetcher has not
/// started yet (`RD_KAFKA_RESP_ERR__STATE`). rust-rdkafka passes a seek's error on as
/// librdkafka's text only; the code's `Display` is `State (<that text>)`.
pub(super) fn is_not_ready(error: &anyhow::Error) -> bool {
    matches!(error.downcast_ref::<KafkaError>(), Some(KafkaError::Seek(text))
        if RDKafkaErrorCode::State.to_string().ends_with(&format!(" ({text})")))
}

/// How loading a partition's state ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Loaded: its records are read from the group's committed offset on.
    Ready,
    /// Loaded, and its records are read from this offset on (the stage keeps its offsets
    /// itself, as the db-client does in PostgreSQL): the consumer is moved there first, and
    /// what it polled before is dropped.
    ReadyAt(rdkafka::Offset),
    /// A rebalance came in: tried again after it.
    Interrupted,
}

/// What a stage keeps per input partition, told of the group's changes.
pub trait PartitionState {
    /// Loads the state of newly assigned `partition` before any of its records is processed.
    /// Long loads call `keep_alive` often: it serves the group and returns false once a
    /// rebalance came in (then return [`Loaded::Interrupted`]). An error is retried after a
    /// backoff, unless it is a [`Stop`]: then the loop ends with it.
    fn load(
        &mut self,
        partition: i32,
        keep_alive: &mut dyn FnMut() -> bool,
    ) -> anyhow::Result<Loaded> {
        let _ = (partition, keep_alive);
        Ok(Loaded::Ready)
    }

    /// `partitions` were taken away: forget their state.
    fn revoked(&mut self, partitions: &[i32]) {
        let _ = partitions;
    }

    /// The weight of a record against [`super::BatchLimits::weight`].
    fn weight(&self, message: &OwnedMessage) -> u64 {
        message.payload().map_or(0, |p| p.len() as u64)
    }
}

/// A load error no retry heals (e.g. a recreated input topic): the stage stops with it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Stop(pub anyhow::Error);

impl Group {
    /// Loads the state of every partition in `loading`. No record of a partition is processed
    /// before its state is complete, so this retries through broker outages rather than
    /// guess (the watchdog restarts the process if the broker answers and it still does not
    /// finish). Returns early only on shutdown.
    pub(super) fn load_pending(
        &mut self,
        batch: &mut Vec<OwnedMessage>,
        state: &mut dyn PartitionState,
    ) -> anyhow::Result<()> {
        let _step = self.liveness.step("load partition state");
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut failures = Throttle::new(Duration::from_secs(10));
        while let Some(&partition) = self.loading.first() {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.pause_assignment(true);
            let loaded = self.load_one(partition, state);
            let loaded = match loaded {
                Ok(Loaded::ReadyAt(offset)) => self.seek_when_ready(partition, offset),
                other => other,
            };
            match loaded {
                Ok(Loaded::Ready | Loaded::ReadyAt(_)) => {
                    self.loading.remove(&partition);
                    self.assigned.insert(partition);
                    backoff.reset();
                }
                Ok(Loaded::Interrupted) => {} // a rebalance came in: handled below
                Err(error) if error.is::<Stop>() => return Err(error),
                Err(error) => {
                    if let Some(skipped) = failures.allow() {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            partition,
                            skipped,
                            "cannot load the partition's state, retrying"
                        );
                    }
                    let until = Instant::now() + backoff.next_delay();
                    while Instant::now() < until && self.keep_alive() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            self.handle_rebalance(batch, state);
        }
        self.pause_assignment(false);
        Ok(())
    }

    /// Loads the state of `partition`, serving the group meanwhile.
    fn load_one(
        &mut self,
        partition: i32,
        state: &mut dyn PartitionState,
    ) -> anyhow::Result<Loaded> {
        let consumer = &self.consumer;
        let events = &self.events;
        let stash = &mut self.stash;
        let errors = &mut self.errors;
        let stage = self.stage;
        let mut keep_alive = || {
            serve_group(stage, consumer, stash, errors);
            events.is_empty()
        };
        state.load(partition, &mut keep_alive)
    }

    /// Serves the group once; false once a rebalance came in.
    fn keep_alive(&mut self) -> bool {
        serve_group(
            self.stage,
            &self.consumer,
            &mut self.stash,
            &mut self.errors,
        );
        self.events.is_empty()
    }

    /// Moves `partition` to `offset` as soon as librdkafka lets it: a partition assigned a
    /// moment ago refuses a seek (`Local: Erroneous state`) until its fetcher knows where to
    /// start, a few milliseconds later. That refusal is waited out in short steps while the
    /// group is served, for up to [`SEEK_READY_WITHIN`]; it used to cost a failure's backoff
    /// (200 ms and more) at every start and rebalance. Other errors, and a refusal that
    /// lasts, go to the caller's backoff.
    fn seek_when_ready(&mut self, partition: i32, offset: Offset) -> anyhow::Result<Loaded> {
        let deadline = Instant::now() + SEEK_READY_WITHIN;
        loop {
            match self.seek(partition, offset) {
                Ok(()) => return Ok(Loaded::Ready),
                Err(error) if is_not_ready(&error) && Instant::now() < deadline => {
                    if !self.keep_alive() {
                        return Ok(Loaded::Interrupted);
                    }
                    std::thread::sleep(SEEK_READY_STEP);
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Moves `partition` to `offset`, and drops what was polled of it before.
    fn seek(&mut self, partition: i32, offset: Offset) -> anyhow::Result<()> {
        self.consumer
            .seek(&self.topic, partition, offset, Duration::from_secs(5))
            .with_context(|| format!("cannot move partition {partition} to {offset:?}"))?;
        self.stash.retain(|m| m.partition() != partition);
        tracing::info!(partition, ?offset, "resuming at the stage's own offset");
        Ok(())
    }
}

/// Polls the group consumer without taking work: keeps the instance in its group while a
/// long step runs. Anything it returns (only from partitions not yet paused) is kept in order.
pub(super) fn serve_group(
    stage: &'static str,
    consumer: &BaseConsumer<RebalanceLog>,
    stash: &mut VecDeque<OwnedMessage>,
    errors: &mut Throttle,
) {
    match consumer.poll(Duration::ZERO) {
        None => {}
        Some(Ok(message)) => stash.push_back(message.detach()),
        // A partition's end: the next batch learns it again.
        Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
        Some(Err(error)) => {
            liveness::restart_if_fatal(stage, &error);
            if let Some(skipped) = errors.allow() {
                tracing::warn!(%error, skipped, "consumer error");
            }
        }
    }
}
