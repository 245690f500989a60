//! The totals of one batch into PostgreSQL at COPY speed: the pre-aggregated `(consumer_id,
//! total)` rows go into a session-local staging table with binary COPY, then one
//! `INSERT … SELECT … ORDER BY consumer_id ON CONFLICT DO UPDATE` adds them to
//! `consumer_totals`, inside the batch's transaction (with its offsets and ledger); the
//! `(consumer_id, period_start, total)` rows go the same way into `consumer_period_totals`, and
//! their sums per period into `usage_period_totals`. Rows are
//! upserted in key order, so concurrent instances lock rows in the same order and never
//! deadlock. The staging table is `ON COMMIT DELETE ROWS`: a rolled-back or committed batch
//! leaves it empty. With the change log on, the same statements log what they changed
//! ([`crate::changes`]).

use std::collections::BTreeMap;

use anyhow::Context;
use sqlx::PgConnection;

use crate::changes;

mod binary;

pub use binary::{encode, encode_period_events, encode_periods, encode_staged};

/// Creates the session's staging table (once per connection; harmless when it exists).
pub const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_staging \
     (consumer_id BIGINT NOT NULL, total NUMERIC NOT NULL) ON COMMIT DELETE ROWS";

/// Creates the session's staging table for period totals.
pub const CREATE_PERIOD_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_period_staging \
     (consumer_id BIGINT NOT NULL, period_start TIMESTAMPTZ NOT NULL, total NUMERIC NOT NULL) \
     ON COMMIT DELETE ROWS";

/// Copies `data` (a binary COPY stream) into the staging table `table`, created first by
/// `create`.
async fn stage(
    tx: &mut PgConnection,
    create: &str,
    copy_into: &str,
    data: Vec<u8>,
) -> anyhow::Result<()> {
    sqlx::query(create)
        .execute(&mut *tx)
        .await
        .context("staging table")?;
    let mut copy = tx.copy_in_raw(copy_into).await.context("start COPY")?;
    copy.send(data).await.context("COPY data")?;
    copy.finish().await.context("finish COPY")?;
    Ok(())
}

/// Adds `rows` (sorted by (id, period start), each pair once; starts in Unix seconds) to
/// `consumer_period_totals` in the open transaction. Their monthly partitions must exist
/// ([`ensure_partitions`]). With `log`, the deltas go to the change log too.
pub async fn upsert_period_totals(
    tx: &mut PgConnection,
    rows: &[((i64, i64), i128)],
    log: bool,
) -> anyhow::Result<()> {
    stage(
        tx,
        CREATE_PERIOD_STAGING,
        "COPY tally_period_staging (consumer_id, period_start, total) FROM STDIN (FORMAT binary)",
        encode_periods(rows),
    )
    .await?;
    add_period_totals(
        tx,
        "SELECT consumer_id, period_start, total FROM tally_period_staging
         ORDER BY consumer_id, period_start",
        false,
    )
    .await?;
    if log {
        // The deltas are `rows` themselves: their events are built here and copied in,
        // instead of aggregated from the staging table by the server (which is what binds).
        let mut copy = tx
            .copy_in_raw(
                "COPY tally_changes (consumer_ids, period_starts, deltas) FROM STDIN (FORMAT binary)",
            )
            .await
            .context("start COPY of period deltas")?;
        copy.send(encode_period_events(rows, changes::PER_EVENT as usize))
            .await
            .context("COPY period deltas")?;
        copy.finish()
            .await
            .context("finish COPY of period deltas")?;
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

/// Adds the `(consumer_id, total)` rows `select` yields (each id once, in id order) to
/// `consumer_totals`; with `log`, their new totals go to the change log in the same statement.
async fn add_totals(tx: &mut PgConnection, select: &str, log: bool) -> anyhow::Result<()> {
    let upsert = format!(
        "INSERT INTO consumer_totals (consumer_id, total) {select}
         ON CONFLICT (consumer_id) DO UPDATE
           SET total = consumer_totals.total + EXCLUDED.total, updated_at = now()"
    );
    let statement = if log {
        changes::log_totals(&upsert)
    } else {
        upsert
    };
    sqlx::query(&statement)
        .execute(&mut *tx)
        .await
        .context("upsert totals")?;
    Ok(())
}

/// Adds the `(consumer_id, period_start, total)` rows `select` yields (each pair once, in key
/// order) to `consumer_period_totals`; with `log`, to the change log too.
async fn add_period_totals(tx: &mut PgConnection, select: &str, log: bool) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO consumer_period_totals (consumer_id, period_start, total) {select}
         ON CONFLICT (consumer_id, period_start) DO UPDATE
           SET total = consumer_period_totals.total + EXCLUDED.total, updated_at = now()"
    ))
    .execute(&mut *tx)
    .await
    .context("upsert period totals")?;
    if log {
        sqlx::query(&changes::log_periods(select))
            .execute(&mut *tx)
            .await
            .context("log period deltas")?;
    }
    Ok(())
}

/// Creates the monthly partitions of `consumer_period_totals` for periods starting at `starts`
/// (Unix seconds), and the month after each, where missing. Run outside a batch's transaction:
/// creating a partition locks the whole table for a moment.
pub async fn ensure_partitions(pool: &sqlx::PgPool, starts: &[i64]) -> anyhow::Result<()> {
    if starts.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT tally_ensure_period_partitions(ARRAY(SELECT to_timestamp(s) FROM UNNEST($1::bigint[]) AS s))")
        .bind(starts)
        .execute(pool)
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
        "COPY tally_sums_staging (consumer_id, period_start, total) FROM STDIN (FORMAT binary)",
        encode_staged(period, sums),
    )
    .await
}

/// Adds what [`stage_sums`] staged, summed per consumer, to `consumer_totals`, and what has
/// a period, summed per consumer and period, to `consumer_period_totals` (their partitions
/// must exist, [`ensure_partitions`]), in key order, in the open transaction; with `log`, to
/// the change log too.
pub async fn upsert_staged(tx: &mut PgConnection, log: bool) -> anyhow::Result<()> {
    sqlx::query(CREATE_SUMS_STAGING)
        .execute(&mut *tx)
        .await
        .context("staging table")?;
    add_totals(
        tx,
        "SELECT consumer_id, sum(total) FROM tally_sums_staging
         GROUP BY consumer_id ORDER BY consumer_id",
        log,
    )
    .await?;
    add_period_totals(
        tx,
        "SELECT consumer_id, period_start, sum(total) FROM tally_sums_staging
         WHERE period_start IS NOT NULL
         GROUP BY consumer_id, period_start ORDER BY consumer_id, period_start",
        log,
    )
    .await?;
    sqlx::query(&add_period_usage(
        "SELECT period_start, sum(total) FROM tally_sums_staging
         WHERE period_start IS NOT NULL GROUP BY period_start",
    ))
    .execute(&mut *tx)
    .await
    .context("add to the usage per period")?;
    Ok(())
}

/// Adds `rows` (sorted by id, each id once) to `consumer_totals` in the open transaction;
/// with `log`, their new totals go to the change log too.
pub async fn upsert_totals(
    tx: &mut PgConnection,
    rows: &[(i64, i128)],
    log: bool,
) -> anyhow::Result<()> {
    stage(
        tx,
        CREATE_STAGING,
        "COPY tally_staging (consumer_id, total) FROM STDIN (FORMAT binary)",
        encode(rows),
    )
    .await?;
    let copied = std::time::Instant::now();
    add_totals(
        tx,
        "SELECT consumer_id, total FROM tally_staging ORDER BY consumer_id",
        log,
    )
    .await?;
    tracing::debug!(
        rows = rows.len(),
        statement_ms = copied.elapsed().as_millis() as u64,
        "upsert statement"
    );
    Ok(())
}
