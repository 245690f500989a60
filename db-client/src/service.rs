//! `tally db-client`: sums from Kafka into `consumer_totals`, exactly once.
//!
//! Per batch of records, ONE PostgreSQL transaction: lock the batch's partitions' rows in
//! `kafka_offsets`, drop records below the stored offsets (a replay after a crash, or a stale
//! instance after a rebalance), pre-aggregate per consumer (one statement may not touch a key
//! twice), upsert in key order (no deadlocks between instances), record the ledger, advance the
//! offsets, commit. Only then are the same offsets committed to Kafka, for lag tools; Kafka's
//! committed offsets therefore always trail the database's, and a restart re-reads at most a
//! few records that the offsets table then skips. A connection lost during COMMIT is harmless:
//! the retry finds the offsets already advanced (or not) and adds accordingly.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tally_core::liveness::{Liveness, Throttle};
use tally_core::messages::{SumsRecord, UnitDone};
use tally_core::shutdown::CancellationToken;
use tally_core::{kafka, DatabaseArgs, KafkaArgs, LivenessArgs, Topics};

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
    /// Read the aggregator's `totals` topic instead of the parsers' `sums` topic.
    #[arg(long, env = "TALLY_FROM_TOTALS")]
    pub from_totals: bool,
    /// Most Kafka records per database transaction.
    #[arg(long, env = "TALLY_BATCH_RECORDS_MAX", default_value_t = 500)]
    pub batch_records_max: usize,
    /// Most payload bytes per database transaction (a sums record holds up to 20,000 pairs).
    #[arg(long, env = "TALLY_BATCH_BYTES_MAX", default_value_t = 16 << 20)]
    pub batch_bytes_max: usize,
    /// How often the applied offsets are also committed to Kafka, for lag tools. The database
    /// is the checkpoint: after a crash, records up to this old are read again and skipped.
    #[arg(long, env = "TALLY_KAFKA_COMMIT_INTERVAL_MS", default_value_t = 5_000)]
    pub kafka_commit_interval_ms: u64,
    /// How long to wait for more records before writing a partial batch.
    #[arg(long, env = "TALLY_BATCH_WAIT_MS", default_value_t = 100)]
    pub batch_wait_ms: u64,
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Records applied.
    pub records: usize,
    /// Records skipped: below the stored offsets.
    pub skipped: usize,
    /// Distinct consumers upserted.
    pub consumers: usize,
    /// Records that could not be decoded (logged, skipped).
    pub undecodable: usize,
}

/// Runs a db-client instance until `shutdown` is cancelled.
pub async fn run(args: &DbClientArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    // A batch transaction may take up to its 120 s timeout: the limit is never below that.
    let liveness = Liveness::start(
        "db-client",
        &args.kafka,
        args.liveness.limit(BATCH_TIMEOUT + Duration::from_secs(30)),
    );
    let pool = connect(&args.database, shutdown, &liveness).await?;
    schema::migrate(&pool)
        .await
        .context("cannot apply migrations")?;
    let topics = Topics::new(&args.kafka.topic_prefix);
    let topic = if args.from_totals {
        topics.totals.clone()
    } else {
        topics.sums.clone()
    };
    let mut config = kafka::consumer_config(&args.kafka, &topics.db_client_group);
    kafka::static_membership(&mut config, args.instance_id.as_deref());
    kafka::apply_overrides(&mut config, &args.kafka);
    let consumer: StreamConsumer = config
        .create()
        .context("cannot create the Kafka consumer")?;
    consumer.subscribe(&[&topic])?;
    tracing::info!(topic, database = %args.database.redacted_url(), "db-client started");

    let wait = Duration::from_millis(args.batch_wait_ms);
    let commit_every = Duration::from_millis(args.kafka_commit_interval_ms);
    let mut last_commit = tokio::time::Instant::now();
    // Applied but not yet committed to Kafka: partition → next offset.
    let mut uncommitted: BTreeMap<i32, i64> = BTreeMap::new();
    let mut totals = Applied::default();
    let mut consumer_errors = Throttle::new(Duration::from_secs(10));
    'outer: while !shutdown.is_cancelled() {
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
                    if let Some(skipped) = consumer_errors.allow() {
                        tracing::warn!(%error, skipped, "consumer error");
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        // A database outage is retried, never skipped: the batch stays in hand until it lands.
        let mut backoff = Duration::from_millis(100);
        let mut database_down = None;
        let applied = loop {
            // Bounded: a connection that hangs (a half-open socket after a server crash) counts
            // as a failure; dropping the transaction rolls it back.
            let attempt = tokio::time::timeout(BATCH_TIMEOUT, apply(&pool, &topic, &batch)).await;
            match attempt.unwrap_or_else(|_| Err(anyhow::anyhow!("batch transaction timed out"))) {
                Ok(applied) => break applied,
                Err(error) => {
                    // Kafka is not what holds this stage up: no restart would help.
                    database_down.get_or_insert_with(|| liveness.waiting_on("PostgreSQL"));
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "batch not written, retrying"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        drop(database_down);
        liveness.progress();
        totals.records += applied.records;
        totals.skipped += applied.skipped;
        tracing::debug!(?applied, "batch committed");
        uncommitted.extend(next_offsets(&batch));
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
fn commit_to_kafka(consumer: &StreamConsumer, topic: &str, uncommitted: &mut BTreeMap<i32, i64>) {
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
    shutdown: &CancellationToken,
    liveness: &Liveness,
) -> anyhow::Result<PgPool> {
    let _waiting = liveness.waiting_on("PostgreSQL");
    let mut backoff = Duration::from_millis(200);
    loop {
        match PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&database.database_url)
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(error) => {
                tracing::warn!(%error, database = %database.redacted_url(), "cannot connect, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("shut down before the database was reachable"),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn next_offsets(batch: &[OwnedMessage]) -> BTreeMap<i32, i64> {
    let mut next = BTreeMap::new();
    for m in batch {
        let e = next.entry(m.partition()).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next
}

/// Writes one batch in one database transaction; see the module docs for the steps.
pub async fn apply(pool: &PgPool, topic: &str, batch: &[OwnedMessage]) -> anyhow::Result<Applied> {
    let next = next_offsets(batch);
    let partitions: Vec<i32> = next.keys().copied().collect();
    let mut tx = pool.begin().await.context("begin")?;
    sqlx::query(
        "INSERT INTO kafka_offsets (topic, partition, next_offset)
         SELECT $1, p, 0 FROM UNNEST($2::int[]) AS p ON CONFLICT DO NOTHING",
    )
    .bind(topic)
    .bind(&partitions)
    .execute(&mut *tx)
    .await
    .context("create offset rows")?;
    // Locked in partition order: two instances never wait on each other in a cycle.
    let stored: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
        "SELECT partition, next_offset FROM kafka_offsets
         WHERE topic = $1 AND partition = ANY($2) ORDER BY partition FOR UPDATE",
    )
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut *tx)
    .await
    .context("lock offsets")?
    .into_iter()
    .collect();

    let mut applied = Applied::default();
    let mut sums: BTreeMap<i64, i128> = BTreeMap::new();
    // Unit end markers in this batch: unit id → (counts, partitions total, markers seen).
    let mut units: BTreeMap<String, (UnitDone, i32, i32)> = BTreeMap::new();
    for m in batch {
        if m.offset() < stored.get(&m.partition()).copied().unwrap_or(0) {
            applied.skipped += 1;
            continue;
        }
        match m.payload().map(serde_json::from_slice::<SumsRecord>) {
            Some(Ok(SumsRecord::Sums { sums: pairs })) => {
                for (id, sum) in pairs {
                    *sums.entry(id).or_default() += i128::from(sum);
                }
            }
            Some(Ok(SumsRecord::UnitEnd { unit, partitions })) => {
                units
                    .entry(unit.unit_id.clone())
                    .or_insert((unit, partitions, 0))
                    .2 += 1;
            }
            _ => {
                applied.undecodable += 1;
                tracing::error!(
                    topic,
                    partition = m.partition(),
                    offset = m.offset(),
                    "undecodable sums record skipped"
                );
            }
        }
        applied.records += 1;
    }
    applied.consumers = sums.len();

    if !sums.is_empty() {
        // Sorted keys (BTreeMap): concurrent instances lock rows in the same order.
        let (ids, values): (Vec<i64>, Vec<String>) =
            sums.into_iter().map(|(k, v)| (k, v.to_string())).unzip();
        sqlx::query(
            "INSERT INTO consumer_totals (consumer_id, total)
             SELECT id, t::numeric FROM UNNEST($1::bigint[], $2::text[]) AS u(id, t)
             ON CONFLICT (consumer_id) DO UPDATE
               SET total = consumer_totals.total + EXCLUDED.total, updated_at = now()",
        )
        .bind(&ids)
        .bind(&values)
        .execute(&mut *tx)
        .await
        .context("upsert totals")?;
    }
    if !units.is_empty() {
        record_units(&mut tx, &units).await?;
    }
    let (parts, offsets): (Vec<i32>, Vec<i64>) = next.into_iter().unzip();
    sqlx::query(
        "UPDATE kafka_offsets o SET next_offset = GREATEST(o.next_offset, u.next), updated_at = now()
         FROM UNNEST($2::int[], $3::bigint[]) AS u(partition, next)
         WHERE o.topic = $1 AND o.partition = u.partition",
    )
    .bind(topic)
    .bind(&parts)
    .bind(&offsets)
    .execute(&mut *tx)
    .await
    .context("advance offsets")?;
    tx.commit().await.context("commit")?;
    Ok(applied)
}

/// The ingested-files ledger: counts each unit's end markers (in unit-id order: rows are
/// locked in the same order by every instance); a unit whose last marker lands here is
/// rolled up into its file.
async fn record_units(
    tx: &mut sqlx::PgConnection,
    units: &BTreeMap<String, (UnitDone, i32, i32)>,
) -> anyhow::Result<()> {
    let unit_ids: Vec<&str> = units.keys().map(String::as_str).collect();
    let file_ids: Vec<&str> = units.values().map(|u| u.0.file_id.as_str()).collect();
    let paths: Vec<&str> = units.values().map(|u| u.0.path.as_str()).collect();
    let totals: Vec<i32> = units.values().map(|u| u.0.units as i32).collect();
    let partitions: Vec<i32> = units.values().map(|u| u.1).collect();
    let seen: Vec<i32> = units.values().map(|u| u.2).collect();
    let lines: Vec<i64> = units.values().map(|u| u.0.lines as i64).collect();
    let bad: Vec<i64> = units.values().map(|u| u.0.bad_lines as i64).collect();
    let bytes: Vec<i64> = units.values().map(|u| u.0.bytes as i64).collect();
    sqlx::query(
        "WITH u AS (
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::int[],
                                $7::bigint[], $8::bigint[], $9::bigint[])
             AS u(unit_id, file_id, path, units, partitions, seen, lines, bad_lines, bytes)
         ), counted AS (
           INSERT INTO ingested_units
             (unit_id, file_id, partitions_total, partitions_seen, lines, bad_lines, bytes)
           SELECT unit_id, file_id, partitions, seen, lines, bad_lines, bytes FROM u ORDER BY unit_id
           ON CONFLICT (unit_id) DO UPDATE
             SET partitions_seen = ingested_units.partitions_seen + EXCLUDED.partitions_seen,
                 ingested_at = now()
           RETURNING unit_id, partitions_seen >= partitions_total AS complete
         )
         INSERT INTO ingested_files (file_id, path, units_total, units_ingested, lines, bad_lines, bytes)
         SELECT u.file_id, max(u.path), max(u.units), count(*), sum(u.lines), sum(u.bad_lines), sum(u.bytes)
         FROM u JOIN counted USING (unit_id) WHERE counted.complete GROUP BY u.file_id
         ON CONFLICT (file_id) DO UPDATE SET
           units_ingested = ingested_files.units_ingested + EXCLUDED.units_ingested,
           lines = ingested_files.lines + EXCLUDED.lines,
           bad_lines = ingested_files.bad_lines + EXCLUDED.bad_lines,
           bytes = ingested_files.bytes + EXCLUDED.bytes,
           last_ingested_at = now()",
    )
    .bind(&unit_ids)
    .bind(&file_ids)
    .bind(&paths)
    .bind(&totals)
    .bind(&partitions)
    .bind(&seen)
    .bind(&lines)
    .bind(&bad)
    .bind(&bytes)
    .execute(&mut *tx)
    .await
    .context("record ingested units")?;
    Ok(())
}
