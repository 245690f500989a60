//! `tally db-client`: sums from Kafka into `consumer_totals`, exactly once.
//!
//! The consumer loop: collect a batch of records (bounded in count, bytes and wait), write it
//! in one PostgreSQL transaction ([`crate::batch`]), retry that until it lands (a database
//! outage never skips a batch), and only then commit the same offsets to Kafka, for lag tools;
//! Kafka's committed offsets therefore always trail the database's, and a restart re-reads at
//! most a few records that the offsets table then skips. A gap (records deleted before they were
//! applied) stops the stage with an error that says how to accept it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tally_core::backoff::Backoff;
use tally_core::liveness::{self, Liveness, Throttle};
use tally_core::rebalance::RebalanceLog;
use tally_core::shutdown::CancellationToken;
use tally_core::{kafka, DatabaseArgs, KafkaArgs, LivenessArgs, Topics};

use crate::batch::{self, Applied, Checks, Gaps};
use crate::input;
use crate::resume::{Resume, TopicReset};
use crate::schema;

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
    /// Stable instance name: the consumer's static group membership (`group.instance.id`), so
    /// that a restarted instance takes its partitions back without a rebalance. Two running
    /// instances must not share it. Default: none (dynamic membership).
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: Option<String>,
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
    /// Most Kafka records per database transaction.
    #[arg(long, env = "TALLY_BATCH_RECORDS_MAX", default_value_t = 500, value_parser = tally_core::args::positive_usize)]
    pub batch_records_max: usize,
    /// Most payload bytes per database transaction (a sums record holds up to 20,000 pairs).
    #[arg(long, env = "TALLY_BATCH_BYTES_MAX", default_value_t = 16 << 20, value_parser = tally_core::args::positive_usize)]
    pub batch_bytes_max: usize,
    /// How often the applied offsets are also committed to Kafka, for lag tools. The database
    /// is the checkpoint: after a crash, records up to this old are read again and skipped.
    #[arg(long, env = "TALLY_KAFKA_COMMIT_INTERVAL_MS", default_value_t = 5_000)]
    pub kafka_commit_interval_ms: u64,
    /// Database transactions that write one batch at once, each for its share of the batch's
    /// partitions (at most one per partition): lets PostgreSQL use that many cores.
    #[arg(long, env = "TALLY_DB_WRITERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub writers: u16,
    /// How long to wait for more records before writing a partial batch.
    #[arg(long, env = "TALLY_BATCH_WAIT_MS", default_value_t = 100)]
    pub batch_wait_ms: u64,
}

/// Runs a db-client instance until `shutdown` is cancelled.
pub async fn run(args: &DbClientArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    // A batch transaction may take up to its 120 s timeout: the limit is never below that.
    let liveness = Liveness::start(
        "db-client",
        &args.kafka,
        &args.liveness,
        BATCH_TIMEOUT + Duration::from_secs(30),
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
    let mut config = kafka::consumer_config(&args.kafka, &topics.db_client_group);
    kafka::static_membership(&mut config, args.instance_id.as_deref());
    kafka::apply_overrides(&mut config, &args.kafka);
    config.set(
        "statistics.interval.ms",
        tally_core::rebalance::STATISTICS_INTERVAL_MS,
    );
    let rebalances = RebalanceLog::for_stage(&liveness);
    let consumer: StreamConsumer<RebalanceLog> = config
        .create_with_context(rebalances.clone())
        .context("cannot create the Kafka consumer")?;
    consumer.subscribe(&[&topic])?;
    tracing::info!(topic, database = %args.database.redacted_url(), "db-client started");

    let accepted: HashSet<(i32, i64)> = args.accept_gaps.iter().copied().collect();
    // Log starts are asked of a client of their own: the group consumer answers such calls
    // only between its fetches, which costs a batch up to a second per partition.
    let probe = kafka::BrokerProbe::new(&args.kafka);
    let log_start =
        |partition: i32| -> anyhow::Result<i64> { Ok(probe.watermarks(&topic, partition)?.0) };
    let checks = Checks {
        log_start: &log_start,
        accepted: &accepted,
    };
    let wait = Duration::from_millis(args.batch_wait_ms);
    let commit_every = Duration::from_millis(args.kafka_commit_interval_ms);
    let mut last_commit = tokio::time::Instant::now();
    // Applied but not yet committed to Kafka: partition → next offset.
    let mut uncommitted: BTreeMap<i32, i64> = BTreeMap::new();
    let mut totals = Applied::default();
    let mut consumer_errors = Throttle::new(Duration::from_secs(10));
    let mut resume = Resume::default();
    // Open while the stored offsets cannot be read (PostgreSQL down): a restart cannot help.
    let mut resume_waits = None;
    'outer: while !shutdown.is_cancelled() {
        resume.update(&rebalances);
        match resume.seek(&consumer, &pool, &topic, &accepted).await {
            Ok(()) => resume_waits = None,
            Err(error) if error.is::<TopicReset>() => {
                tracing::error!(error = %error, "recreated input topic: stopping");
                commit_to_kafka(&consumer, &topic, &mut uncommitted);
                return Err(error);
            }
            Err(error) => {
                resume_waits.get_or_insert_with(|| liveness.waiting_on("PostgreSQL"));
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot resume assigned partitions yet"
                );
            }
        }
        // Wakes up at least once a second while idle: the watchdog sees the positions, lag
        // tools see the offsets.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = tokio::time::timeout(Duration::from_secs(1), consumer.recv()) => m,
        };
        liveness.stream_positions(&consumer, &topic);
        if last_commit.elapsed() >= commit_every {
            commit_to_kafka(&consumer, &topic, &mut uncommitted);
            last_commit = tokio::time::Instant::now();
        }
        let mut batch = match first {
            Err(_) => continue,
            Ok(Ok(m)) => vec![m.detach()],
            Ok(Err(error)) => {
                liveness::restart_if_fatal("db-client", &error);
                if let Some(skipped) = consumer_errors.allow() {
                    tracing::warn!(%error, skipped, "consumer error");
                }
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut bytes = batch[0].payload().map_or(0, <[u8]>::len);
        while batch.len() < args.batch_records_max && bytes < args.batch_bytes_max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => {
                    bytes += m.payload().map_or(0, <[u8]>::len);
                    batch.push(m.detach());
                }
                Ok(Err(error)) => {
                    liveness::restart_if_fatal("db-client", &error);
                    if let Some(skipped) = consumer_errors.allow() {
                        tracing::warn!(%error, skipped, "consumer error");
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        // Records of partitions assigned meanwhile are read again once sought.
        resume.update(&rebalances);
        batch.retain(|m| !resume.waits(m.partition()));
        if batch.is_empty() {
            continue;
        }
        // A database outage is retried, never skipped: the batch stays in hand until it lands.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut database_down = None;
        let stage_metrics = tally_core::metrics::stage("db-client");
        let started = std::time::Instant::now();
        let applied = loop {
            // Bounded: a connection that hangs (a half-open socket after a server crash) counts
            // as a failure; dropping the transaction rolls it back.
            let attempt = tokio::time::timeout(
                BATCH_TIMEOUT,
                batch::apply_parallel(&pool, &topic, &batch, &checks, usize::from(args.writers)),
            )
            .await;
            match attempt.unwrap_or_else(|_| Err(anyhow::anyhow!("batch transaction timed out"))) {
                Ok(applied) => break applied,
                Err(error) if error.is::<Gaps>() => {
                    // Not a failure to retry: an operator must decide.
                    tracing::error!(error = %error, "gap in the input: stopping");
                    commit_to_kafka(&consumer, &topic, &mut uncommitted);
                    return Err(error);
                }
                Err(error) => {
                    // Kafka is not what holds this stage up: no restart would help.
                    database_down.get_or_insert_with(|| liveness.waiting_on("PostgreSQL"));
                    metrics::counter!(stage_metrics.retries).increment(1);
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = delay.as_millis() as u64,
                        "batch not written, retrying"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        drop(database_down);
        liveness.progress();
        metrics::histogram!(stage_metrics.batch_seconds).record(started.elapsed());
        metrics::counter!(tally_core::metrics::DB_CLIENT_RECORDS).increment(applied.records as u64);
        metrics::counter!(tally_core::metrics::DB_CLIENT_ROWS_UPSERTED)
            .increment(applied.consumers as u64);
        totals.records += applied.records;
        totals.skipped += applied.skipped;
        tracing::debug!(?applied, "batch committed");
        uncommitted.extend(batch::next_offsets(&batch));
        if last_commit.elapsed() >= commit_every {
            commit_to_kafka(&consumer, &topic, &mut uncommitted);
            last_commit = tokio::time::Instant::now();
        }
    }
    commit_to_kafka(&consumer, &topic, &mut uncommitted);
    tracing::info!(
        records = totals.records,
        skipped = totals.skipped,
        "db-client stopped"
    );
    Ok(())
}

/// Commits applied offsets to Kafka, for lag tools only: the database is the checkpoint, and
/// Kafka's committed offsets always trail it.
fn commit_to_kafka(
    consumer: &StreamConsumer<RebalanceLog>,
    topic: &str,
    uncommitted: &mut BTreeMap<i32, i64>,
) {
    if uncommitted.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in std::mem::take(uncommitted) {
        if let Err(error) = tpl.add_partition_offset(topic, partition, Offset::Offset(next)) {
            tracing::debug!(%error, "bad offset");
        }
    }
    if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(%error, "kafka offset commit failed (harmless)");
    }
}

/// Longest a batch transaction may take before it counts as failed (and is rolled back).
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);

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
