//! tally-standalone: `tally standalone --dir D`, one process and PostgreSQL, no Kafka.
//!
//! The lightest way to run tally (direct reading on one host, for when one machine is enough and
//! Kafka is not wanted): it watches D with `producer watch`'s completion rules
//! ([`tally_producer::watch::candidates`]), cuts each complete file into the same work units
//! ([`tally_producer::announce::describe`], file time and all), and counts them in groups of
//! up to `--units-per-txn-max` units, one PostgreSQL transaction each ([`txn::count`]): the
//! parser's done-state rules and engine, the db-client's COPY upsert and ledger. Exactly once
//! without a broker: a unit's sums, its ledger rows and its file's done-state commit together, so after kill -9 it resumes where it
//! stopped and a byte already counted is never counted again, whatever the unit size, however
//! often a file is seen, appended to, rewritten or replaced. Memory is bounded by the engine's
//! key cap. Once a file's bytes are all summed, `--after-done` applies as in `watch`.
//!
//! - [`txn`]: a group of units → one transaction.

pub mod txn;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::Watcher;
use tally_core::args::{PeriodArgs, RescanArgs, SettleArgs, UnitArgs, UnitBatchArgs};
use tally_core::backoff::Backoff;
use tally_core::shutdown::CancellationToken;
use tally_core::DatabaseArgs;
use tally_model::identity::file_id;
use tally_model::messages::WorkUnit;

use tally_parser::offline::EngineArgs;
use tally_producer::announce::{self, Split};
use tally_producer::watch::{self, AfterDoneArgs};

use txn::Engine;

/// Arguments of `tally standalone`.
#[derive(Debug, Clone, clap::Args)]
pub struct StandaloneArgs {
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Parse engine.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Directory to watch (not recursive); files are complete by `producer watch`'s rules.
    #[arg(long, env = "TALLY_STANDALONE_DIR")]
    pub dir: PathBuf,
    /// Work units and file times.
    #[command(flatten)]
    pub units: UnitArgs,
    /// The usage period.
    #[command(flatten)]
    pub period: PeriodArgs,
    /// The full rescans.
    #[command(flatten)]
    pub rescan: RescanArgs,
    /// When a file is complete.
    #[command(flatten)]
    pub settle: SettleArgs,
    /// What happens to a file once it is done.
    #[command(flatten)]
    pub after: AfterDoneArgs,
    /// Units per database transaction (their sums are merged before PostgreSQL).
    #[command(flatten)]
    pub batch: UnitBatchArgs,
    /// Count what is complete, then exit (after waiting for files still settling; not for
    /// locked ones).
    #[arg(long)]
    pub once: bool,
    /// The change log (`GET /v1/changes` of `tally api`).
    #[command(flatten)]
    pub change_log: tally_db_client::changes::ChangeLogArgs,
}

/// Runs `tally standalone` until `shutdown` is cancelled (or after one pass with `--once`).
pub async fn run(args: &StandaloneArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let pool = tally_core::schema::connect_migrated(&args.database, 2).await?;
    let engine = Engine {
        config: args.engine.config(),
        merge_keys_max: args.engine.merge_keys_max(),
        pool: Arc::new(args.engine.pool()?),
        period: args.period.period,
        log_changes: args.change_log.enabled,
    };
    tally_db_client::changes::start(&pool, args.change_log.enabled).await?;
    tokio::spawn(tally_db_client::changes::keep_pruned(
        pool.clone(),
        Duration::from_secs(args.change_log.retention_minutes.saturating_mul(60)),
        shutdown.clone(),
    ));
    let split = Split::new(&args.units);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watched = dir.clone();
    let mut watcher = notify::recommended_watcher(move |event| {
        if watch::may_change_a_scan(&watched, &event) {
            let _ = tx.send(());
        }
    })
    .context("cannot start inotify")?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(%error, "inotify unavailable, relying on periodic rescans");
    }
    tracing::info!(dir = %dir.display(), period = %args.period.period, "standalone started");
    let mut pass = Pass {
        args,
        dir: &dir,
        pool: &pool,
        engine: &engine,
        split: &split,
        done: HashSet::new(),
        forced: HashMap::new(),
    };
    let rescan = Duration::from_millis(args.rescan.rescan_interval_ms.max(10));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !shutdown.is_cancelled() {
        let next = match pass.scan(shutdown).await {
            // --once: done when no file is still settling (a file just written or renamed
            // in waits out --settle-ms first; locked files are not waited for).
            Ok(None) if args.once => break,
            Ok(next) => {
                backoff.reset();
                next.map_or(rescan, |n| n.min(rescan))
            }
            Err(error) if args.once => return Err(error),
            // PostgreSQL down or restarting, a file system hiccup: nothing half-done stays.
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "pass failed, retrying");
                backoff.next_delay()
            }
        };
        let passed = tokio::time::Instant::now();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            // A writer appending in the folder raises an event per write: passes stay apart.
            Some(()) = rx.recv() => tokio::time::sleep_until(passed + watch::SCAN_SPACING).await,
            _ = tokio::time::sleep(next) => {}
        }
        while rx.try_recv().is_ok() {}
    }
    tracing::info!("standalone stopped");
    Ok(())
}

/// One scan of the folder and what it found.
struct Pass<'a> {
    args: &'a StandaloneArgs,
    dir: &'a Path,
    pool: &'a sqlx::PgPool,
    engine: &'a Engine,
    split: &'a Split,
    /// File versions whose bytes are all done (summed or rejected): not looked at again.
    done: HashSet<String>,
    /// Units that failed while parsed: rejected when seen again (unit id → reason).
    forced: HashMap<String, String>,
}

impl Pass<'_> {
    /// Counts every complete file not done yet; returns when the next unsettled file may be
    /// complete.
    async fn scan(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Option<Duration>> {
        let settle = Duration::from_millis(self.args.settle.settle_ms);
        let mut next: Option<Duration> = None;
        let mut files: Vec<Vec<WorkUnit>> = Vec::new();
        let mut present: HashSet<String> = HashSet::new();
        for watch::Candidate { path, meta, wait } in watch::candidates(self.dir, settle)? {
            if !wait.is_zero() {
                next = Some(next.map_or(wait, |n| n.min(wait)));
                continue;
            }
            let id = file_id(&meta);
            present.insert(id.clone());
            if self.done.contains(&id) {
                continue;
            }
            match announce::describe(&path, self.split) {
                Ok(units) => files.push(units),
                Err(error) => match error.downcast_ref::<announce::Refused>() {
                    // Never counted; not looked at again while this version is there.
                    Some(refused) => {
                        announce::say_refused(refused);
                        self.done.insert(id);
                    }
                    // Vanished or replaced since the listing: the next scan sees what is there.
                    None => tracing::debug!(%error, "skipping file for now"),
                },
            }
        }
        // Memory stays with the files still there.
        self.done.retain(|id| present.contains(id));
        self.forced.retain(|unit, _| {
            unit.split('/')
                .next()
                .is_some_and(|id| present.contains(id))
        });
        let units: Vec<WorkUnit> = files.iter().flatten().cloned().collect();
        let period = |u: &WorkUnit| u.time().and_then(|t| self.engine.period.start_of(t));
        let limits = (
            self.args.batch.units_per_txn_max,
            self.args.batch.txn_bytes_max,
        );
        for group in groups(&units, limits, period) {
            if shutdown.is_cancelled() {
                return Ok(next);
            }
            let counted =
                txn::count(self.pool, self.engine, self.dir, group, &mut self.forced).await?;
            for (unit, reason) in counted.rejected {
                tracing::error!(unit, reason, "unit rejected");
            }
            for done in counted.summed {
                tracing::debug!(unit = done.unit_id, lines = done.lines, "unit counted");
            }
        }
        for units in &files {
            self.finish(units).await?;
        }
        Ok(next)
    }

    /// Once all bytes of a file version are done: remembers it, and applies the life-cycle
    /// action (or lists it, if some were rejected).
    async fn finish(&mut self, units: &[WorkUnit]) -> anyhow::Result<()> {
        let Some(first) = units.first() else {
            return Ok(());
        };
        let path = PathBuf::from(&first.path);
        let mut conn = self.pool.acquire().await.context("connect")?;
        let Some(state) = txn::load_state(&mut conn, &first.stream).await? else {
            return Ok(());
        };
        if state.file_id != first.file_id || !state.finished(first.file_bytes) {
            // Another version is what the state describes now (the file changed meanwhile):
            // the next scan counts that one.
            return Ok(());
        }
        self.done.insert(first.file_id.clone());
        let rejected = state.rejected.bytes();
        if rejected > 0 {
            tracing::error!(
                path = %path.display(),
                rejected_bytes = rejected,
                "file not fully counted (units rejected); left in place and listed in {}",
                watch::REJECTED_FILE
            );
            watch::list_rejected(self.dir, rejected, first.file_bytes, &path)?;
        } else if let Err(error) =
            watch::apply_after_done(&self.args.after.after_done, &first.file_id, &path)
        {
            tracing::error!(%error, "life-cycle action failed; file left in place");
        }
        Ok(())
    }
}

/// `units` cut into runs of at most `units_max` units and `bytes_max` unit bytes (at least
/// one unit each), each of one period (`period_of`): a group's sums then merge in one table,
/// and periods never push each other out of it.
fn groups(
    units: &[WorkUnit],
    (units_max, bytes_max): (usize, u64),
    period_of: impl Fn(&WorkUnit) -> Option<i64>,
) -> Vec<&[WorkUnit]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, unit) in units.iter().enumerate() {
        let len = unit.end - unit.start;
        let full = i - start >= units_max || bytes + len > bytes_max;
        if i > start && (full || period_of(unit) != period_of(&units[start])) {
            out.push(&units[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < units.len() {
        out.push(&units[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_stay_within_their_limits() {
        let unit = |start: u64, end: u64| WorkUnit {
            stream: "s".into(),
            file_id: "f".into(),
            unit_id: format!("f/{start}-{end}"),
            path: "/x".into(),
            file_bytes: 100,
            fingerprint: 0,
            start,
            end,
            file_time: None,
        };
        let units: Vec<_> = (0..10).map(|i| unit(i * 10, i * 10 + 10)).collect();
        let sizes = |g: Vec<&[WorkUnit]>| g.iter().map(|g| g.len()).collect::<Vec<_>>();
        let one = |_: &WorkUnit| Some(0);
        assert_eq!(sizes(groups(&units, (4, 1000), one)), vec![4, 4, 2]);
        assert_eq!(sizes(groups(&units, (8, 25), one)), vec![2, 2, 2, 2, 2]);
        assert_eq!(sizes(groups(&units, (8, 5), one)), vec![1; 10]);
        assert!(groups(&[], (8, 5), one).is_empty());
        // A new period starts a new group.
        let by_thirds = |u: &WorkUnit| Some(u.start as i64 / 30);
        assert_eq!(
            sizes(groups(&units, (8, 1000), by_thirds)),
            vec![3, 3, 3, 1]
        );
    }
}
