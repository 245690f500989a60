//! `tally parser`: the consumer group on `tally.files` that turns work units into sums.
//!
//! KIP-447 consume-transform-produce, one transaction per batch of units: the units' sums
//! (`tally.sums`), completion records (`tally.done`), bad lines (`tally.dead-letter`) and the
//! consumed offsets commit together, fenced by the consumer's group metadata. A crash redoes at
//! most the units of the one open transaction: that is the checkpoint.
//!
//! The loop is synchronous on its own thread: librdkafka's transaction calls block, and
//! rebalance callbacks run inside `poll`, which this loop calls only between transactions, so a
//! rebalance can never cut a transaction in two. Parsing runs on the rayon pool.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_core::kafka::{self, TxnErrorKind};
use tally_core::messages::{
    consumer_partition, DeadLetter, Outcome, SumsRecord, UnitDone, WorkUnit,
};
use tally_core::shutdown::CancellationToken;
use tally_core::{KafkaArgs, Topics};

use crate::doneset::DoneSet;
use crate::engine::{self, BadLine, EngineConfig, EngineError, Sink, Source, Stopped};
use crate::offline::EngineArgs;
use crate::source::FileSource;
use crate::watchdog::Watchdog;

/// Arguments of `tally parser`.
#[derive(Debug, Clone, clap::Args)]
pub struct ParserArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
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
    /// Stable instance name (part of the transactional.id). A restarted instance with the same
    /// name aborts its predecessor's open transaction at once instead of waiting for the
    /// transaction timeout. Default: a random name.
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// Partition assignment changes, recorded by the consumer context (inside `poll`).
#[derive(Debug)]
enum Event {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct RebalanceRecorder {
    events: Arc<Mutex<Vec<Event>>>,
}

impl ClientContext for RebalanceRecorder {}

impl ConsumerContext for RebalanceRecorder {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = tpl.elements().iter().map(|e| e.partition()).collect();
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Event::Revoked(parts));
        }
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = tpl.elements().iter().map(|e| e.partition()).collect();
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Event::Assigned(parts));
        }
    }
}

/// Counts since start, logged at exit.
#[derive(Debug, Default)]
struct Counters {
    /// Units parsed (in transactions that may still abort).
    units_summed: u64,
    /// Units skipped because the done-set had them.
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

type Producer_ = ThreadedProducer<DefaultProducerContext>;

struct Parser<'a> {
    args: &'a ParserArgs,
    topics: Topics,
    data_root: PathBuf,
    config: EngineConfig,
    pool: rayon::ThreadPool,
    consumer: BaseConsumer<RebalanceRecorder>,
    events: Arc<Mutex<Vec<Event>>>,
    producer: Producer_,
    transactional_id: String,
    done: DoneSet,
    assigned: HashSet<i32>,
    sums_partitions: i32,
    /// Units that failed in a way that needs an abort; rejected when seen again.
    forced_reject: HashMap<String, String>,
    counters: Counters,
    shutdown: CancellationToken,
    watchdog: Watchdog,
}

/// Runs a parser instance until `shutdown` is cancelled. Blocking: call it on its own thread.
pub fn run(args: &ParserArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    // Through a broker outage (also after the watchdog restarted us during one) keep trying.
    let mut parser = retry(shutdown, "start the parser", || {
        Parser::new(args, shutdown.clone())
    })?;
    let result = parser.run();
    parser.consumer.unsubscribe();
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
    fn new(args: &'a ParserArgs, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let topics = Topics::new(&args.kafka.topic_prefix);
        let data_root = std::fs::canonicalize(&args.data_root)
            .with_context(|| format!("cannot resolve --data-root {}", args.data_root.display()))?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut config = kafka::consumer_config(&args.kafka, &topics.parser_group);
        config
            .set("partition.assignment.strategy", "range")
            .set("max.poll.interval.ms", "300000");
        kafka::apply_overrides(&mut config, &args.kafka);
        let consumer: BaseConsumer<RebalanceRecorder> = config
            .create_with_context(RebalanceRecorder {
                events: events.clone(),
            })
            .context("cannot create the Kafka consumer")?;
        let files = kafka::partition_count(&consumer, &topics.files)?;
        let done = kafka::partition_count(&consumer, &topics.done)?;
        let sums_partitions = kafka::partition_count(&consumer, &topics.sums)?;
        if files == 0 || files != done || sums_partitions == 0 {
            bail!(
                "topics not set up: {} has {files} partitions, {} has {done}, {} has {sums_partitions} \
                 (files and done must match; run `tally init`)",
                topics.files, topics.done, topics.sums
            );
        }
        consumer.subscribe(&[&topics.files])?;
        let instance = args
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{:016x}", rand_u64()));
        let transactional_id = format!("{}.parser.{instance}", args.kafka.topic_prefix);
        let producer = create_producer(args, &transactional_id)?;
        let done_set = DoneSet::new(
            &args.kafka,
            &topics.done,
            &format!("{}.done-reader", topics.parser_group),
        )?;
        tracing::info!(transactional_id, data_root = %data_root.display(), "parser started");
        Ok(Self {
            args,
            topics,
            data_root,
            config: args.engine.config(),
            pool: args.engine.pool()?,
            consumer,
            events,
            producer,
            transactional_id,
            done: done_set,
            assigned: HashSet::new(),
            sums_partitions,
            forced_reject: HashMap::new(),
            counters: Counters::default(),
            shutdown,
            // Past the broker's own transaction timeout the transaction is dead anyway.
            watchdog: Watchdog::start(
                Duration::from_millis(args.transaction_timeout_ms) + Duration::from_secs(30),
            ),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            let batch = self.collect()?;
            if batch.is_empty() {
                continue;
            }
            self.watchdog.busy();
            let result = self.transact(&batch);
            match result {
                Ok(completed) => {
                    for (partition, unit_id) in completed {
                        self.done.insert(partition, unit_id);
                    }
                    backoff = Duration::from_millis(100);
                }
                Err(failure) => {
                    self.counters.aborts += 1;
                    self.recover(failure, &batch)?;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            self.watchdog.idle();
        }
        Ok(())
    }

    /// Polls a batch of units, bounded in count and bytes, handling rebalances as they come.
    fn collect(&mut self) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut bytes = 0u64;
        let started = Instant::now();
        while batch.len() < self.args.units_per_txn_max && bytes < self.args.txn_bytes_max {
            let wait = if batch.is_empty() {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(20)
            };
            let polled = self.consumer.poll(wait).map(|r| r.map(|m| m.detach()));
            self.handle_rebalance(&mut batch)?;
            match polled {
                None => break,
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer error");
                    break;
                }
                Some(Ok(message)) => {
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
        Ok(batch)
    }

    /// Applies assignment changes: revoked partitions leave the batch and the done-set;
    /// assigned ones get their done-set loaded before any of their units is processed.
    fn handle_rebalance(&mut self, batch: &mut Vec<OwnedMessage>) -> anyhow::Result<()> {
        let events: Vec<Event> =
            std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()));
        for event in events {
            match event {
                Event::Revoked(parts) => {
                    tracing::info!(?parts, "partitions revoked");
                    batch.retain(|m| !parts.contains(&m.partition()));
                    self.done.forget(&parts);
                    for p in &parts {
                        self.assigned.remove(p);
                    }
                }
                Event::Assigned(parts) => {
                    tracing::info!(?parts, "partitions assigned, loading done-set");
                    for &p in &parts {
                        // No unit of p may be processed before its done-set is complete: retry
                        // through broker outages rather than guess.
                        let done = &mut self.done;
                        retry(&self.shutdown, "load the done-set", || done.load(p))?;
                        self.assigned.insert(p);
                    }
                }
            }
        }
        Ok(())
    }

    /// One transaction for the batch. Returns the units completed in it.
    fn transact(&mut self, batch: &[OwnedMessage]) -> Result<Vec<(i32, String)>, Failure> {
        self.producer.begin_transaction()?;
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        let mut completed: Vec<(i32, String)> = Vec::new();
        for message in batch {
            let partition = message.partition();
            offsets.insert(partition, message.offset() + 1);
            let unit = match message.payload().map(serde_json::from_slice::<WorkUnit>) {
                Some(Ok(unit)) => unit,
                other => {
                    let reason = match other {
                        Some(Err(e)) => format!("not a work unit: {e}"),
                        _ => "empty notification".to_owned(),
                    };
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
            let duplicate = completed
                .iter()
                .any(|(p, id)| *p == partition && *id == unit.unit_id);
            if duplicate || self.done.contains(partition, &unit.unit_id) {
                self.counters.units_skipped += 1;
                tracing::debug!(unit = unit.unit_id, "already done, skipping");
                continue;
            }
            let _span = tracing::info_span!("unit", unit = %unit.unit_id).entered();
            let outcome = match self.forced_reject.get(&unit.unit_id).cloned() {
                Some(reason) => Err(reason),
                None => open_unit(&unit, &self.data_root),
            };
            match outcome {
                Err(reason) => self.reject(partition, &unit, &reason)?,
                Ok(file) => self.sum_unit(partition, &unit, file)?,
            }
            completed.push((partition, unit.unit_id));
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in &offsets {
            tpl.add_partition_offset(&self.topics.files, *partition, Offset::Offset(*next))?;
        }
        let metadata = self.consumer.group_metadata().ok_or(Failure::NotInGroup)?;
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
        tracing::debug!(units = completed.len(), "transaction committed");
        Ok(completed)
    }

    fn sum_unit(&mut self, partition: i32, unit: &WorkUnit, file: File) -> Result<(), Failure> {
        let source = match FileSource::new(file) {
            Ok(s) => s,
            Err(e) => return self.reject(partition, unit, &format!("cannot read: {e}")),
        };
        if source.len() != unit.file_bytes {
            return self.reject(partition, unit, "size changed since announced");
        }
        let sink = KafkaSink {
            producer: &self.producer,
            topics: &self.topics,
            sums_partitions: self.sums_partitions,
            unit,
            error: Mutex::new(None),
        };
        let started = Instant::now();
        let result = engine::sum_range(
            &source,
            unit.start..unit.end,
            &self.config,
            &self.pool,
            &sink,
        );
        let stats = match result {
            Ok(stats) => stats,
            Err(EngineError::Stopped) => {
                let error = sink.error.into_inner().unwrap_or_else(|p| p.into_inner());
                return Err(Failure::Kafka(error.unwrap_or(KafkaError::Canceled)));
            }
            Err(EngineError::BadLine(bad)) => {
                return Err(Failure::Reject {
                    unit_id: unit.unit_id.clone(),
                    reason: format!(
                        "bad line at byte {} ({}) under --bad-lines=fail",
                        bad.offset, bad.reason
                    ),
                })
            }
            Err(EngineError::Io(e)) => {
                return Err(Failure::Reject {
                    unit_id: unit.unit_id.clone(),
                    reason: format!("read error: {e}"),
                })
            }
        };
        let done = UnitDone {
            unit_id: unit.unit_id.clone(),
            file_id: unit.file_id.clone(),
            path: unit.path.clone(),
            units: unit.units,
            outcome: Outcome::Summed,
            lines: stats.lines,
            bad_lines: stats.bad_lines,
            bytes: stats.bytes,
        };
        // One end marker per sums partition, each after the unit's sums in that partition: the
        // db-client knows the unit is in the totals once it applied all of them.
        let end = serde_json::to_vec(&SumsRecord::UnitEnd {
            unit: done.clone(),
            partitions: self.sums_partitions,
        })
        .expect("serialisable");
        for sums_partition in 0..self.sums_partitions {
            kafka::send_waiting(
                &self.producer,
                BaseRecord::<str, [u8]>::to(&self.topics.sums)
                    .key(&unit.unit_id)
                    .partition(sums_partition)
                    .payload(&end),
            )?;
        }
        self.send_done(partition, &done)?;
        self.counters.units_summed += 1;
        tracing::info!(
            lines = stats.lines,
            bad_lines = stats.bad_lines,
            bytes = stats.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "unit summed"
        );
        Ok(())
    }

    fn reject(&mut self, partition: i32, unit: &WorkUnit, reason: &str) -> Result<(), Failure> {
        tracing::warn!(
            unit = unit.unit_id,
            path = unit.path,
            reason,
            "unit rejected"
        );
        self.dead_letter(
            Some(&unit.unit_id),
            &DeadLetter::RejectedUnit {
                unit_id: unit.unit_id.clone(),
                path: unit.path.clone(),
                reason: reason.to_owned(),
            },
        )?;
        self.send_done(
            partition,
            &UnitDone {
                unit_id: unit.unit_id.clone(),
                file_id: unit.file_id.clone(),
                path: unit.path.clone(),
                units: unit.units,
                outcome: Outcome::Rejected,
                lines: 0,
                bad_lines: 0,
                bytes: 0,
            },
        )?;
        self.counters.units_rejected += 1;
        Ok(())
    }

    fn send_done(&self, partition: i32, done: &UnitDone) -> Result<(), KafkaError> {
        let payload = serde_json::to_vec(done).expect("serialisable");
        kafka::send_waiting(
            &self.producer,
            BaseRecord::<str, [u8]>::to(&self.topics.done)
                .key(&done.unit_id)
                .partition(partition)
                .payload(&payload),
        )
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
        let aborted =
            kind != TxnErrorKind::Fatal && self.producer.abort_transaction(Timeout::Never).is_ok();
        if !aborted {
            tracing::warn!("recreating the transactional producer");
            self.producer = create_producer(self.args, &self.transactional_id)?;
        }
        let partitions: HashSet<i32> = batch.iter().map(|m| m.partition()).collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&self.topics.files, *p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(30))?;
        for element in committed.elements() {
            if !self.assigned.contains(&element.partition()) {
                continue;
            }
            let offset = match element.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if let Err(error) = self.consumer.seek(
                &self.topics.files,
                element.partition(),
                offset,
                Duration::from_secs(30),
            ) {
                tracing::warn!(%error, partition = element.partition(), "rewind failed");
            }
        }
        Ok(())
    }
}

/// Retries `op` with capped exponential backoff until it succeeds or `shutdown` is cancelled.
fn retry<T>(
    shutdown: &CancellationToken,
    what: &str,
    mut op: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(error) if !shutdown.is_cancelled() => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot {what}, retrying"
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error.context(format!("cannot {what}"))),
        }
    }
}

/// Sends a dead-letter record.
fn send_dead_letter(
    producer: &Producer_,
    topic: &str,
    key: Option<&str>,
    record: &DeadLetter,
) -> Result<(), KafkaError> {
    let payload = serde_json::to_vec(record).expect("serialisable");
    let mut base = BaseRecord::<str, [u8]>::to(topic).payload(&payload);
    if let Some(key) = key {
        base = base.key(key);
    }
    kafka::send_waiting(producer, base)
}

/// Validates a unit's file: inside the data root, a regular file, the announced size, a sane
/// range. The error is the dead-letter reason.
fn open_unit(unit: &WorkUnit, data_root: &Path) -> Result<File, String> {
    let resolved =
        std::fs::canonicalize(&unit.path).map_err(|e| format!("cannot resolve path: {e}"))?;
    if !resolved.starts_with(data_root) {
        return Err(format!(
            "path outside the data root {}",
            data_root.display()
        ));
    }
    let file = File::open(&resolved).map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() != unit.file_bytes {
        return Err(format!(
            "size changed since announced ({} bytes announced, {} now)",
            unit.file_bytes,
            meta.len()
        ));
    }
    if unit.start > unit.end || unit.end > unit.file_bytes {
        return Err(format!("invalid byte range {}..{}", unit.start, unit.end));
    }
    Ok(file)
}

/// The engine's output, into the open transaction.
struct KafkaSink<'a> {
    producer: &'a Producer_,
    topics: &'a Topics,
    sums_partitions: i32,
    unit: &'a WorkUnit,
    /// The first send error; the engine is stopped and the transaction aborted.
    error: Mutex<Option<KafkaError>>,
}

/// Pairs per sums record: ~20 bytes each in JSON, well under the 1 MB record limit.
const PAIRS_PER_RECORD: usize = 20_000;

impl KafkaSink<'_> {
    fn fail(&self, error: KafkaError) -> Stopped {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
        Stopped
    }
}

impl Sink for KafkaSink<'_> {
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        let mut by_partition: Vec<Vec<(i64, i64)>> =
            vec![Vec::new(); self.sums_partitions as usize];
        for (id, sum) in batch {
            by_partition[consumer_partition(id, self.sums_partitions) as usize].push((id, sum));
        }
        for (partition, sums) in by_partition.into_iter().enumerate() {
            for chunk in sums.chunks(PAIRS_PER_RECORD) {
                let payload = serde_json::to_vec(&SumsRecord::Sums {
                    sums: chunk.to_vec(),
                })
                .expect("serialisable");
                let record = BaseRecord::<str, [u8]>::to(&self.topics.sums)
                    .key(&self.unit.unit_id)
                    .partition(partition as i32)
                    .payload(&payload);
                kafka::send_waiting(self.producer, record).map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }

    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        let record = DeadLetter::BadLine {
            unit_id: self.unit.unit_id.clone(),
            path: self.unit.path.clone(),
            offset: bad.offset,
            reason: bad.reason.as_str().to_owned(),
            raw: lossy(&bad.raw),
        };
        send_dead_letter(
            self.producer,
            &self.topics.dead_letter,
            Some(&self.unit.unit_id),
            &record,
        )
        .map_err(|e| self.fail(e))
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(EngineConfig::RAW_BYTES_MAX)]).into_owned()
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
