//! `tally db-client`: sums from Kafka into `consumer_totals`, exactly once.
//!
//! The stage's flags, its start (database, migrations, the input topic it follows) and the
//! shared consume loop ([`tally_core::consume`]) with the db-client's commit
//! ([`crate::writer`]): each batch (bounded in count, bytes and wait) is written in PostgreSQL
//! transactions that carry its offsets ([`crate::batch`]), retried until it lands (a database
//! outage never skips a batch); only then are the same offsets committed to Kafka, for lag
//! tools. A gap (records deleted before they were applied) stops the stage with an error that
//! says how to accept it.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tally_core::args::InstanceArgs;
use tally_core::backoff::Backoff;
use tally_core::consume::{BatchLimits, ConsumeLoop, Group, Settings};
use tally_core::liveness::Liveness;
use tally_core::shutdown::CancellationToken;
use tally_core::{kafka, DatabaseArgs, KafkaArgs, LivenessArgs, Topics};

use crate::batch;
use crate::changes::{self, ChangeLogArgs};
use crate::copy;
use crate::input;
use crate::writer::{batch_timeout, Writer};
use tally_core::schema;

/// Arguments of `tally db-client`.
#[derive(Debug, Clone, clap::Args)]
pub struct DbClientArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Liveness watchdog.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// The instance name.
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Accept one reported gap and go on past it: `PARTITION:OFFSET` as the gap error names it
    /// (the records from OFFSET to the log start are lost to the totals). Repeatable; only that
    /// exact gap is accepted, a later one stops the stage again.
    #[arg(long = "accept-gap", value_parser = parse_gap)]
    pub accept_gaps: Vec<(i32, i64)>,
    /// Read the aggregator's `totals` topic instead of the parsers' `sums` topic (run
    /// `tally aggregator` too).
    #[arg(long, env = "TALLY_FROM_TOTALS")]
    pub from_totals: bool,
    /// Start following the other input topic than the one the totals were last applied from
    /// (adding or removing the aggregator): only after the procedure in docs/operations.md,
    /// or sums are counted twice or missed. Without it such a start stops with an error.
    #[arg(long)]
    pub switch_input: bool,
    /// Memory for one batch and what comes in meanwhile, in bytes (`4GiB`, `1536MiB`, …):
    /// less 32 MiB for the process itself, half for the batch in hand (its records and their
    /// decoded pairs, [`crate::batch::PAIR_BYTES`] each: 4 GiB hold 13M consumers, so 10M
    /// are written once, in one batch), the rest for Kafka's buffers and the records read
    /// while a batch is written. Default: 4 GiB, or three quarters of the container's memory
    /// limit when lower.
    #[arg(long, env = "TALLY_DB_CLIENT_MEMORY_MAX", value_parser = tally_core::args::bytes)]
    pub memory_max: Option<u64>,
    /// Most Kafka records per database transaction (a sums record holds up to 20,000 pairs).
    #[arg(long, env = "TALLY_BATCH_RECORDS_MAX", default_value_t = 10_000, value_parser = tally_core::args::positive_usize)]
    pub batch_records_max: usize,
    /// Most bytes of memory per database transaction: its records and their decoded pairs (at
    /// most half of `--memory-max`). Default: that half.
    #[arg(long, env = "TALLY_BATCH_BYTES_MAX", value_parser = tally_core::args::bytes)]
    pub batch_bytes_max: Option<u64>,
    /// How often the applied offsets are also committed to Kafka, for lag tools. The database
    /// is the checkpoint: after a crash, records up to this old are read again and skipped.
    #[arg(long, env = "TALLY_KAFKA_COMMIT_INTERVAL_MS", default_value_t = 5_000)]
    pub kafka_commit_interval_ms: u64,
    /// Database transactions that write one batch at once, each for its share of the batch's
    /// partitions (at most one per partition): lets PostgreSQL use that many cores.
    #[arg(long, env = "TALLY_DB_WRITERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub writers: u16,
    /// How long to wait for more records before writing a partial batch (records already on
    /// their way, up to the partitions' end, are read first).
    #[arg(long, env = "TALLY_BATCH_WAIT_MS", default_value_t = 100)]
    pub batch_wait_ms: u64,
    /// The change log.
    #[command(flatten)]
    pub change_log: ChangeLogArgs,
}

impl DbClientArgs {
    /// The memory budget in bytes (`--memory-max`, or its default).
    pub fn memory_max(&self) -> u64 {
        tally_core::args::memory_budget(self.memory_max, 4 << 30)
    }

    /// Most bytes of memory one batch takes ([`crate::batch::weight`] of its records).
    pub fn batch_bytes_max(&self) -> u64 {
        let share = (tally_core::args::usable_memory(self.memory_max()) / 2).max(1);
        self.batch_bytes_max.map_or(share, |b| b.min(share))
    }
}

/// Runs a db-client instance until `shutdown` is cancelled.
pub async fn run(args: &DbClientArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let batch_bytes_max = args.batch_bytes_max();
    // A batch's timeout grows with its pairs, up to this for the largest batch of the budget;
    // its write is a liveness step allowed that long (`Writer::allowance`), while the limit
    // for everything else stays at the stall timeout, never below a small batch's timeout.
    let timeout = batch_timeout(batch_bytes_max / batch::PAIR_BYTES);
    let liveness = Liveness::start(
        "db-client",
        &args.kafka,
        &args.liveness,
        batch_timeout(0) + Duration::from_secs(30),
    )?;
    let pool = connect(
        &args.database,
        usize::from(args.writers),
        shutdown,
        &liveness,
    )
    .await?;
    schema::migrate(&pool)
        .await
        .context("cannot apply migrations")?;
    let topics = Topics::new(&args.kafka.topic_prefix);
    let (topic, other) = if args.from_totals {
        (topics.totals.clone(), &topics.sums)
    } else {
        (topics.sums.clone(), &topics.totals)
    };
    input::check(&pool, &topic, other, args.switch_input).await?;
    changes::start(&pool, args.change_log.enabled).await?;
    tokio::spawn(changes::keep_pruned(
        pool.clone(),
        Duration::from_secs(args.change_log.retention_minutes.saturating_mul(60)),
        shutdown.clone(),
    ));
    let wait = Duration::from_millis(args.batch_wait_ms);
    let settings = Settings {
        stage: "db-client",
        input: topic.clone(),
        group: topics.db_client_group.clone(),
        instance_id: args.instance.instance_id.clone(),
        limits: BatchLimits {
            records: args.batch_records_max,
            weight: batch_bytes_max,
            idle: wait,
            max_wait: wait,
            wait_for_open: true,
            read_through: true,
            end_at_watermark: true,
        },
        // The loop does not poll while a batch is written: a member must not leave its group
        // while the largest batch of the budget is within its timeout.
        consumer_options: vec![(
            "max.poll.interval.ms",
            (timeout + Duration::from_secs(60)).as_millis().to_string(),
        )],
    };
    let group = Group::open(&args.kafka, &settings, liveness.clone(), shutdown.clone())?;
    group.subscribe()?;
    tracing::info!(
        topic,
        database = %args.database.redacted_url(),
        batch_bytes_max,
        timeout_max_s = timeout.as_secs(),
        "db-client started"
    );
    let writer = Writer::new(
        tokio::runtime::Handle::current(),
        pool,
        topic,
        kafka::BrokerProbe::new(&args.kafka),
        args.accept_gaps.iter().copied().collect(),
        usize::from(args.writers),
        args.change_log.enabled,
        Duration::from_millis(args.kafka_commit_interval_ms),
        liveness.clone(),
    );
    let mut consume = ConsumeLoop::new(
        "db-client",
        settings.limits,
        group,
        writer,
        liveness,
        shutdown.clone(),
    );
    // The loop blocks on librdkafka: a thread of its own, the database calls on this runtime.
    let (result, consume) = tokio::task::spawn_blocking(move || (consume.run(), consume))
        .await
        .context("the db-client loop panicked")?;
    let (group, mut writer) = consume.into_parts();
    writer.commit_to_kafka(&group);
    group.leave();
    tracing::info!(
        records = writer.totals.records,
        skipped = writer.totals.skipped,
        "db-client stopped"
    );
    result
}

async fn connect(
    database: &DatabaseArgs,
    writers: usize,
    shutdown: &CancellationToken,
    liveness: &Liveness,
) -> anyhow::Result<PgPool> {
    let _waiting = liveness.waiting_on("PostgreSQL");
    let mut backoff = Backoff::stage();
    loop {
        match PgPoolOptions::new()
            // The writers, and one for resuming and start-up checks.
            .max_connections(writers as u32 + 1)
            // Every session open and ready from the start: the first batch after a start
            // waited for the writers' connections, their backends, and each session's first
            // staging tables and partition check (reopened sessions get the same).
            .min_connections(writers as u32 + 1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    copy::prepare_session(conn).await;
                    Ok(())
                })
            })
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(database.connect_options()?)
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(error) if schema::will_not_heal(&error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("cannot connect to {}", database.redacted_url())));
            }
            Err(error) => {
                tracing::warn!(%error, database = %database.redacted_url(), "cannot connect, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("shut down before the database was reachable"),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

fn parse_gap(s: &str) -> Result<(i32, i64), String> {
    let (partition, offset) = s
        .split_once(':')
        .ok_or_else(|| format!("expected PARTITION:OFFSET, got `{s}`"))?;
    Ok((
        partition
            .parse()
            .map_err(|e| format!("partition `{partition}`: {e}"))?,
        offset
            .parse()
            .map_err(|e| format!("offset `{offset}`: {e}"))?,
    ))
}
