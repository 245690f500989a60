//! `tally aggregator`: the consumer group on `tally.sums` that merges sums across units and
//! files into `tally.totals`, exactly once.
//!
//! Each batch (up to `--flush-interval-ms` of records, bounded in count and bytes) is one
//! Kafka transaction of tally-core's loop ([`tally_core::txn`]): its sums records are merged
//! per partition and usage period in a [`Merger`] within half of `--memory-max` (what does not
//! fit leaves early, within the same transaction), the merged sums are written to the *same partition number* of
//! `tally.totals` (the consumer id picks the partition on both topics), then the batch's
//! unit-end markers, unchanged, then the consumed offsets commit with them. So in every totals
//! partition a unit's end marker follows every sum it covers, as on `tally.sums`, and the
//! db-client's ingested-files ledger stays right. A crash or a fenced instance redoes the open
//! batch from the committed offsets; nothing of it was visible (`read_committed`). A batch
//! whose input is drained ends at once: at the partitions' watermark when no parser has a unit
//! left (`upstream`), else when their end is told, past any parser transaction open by then.

use std::time::Duration;

use anyhow::bail;
use rdkafka::message::{Message, OwnedMessage};
use tally_core::args::{InstanceArgs, TransactionArgs};
use tally_core::liveness::Liveness;
use tally_core::shutdown::CancellationToken;
use tally_core::txn::producer::{send, send_leaving, send_sums};
use tally_core::txn::{
    BatchLimits, Failure, Handler, PartitionState, Settings, Transactions, TxnLoop, TxnProducer,
};
use tally_core::{KafkaArgs, LivenessArgs, Topics};
use tally_model::codec;
use tally_model::messages::SumsRecord;
use tally_model::sums::Merger;

use crate::upstream::Parsers;

/// Arguments of `tally aggregator`.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregatorArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Liveness watchdog.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// The transaction timeout.
    #[command(flatten)]
    pub transactions: TransactionArgs,
    /// The instance name.
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Memory for one transaction, in bytes (`4GiB`, `1536MiB`, …): less 32 MiB for the
    /// process itself, half for the table that
    /// merges its sums (at most 64 bytes per key: 4 GiB merge 32M consumers in one pass, and
    /// take only what the consumers seen need), a quarter at most for its input records
    /// (`--batch-bytes-max` is lowered to it), the rest for Kafka's buffers. Past the table's
    /// share, sums leave early (still merged as far as they fit), so memory stays bounded.
    /// Default: 4 GiB, or three quarters of the container's memory limit when lower.
    #[arg(long, env = "TALLY_AGGREGATOR_MEMORY_MAX", value_parser = tally_core::args::bytes)]
    pub memory_max: Option<u64>,
    /// A key cap instead of `--memory-max`'s table share (configurations from before it).
    #[arg(long, env = "TALLY_AGGREGATOR_KEYS_MAX", value_parser = tally_core::args::positive_usize)]
    pub keys_max: Option<usize>,
    /// How long one transaction collects sums records before it writes them: longer merges
    /// more (fewer rows for PostgreSQL), shorter delivers sooner.
    #[arg(long, env = "TALLY_FLUSH_INTERVAL_MS", default_value_t = 5_000)]
    pub flush_interval_ms: u64,
    /// Most sums records per transaction.
    #[arg(
        long,
        env = "TALLY_AGGREGATOR_BATCH_RECORDS_MAX",
        default_value_t = 5_000
    , value_parser = tally_core::args::positive_usize)]
    pub batch_records_max: usize,
    /// Most payload bytes per transaction (held in memory until the transaction ends; at most
    /// a quarter of `--memory-max`). Default: that quarter.
    #[arg(long, env = "TALLY_AGGREGATOR_BATCH_BYTES_MAX", value_parser = tally_core::args::bytes)]
    pub batch_bytes_max: Option<u64>,
}

impl AggregatorArgs {
    /// The memory budget in bytes (`--memory-max`, or its default).
    pub fn memory_max(&self) -> u64 {
        tally_core::args::memory_budget(self.memory_max, 4 << 30)
    }

    /// Most keys merged in memory per transaction.
    pub fn keys_max(&self) -> usize {
        self.keys_max.unwrap_or_else(|| {
            tally_model::sums::keys_within(tally_core::args::usable_memory(self.memory_max()) / 2)
        })
    }

    /// Most payload bytes per transaction.
    pub fn batch_bytes_max(&self) -> u64 {
        let share = (tally_core::args::usable_memory(self.memory_max()) / 4).max(1);
        self.batch_bytes_max.map_or(share, |b| b.min(share))
    }
}

/// Counts since start (of transactions that may still abort), logged at exit.
#[derive(Debug, Default)]
struct Counters {
    records_in: u64,
    pairs_in: u64,
    pairs_out: u64,
    markers: u64,
    undecodable: u64,
}

/// The aggregator's handler.
struct Aggregator {
    topics: Topics,
    partitions: i32,
    keys_max: usize,
    counters: Counters,
    /// The parsers' progress; `None` if it could not be asked for at start (then a drained
    /// batch always waits for its end to be told).
    parsers: Option<Parsers>,
}

/// Runs an aggregator instance until `shutdown` is cancelled. Blocking: call it on its own
/// thread.
pub fn run(args: &AggregatorArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    tally_core::txn::run_stage(
        "aggregator",
        &args.kafka,
        &args.liveness,
        args.transactions.timeout(),
        shutdown,
        |liveness| start_loop(args, shutdown.clone(), liveness),
        |aggregator: &Aggregator, aborts| {
            let c = &aggregator.counters;
            tracing::info!(
                records_in = c.records_in,
                pairs_in = c.pairs_in,
                pairs_out = c.pairs_out,
                markers = c.markers,
                undecodable = c.undecodable,
                aborts,
                "aggregator stopped"
            );
        },
    )
}

fn start_loop(
    args: &AggregatorArgs,
    shutdown: CancellationToken,
    liveness: Liveness,
) -> anyhow::Result<TxnLoop<Aggregator>> {
    let topics = Topics::new(&args.kafka.topic_prefix);
    let flush = Duration::from_millis(args.flush_interval_ms.max(1));
    let settings = Settings {
        stage: "aggregator",
        input: topics.sums.clone(),
        group: topics.aggregator_group.clone(),
        instance_id: args.instance.instance_id.clone(),
        limits: BatchLimits {
            records: args.batch_records_max.max(1),
            weight: args.batch_bytes_max(),
            idle: flush,
            max_wait: flush,
            wait_for_open: true,
            read_through: false,
            // Drained at the watermark with no parser's transaction open and no unit left to
            // the parsers (`upstream_drained`): nothing is coming, the batch ends at once.
            end_at_watermark: true,
        },
        consumer_options: vec![("max.poll.interval.ms", "300000".to_owned())],
    };
    let transactions = Transactions {
        prefix: format!("{}.aggregator", args.kafka.topic_prefix),
        timeout: args.transactions.timeout(),
    };
    tally_core::txn::start(
        &args.kafka,
        settings,
        transactions,
        liveness,
        shutdown,
        |group| {
            let sums = group.partition_count(&topics.sums)?;
            let totals = group.partition_count(&topics.totals)?;
            if sums == 0 || sums != totals {
                bail!(
                "topics not set up: {} has {sums} partitions, {} has {totals} (they must match: \
                 a consumer's sums and totals share a partition number; run `tally init`)",
                topics.sums,
                topics.totals
            );
            }
            tracing::info!(
                partitions = sums,
                memory_max = args.memory_max(),
                keys_max = args.keys_max(),
                batch_bytes_max = args.batch_bytes_max(),
                "aggregator started"
            );
            let parsers = Parsers::new(&args.kafka, &topics)
                .inspect_err(
                    |error| tracing::warn!(%error, "the parsers' progress cannot be asked for"),
                )
                .ok();
            Ok(Aggregator {
                topics: topics.clone(),
                partitions: sums,
                keys_max: args.keys_max(),
                counters: Counters::default(),
                parsers,
            })
        },
    )
}

impl PartitionState for Aggregator {
    /// No unit left to the parsers: a batch read up to the watermark holds every sum there is.
    fn upstream_drained(&mut self) -> bool {
        self.parsers.as_ref().is_some_and(|p| !p.units_left())
    }
}

impl Handler for Aggregator {
    /// (records in, records out) of the batch, counted once it is committed.
    type Output = (u64, u64);

    fn committed(&mut self, (records_in, records_out): (u64, u64)) {
        use tally_core::metrics as m;
        metrics::counter!(m::AGGREGATOR_RECORDS_IN).increment(records_in);
        metrics::counter!(m::AGGREGATOR_RECORDS_OUT).increment(records_out);
    }

    fn process(
        &mut self,
        producer: &TxnProducer,
        batch: &[OwnedMessage],
    ) -> Result<(u64, u64), Failure> {
        let mut out = 0u64;
        let merger = Merger::new(self.partitions as usize, self.keys_max);
        // Unit-end markers by partition, in order: written after the partition's sums.
        let mut markers: Vec<Vec<&OwnedMessage>> = vec![Vec::new(); self.partitions as usize];
        let totals = &self.topics.totals;
        for message in batch {
            let partition = message.partition();
            self.counters.records_in += 1;
            match message.payload().map(codec::decode) {
                Some(Ok(SumsRecord::Sums { period, sums })) if partition < self.partitions => {
                    self.counters.pairs_in += sums.len() as u64;
                    let leave = merger.add(partition as usize, period, &sums);
                    out += leave.iter().map(|(_, s)| records_for(s.len())).sum::<u64>();
                    self.counters.pairs_out += send_leaving(producer, totals, partition, leave)?;
                }
                Some(Ok(SumsRecord::UnitEnd { .. })) if partition < self.partitions => {
                    markers[partition as usize].push(message);
                }
                other => {
                    // The db-client skips such a record too (it could never apply it); the
                    // error names it for an operator (`tally inspect sums`).
                    self.counters.undecodable += 1;
                    let reason = match other {
                        Some(Err(e)) => e.to_string(),
                        None => "empty record".to_owned(),
                        Some(Ok(_)) => format!("partition {partition} past the totals topic"),
                    };
                    tracing::error!(
                        partition,
                        offset = message.offset(),
                        reason,
                        "undecodable sums record skipped"
                    );
                }
            }
        }
        let pairs_out = &mut self.counters.pairs_out;
        merger.drain(|partition, period, sums| {
            *pairs_out += sums.len() as u64;
            out += records_for(sums.len());
            send_sums(producer, totals, partition as i32, period, &sums)
        })?;
        for (partition, ends) in markers.into_iter().enumerate() {
            for end in ends {
                let key = end.key().and_then(|k| std::str::from_utf8(k).ok());
                let payload = end.payload().unwrap_or_default();
                send(producer, totals, Some(partition as i32), key, payload)?;
                self.counters.markers += 1;
                out += 1;
            }
        }
        Ok((batch.len() as u64, out))
    }
}

/// Records `send_sums` writes for `pairs` pairs.
fn records_for(pairs: usize) -> u64 {
    pairs.div_ceil(tally_core::txn::producer::PAIRS_PER_RECORD) as u64
}
