//! Adding a batch to `consumer_totals`, in the cheapest form that gives the same rows:
//!
//! - [`add_rows`], rows the client holds: copied straight into `consumer_totals` when none of
//!   their id range exists (a first load, new consumers: no staging table, no statement), with
//!   their change log events built by the client; else staged and added by [`add_totals`];
//! - [`add_totals`], rows staged in `tally_staging`: one statement of [`super::current`]
//!   (`INSERT` where none of the range exists, else `UPDATE` then `INSERT`), with the change
//!   log and the periods it moved off the rows.
//!
//! Every form decides "present" by a snapshot: another writer of the same consumers racing it
//! makes it fail ([`raced`]), and the caller writes the transaction again as a new one.

use anyhow::Context;
use sqlx::PgConnection;

use super::{add_period_totals, copy_in, current, stage, CREATE_MOVED_STAGING, CREATE_STAGING};
use crate::changes;

/// The rows of `tally_staging`: how many (each id once), and their lowest and highest id.
#[derive(Debug, Clone, Copy)]
pub(super) struct Staged {
    pub(super) rows: u64,
    pub(super) ids: (i64, i64),
}

impl Staged {
    /// Of the staged rows' `ids` (in any order: the range is their least and greatest).
    pub(super) fn of(ids: impl Iterator<Item = i64>) -> Self {
        let (rows, low, high) = ids.fold((0u64, i64::MAX, i64::MIN), |(n, low, high), id| {
            (n + 1, low.min(id), high.max(id))
        });
        Self {
            rows,
            ids: if rows == 0 { (0, 0) } else { (low, high) },
        }
    }
}

/// Whether the transaction's snapshot holds any row of `consumer_totals` in `ids` (inclusive):
/// one index probe.
async fn present(tx: &mut PgConnection, ids: (i64, i64)) -> anyhow::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM consumer_totals WHERE consumer_id BETWEEN $1 AND $2)",
    )
    .bind(ids.0)
    .bind(ids.1)
    .fetch_one(&mut *tx)
    .await
    .context("look for present consumers")
}

/// Adds rows the client holds to `consumer_totals`: `data`, their binary COPY stream of
/// `columns` (`consumer_id, total` first, each id once, in id order), `staged` their count and
/// id range. Where no row of that range exists, `data` is copied straight into
/// `consumer_totals` (a `COPY` writes rows in batches and needs no staging table nor
/// statement: about half the server time of staging and `INSERT … SELECT`, docs/benchmarks.md),
/// and with `log` the change log gets `events()` (the rows' totals events: for new rows, what
/// the batch adds is the running total). Otherwise they are staged and added by
/// [`add_totals`], whose statement logs them. A row another writer inserted meanwhile fails
/// the `COPY` (a unique violation: [`raced`]).
pub(super) async fn add_rows(
    tx: &mut PgConnection,
    staged: Staged,
    columns: &str,
    data: Vec<u8>,
    events: impl FnOnce() -> Vec<u8>,
    log: bool,
) -> anyhow::Result<()> {
    if staged.rows == 0 {
        return Ok(());
    }
    let started = std::time::Instant::now();
    if present(tx, staged.ids).await? {
        stage(
            tx,
            CREATE_STAGING,
            Some("DELETE FROM tally_staging"),
            &format!("COPY tally_staging ({columns}) FROM STDIN (FORMAT binary)"),
            data,
        )
        .await?;
        return add_staged(tx, staged, true, log).await;
    }
    let written = copy_in(
        tx,
        &format!("COPY consumer_totals ({columns}) FROM STDIN (FORMAT binary)"),
        data,
    )
    .await
    .map_err(with_race)?;
    if written != staged.rows {
        return Err(with_race(
            RowsMissing {
                written,
                staged: staged.rows,
            }
            .into(),
        ));
    }
    if log {
        copy_in(
            tx,
            "COPY tally_changes (consumer_ids, totals) FROM STDIN (FORMAT binary)",
            events(),
        )
        .await?;
    }
    tracing::debug!(
        rows = staged.rows,
        form = "copy",
        statement_ms = started.elapsed().as_millis() as u64,
        "upsert statement"
    );
    Ok(())
}

/// Adds the rows of `tally_staging` (`staged`) to `consumer_totals`, and the periods that
/// moves off the rows to `consumer_period_history`, making their monthly partitions if missing
/// (a consumer's current period can be older than any batch's: a month dropped since is made
/// again rather than the batch refused for good). With `log`, the new totals go to the change
/// log in the same statement (a move changes no usage: it is not logged).
///
/// [`current::insert`] if no row of the staged ids' range exists, else
/// [`current::update_then_insert`]. If a concurrent writer of the same keys spoils it (a
/// unique violation, a deadlock, or rows missing from what it wrote: [`raced`]), the error
/// fails the transaction, which its caller writes again as a new one. Not a savepoint and a
/// second form in the same transaction: rolling back to a savepoint releases the row locks
/// the attempt took, so the other writer could change a row between this transaction's two
/// changes of it while this one keeps its lower transaction id, and the change log's readers,
/// who apply transactions in id order, would end on a total without this one's sum.
pub(super) async fn add_totals(
    tx: &mut PgConnection,
    staged: Staged,
    log: bool,
) -> anyhow::Result<()> {
    if staged.rows == 0 {
        return Ok(());
    }
    let found = present(tx, staged.ids).await?;
    add_staged(tx, staged, found, log).await
}

/// [`add_totals`] once it is known whether any row of the range is `present`.
async fn add_staged(
    tx: &mut PgConnection,
    staged: Staged,
    present: bool,
    log: bool,
) -> anyhow::Result<()> {
    run(
        tx,
        &[CREATE_MOVED_STAGING, "DELETE FROM tally_moved_staging"],
    )
    .await?;
    let started = std::time::Instant::now();
    let (form, writes) = if present {
        ("update then insert", current::update_then_insert())
    } else {
        ("insert", current::insert())
    };
    let settings = StatementSettings::apply(tx).await?;
    write_totals(tx, &writes, staged.rows, log)
        .await
        .map_err(with_race)?;
    settings.restore(tx).await?;
    tracing::debug!(
        rows = staged.rows,
        form,
        statement_ms = started.elapsed().as_millis() as u64,
        "upsert statement"
    );
    sqlx::query(
        "SELECT tally_ensure_period_partitions(ARRAY(
           SELECT DISTINCT date_trunc('month', period_start) FROM tally_moved_staging))",
    )
    .execute(&mut *tx)
    .await
    .context("create the partitions of moved periods")?;
    add_period_totals(
        tx,
        "SELECT consumer_id, period_start, total FROM tally_moved_staging
         ORDER BY consumer_id, period_start",
    )
    .await
}

/// `error`, told as a race with another writer if it is one ([`raced`]).
fn with_race(error: anyhow::Error) -> anyhow::Error {
    if raced(&error) {
        error.context(
            "another writer changed the same consumers meanwhile: the batch is written again",
        )
    } else {
        error
    }
}

/// Runs `statements` (without parameters) one after the other.
pub(super) async fn run(tx: &mut PgConnection, statements: &[&'static str]) -> anyhow::Result<()> {
    for &statement in statements {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("`{statement}`"))?;
    }
    Ok(())
}

/// The settings of a batch's totals statement, for the rest of the transaction back to what
/// they were before.
///
/// - `work_mem = 512MB`: the sorts of a large batch's rows (already in key order: a quicksort
///   finds them sorted at once; on disk they are written out in runs) and the change log's
///   grouping in memory. A cap, not an allocation: a small batch uses little.
/// - `jit = off`: compiling the statement took 0.3 s and saved less.
/// - hash and merge joins off: the `UPDATE` probes the index row by row in key order (a hash
///   join would read the whole table).
struct StatementSettings {
    before: (String, String, String, String),
}

impl StatementSettings {
    async fn apply(tx: &mut PgConnection) -> anyhow::Result<Self> {
        let before = sqlx::query_as(
            "SELECT current_setting('work_mem'), current_setting('jit'),
                    current_setting('enable_hashjoin'), current_setting('enable_mergejoin')",
        )
        .fetch_one(&mut *tx)
        .await
        .context("the session's settings")?;
        Self::set(tx, ("512MB", "off", "off", "off")).await?;
        Ok(Self { before })
    }

    async fn restore(self, tx: &mut PgConnection) -> anyhow::Result<()> {
        let (work_mem, jit, hash, merge) = &self.before;
        Self::set(tx, (work_mem, jit, hash, merge)).await
    }

    /// `SET LOCAL`: for the rest of the transaction, unless set again.
    async fn set(tx: &mut PgConnection, values: (&str, &str, &str, &str)) -> anyhow::Result<()> {
        sqlx::query(
            "SELECT set_config('work_mem', $1, true), set_config('jit', $2, true),
                    set_config('enable_hashjoin', $3, true), set_config('enable_mergejoin', $4, true)",
        )
        .bind(values.0)
        .bind(values.1)
        .bind(values.2)
        .bind(values.3)
        .execute(&mut *tx)
        .await
        .context("set the totals statement's settings")?;
        Ok(())
    }
}

/// Rows a totals statement or COPY wrote fewer than it was given: a row deleted under it.
#[derive(Debug, thiserror::Error)]
#[error("{written} rows of {staged} written: a row changed under the statement")]
struct RowsMissing {
    written: u64,
    staged: u64,
}

/// Whether `error` of a COPY into the totals, [`current::insert`] or
/// [`current::update_then_insert`] is a concurrent writer's doing: a unique violation
/// (`23505`), a deadlock (`40P01`) or [`RowsMissing`].
fn raced(error: &anyhow::Error) -> bool {
    error.is::<RowsMissing>()
        || error
            .downcast_ref::<sqlx::Error>()
            .and_then(sqlx::Error::as_database_error)
            .and_then(|e| e.code())
            .is_some_and(|code| code == "23505" || code == "40P01")
}

/// Runs `writes` (common table expressions ending in `up`, [`current`]) with the moves and,
/// with `log`, the change log, and checks that it wrote every staged row.
async fn write_totals(
    tx: &mut PgConnection,
    writes: &str,
    staged: u64,
    log: bool,
) -> anyhow::Result<()> {
    let moved = "moved AS (INSERT INTO tally_moved_staging (consumer_id, period_start, total)
         SELECT consumer_id, moved_start, moved_total FROM up WHERE moved_start IS NOT NULL)";
    let logged = if log {
        format!(", logged AS ({})", changes::log_totals("up"))
    } else {
        String::new()
    };
    let written: i64 = sqlx::query_scalar(&format!(
        "WITH {writes}, {moved}{logged} SELECT count(*) FROM up"
    ))
    .fetch_one(&mut *tx)
    .await
    .context("add the batch to the totals")?;
    let written = written as u64;
    if written != staged {
        return Err(RowsMissing { written, staged }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Staged;

    #[test]
    fn staged_rows_know_their_count_and_id_range() {
        let staged = Staged::of([3i64, 8, 40].into_iter());
        assert_eq!((staged.rows, staged.ids), (3, (3, 40)));
        let staged = Staged::of([8i64, -2, 40, 3].into_iter());
        assert_eq!((staged.rows, staged.ids), (4, (-2, 40)));
        let staged = Staged::of([7i64].into_iter());
        assert_eq!((staged.rows, staged.ids), (1, (7, 7)));
        assert_eq!(Staged::of(std::iter::empty::<i64>()).rows, 0);
    }
}
