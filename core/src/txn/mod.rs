//! The consume-transform-produce loop (KIP-447) that every transactional stage drives with its
//! own [`Handler`]: the parser (work units → sums) and the aggregator (sums → totals).
//!
//! One transaction per batch: the loop polls a batch from the stage's partitions ([`Group`],
//! bounded by [`BatchLimits`]), begins a transaction, lets the handler write its output into it
//! ([`Handler::process`]), adds the batch's consumed offsets (fenced by the consumer's group
//! metadata) and commits. A crash redoes at most the one open batch: that is the checkpoint.
//! When anything fails, the transaction is aborted (or the producer replaced when it is
//! fenced or broken), the consumer is rewound to the committed offsets, and the batch is read
//! again after a backoff; the handler hears of a batch only through
//! [`Handler::committed`] once it is in.
//!
//! The loop is synchronous on its own thread: librdkafka's transaction calls block, and
//! rebalance callbacks run inside `poll`, which this loop calls only between transactions, so
//! a rebalance can never cut a transaction in two. Every call that may block on the broker is
//! a [`Liveness`] step, so the watchdog restarts a stage that hangs.

mod group;
pub mod producer;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

pub use group::{BatchLimits, Group, PartitionState};
pub use producer::TxnProducer;

use crate::args::KafkaArgs;
use crate::backoff::Backoff;
use crate::kafka::{self, TxnErrorKind};
use crate::liveness::{self, Liveness};
use crate::shutdown::CancellationToken;

/// Why a batch's transaction did not commit.
#[derive(Debug)]
pub enum Failure {
    /// A Kafka call failed; classified with [`kafka::classify_txn_error`].
    Kafka(KafkaError),
    /// The handler asks to abort and redo the batch (it remembers why, e.g. a unit to reject
    /// when it comes again).
    Abort(String),
    /// The consumer has no group metadata (not a group member right now).
    NotInGroup,
}

impl From<KafkaError> for Failure {
    fn from(e: KafkaError) -> Self {
        Failure::Kafka(e)
    }
}

/// What a stage does with its batches.
pub trait Handler: PartitionState {
    /// What a committed batch leaves for the handler to remember.
    type Output;

    /// Writes the output of `batch` into the open transaction of `producer`. The batch's
    /// offsets are added by the loop.
    fn process(
        &mut self,
        producer: &TxnProducer,
        batch: &[OwnedMessage],
    ) -> Result<Self::Output, Failure>;

    /// The batch that produced `output` is committed.
    fn committed(&mut self, output: Self::Output) {
        let _ = output;
    }

    /// Called between transactions (at least every half second while idle): housekeeping that
    /// may run a transaction of its own.
    fn between(&mut self, group: &Group, producer: &TxnProducer) {
        let _ = (group, producer);
    }
}

/// How a stage's loop is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The stage's name (logs, liveness).
    pub stage: &'static str,
    /// The input topic.
    pub input: String,
    /// The consumer group.
    pub group: String,
    /// A stable instance name: static group membership and the `transactional.id` suffix.
    /// `None`: a random name, dynamic membership.
    pub instance_id: Option<String>,
    /// `transactional.id` prefix; the id is `<prefix>.<instance>`.
    pub transactional_prefix: String,
    /// Kafka's transaction timeout.
    pub transaction_timeout: Duration,
    /// Batch bounds.
    pub limits: BatchLimits,
    /// Consumer settings of the stage (before the user's `-X` overrides).
    pub consumer_options: Vec<(&'static str, String)>,
}

/// A running consume-transform-produce loop.
pub struct TxnLoop<H> {
    kafka: KafkaArgs,
    settings: Settings,
    group: Group,
    producer: TxnProducer,
    transactional_id: String,
    handler: H,
    liveness: Liveness,
    shutdown: CancellationToken,
    aborts: u64,
}

impl<H: Handler> TxnLoop<H> {
    /// Creates the group consumer, the handler (`make`, which may ask the group for metadata),
    /// joins the group and initialises the transactional producer.
    pub fn new(
        kafka: &KafkaArgs,
        settings: Settings,
        liveness: Liveness,
        shutdown: CancellationToken,
        make: impl FnOnce(&Group) -> anyhow::Result<H>,
    ) -> anyhow::Result<Self> {
        let mut config = kafka::consumer_config(kafka, &settings.group);
        for (key, value) in &settings.consumer_options {
            config.set(*key, value);
        }
        kafka::static_membership(&mut config, settings.instance_id.as_deref());
        kafka::apply_overrides(&mut config, kafka);
        let group = Group::new(
            settings.stage,
            &config,
            &settings.input,
            liveness.clone(),
            shutdown.clone(),
        )?;
        let handler = make(&group)?;
        group.subscribe()?;
        let instance = settings
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{:016x}", random_u64()));
        let transactional_id = format!("{}.{instance}", settings.transactional_prefix);
        let producer = producer::create(kafka, &transactional_id, settings.transaction_timeout)?;
        tracing::info!(
            stage = settings.stage,
            transactional_id,
            "transactional loop started"
        );
        Ok(Self {
            kafka: kafka.clone(),
            settings,
            group,
            producer,
            transactional_id,
            handler,
            liveness,
            shutdown,
            aborts: 0,
        })
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Transactions aborted so far.
    pub fn aborts(&self) -> u64 {
        self.aborts
    }

    /// Leaves the group (at the end).
    pub fn leave(&self) {
        self.group.leave();
    }

    /// Runs batches until `shutdown` is cancelled.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while !self.shutdown.is_cancelled() {
            self.handler.between(&self.group, &self.producer);
            let batch = self
                .group
                .collect(self.settings.limits, &mut self.handler)?;
            if batch.is_empty() {
                continue;
            }
            let step = self.liveness.step("a Kafka transaction");
            let started = std::time::Instant::now();
            let stage_metrics = crate::metrics::stage(self.settings.stage);
            match self.transact(&batch) {
                Ok(output) => {
                    metrics::histogram!(stage_metrics.batch_seconds).record(started.elapsed());
                    self.handler.committed(output);
                    self.liveness.progress();
                    backoff.reset();
                }
                Err(failure) => {
                    self.aborts += 1;
                    metrics::counter!(stage_metrics.retries).increment(1);
                    self.recover(failure, &batch)?;
                    std::thread::sleep(backoff.next_delay());
                }
            }
            drop(step);
        }
        Ok(())
    }

    fn transact(&mut self, batch: &[OwnedMessage]) -> Result<H::Output, Failure> {
        self.producer.begin_transaction()?;
        let output = self.handler.process(&self.producer, batch)?;
        let mut next: HashMap<i32, i64> = HashMap::new();
        for message in batch {
            let e = next.entry(message.partition()).or_insert(0);
            *e = (*e).max(message.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in &next {
            tpl.add_partition_offset(&self.settings.input, *partition, Offset::Offset(*offset))?;
        }
        let metadata = self.group.group_metadata().ok_or(Failure::NotInGroup)?;
        self.producer
            .send_offsets_to_transaction(&tpl, &metadata, Duration::from_secs(30))?;
        commit(&self.producer)?;
        tracing::debug!(
            stage = self.settings.stage,
            records = batch.len(),
            "transaction committed"
        );
        Ok(output)
    }

    /// After a failed transaction: abort it (or replace a fenced producer), and rewind the
    /// consumer to the committed offsets so the batch is consumed again.
    fn recover(&mut self, failure: Failure, batch: &[OwnedMessage]) -> anyhow::Result<()> {
        let kind = match &failure {
            Failure::Kafka(e) => {
                let kind = kafka::classify_txn_error(e);
                tracing::warn!(error = %e, ?kind, "transaction failed");
                kind
            }
            Failure::Abort(reason) => {
                tracing::info!(reason, "transaction aborted, batch redone");
                TxnErrorKind::Abortable
            }
            Failure::NotInGroup => TxnErrorKind::Abortable,
        };
        let _step = self.liveness.step("recover from a failed transaction");
        let aborted =
            kind != TxnErrorKind::Fatal && self.producer.abort_transaction(Timeout::Never).is_ok();
        if !aborted {
            tracing::warn!("recreating the transactional producer");
            let (kafka, id, timeout) = (
                &self.kafka,
                &self.transactional_id,
                self.settings.transaction_timeout,
            );
            self.producer = liveness::retry(
                &self.shutdown,
                "recreate the transactional producer",
                || producer::create(kafka, id, timeout),
            )?;
        }
        let partitions: HashSet<i32> = batch.iter().map(|m| m.partition()).collect();
        self.group.rewind(&partitions)
    }
}

/// Runs a transactional stage until `shutdown` is cancelled: its watchdog (the stall limit is
/// never below the transaction timeout plus 30 s: past the broker's own timeout a transaction
/// is dead anyway), `start` retried through broker outages (also after the watchdog restarted
/// the process during one), the loop, then leaving the group; `stopped` logs the handler's
/// counts and the aborts. Blocking: call it on its own thread.
pub fn run_stage<H: Handler>(
    stage: &'static str,
    kafka: &KafkaArgs,
    liveness: &crate::LivenessArgs,
    transaction_timeout: Duration,
    shutdown: &CancellationToken,
    start: impl Fn(Liveness) -> anyhow::Result<TxnLoop<H>>,
    stopped: impl FnOnce(&H, u64),
) -> anyhow::Result<()> {
    let liveness = Liveness::start(
        stage,
        kafka,
        liveness,
        transaction_timeout + Duration::from_secs(30),
    )?;
    let what = format!("start the {stage}");
    let step = liveness.step("start the stage");
    let mut stage_loop = liveness::retry(shutdown, &what, || start(liveness.clone()))?;
    drop(step);
    let result = stage_loop.run();
    stage_loop.leave();
    stopped(stage_loop.handler(), stage_loop.aborts());
    result
}

/// Commits the open transaction, retrying what is retriable (a flush timeout) a few times.
pub fn commit(producer: &TxnProducer) -> Result<(), KafkaError> {
    let mut tries = 0;
    loop {
        match producer.commit_transaction(Timeout::Never) {
            Ok(()) => return Ok(()),
            Err(e) if kafka::classify_txn_error(&e) == TxnErrorKind::Retriable && tries < 10 => {
                tries += 1;
                tracing::warn!(error = %e, tries, "commit failed, retrying");
            }
            Err(e) => return Err(e),
        }
    }
}

/// A random 64-bit number (instance names), without a dependency.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
