//! A group of work units → one PostgreSQL transaction, without Kafka.
//!
//! Under transaction-scoped advisory locks on the units' streams (taken in stream order, so two
//! instances on one folder take turns on a file): read each stream's done-state from
//! `standalone_streams`, decide with the parser's rules ([`streams::prepare`]) what of each
//! unit is still to sum, parse those bytes with the engine on its rayon pool into one
//! [`Merger`] for the whole group (per period, under the key cap: what does not fit is copied
//! into the session's staging table at once), then stage the merged sums, upsert them into
//! `consumer_totals` (and the usage per period, as the db-client does), record the units in
//! the ledger (`ingested_units`, `ingested_files`), store the streams' new states, and commit. Merging a
//! group's units first is what the parser's transactions and the aggregator do for the
//! pipeline: PostgreSQL updates a consumer once per group, not once per unit.
//!
//! A crash at any point leaves all of a group or none of it; a byte a state has is never
//! summed again. A unit that fails while it is parsed (a bad line under `--bad-lines=fail`, a
//! read error) aborts the group, which is then redone with that unit rejected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgConnection;
use tally_db_client::{batch, copy};
use tally_engine::source::FileSource;
use tally_engine::{self as engine, BadLine, EngineConfig, EngineError, Sink, Stats, Stopped};
use tally_model::messages::{StreamDone, UnitDone, WorkUnit};
use tally_model::period::Period;
use tally_model::sums::Merger;
use tally_parser::streams::{self, Step};
use tokio::sync::mpsc;

/// Bad lines logged one by one per unit; the rest are counted.
const BAD_LINES_LOGGED: u64 = 10;

/// Sums on their way to the staging table, with their period.
type Batch = (Option<i64>, Vec<(i64, i64)>);

/// The engine and its settings.
pub struct Engine {
    /// Engine configuration.
    pub config: EngineConfig,
    /// Most keys merged per group of units.
    pub merge_keys_max: usize,
    /// Parse threads.
    pub pool: Arc<rayon::ThreadPool>,
    /// Usage period.
    pub period: Period,
    /// Whether the totals' changes go to the change log.
    pub log_changes: bool,
}

/// What a group's transaction did.
#[derive(Debug, Default)]
pub struct Counted {
    /// Units summed, with their counts.
    pub summed: Vec<UnitDone>,
    /// Units rejected: (unit id, reason).
    pub rejected: Vec<(String, String)>,
}

/// Counts `units` (of files under `data_root`) in one transaction on `pool`. `forced` holds
/// units to reject (unit id → reason); a unit that fails while parsed is added to it and the
/// group is redone.
pub async fn count(
    pool: &sqlx::PgPool,
    engine: &Engine,
    data_root: &std::path::Path,
    units: &[WorkUnit],
    forced: &mut HashMap<String, String>,
) -> anyhow::Result<Counted> {
    loop {
        match try_count(pool, engine, data_root, units, forced).await? {
            Ok(counted) => return Ok(counted),
            Err((unit_id, reason)) => {
                forced.insert(unit_id, reason);
            }
        }
    }
}

/// One attempt: `Ok(Err((unit, reason)))` when a unit failed while parsed (nothing written).
async fn try_count(
    pool: &sqlx::PgPool,
    engine: &Engine,
    data_root: &std::path::Path,
    units: &[WorkUnit],
    forced: &HashMap<String, String>,
) -> anyhow::Result<Result<Counted, (String, String)>> {
    let period_of = |unit: &WorkUnit| unit.time().and_then(|t| engine.period.start_of(t));
    let periods: BTreeSet<i64> = units.iter().filter_map(period_of).collect();
    copy::ensure_partitions(pool, &periods.into_iter().collect::<Vec<_>>()).await?;

    let mut tx = pool.begin().await.context("begin")?;
    if engine.log_changes {
        tally_db_client::changes::writing(&mut tx).await?;
        // Writers of the same consumers must take their transaction ids in the order they
        // change the totals (the change log is read in that order): one writer at a time,
        // locked before the first write takes an id.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(tally_db_client::changes::WRITER_LOCK)
            .execute(&mut *tx)
            .await
            .context("lock the change log")?;
    }
    let streams: BTreeSet<&str> = units.iter().map(|u| u.stream.as_str()).collect();
    let mut states: HashMap<String, Option<StreamDone>> = HashMap::new();
    for &stream in &streams {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(stream)
            .execute(&mut *tx)
            .await
            .context("lock the stream")?;
        states.insert(stream.to_owned(), load_state(&mut tx, stream).await?);
    }
    let merger = Arc::new(Merger::new(1, engine.merge_keys_max));
    let mut counted = Counted::default();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    for unit in units {
        let state = states.get(&unit.stream).cloned().flatten();
        let step = match forced.get(&unit.unit_id) {
            Some(reason) if !streams::done_already(state.as_ref(), unit) => {
                Step::Reject(reason.clone())
            }
            _ => streams::prepare(state.as_ref(), unit, data_root),
        };
        match step {
            Step::Skip => {}
            Step::Reject(reason) => {
                if let Some(new) = streams::rejected(state.as_ref(), unit) {
                    states.insert(unit.stream.clone(), Some(new));
                    changed.insert(unit.stream.clone());
                }
                counted.rejected.push((unit.unit_id.clone(), reason));
            }
            Step::Count { file, plan } => {
                let summed = sum_unit(
                    &mut tx,
                    engine,
                    &merger,
                    period_of(unit),
                    unit,
                    file,
                    &plan.missing,
                )
                .await?;
                let stats = match summed {
                    Ok(stats) => stats,
                    Err(reason) => return Ok(Err((unit.unit_id.clone(), reason))),
                };
                let (new, done) = streams::counted(plan, unit, &stats);
                states.insert(unit.stream.clone(), Some(new));
                changed.insert(unit.stream.clone());
                counted.summed.push(done);
            }
        }
    }
    // The merged sums, then the upserts, the ledger and the states.
    let (sender, receiver) = mpsc::channel::<Batch>(4);
    let drain = tokio::task::spawn_blocking(move || {
        merger.drain(|_, period, sums| sender.blocking_send((period, sums)))
    });
    stage_all(&mut tx, receiver).await?;
    drain
        .await
        .context("the merge task")?
        .map_err(|_| anyhow::anyhow!("the staging side went away"))?;
    copy::upsert_staged(&mut tx, engine.log_changes).await?;
    if !counted.summed.is_empty() {
        let ledger: BTreeMap<String, (UnitDone, i32, i32)> = counted
            .summed
            .iter()
            .map(|d| (d.unit_id.clone(), (d.clone(), 1, 1)))
            .collect();
        batch::record_units(&mut tx, &ledger).await?;
    }
    for stream in &changed {
        if let Some(Some(state)) = states.get(stream) {
            save_state(&mut tx, state).await?;
        }
    }
    tx.commit().await.context("commit")?;
    Ok(Ok(counted))
}

/// Copies every batch `receiver` yields into the staging table.
async fn stage_all(
    tx: &mut PgConnection,
    mut receiver: mpsc::Receiver<Batch>,
) -> anyhow::Result<()> {
    while let Some((period, sums)) = receiver.recv().await {
        copy::stage_sums(tx, period, &sums).await?;
    }
    Ok(())
}

/// The stored done-state of `stream`.
pub async fn load_state(
    conn: &mut PgConnection,
    stream: &str,
) -> anyhow::Result<Option<StreamDone>> {
    let text: Option<String> =
        sqlx::query_scalar("SELECT state::text FROM standalone_streams WHERE stream = $1")
            .bind(stream)
            .fetch_optional(&mut *conn)
            .await
            .context("read the stream's state")?;
    text.map(|t| serde_json::from_str(&t).context("a stored stream state is not a StreamDone"))
        .transpose()
}

async fn save_state(tx: &mut PgConnection, state: &StreamDone) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO standalone_streams (stream, state) VALUES ($1, $2::jsonb)
         ON CONFLICT (stream) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
    )
    .bind(&state.stream)
    .bind(serde_json::to_string(state).context("serialise the state")?)
    .execute(&mut *tx)
    .await
    .context("store the stream's state")?;
    Ok(())
}

/// Sums `ranges` of the unit's file into `merger` under `period` on the engine's pool, while
/// the sums the merger lets go are copied into the staging table. `Ok(Err(reason))`: the
/// unit must be rejected (and the group redone without it).
async fn sum_unit(
    tx: &mut PgConnection,
    engine: &Engine,
    merger: &Arc<Merger>,
    period: Option<i64>,
    unit: &WorkUnit,
    file: std::fs::File,
    ranges: &[(u64, u64)],
) -> anyhow::Result<Result<Stats, String>> {
    // A few batches in flight: the engine waits on a full channel, so memory stays bounded.
    let (sender, receiver) = mpsc::channel::<Batch>(4);
    let config = engine.config.clone();
    let pool = Arc::clone(&engine.pool);
    let sink = StagingSink {
        merger: Arc::clone(merger),
        period,
        sender,
        unit_id: unit.unit_id.clone(),
        path: unit.path.clone(),
        bad_lines: std::sync::atomic::AtomicU64::new(0),
    };
    let file_bytes = unit.file_bytes;
    let ranges = ranges.to_vec();
    let parse = tokio::task::spawn_blocking(move || {
        let source = FileSource::with_len(file, file_bytes);
        let mut stats = Stats::default();
        for (start, end) in ranges {
            match engine::sum_range(&source, start..end, &config, &pool, &sink) {
                Ok(range) => stats.merge(&range),
                Err(EngineError::Stopped) => return Err(None),
                Err(EngineError::BadLine(bad)) => {
                    return Err(Some(format!(
                        "bad line at byte {} ({}) under --bad-lines=fail",
                        bad.offset, bad.reason
                    )))
                }
                Err(EngineError::Io(e)) => return Err(Some(format!("read error: {e}"))),
            }
        }
        Ok(stats)
    });
    stage_all(tx, receiver).await?;
    match parse.await.context("the parse task")? {
        Ok(stats) => Ok(Ok(stats)),
        Err(Some(reason)) => Ok(Err(reason)),
        Err(None) => anyhow::bail!("the parse stopped: the database side went away"),
    }
}

/// The engine's output: sums merged under the key cap; what leaves is sent to be staged.
struct StagingSink {
    merger: Arc<Merger>,
    period: Option<i64>,
    sender: mpsc::Sender<Batch>,
    unit_id: String,
    path: String,
    bad_lines: std::sync::atomic::AtomicU64,
}

impl Sink for StagingSink {
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        for leaving in self.merger.add(0, self.period, &batch) {
            self.sender.blocking_send(leaving).map_err(|_| Stopped)?;
        }
        Ok(())
    }

    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        let seen = self
            .bad_lines
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if seen < BAD_LINES_LOGGED {
            tracing::warn!(
                unit = self.unit_id,
                path = self.path,
                offset = bad.offset,
                reason = bad.reason.as_str(),
                raw = %String::from_utf8_lossy(&bad.raw),
                "bad line (counted in ingested_files.bad_lines)"
            );
        }
        Ok(())
    }
}
