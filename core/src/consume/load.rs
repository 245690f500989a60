//! A newly assigned partition's state, loaded before any of its records is processed (the
//! parser's done-set; the db-client's stored offset, where the partition resumes), while the
//! group consumer keeps being served.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::Offset;

use super::Group;
use crate::backoff::Backoff;
use crate::liveness::Throttle;

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

    /// Whether nothing is on its way to this stage's input: asked when a batch with
    /// [`super::BatchLimits::end_at_watermark`] is read up to the watermark with no writer's
    /// transaction open. `false` keeps the batch going until the end is told (one held fetch
    /// later), in which time a writer's next transaction shows as open. By default the
    /// watermark is trusted.
    fn upstream_drained(&mut self) -> bool {
        true
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
        let intake = &mut self.intake;
        let mut keep_alive = || {
            intake.serve(consumer);
            events.is_empty()
        };
        state.load(partition, &mut keep_alive)
    }

    /// Serves the group once; false once a rebalance came in.
    fn keep_alive(&mut self) -> bool {
        self.intake.serve(&self.consumer);
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
        self.intake.retain(|m| m.partition() != partition);
        tracing::info!(partition, ?offset, "resuming at the stage's own offset");
        Ok(())
    }
}
