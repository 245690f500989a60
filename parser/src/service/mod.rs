//! `tally parser`: the consumer group on `tally.files` that turns work units into sums.
//!
//! The parser is a [`Handler`] of tally-core's consume-transform-produce loop
//! ([`tally_core::txn`]), one transaction per batch of units: the units' sums (`tally.sums`),
//! the done-states of their files (`tally.done`), bad lines (`tally.dead-letter`) and the
//! consumed offsets commit together. A crash redoes at most the units of the one open
//! transaction. The done-set of a partition is loaded when it is assigned
//! ([`PartitionState::load`]). One unit (check, sum the bytes not yet summed, records) is in
//! `unit.rs`; pruning the done-set of files that are done and gone, in `prune.rs`. Parsing runs
//! on the rayon pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use tally_core::args::{InstanceArgs, PeriodArgs, TransactionArgs, UnitBatchArgs};
use tally_core::liveness::Liveness;
use tally_core::shutdown::CancellationToken;
use tally_core::txn::{
    producer, BatchLimits, Failure, Group, Handler, Loaded, PartitionState, Settings, Transactions,
    TxnLoop, TxnProducer,
};
use tally_core::{KafkaArgs, LivenessArgs, Topics};
use tally_model::messages::{DeadLetter, StreamDone, WorkUnit};

use crate::doneset::DoneSet;
use crate::offline::EngineArgs;
use crate::sink::lossy;
use tally_engine::{EngineConfig, Merger};

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
    /// Units per transaction.
    #[command(flatten)]
    pub units: UnitBatchArgs,
    /// The transaction timeout.
    #[command(flatten)]
    pub transactions: TransactionArgs,
    /// The instance name.
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// The usage period.
    #[command(flatten)]
    pub period: PeriodArgs,
    /// Forget a file's done-state once all of its bytes are done, its state is older than
    /// this, and the file is gone from its path (deleted, archived, replaced): such a file
    /// cannot be announced again, and the done-set stays as small as the files still there.
    /// A number with s, m, h or d, or `off` to keep every state forever.
    #[arg(long, env = "TALLY_DONE_RETENTION", default_value = "7d")]
    pub done_retention: Retention,
    /// Bad lines of one unit written to the dead-letter topic in full (`bad-line` records);
    /// past them, one `bad-lines-summary` record at the unit's end counts every bad line by
    /// reason. Bounds what a file of garbage costs the topic, its transaction and `status`.
    #[arg(long, env = "TALLY_DEAD_LETTER_LINES", default_value_t = 100)]
    pub dead_letter_lines: u64,
    /// CPU niceness of the parse threads (0 to 19; 0 leaves them as the process). On a host
    /// shared with latency work (PostgreSQL, `tally api`), niced parse threads still take
    /// every idle core but yield to it; the price is some throughput (the scheduler balances
    /// niced threads by weight). docs/operations.md has the figures.
    #[arg(long, env = "TALLY_PARSE_NICE", default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub parse_nice: i32,
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
}

/// What a transaction did, for the metrics once it is committed (an aborted transaction's
/// work is redone, and counted then).
#[derive(Debug, Default)]
struct Pending {
    lines: u64,
    bytes: u64,
    summed: u64,
    skipped: u64,
    rejected: u64,
    unit_dead_letters: u64,
    sums_records: u64,
}

impl Pending {
    fn record(self) {
        use tally_core::metrics as m;
        metrics::counter!(m::PARSER_LINES).increment(self.lines);
        metrics::counter!(m::PARSER_BYTES).increment(self.bytes);
        metrics::counter!(m::PARSER_UNITS, "outcome" => "summed").increment(self.summed);
        metrics::counter!(m::PARSER_UNITS, "outcome" => "skipped").increment(self.skipped);
        metrics::counter!(m::PARSER_UNITS, "outcome" => "rejected").increment(self.rejected);
        metrics::counter!(m::PARSER_DEAD_LETTERS, "kind" => "unit")
            .increment(self.unit_dead_letters);
        metrics::counter!(m::PARSER_SUMS_RECORDS).increment(self.sums_records);
    }
}

/// The parser's handler: its done-set, engine and counters.
struct Parser<'a> {
    args: &'a ParserArgs,
    topics: Topics,
    data_root: PathBuf,
    config: EngineConfig,
    /// Most keys merged per transaction ([`EngineArgs::merge_keys_max`]).
    merge_keys_max: usize,
    pool: rayon::ThreadPool,
    done: DoneSet,
    sums_partitions: i32,
    /// Units that failed in a way that needs an abort; rejected when seen again.
    forced_reject: HashMap<String, String>,
    counters: Counters,
    pending: Pending,
    liveness: Liveness,
    /// When the done-set was last pruned.
    last_prune: Instant,
}

/// Runs a parser instance until `shutdown` is cancelled. Blocking: call it on its own thread.
pub fn run(args: &ParserArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    // Will not heal by waiting: say so at once.
    if !args.data_root.is_dir() {
        anyhow::bail!(
            "--data-root {} is not a directory",
            args.data_root.display()
        );
    }
    tally_core::txn::run_stage(
        "parser",
        &args.kafka,
        &args.liveness,
        args.transactions.timeout(),
        shutdown,
        |liveness| start_loop(args, shutdown.clone(), liveness),
        |parser: &Parser<'_>, aborts| {
            let c = &parser.counters;
            tracing::info!(
                summed = c.units_summed,
                skipped = c.units_skipped,
                rejected = c.units_rejected,
                aborts,
                "parser stopped"
            );
        },
    )
}

fn start_loop<'a>(
    args: &'a ParserArgs,
    shutdown: CancellationToken,
    liveness: Liveness,
) -> anyhow::Result<TxnLoop<Parser<'a>>> {
    let topics = Topics::new(&args.kafka.topic_prefix);
    let data_root = std::fs::canonicalize(&args.data_root)
        .with_context(|| format!("cannot resolve --data-root {}", args.data_root.display()))?;
    let settings = Settings {
        stage: "parser",
        input: topics.files.clone(),
        group: topics.parser_group.clone(),
        instance_id: args.instance.instance_id.clone(),
        limits: BatchLimits {
            records: args.units.units_per_txn_max,
            weight: args.units.txn_bytes_max,
            idle: Duration::from_millis(20),
            max_wait: Duration::from_secs(2),
            wait_for_open: false,
            read_through: false,
            end_at_watermark: false,
        },
        consumer_options: vec![
            ("partition.assignment.strategy", "range".to_owned()),
            ("max.poll.interval.ms", "300000".to_owned()),
        ],
    };
    let handler_liveness = liveness.clone();
    let transactions = Transactions {
        prefix: format!("{}.parser", args.kafka.topic_prefix),
        timeout: args.transactions.timeout(),
    };
    tally_core::txn::start(
        &args.kafka,
        settings,
        transactions,
        liveness,
        shutdown,
        |group| {
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
            let done_set = DoneSet::new(
                &args.kafka,
                &topics.done,
                &format!("{}.done-reader", topics.parser_group),
                args.transactions.timeout(),
            )?;
            tracing::info!(data_root = %data_root.display(), "parser started");
            Ok(Parser {
                args,
                topics: topics.clone(),
                data_root,
                config: args.engine.config(),
                merge_keys_max: args.engine.merge_keys_max(),
                pool: args.engine.pool_at(args.parse_nice)?,
                done: done_set,
                sums_partitions,
                forced_reject: HashMap::new(),
                counters: Counters::default(),
                pending: Pending::default(),
                liveness: handler_liveness,
                last_prune: Instant::now(),
            })
        },
    )
}

impl PartitionState for Parser<'_> {
    fn load(
        &mut self,
        partition: i32,
        keep_alive: &mut dyn FnMut() -> bool,
    ) -> anyhow::Result<Loaded> {
        Ok(match self.done.load(partition, keep_alive)? {
            true => Loaded::Ready,
            false => Loaded::Interrupted,
        })
    }

    fn revoked(&mut self, partitions: &[i32]) {
        self.done.forget(partitions);
    }

    /// A unit weighs its bytes (a batch is bounded by the bytes it parses).
    fn weight(&self, message: &OwnedMessage) -> u64 {
        message
            .payload()
            .and_then(|p| serde_json::from_slice::<WorkUnit>(p).ok())
            .map_or(0, |unit| unit.end.saturating_sub(unit.start))
    }
}

impl Handler for Parser<'_> {
    /// The done-states the transaction wrote, by partition and stream.
    type Output = States;

    /// The batch's units in one transaction (a unit sees the states written by earlier units
    /// of its batch), their merged sums, then their end markers, then the streams' new states.
    fn process(
        &mut self,
        producer: &TxnProducer,
        batch: &[OwnedMessage],
    ) -> Result<States, Failure> {
        self.pending = Pending::default();
        let mut states = States::new();
        let mut txn = Txn::new(
            producer,
            Merger::new(self.sums_partitions as usize, self.merge_keys_max),
        );
        // The transaction shows as open on every sums partition from its start (an empty sums
        // record each): an aggregator or db-client whose input is drained meanwhile waits for
        // these sums (at most its interval) instead of writing its consumers without them
        // and then again with them. The merged sums themselves leave only at the end.
        let open = tally_model::codec::encode_sums(None, &[]);
        for partition in 0..self.sums_partitions {
            tally_core::txn::producer::send(
                producer,
                &self.topics.sums,
                Some(partition),
                None,
                &open,
            )?;
        }
        for message in batch {
            let partition = message.partition();
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
                    self.pending.unit_dead_letters += 1;
                    self.dead_letter(
                        producer,
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
                .or_else(|| self.done.get(partition, &unit.stream))
                .cloned();
            if let Some(next) = self.count_unit(&mut txn, &unit, state.as_ref())? {
                states.insert(key, next);
            }
        }
        self.end_transaction(txn)?;
        self.send_states(producer, &states)?;
        Ok(states)
    }

    fn committed(&mut self, states: States) {
        std::mem::take(&mut self.pending).record();
        for ((partition, _), state) in states {
            self.done.insert(partition, state);
        }
    }

    fn between(&mut self, group: &Group, producer: &TxnProducer) {
        self.prune_if_due(group, producer);
    }
}

impl Parser<'_> {
    fn dead_letter(
        &self,
        producer: &TxnProducer,
        key: Option<&str>,
        record: &DeadLetter,
    ) -> Result<(), KafkaError> {
        producer::send_json(producer, &self.topics.dead_letter, key, record)
    }
}
