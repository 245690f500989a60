//! `tally rollup --older-than 30d --to 1d`: folds the fine rows of old periods in
//! `consumer_period_history` into coarse ones, in one transaction, so that the table stays
//! bounded while every sum is kept exactly; all consumers' usage per period
//! (`usage_period_totals`) moves with them. Current periods older than the cutoff (a
//! consumer's newest period, kept on its `consumer_totals` row until a newer one comes) move
//! to the period rows first, in the same transaction, and are folded with them.
//!
//! Only whole coarse periods are folded: those that end before the cutoff (now minus
//! `--older-than`, floored to `--to`). Rows already aligned to `--to` stay and receive the
//! sums of the rows folded into them; every other row there is deleted and its total added to
//! its coarse row, in one statement (a data-modifying `DELETE … RETURNING` feeding an upsert).
//! Safe while ingestion goes on: a db-client adding to a row being folded waits for the
//! rollup's commit and then adds to a new row, or the rollup waits and folds the new total
//! (PostgreSQL re-reads a row changed by a concurrent commit before deleting it). Either way
//! nothing is lost or counted twice; a late row is folded by the next rollup. A deadlock with a
//! db-client batch is retried (PostgreSQL aborts one of the two; the db-client retries too).
//! With the change log on, a fold is in it as period deltas (`GET /v1/changes`).

use anyhow::{bail, Context};
use tally_core::DatabaseArgs;
use tally_model::period::Period;

/// Most consumers in one change log event (as the writers' `PER_EVENT`).
const EVENT_CONSUMERS_MAX: i64 = 1000;

/// Arguments of `tally rollup`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollupArgs {
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Fold periods that ended at least this long ago (a whole number of m, h or d).
    #[arg(long, value_parser = tally_model::period::parse_period)]
    pub older_than: Period,
    /// The coarse period they are folded into: one that divides a day (`1h`, `6h`, `1d`, …;
    /// epoch-aligned in UTC, like `--period`), so no folded row crosses into another month.
    #[arg(long, value_parser = tally_model::period::parse_period)]
    pub to: Period,
}

/// What a rollup did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolled {
    /// The cutoff (Unix seconds): coarse periods starting before it were folded.
    pub cutoff: i64,
    /// Fine rows deleted.
    pub folded: u64,
    /// Coarse rows they were added to (created or updated).
    pub into: u64,
}

/// Folds old periods older than `older_than` seconds into periods of `to` seconds, at
/// `now` (Unix seconds).
pub async fn rollup(
    pool: &sqlx::PgPool,
    older_than: i64,
    to: i64,
    now: i64,
) -> anyhow::Result<Rolled> {
    let cutoff = (now - older_than).div_euclid(to) * to;
    // The coarse rows' partitions first (a coarse period may start in an earlier month).
    // And those of current periods to move (their month may have been dropped since).
    sqlx::query(
        "SELECT tally_ensure_period_partitions(ARRAY(
           SELECT DISTINCT to_timestamp(floor(extract(epoch FROM period_start)::bigint / $2::float8) * $2)
           FROM consumer_period_totals WHERE period_start < to_timestamp($1)
           UNION
           SELECT DISTINCT date_trunc('month', period_start) FROM consumer_totals
           WHERE period_start < to_timestamp($1)))",
    )
    .bind(cutoff)
    .bind(to)
    .execute(pool)
    .await
    .context("create the coarse periods' partitions")?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match fold(pool, cutoff, to).await {
            Ok((folded, into)) => {
                return Ok(Rolled {
                    cutoff,
                    folded,
                    into,
                })
            }
            // deadlock_detected, serialization_failure: a concurrent db-client batch.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("40P01" | "40001")) && attempts < 5 =>
            {
                tracing::warn!(error = %e, attempts, "rollup met a concurrent batch; retrying");
            }
            Err(e) => return Err(e).context("fold old periods"),
        }
    }
}

async fn fold(pool: &sqlx::PgPool, cutoff: i64, to: i64) -> Result<(u64, u64), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // A writer of the change log, before its first write (see `tally_db_client::changes`).
    sqlx::query("SELECT tally_change_log_writing()")
        .execute(&mut *tx)
        .await?;
    // Current periods before the cutoff (a consumer's newest, on its totals row) move to the
    // period rows first, to be folded with them (migration `20261206000001`): the usage stays,
    // only where it is kept changes, so nothing is logged.
    sqlx::query("SELECT tally_settle_periods(to_timestamp($1))")
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
    // One statement, so one snapshot: the usage of all consumers per period moves by exactly
    // the rows it deletes (in a statement of its own it would see batches that committed in
    // between, and move usage whose rows stayed). With the change log on, the fold is logged as
    // period deltas (each fine row taken away, each coarse row added to), so a follower's
    // periods stay the table's; totals do not move.
    let (folded, into): (i64, i64) = sqlx::query_as(
        "WITH gone AS (
           DELETE FROM consumer_period_history
           WHERE period_start < to_timestamp($1)
             AND extract(epoch FROM period_start)::bigint % $2 <> 0
           RETURNING consumer_id, period_start, total
         ), folded AS (
           SELECT consumer_id,
                  to_timestamp(floor(extract(epoch FROM period_start)::bigint / $2::float8) * $2)
                    AS period_start,
                  sum(total) AS total
           FROM gone GROUP BY 1, 2
         ), coarse AS (
           INSERT INTO consumer_period_history (consumer_id, period_start, total)
           SELECT consumer_id, period_start, total FROM folded ORDER BY 1, 2
           ON CONFLICT (consumer_id, period_start) DO UPDATE
             SET total = consumer_period_history.total + EXCLUDED.total, updated_at = now()
           RETURNING 1
         ), deltas AS (
           SELECT consumer_id, period_start, -total AS delta FROM gone
           UNION ALL
           SELECT consumer_id, period_start, total FROM folded
         ), usage AS (
           -- All consumers' usage moves with exactly the rows moved here (the ones this
           -- statement deleted, whatever commits meanwhile), at this session's slot: a folded
           -- period keeps its usage rows, which now add up to what it still holds.
           INSERT INTO usage_period_totals (period_start, slot, total)
           SELECT period_start, pg_backend_pid() % 64, sum(delta) FROM deltas GROUP BY 1 ORDER BY 1
           ON CONFLICT (period_start, slot) DO UPDATE
             SET total = usage_period_totals.total + EXCLUDED.total, updated_at = now()
         ), logged AS (
           INSERT INTO tally_changes (consumer_ids, period_starts, deltas)
           SELECT array_agg(consumer_id), array_agg(period_start), array_agg(delta)
           FROM (SELECT consumer_id, period_start, delta,
                        (row_number() OVER (ORDER BY consumer_id, period_start) - 1) / $3 AS part
                 FROM deltas) n
           WHERE (SELECT enabled FROM tally_change_log)
           GROUP BY part ORDER BY part
           RETURNING 1
         )
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM coarse)",
    )
    .bind(cutoff)
    .bind(to)
    .bind(EVENT_CONSUMERS_MAX)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((folded as u64, into as u64))
}

/// Runs `tally rollup`.
pub async fn run(args: &RollupArgs) -> anyhow::Result<()> {
    let (Some(older_than), Some(to)) = (args.older_than.length(), args.to.length()) else {
        bail!("--older-than and --to take a period (a whole number of m, h or d), not off");
    };
    if 86_400 % to != 0 {
        // A coarse period that does not divide a day would straddle midnight, and some month
        // boundaries: its usage would move into the month it starts in.
        bail!(
            "--to {} does not divide a day: use one that does (1h, 6h, 1d, …)",
            args.to
        );
    }
    let pool = tally_core::schema::connect_migrated(&args.database, 1).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let rolled = rollup(&pool, older_than, to, now).await?;
    let cutoff: String = sqlx::query_scalar(
        "SELECT to_char(to_timestamp($1) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    )
    .bind(rolled.cutoff)
    .fetch_one(&pool)
    .await?;
    println!(
        "folded {} rows of periods before {cutoff} into {} rows of {}",
        rolled.folded, rolled.into, args.to
    );
    Ok(())
}
