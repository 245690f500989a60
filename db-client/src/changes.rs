//! The change log's write side (`tally_changes`, migration `20261203000001_change_log.sql`):
//! what a writer of the totals changed, added in the same transaction as its upserts, so a
//! reader (`tally api`'s `GET /v1/changes`) sees exactly the committed changes.
//!
//! - [`log_totals`] reads what a totals upsert returns (each consumer's new running total)
//!   into events of at most [`PER_EVENT`] consumers; rows of new consumers copied straight into
//!   the totals get the same events built by the writer
//!   ([`crate::copy::encode_total_events`]);
//! - [`log_periods`] turns the `(consumer_id, period_start, total)` rows a period upsert adds
//!   into events of deltas, in the server (for sums staged in pieces, `tally standalone`); the
//!   db-client, which holds its batch's deltas, builds the same events itself and copies them
//!   in ([`crate::copy::encode_period_events`]);
//! - [`start`] records whether this writer logs (`--change-log on|off`): switching marks the
//!   events before it as gone, so a reader that followed across an unlogged stretch is told;
//! - [`prune`] deletes whole transactions older than the retention and records the last event
//!   deleted, every [`PRUNE_EVERY`] ([`keep_pruned`]).
//!
//! Order. Readers take events in transaction-id order, and a totals event carries absolute
//! totals, so two transactions that change the same consumer must take their ids in the order
//! they change it. A transaction takes its id at its first write, and row locks come later;
//! so writers that may overlap serialize before their first write: the db-client locks its
//! batch's partitions (advisory, in partition order: a consumer lives in one partition), and
//! `tally standalone` takes [`WRITER_LOCK`].
//!
//! Readers read a transaction's events once no transaction with a lower id can still commit
//! any. They wait only for the log's writers, which say so before their first write
//! ([`writing`], migration `20261203000004_change_log_writers.sql`): a session of another
//! application left open in a transaction holds no reader back.

use std::time::Duration;

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

/// Marks the open transaction as a writer of the change log, so readers wait for it. Call it
/// before the transaction's first write (which takes its id), outside any savepoint (rolling
/// one back would release the lock); a transaction that writes events without it may have them
/// skipped by readers. A prepared (two-phase) transaction holds the lock without a process:
/// readers would not wait for it, so writers of the log never `PREPARE`.
pub async fn writing(tx: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query("SELECT tally_change_log_writing()")
        .execute(tx)
        .await
        .context("mark the transaction as a change log writer")?;
    Ok(())
}

/// Most consumers in one event: a transaction that changes more spans several events.
pub const PER_EVENT: i64 = 1000;

/// The advisory lock a writer holds from its transaction's start when other writers may change
/// the same consumers at once (`tally standalone` instances): see the order below.
pub const WRITER_LOCK: i64 = 0x7461_6c6c_7963_6c67; // "tallyclg"

/// How often a writer deletes changes past the retention.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The change log's settings, shared by every writer of the totals (the db-client,
/// `tally standalone`). Give all instances the same.
#[derive(Debug, Clone, clap::Args)]
pub struct ChangeLogArgs {
    /// Add what each transaction changed to the change log (`GET /v1/changes` of `tally api`):
    /// `on` or `off`. Off saves its cost (docs/benchmarks.md); readers are told that changes
    /// are missing from the switch on.
    #[arg(long = "change-log", env = "TALLY_CHANGE_LOG", default_value = "on", value_name = "on|off",
          value_parser = on_off, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// How long the change log keeps a transaction's changes, in minutes: a reader away for
    /// longer is told to read the totals again (410).
    #[arg(long = "change-log-retention-minutes", env = "TALLY_CHANGE_LOG_RETENTION_MINUTES",
          default_value_t = 60, value_parser = tally_core::args::positive_u64)]
    pub retention_minutes: u64,
}

impl Default for ChangeLogArgs {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_minutes: 60,
        }
    }
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got `{s}`")),
    }
}

/// A statement that logs, as totals events, the `(consumer_id, total)` rows of the common
/// table expression `up` (each changed consumer's new running total), to follow a `WITH`.
pub fn log_totals(up: &str) -> String {
    format!(
        "INSERT INTO tally_changes (consumer_ids, totals)
         SELECT array_agg(consumer_id), array_agg(total)
         FROM (SELECT consumer_id, total, (row_number() OVER () - 1) / {PER_EVENT} AS part
               FROM {up}) n
         GROUP BY part ORDER BY part"
    )
}

/// A statement that logs the `(consumer_id, period_start, total)` rows `select` yields (its
/// columns in that order, whatever their names) as period deltas.
pub fn log_periods(select: &str) -> String {
    format!(
        "INSERT INTO tally_changes (consumer_ids, period_starts, deltas)
         SELECT array_agg(consumer_id), array_agg(period_start), array_agg(total)
         FROM (SELECT consumer_id, period_start, total,
                      (row_number() OVER () - 1) / {PER_EVENT} AS part
               FROM ({select}) AS s (consumer_id, period_start, total)) n
         GROUP BY part ORDER BY part"
    )
}

/// Records whether this writer logs changes. Switching either way marks every event up to now
/// as gone: a reader positioned before it may have missed changes written without a log.
pub async fn start(pool: &PgPool, enabled: bool) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE tally_change_log
         SET enabled = $1,
             gone_tx = CASE WHEN enabled = $1 THEN gone_tx ELSE pg_current_xact_id() END,
             gone_seq = CASE WHEN enabled = $1 THEN gone_seq ELSE 9223372036854775807 END",
    )
    .bind(enabled)
    .execute(pool)
    .await
    .context("record the change log's setting")?;
    Ok(())
}

/// Deletes the changes of transactions that began more than `retention` ago, and records the
/// last event deleted. Returns how many events went.
pub async fn prune(pool: &PgPool, retention: Duration) -> anyhow::Result<u64> {
    let deleted: i64 = sqlx::query_scalar(
        "WITH gone AS (
           DELETE FROM tally_changes
           WHERE written_at < now() - make_interval(secs => $1)
           RETURNING tx, seq
         ), last AS (
           SELECT tx, seq FROM gone ORDER BY tx DESC, seq DESC LIMIT 1
         ), marked AS (
           UPDATE tally_change_log l SET gone_tx = last.tx, gone_seq = last.seq FROM last
           WHERE l.gone_tx IS NULL OR (last.tx, last.seq) > (l.gone_tx, l.gone_seq)
         )
         SELECT count(*) FROM gone",
    )
    .bind(retention.as_secs_f64())
    .fetch_one(pool)
    .await
    .context("prune the change log")?;
    Ok(deleted as u64)
}

/// Prunes every [`PRUNE_EVERY`] until `shutdown` (a failure is logged and tried again later).
pub async fn keep_pruned(
    pool: PgPool,
    retention: Duration,
    shutdown: tally_core::shutdown::CancellationToken,
) {
    loop {
        match prune(&pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "change log pruned"),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "change log not pruned"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ChangeLogArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        change_log: ChangeLogArgs,
    }

    fn enabled(args: &[&str]) -> Result<bool, clap::Error> {
        Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
            .map(|cli| cli.change_log.enabled)
    }

    #[test]
    fn the_change_log_is_switched_with_on_or_off() {
        assert!(enabled(&[]).unwrap());
        assert!(!enabled(&["--change-log", "off"]).unwrap());
        assert!(!enabled(&["--change-log=off"]).unwrap());
        assert!(enabled(&["--change-log", "on"]).unwrap());
        assert!(enabled(&["--change-log", "maybe"]).is_err());
    }
}
