//! `tally parser`: the consumer group on `tally.files` that turns work units into sums.
//!
//! KIP-447 consume-transform-produce, one transaction per batch of units: the units' sums
//! (`tally.sums`), the done-states of their files (`tally.done`), bad lines
//! (`tally.dead-letter`) and the consumed offsets commit together, fenced by the consumer's
//! group metadata. A crash redoes at most the units of the one open transaction: that is the
//! checkpoint. One unit (check, sum the bytes not yet summed, records) is in `unit.rs`;
//! pruning the done-set of files that are done and gone, in `prune.rs`.
//!
//! The loop is synchronous on its own thread: librdkafka's transaction calls block, and
//! rebalance callbacks run inside `poll`, which this loop calls only between transactions, so a
//! rebalance can never cut a transaction in two. Parsing runs on the rayon pool.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::kafka::{self, TxnErrorKind};
use tally_core::liveness::{self, Liveness};
use tally_core::messages::{DeadLetter, StreamDone, WorkUnit};
use tally_core::shutdown::CancellationToken;
use tally_core::{KafkaArgs, LivenessArgs, Topics};

use crate::assignment::{Assignment, BatchLimits};
use crate::doneset::DoneSet;
use crate::engine::{EngineConfig, Merger};
use crate::offline::EngineArgs;
use crate::sink::{lossy, send_dead_letter, TxnProducer};

mod prune;
mod unit;

use unit::Txn;

pub use prune::Retention;

/// Done-states written by one transaction, by (files partition, stream).
type States = HashMap<(i32, String), StreamDone>;

/// Arguments of `tally parser`.
#[derive(Debug, Clone, clap::Args)]
pub struct ParserArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Liveness watchdog.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Parse engine.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Only files that resolve inside this directory are parsed; others are dead-lettered.
    #[arg(long, env = "TALLY_DATA_ROOT")]
    pub data_root: PathBuf,
    /// Most units per transaction.
    #[arg(long, env = "TALLY_UNITS_PER_TXN_MAX", default_value_t = 8)]
    pub units_per_txn_max: usize,
    /// Most unit bytes per transaction: bounds the time a transaction stays open.
    #[arg(long, env = "TALLY_TXN_BYTES_MAX", default_value_t = 1 << 30)]
    pub txn_bytes_max: u64,
    /// Kafka transaction timeout; a transaction must end well inside it.
    #[arg(long, env = "TALLY_TRANSACTION_TIMEOUT_MS", default_value_t = 60_000)]
    pub transaction_timeout_ms: u64,
    /// Stable instance name: part of the transactional.id, and the consumer's static group
    /// membership (`group.instance.id`). A restarted instance with the same name aborts its
    /// predecessor's open transaction at once instead of waiting for the transaction timeout,
    /// and takes its partitions back without a rebalance. Default: a random name.
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Forget a file's done-state once all of its bytes are done, its state is older than
    /// this, and the file is gone from its path (deleted, archived, replaced): such a file
    /// cannot be announced again, and the done-set stays as small as the files still there.
    /// A number with s, m, h or d, or `off` to keep every state forever.
    #[arg(long, env = "TALLY_DONE_RETENTION", default_value = "7d")]
    pub done_retention: Retention,
}

/// Counts since start, logged at exit.
#[derive(Debug, Default)]
struct Counters {
    /// Units parsed (in transactions that may still abort).
    units_summed: u64,
    /// Units skipped because the done-set had all their bytes.
    units_skipped: u64,
    /// Units rejected (dead-lettered).
    units_rejected: u64,
    /// Transactions aborted.
    aborts: u64,
}

/// Why a batch's transaction did not commit.
enum Failure {
    Kafka(KafkaError),
    /// A unit must be rejected; the transaction already holds some of its output.
    Reject {
        unit_id: String,
        reason: String,
    },
    /// The consumer has no group metadata (not a group member right now).
    NotInGroup,
}

impl From<KafkaError> for Failure {
    fn from(e: KafkaError) -> Self {
        Failure::Kafka(e)
    }
}

type Producer_ = TxnProducer;

struct Parser<'a> {
    args: &'a ParserArgs,
    topics: Topics,
    data_root: PathBuf,
    config: EngineConfig,
    pool: rayon::ThreadPool,
    group: Assignment,
    producer: Producer_,
    transactional_id: String,
    sums_partitions: i32,
    /// Units that failed in a way that needs an abort; rejected when seen again.
    forced_reject: HashMap<String, String>,
    counters: Counters,
    shutdown: CancellationToken,
    liveness: Liveness,
    /// When the done-set was last pruned.
    last_prune: Instant,
}

/// Runs a parser instance until `shutdown` is cancelled. Blocking: call it on its own thread.
pub fn run(args: &ParserArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    // Past the broker's own transaction timeout a transaction is dead anyway: the limit is
    // never below it.
    let limit = args
        .liveness
        .limit(Duration::from_millis(args.transaction_timeout_ms) + Duration::from_secs(30));
    let liveness = Liveness::start("parser", &args.kafka, limit);
    // Through a broker outage (also after the watchdog restarted us during one) keep trying.
    let start = liveness.step("start the parser");
    let mut parser = liveness::retry(shutdown, "start the parser", || {
        Parser::new(args, shutdown.clone(), liveness.clone())
    })?;
    drop(start);
    let result = parser.run();
    parser.group.leave();
    let c = &parser.counters;
    tracing::info!(
        summed = c.units_summed,
        skipped = c.units_skipped,
        rejected = c.units_rejected,
        aborts = c.aborts,
        "parser stopped"
    );
    result
}

fn create_producer(args: &ParserArgs, transactional_id: &str) -> anyhow::Result<Producer_> {
    let mut config = kafka::transactional_producer_config(
        &args.kafka,
        transactional_id,
        Duration::from_millis(args.transaction_timeout_ms),
    );
    // A bounded send queue: a full queue makes the engine wait, so memory stays flat.
    config.set("queue.buffering.max.kbytes", "65536");
    kafka::apply_overrides(&mut config, &args.kafka);
    let producer: Producer_ = config
        .create()
        .context("cannot create the Kafka producer")?;
    producer
        .init_transactions(Duration::from_secs(60))
        .context("cannot initialise Kafka transactions")?;
    Ok(producer)
}

impl<'a> Parser<'a> {
    fn new(
        args: &'a ParserArgs,
        shutdown: CancellationToken,
        liveness: Liveness,
    ) -> anyhow::Result<Self> {
        let topics = Topics::new(&args.kafka.topic_prefix);
        let data_root = std::fs::canonicalize(&args.data_root)
            .with_context(|| format!("cannot resolve --data-root {}", args.data_root.display()))?;
        let mut config = kafka::consumer_config(&args.kafka, &topics.parser_group);
        config
            .set("partition.assignment.strategy", "range")
            .set("max.poll.interval.ms", "300000");
        kafka::static_membership(&mut config, args.instance_id.as_deref());
        kafka::apply_overrides(&mut config, &args.kafka);
        let done_set = DoneSet::new(
            &args.kafka,
            &topics.done,
            &format!("{}.done-reader", topics.parser_group),
        )?;
        let group = Assignment::new(
            &config,
            &topics.files,
            done_set,
            liveness.clone(),
            shutdown.clone(),
        )?;
        let files = group.partition_count(&topics.files)?;
        let done = group.partition_count(&topics.done)?;
        let sums_partitions = group.partition_count(&topics.sums)?;
        if files == 0 || files != done || sums_partitions == 0 {
            bail!(
                "topics not set up: {} has {files} partitions, {} has {done}, {} has {sums_partitions} \
                 (files and done must match; run `tally init`)",
                topics.files, topics.done, topics.sums
            );
        }
        group.subscribe()?;
        let instance = args
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{:016x}", rand_u64()));
        let transactional_id = format!("{}.parser.{instance}", args.kafka.topic_prefix);
        let producer = create_producer(args, &transactional_id)?;
        tracing::info!(transactional_id, data_root = %data_root.display(), "parser started");
        Ok(Self {
            args,
            topics,
            data_root,
            config: args.engine.config(),
            pool: args.engine.pool()?,
            group,
            producer,
            transactional_id,
            sums_partitions,
            forced_reject: HashMap::new(),
            counters: Counters::default(),
            shutdown,
            liveness,
            last_prune: Instant::now(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            self.prune_if_due();
            let batch = self.group.collect(BatchLimits {
                units: self.args.units_per_txn_max,
                bytes: self.args.txn_bytes_max,
            })?;
            if batch.is_empty() {
                continue;
            }
            let step = self.liveness.step("a Kafka transaction");
            let result = self.transact(&batch);
            match result {
                Ok(states) => {
                    for ((partition, _), state) in states {
                        self.group.done_mut().insert(partition, state);
                    }
                    self.liveness.progress();
                    backoff = Duration::from_millis(100);
                }
                Err(failure) => {
                    self.counters.aborts += 1;
                    self.recover(failure, &batch)?;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            drop(step);
        }
        Ok(())
    }

    /// One transaction for the batch. Returns the done-states it wrote, by partition and
    /// stream (a unit sees the states written by earlier units of its batch).
    fn transact(&mut self, batch: &[OwnedMessage]) -> Result<States, Failure> {
        self.producer.begin_transaction()?;
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        let mut states = States::new();
        let mut txn = Txn {
            merger: Merger::new(self.sums_partitions as usize, self.config.keys_max),
            ends: Vec::new(),
        };
        for message in batch {
            let partition = message.partition();
            offsets.insert(partition, message.offset() + 1);
            let decoded = match message.payload().map(serde_json::from_slice::<WorkUnit>) {
                Some(Ok(unit)) => unit.check().map(|()| unit),
                Some(Err(e)) => Err(format!("not a work unit: {e}")),
                None => Err("empty notification".to_owned()),
            };
            let unit = match decoded {
                Ok(unit) => unit,
                Err(reason) => {
                    tracing::warn!(
                        partition,
                        offset = message.offset(),
                        reason,
                        "bad notification"
                    );
                    self.dead_letter(
                        None,
                        &DeadLetter::BadNotification {
                            partition,
                            offset: message.offset(),
                            reason,
                            raw: lossy(message.payload().unwrap_or_default()),
                        },
                    )?;
                    continue;
                }
            };
            let key = (partition, unit.stream.clone());
            let state = states
                .get(&key)
                .or_else(|| self.group.done().get(partition, &unit.stream))
                .cloned();
            if let Some(next) = self.count_unit(&mut txn, partition, &unit, state.as_ref())? {
                states.insert(key, next);
            }
        }
        self.end_transaction(txn)?;
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in &offsets {
            tpl.add_partition_offset(&self.topics.files, *partition, Offset::Offset(*next))?;
        }
        let metadata = self.group.group_metadata().ok_or(Failure::NotInGroup)?;
        self.producer
            .send_offsets_to_transaction(&tpl, &metadata, Duration::from_secs(30))?;
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(Timeout::Never) {
                Ok(()) => break,
                Err(e)
                    if kafka::classify_txn_error(&e) == TxnErrorKind::Retriable && tries < 10 =>
                {
                    tries += 1;
                    tracing::warn!(error = %e, tries, "commit failed, retrying");
                }
                Err(e) => return Err(Failure::Kafka(e)),
            }
        }
        tracing::debug!(streams = states.len(), "transaction committed");
        Ok(states)
    }

    fn dead_letter(&self, key: Option<&str>, record: &DeadLetter) -> Result<(), KafkaError> {
        send_dead_letter(&self.producer, &self.topics.dead_letter, key, record)
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
            Failure::Reject { unit_id, reason } => {
                self.forced_reject.insert(unit_id.clone(), reason.clone());
                TxnErrorKind::Abortable
            }
            Failure::NotInGroup => TxnErrorKind::Abortable,
        };
        let _step = self.liveness.step("recover from a failed transaction");
        let aborted =
            kind != TxnErrorKind::Fatal && self.producer.abort_transaction(Timeout::Never).is_ok();
        if !aborted {
            tracing::warn!("recreating the transactional producer");
            let (args, id) = (self.args, &self.transactional_id);
            self.producer = liveness::retry(
                &self.shutdown,
                "recreate the transactional producer",
                || create_producer(args, id),
            )?;
        }
        let partitions: HashSet<i32> = batch.iter().map(|m| m.partition()).collect();
        self.group.rewind(&partitions)
    }
}

fn rand_u64() -> u64 {
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
