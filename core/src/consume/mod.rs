//! The one consume loop every consuming stage runs: the parser and the aggregator with a Kafka
//! transaction as their commit ([`crate::txn`]), the db-client with PostgreSQL transactions that
//! carry the consumed offsets.
//!
//! The loop polls a batch from the stage's partitions ([`Input::collect`], bounded by
//! [`BatchLimits`]; [`Group`] is the group consumer behind it), hands it to the stage's
//! [`Commit`], which writes the batch's output and its consumed offsets in one atomic step, and
//! tells the commit once it is in ([`Commit::committed`]). What to do when a commit fails is the
//! commit's call ([`Commit::recover`]): abort and read the batch again from the committed
//! offsets ([`Recovery::Rewind`], Kafka transactions), or keep the batch in hand and write it
//! again ([`Recovery::Retry`], a database outage: nothing is skipped, nothing re-read), each
//! after a backoff; an error no retry can heal ([`Failure::Stop`]) ends the loop. Batching,
//! rebalances, liveness steps, backoff and the retry metrics are therefore written once, here.
//!
//! The loop is synchronous on its own thread: librdkafka's calls block, and rebalance callbacks
//! run inside `poll`, which the loop calls only between commits, so a rebalance never cuts a
//! commit in two. A commit may still do its work in parallel (the db-client writes one batch
//! as several database transactions, one per writer share).

mod ends;
mod group;
mod intake;
mod load;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};

pub use group::{BatchLimits, Group, Loaded, PartitionState, Stop};

use crate::args::KafkaArgs;
use crate::backoff::Backoff;
use crate::kafka;
use crate::liveness::Liveness;
use crate::shutdown::{self, CancellationToken};

/// Why a batch did not commit.
#[derive(Debug)]
pub enum Failure {
    /// A Kafka call failed; classified with [`kafka::classify_txn_error`].
    Kafka(KafkaError),
    /// The stage asks to abort and redo the batch (it remembers why, e.g. a unit to reject
    /// when it comes again).
    Abort(String),
    /// The consumer has no group metadata (not a group member right now).
    NotInGroup,
    /// Anything else that a retry may heal (a database outage).
    Other(anyhow::Error),
    /// What no retry heals: the loop ends with this error (an operator must decide).
    Stop(anyhow::Error),
    /// A transaction that did not finish within its timeout (the broker has aborted it by
    /// then): its producer is replaced, not asked to abort (that call could hang the same way).
    Stuck(String),
}

impl From<KafkaError> for Failure {
    fn from(e: KafkaError) -> Self {
        Failure::Kafka(e)
    }
}

/// What the loop does with a batch whose commit failed, after the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Read the batch's partitions again from their committed offsets.
    Rewind,
    /// Write the same batch again (it stays in hand).
    Retry,
}

/// Where batches come from: the group consumer ([`Group`]), or an in-memory input in tests.
pub trait Input {
    /// Polls a batch bounded by `limits`, telling `state` of the group's changes.
    fn collect(
        &mut self,
        limits: BatchLimits,
        state: &mut dyn PartitionState,
    ) -> anyhow::Result<Vec<OwnedMessage>>;

    /// Moves `partitions` back to their committed offsets, so that a batch is read again.
    fn rewind(&mut self, partitions: &HashSet<i32>) -> anyhow::Result<()>;
}

/// How a stage makes a batch's output durable together with the batch's consumed offsets.
pub trait Commit<I: Input>: PartitionState {
    /// What a committed batch leaves for the stage to remember.
    type Output;

    /// The liveness step a commit is (what the watchdog names when one hangs).
    fn what(&self) -> &'static str;

    /// How long writing `batch` may legitimately take, when that can be longer than the
    /// stage's stall limit (the db-client's transactions, whose timeout grows with the batch);
    /// the liveness step of the write gets that allowance ([`Liveness::step_within`]).
    fn allowance(&self, batch: &[OwnedMessage]) -> Duration {
        let _ = batch;
        Duration::ZERO
    }

    /// Writes `batch`'s output and its next offsets, all or nothing.
    fn write(&mut self, input: &I, batch: &[OwnedMessage]) -> Result<Self::Output, Failure>;

    /// The batch that produced `output` is committed.
    fn committed(&mut self, input: &I, output: Self::Output) {
        let _ = (input, output);
    }

    /// After a failed [`Commit::write`]: make ready to go on (abort, replace a client), and say
    /// whether the batch is read again or written again.
    fn recover(&mut self, failure: Failure) -> anyhow::Result<Recovery>;

    /// Called between batches (at least every half second while idle): housekeeping.
    fn between(&mut self, input: &I) {
        let _ = input;
    }
}

/// How a stage's group consumer is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The stage's name (logs, liveness, metrics).
    pub stage: &'static str,
    /// The input topic.
    pub input: String,
    /// The consumer group.
    pub group: String,
    /// A stable instance name: static group membership (and, for Kafka transactions, the
    /// `transactional.id` suffix). `None`: dynamic membership.
    pub instance_id: Option<String>,
    /// Batch bounds.
    pub limits: BatchLimits,
    /// Consumer settings of the stage (before the user's `-X` overrides).
    pub consumer_options: Vec<(&'static str, String)>,
}

impl Group {
    /// The group consumer a stage's loop reads from, as `settings` say (not subscribed yet):
    /// the one place a consume loop's consumer is created.
    pub fn open(
        kafka: &KafkaArgs,
        settings: &Settings,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let mut config = kafka::consumer_config(kafka, &settings.group);
        for (key, value) in &settings.consumer_options {
            config.set(*key, value);
        }
        kafka::static_membership(&mut config, settings.instance_id.as_deref());
        kafka::apply_overrides(&mut config, kafka);
        Group::new(settings.stage, &config, &settings.input, liveness, shutdown)
    }
}

/// A running consume loop: an input, a commit, and what they share.
pub struct ConsumeLoop<I, C> {
    stage: &'static str,
    limits: BatchLimits,
    input: I,
    commit: C,
    liveness: Liveness,
    shutdown: CancellationToken,
    failures: u64,
    backoff: Backoff,
}

impl<I: Input, C: Commit<I>> ConsumeLoop<I, C> {
    /// A loop of `stage` over `input` with `commit`.
    pub fn new(
        stage: &'static str,
        limits: BatchLimits,
        input: I,
        commit: C,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            stage,
            limits,
            input,
            commit,
            liveness,
            shutdown,
            failures: 0,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
        }
    }

    /// The stage's commit (its state, its counts).
    pub fn commit(&self) -> &C {
        &self.commit
    }

    /// The input.
    pub fn input(&self) -> &I {
        &self.input
    }

    /// The input and the commit, once the loop is over.
    pub fn into_parts(self) -> (I, C) {
        (self.input, self.commit)
    }

    /// Failed commits so far (aborts, retries).
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Runs batches until `shutdown` is cancelled, or a failure stops the stage.
    pub fn run(&mut self) -> anyhow::Result<()> {
        while !self.shutdown.is_cancelled() {
            self.commit.between(&self.input);
            let batch = self.input.collect(self.limits, &mut self.commit)?;
            if !batch.is_empty() {
                self.apply(&batch)?;
            }
        }
        Ok(())
    }

    /// Commits `batch`: written again while the commit says retry, given up (to be read
    /// again) when it says rewind.
    fn apply(&mut self, batch: &[OwnedMessage]) -> anyhow::Result<()> {
        let metrics = crate::metrics::stage(self.stage);
        loop {
            let started = Instant::now();
            let written = {
                let allowance = self.commit.allowance(batch);
                let _step = self.liveness.step_within(self.commit.what(), allowance);
                self.commit.write(&self.input, batch)
            };
            let failure = match written {
                Ok(output) => {
                    metrics::histogram!(metrics.batch_seconds).record(started.elapsed());
                    self.commit.committed(&self.input, output);
                    self.liveness.progress();
                    self.backoff.reset();
                    return Ok(());
                }
                Err(Failure::Stop(error)) => return Err(error),
                Err(failure) => failure,
            };
            self.failures += 1;
            metrics::counter!(metrics.retries).increment(1);
            let recovery = {
                let _step = self.liveness.step("recover from a failed commit");
                self.commit.recover(failure)?
            };
            let delay = self.backoff.next_delay();
            match recovery {
                Recovery::Rewind => {
                    let partitions: HashSet<i32> = batch.iter().map(|m| m.partition()).collect();
                    self.input.rewind(&partitions)?;
                    shutdown::sleep(&self.shutdown, delay);
                    return Ok(());
                }
                Recovery::Retry => {
                    if shutdown::sleep(&self.shutdown, delay) {
                        return Ok(());
                    }
                }
            }
        }
    }
}
