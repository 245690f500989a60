//! The totals of one batch into PostgreSQL at COPY speed, inside the batch's transaction
//! (with its offsets and ledger): the pre-aggregated rows go with binary COPY straight into
//! `consumer_totals` where no row of their id range exists, else into a session-local staging
//! table, from which one statement adds them (`UPDATE` then `INSERT`); a transaction that
//! another writer of the same consumers races fails and is written again (`totals.rs`,
//! [`current`]). A consumer's row carries its newest usage
//! period too ([`current`]): the same row write adds to it, and a period replaced by a newer
//! one, or a late batch's amount, moves to `consumer_period_history`; a consumer's older
//! periods of the same batch go there directly, and every period's sum of the batch goes to
//! `usage_period_totals`. Readers see both through the view `consumer_period_totals`. Rows are
//! written in key order (present ones, then new ones); instances of one deployment never
//! write the same consumers at once (a batch holds its partitions' locks). The staging tables
//! are `ON COMMIT DELETE ROWS`: a rolled-back or committed batch leaves them empty. With the
//! change log on, what a batch changed is logged in the same transaction ([`crate::changes`]).

use std::collections::BTreeMap;

use anyhow::Context;
use sqlx::PgConnection;

use crate::changes;

mod binary;
pub mod current;
mod totals;

use totals::{add_rows, add_totals, run, Staged};

pub use binary::{
    encode, encode_heads, encode_period_events, encode_periods, encode_staged, encode_total_events,
};

/// Creates the session's staging table (once per connection; harmless when it exists): a
/// consumer's total, and its newest period with the amount there (NULL without one).
pub const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_staging \
     (consumer_id BIGINT NOT NULL, total NUMERIC NOT NULL, period_start TIMESTAMPTZ, \
      period_total NUMERIC) ON COMMIT DELETE ROWS";

/// Creates the session's table of the periods an upsert moved off the consumers' rows.
const CREATE_MOVED_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_moved_staging \
     (consumer_id BIGINT NOT NULL, period_start TIMESTAMPTZ NOT NULL, total NUMERIC NOT NULL) \
     ON COMMIT DELETE ROWS";

/// Creates the session's staging table for period totals.
pub const CREATE_PERIOD_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_period_staging \
     (consumer_id BIGINT NOT NULL, period_start TIMESTAMPTZ NOT NULL, total NUMERIC NOT NULL) \
     ON COMMIT DELETE ROWS";

/// Copies `data` (a binary COPY stream) into a staging table, created first by `create`;
/// with `clear` (a `DELETE`), emptied first of what an earlier statement of the same
/// transaction staged, so that each call adds only its own rows.
async fn stage(
    tx: &mut PgConnection,
    create: &str,
    clear: Option<&str>,
    copy_into: &str,
    data: Vec<u8>,
) -> anyhow::Result<()> {
    sqlx::query(create)
        .execute(&mut *tx)
        .await
        .context("staging table")?;
    if let Some(clear) = clear {
        sqlx::query(clear)
            .execute(&mut *tx)
            .await
            .context("empty the staging table")?;
    }
    copy_in(tx, copy_into, data).await?;
    Ok(())
}

/// Runs `copy_into` (a `COPY … FROM STDIN`) with `data`, freed once sent; returns the rows
/// copied. Sent in pieces of [`SEND_CHUNK`]: the connection copies what it sends into its
/// write buffer, which keeps its size, so one piece of a 600 MB stream would hold 600 MB more
/// for as long as the connection lives.
async fn copy_in(tx: &mut PgConnection, copy_into: &str, data: Vec<u8>) -> anyhow::Result<u64> {
    let mut copy = tx
        .copy_in_raw(copy_into)
        .await
        .with_context(|| format!("start `{copy_into}`"))?;
    for piece in data.chunks(SEND_CHUNK) {
        copy.send(piece)
            .await
            .with_context(|| format!("send `{copy_into}`"))?;
    }
    drop(data);
    copy.finish()
        .await
        .with_context(|| format!("finish `{copy_into}`"))
}

/// Bytes of a COPY stream sent at once.
const SEND_CHUNK: usize = 1 << 20;

/// Consumers in one change log event ([`changes::PER_EVENT`]).
const PER_EVENT: usize = changes::PER_EVENT as usize;

/// Adds `rows` (sorted by (id, period start), each pair once; starts in Unix seconds) to
/// `consumer_period_history` in the open transaction, and their sums per period to
/// `usage_period_totals`. Their monthly partitions must exist ([`ensure_partitions`]). With
/// `log`, the deltas go to the change log too.
pub async fn upsert_period_totals(
    tx: &mut PgConnection,
    rows: &[((i64, i64), i128)],
    log: bool,
) -> anyhow::Result<()> {
    put_period_rows(tx, rows).await?;
    count_periods(tx, rows, log).await
}

/// Adds a batch to `consumer_totals` in the open transaction: `sums` (sorted by id, each id
/// once) to the running totals, and `period_sums` (sorted by (id, period start), each pair
/// once; every id also in `sums`) to the consumers' usage per period: a consumer's newest
/// period of the batch on its row ([`current`]), its older ones as period rows; their sums per
/// period to `usage_period_totals`. The monthly partitions of the batch's periods must exist
/// ([`ensure_partitions`]); those of periods moved off the rows are made here if missing. With
/// `log`, the new totals and the period deltas go to the change log too.
pub async fn upsert_sums(
    tx: &mut PgConnection,
    sums: Vec<(i64, i128)>,
    period_sums: &[((i64, i64), i128)],
    log: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (heads, older) = current::split(sums, period_sums);
    let split = started.elapsed();
    let mut encoded = split;
    if !heads.is_empty() {
        let staged = Staged::of(heads.iter().map(|head| head.id));
        let data = encode_heads(&heads);
        encoded = started.elapsed();
        add_rows(
            tx,
            staged,
            "consumer_id, total, period_start, period_total",
            data,
            || encode_total_events(&heads, PER_EVENT, |head| (head.id, head.total)),
            log,
        )
        .await?;
        drop(heads);
    }
    let totals = started.elapsed();
    if !older.is_empty() {
        put_period_rows(tx, &older).await?;
    }
    let older_at = started.elapsed();
    if !period_sums.is_empty() {
        count_periods(tx, period_sums, log).await?;
    }
    tracing::debug!(
        split_ms = split.as_millis() as u64,
        encoded_ms = encoded.as_millis() as u64,
        totals_ms = totals.as_millis() as u64,
        older_ms = older_at.as_millis() as u64,
        periods_ms = started.elapsed().as_millis() as u64,
        "batch sums written"
    );
    Ok(())
}

/// Adds `rows` to `consumer_period_history` (nothing else) through the period staging table.
async fn put_period_rows(tx: &mut PgConnection, rows: &[((i64, i64), i128)]) -> anyhow::Result<()> {
    stage(
        tx,
        CREATE_PERIOD_STAGING,
        Some("DELETE FROM tally_period_staging"),
        "COPY tally_period_staging (consumer_id, period_start, total) FROM STDIN (FORMAT binary)",
        encode_periods(rows),
    )
    .await?;
    add_period_totals(
        tx,
        "SELECT consumer_id, period_start, total FROM tally_period_staging
         ORDER BY consumer_id, period_start",
    )
    .await
}

/// What a batch added per (consumer, period), `rows`: with `log`, into the change log as period
/// deltas; summed per period, into `usage_period_totals`.
pub async fn count_periods(
    tx: &mut PgConnection,
    rows: &[((i64, i64), i128)],
    log: bool,
) -> anyhow::Result<()> {
    if log {
        // The deltas are `rows` themselves: their events are built here and copied in,
        // instead of aggregated from the staging table by the server (which is what binds).
        copy_in(
            tx,
            "COPY tally_changes (consumer_ids, period_starts, deltas) FROM STDIN (FORMAT binary)",
            encode_period_events(rows, PER_EVENT),
        )
        .await?;
    }
    let mut usage: BTreeMap<i64, i128> = BTreeMap::new();
    for &((_, start), total) in rows {
        *usage.entry(start).or_default() += total;
    }
    let (starts, totals): (Vec<i64>, Vec<String>) = usage
        .into_iter()
        .map(|(start, total)| (start, total.to_string()))
        .unzip();
    sqlx::query(&add_period_usage(
        "SELECT to_timestamp(s), t::numeric FROM UNNEST($1::bigint[], $2::text[]) AS u (s, t)",
    ))
    .bind(starts)
    .bind(totals)
    .execute(&mut *tx)
    .await
    .context("add to the usage per period")?;
    Ok(())
}

/// A statement that adds the `(period_start, total)` rows `select` yields (each period once)
/// to `usage_period_totals`, all consumers' usage per period (migration
/// `20261203000005_usage_period_totals.sql`), at this session's slot, in period order.
pub fn add_period_usage(select: &str) -> String {
    format!(
        "INSERT INTO usage_period_totals (period_start, slot, total)
         SELECT p, pg_backend_pid() % 64, t FROM ({select}) AS s (p, t) ORDER BY p
         ON CONFLICT (period_start, slot) DO UPDATE
           SET total = usage_period_totals.total + EXCLUDED.total, updated_at = now()"
    )
}

/// Adds the `(consumer_id, period_start, total)` rows `select` yields (each pair once, in key
/// order) to `consumer_period_history`.
async fn add_period_totals(tx: &mut PgConnection, select: &str) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO consumer_period_history (consumer_id, period_start, total) {select}
         ON CONFLICT (consumer_id, period_start) DO UPDATE
           SET total = consumer_period_history.total + EXCLUDED.total, updated_at = now()"
    ))
    .execute(&mut *tx)
    .await
    .context("upsert period totals")?;
    Ok(())
}

/// Readies a new database session for batches: its staging tables, and this month's and the
/// next month's period partitions (compiling the function that makes them, in this session).
/// A batch does each of these itself where needed; done when the session opens, the first
/// batches after a start do not wait for them. Where the schema is not there yet (before
/// `tally init`), it stops at the first refusal, quietly: the batches then do it.
pub async fn prepare_session(conn: &mut PgConnection) {
    let prepared = async {
        for statement in [CREATE_STAGING, CREATE_MOVED_STAGING, CREATE_PERIOD_STAGING] {
            sqlx::query(statement).execute(&mut *conn).await?;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        ensure_partitions(&mut *conn, &[now]).await
    };
    if let Err(error) = prepared.await {
        tracing::debug!(error = %format!("{error:#}"), "session not prepared ahead of its batches");
    }
}

/// Creates the monthly partitions of `consumer_period_history` for periods starting at `starts`
/// (Unix seconds), and the month after each, where missing. Run outside a batch's transaction:
/// creating a partition locks the whole table for a moment.
pub async fn ensure_partitions<'e>(
    db: impl sqlx::PgExecutor<'e>,
    starts: &[i64],
) -> anyhow::Result<()> {
    if starts.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT tally_ensure_period_partitions(ARRAY(SELECT to_timestamp(s) FROM UNNEST($1::bigint[]) AS s))")
        .bind(starts)
        .execute(db)
        .await
        .context("create period partitions")?;
    Ok(())
}

/// Creates the session's staging table for sums that arrive in pieces, with their period.
pub const CREATE_SUMS_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_sums_staging \
     (consumer_id BIGINT NOT NULL, period_start TIMESTAMPTZ, total NUMERIC NOT NULL) \
     ON COMMIT DELETE ROWS";

/// Appends `sums` (ids may repeat) of `period` (its start, Unix seconds; `None`: running
/// totals only) to the session's staging table, in the open transaction: for a writer whose
/// sums arrive in pieces (`tally standalone`), added by [`upsert_staged`].
pub async fn stage_sums(
    tx: &mut PgConnection,
    period: Option<i64>,
    sums: &[(i64, i64)],
) -> anyhow::Result<()> {
    stage(
        tx,
        CREATE_SUMS_STAGING,
        None,
        "COPY tally_sums_staging (consumer_id, period_start, total) FROM STDIN (FORMAT binary)",
        encode_staged(period, sums),
    )
    .await
}

/// Adds what [`stage_sums`] staged as [`upsert_sums`] adds a batch, in the server: summed per
/// consumer to `consumer_totals`, with each consumer's newest period on its row, its older
/// periods (summed per consumer and period) to `consumer_period_history`, and every period's
/// sum to `usage_period_totals`, in key order, in the open transaction. The partitions of the
/// staged periods must exist ([`ensure_partitions`]). With `log`, to the change log too.
pub async fn upsert_staged(tx: &mut PgConnection, log: bool) -> anyhow::Result<()> {
    sqlx::query(CREATE_SUMS_STAGING)
        .execute(&mut *tx)
        .await
        .context("staging table")?;
    // Per (consumer, period), numbered from the newest period down.
    const PERIODS: &str = "SELECT consumer_id, period_start, sum(total) AS total,
             row_number() OVER (PARTITION BY consumer_id ORDER BY period_start DESC) AS age
           FROM tally_sums_staging WHERE period_start IS NOT NULL
           GROUP BY consumer_id, period_start";
    // Each consumer once, with its newest period, staged as a batch's rows are.
    run(tx, &[CREATE_STAGING, "DELETE FROM tally_staging"]).await?;
    let rows = sqlx::query(&format!(
        "INSERT INTO tally_staging (consumer_id, total, period_start, period_total)
         SELECT a.consumer_id, a.total, h.period_start, h.total
         FROM (SELECT consumer_id, sum(total) AS total FROM tally_sums_staging
               GROUP BY consumer_id) a
         LEFT JOIN ({PERIODS}) h ON h.consumer_id = a.consumer_id AND h.age = 1
         ORDER BY a.consumer_id"
    ))
    .execute(&mut *tx)
    .await
    .context("sum the staged sums per consumer")?
    .rows_affected();
    let (low, high): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT min(consumer_id), max(consumer_id) FROM tally_staging")
            .fetch_one(&mut *tx)
            .await
            .context("the staged consumers' range")?;
    let staged = Staged {
        rows,
        ids: (low.unwrap_or(0), high.unwrap_or(0)),
    };
    add_totals(tx, staged, log).await?;
    add_period_totals(
        tx,
        &format!(
            "SELECT consumer_id, period_start, total FROM ({PERIODS}) p WHERE age > 1
             ORDER BY consumer_id, period_start"
        ),
    )
    .await?;
    if log {
        sqlx::query(&changes::log_periods(
            "SELECT consumer_id, period_start, sum(total) FROM tally_sums_staging
             WHERE period_start IS NOT NULL
             GROUP BY consumer_id, period_start ORDER BY consumer_id, period_start",
        ))
        .execute(&mut *tx)
        .await
        .context("log period deltas")?;
    }
    sqlx::query(&add_period_usage(
        "SELECT period_start, sum(total) FROM tally_sums_staging
         WHERE period_start IS NOT NULL GROUP BY period_start",
    ))
    .execute(&mut *tx)
    .await
    .context("add to the usage per period")?;
    Ok(())
}

/// Adds `rows` (sorted by id, each id once) to the running totals of `consumer_totals` in the
/// open transaction (their periods untouched); with `log`, their new totals go to the change
/// log too.
pub async fn upsert_totals(
    tx: &mut PgConnection,
    rows: &[(i64, i128)],
    log: bool,
) -> anyhow::Result<()> {
    add_rows(
        tx,
        Staged::of(rows.iter().map(|&(id, _)| id)),
        "consumer_id, total",
        encode(rows),
        || encode_total_events(rows, PER_EVENT, |&row| row),
        log,
    )
    .await
}
