//! The write floor of scripts/bench-pipeline: a set of final rows written into
//! `consumer_totals` by hand, with no Kafka, no offsets and no ledger. The rows
//! (`<consumer_id> <total>` lines, as `tally sum` prints them) are split by id range into
//! `SESSIONS` shares; each share is one transaction of its own session, all at once. Prints the
//! milliseconds from the first BEGIN to the last COMMIT (reading the file is not counted).
//!
//! Two forms (`FLOOR_FORM` in the environment):
//! - `on-conflict` (the default): the floor as issue 21 defines it, the usual hand-written
//!   path: binary COPY into a temporary staging table, then one
//!   `INSERT … SELECT … ORDER BY consumer_id ON CONFLICT (consumer_id) DO UPDATE`;
//! - `tally`: the db-client's own writes of a batch (`tally_db_client::copy`): straight COPY
//!   into the totals where their ids are new, else staging and `UPDATE` then `INSERT`.
//!
//! With a third argument, a period start in Unix seconds, every row is also added to that
//! period, as a pipeline with periods on writes it (the consumer's current period on its
//! `consumer_totals` row, and that period's sum in `usage_period_totals`); its monthly partition
//! is created first, outside the time measured. The `on-conflict` form assumes the rows present
//! (if any) are of the same period, as in the benchmark's second run: it moves no period off
//! the rows (a newer period replaces the row's, without a period the row's stays).
//!
//! With `CHANGE_LOG=on` in the environment the same statements also write the change log, as
//! the db-client does by default: run both to see what the log costs.
//!
//! `DATABASE_URL=… cargo run --release -p tally-db-client --example write_floor -- FILE [SESSIONS [PERIOD]]`

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgConnection;
use tally_db_client::copy::current::Head;
use tally_db_client::{changes, copy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let file = args
        .next()
        .context("usage: write_floor FILE [SESSIONS [PERIOD]]")?;
    let sessions: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let period: Option<i64> = args.next().map(|s| s.parse()).transpose()?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let log = std::env::var("CHANGE_LOG").is_ok_and(|v| v == "on");
    let tally_form = match std::env::var("FLOOR_FORM").as_deref() {
        Ok("tally") => true,
        Ok("on-conflict") | Err(_) => false,
        Ok(other) => anyhow::bail!("FLOOR_FORM is on-conflict or tally, not `{other}`"),
    };
    let text = std::fs::read_to_string(&file).with_context(|| file.clone())?;
    let mut rows: Vec<(i64, i128)> = text
        .lines()
        .map(|line| {
            let (id, total) = line.split_once(' ').context("a line without a space")?;
            Ok((id.parse()?, total.parse()?))
        })
        .collect::<anyhow::Result<_>>()?;
    rows.sort_unstable_by_key(|&(id, _)| id);
    let pool = PgPoolOptions::new()
        .max_connections(sessions as u32)
        .connect(&url)
        .await?;
    if let Some(start) = period {
        copy::ensure_partitions(&pool, &[start]).await?;
    }
    let share = rows.len().div_ceil(sessions.max(1)).max(1);
    let started = std::time::Instant::now();
    let writes = rows.chunks(share).map(|rows| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            if log {
                changes::writing(&mut tx).await?;
            }
            let periods: Vec<((i64, i64), i128)> = period.map_or_else(Vec::new, |start| {
                rows.iter()
                    .map(|&(id, total)| ((id, start), total))
                    .collect()
            });
            if tally_form {
                match period {
                    None => copy::upsert_totals(&mut tx, rows, log).await?,
                    Some(_) => copy::upsert_sums(&mut tx, rows.to_vec(), &periods, log).await?,
                }
            } else {
                on_conflict(&mut tx, rows, period, log).await?;
                if period.is_some() {
                    copy::count_periods(&mut tx, &periods, log).await?;
                }
            }
            tx.commit().await?;
            anyhow::Ok(())
        }
    });
    for result in futures_util::future::join_all(writes).await {
        result?;
    }
    println!("{}", started.elapsed().as_millis());
    Ok(())
}

/// Binary COPY of `rows` (in `period`, if any) into a staging table, then one
/// `INSERT … SELECT … ON CONFLICT DO UPDATE` into `consumer_totals`; with `log`, the new totals
/// to the change log in the same statement.
async fn on_conflict(
    tx: &mut PgConnection,
    rows: &[(i64, i128)],
    period: Option<i64>,
    log: bool,
) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TEMP TABLE floor_staging (consumer_id BIGINT NOT NULL, total NUMERIC NOT NULL,
           period_start TIMESTAMPTZ, period_total NUMERIC) ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await?;
    let heads: Vec<Head> = rows
        .iter()
        .map(|&(id, total)| Head {
            id,
            period_start: period.unwrap_or(Head::NO_PERIOD),
            total,
            period_total: if period.is_some() { total } else { 0 },
        })
        .collect();
    let mut copy = tx
        .copy_in_raw(
            "COPY floor_staging (consumer_id, total, period_start, period_total)
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    for piece in copy::encode_heads(&heads).chunks(1 << 20) {
        copy.send(piece).await?;
    }
    copy.finish().await?;
    let logged = if log {
        format!(" {}", changes::log_totals("up"))
    } else {
        " SELECT count(*) FROM up".to_owned()
    };
    sqlx::query(&format!(
        "WITH up AS (
           INSERT INTO consumer_totals (consumer_id, total, period_start, period_total)
           SELECT consumer_id, total, period_start, period_total FROM floor_staging
           ORDER BY consumer_id
           ON CONFLICT (consumer_id) DO UPDATE SET
             total = consumer_totals.total + EXCLUDED.total,
             period_start = coalesce(EXCLUDED.period_start, consumer_totals.period_start),
             period_total = CASE
               WHEN EXCLUDED.period_start IS NULL THEN consumer_totals.period_total
               WHEN consumer_totals.period_start = EXCLUDED.period_start
                 THEN consumer_totals.period_total + EXCLUDED.period_total
               ELSE EXCLUDED.period_total END,
             updated_at = now()
           RETURNING consumer_id, total){logged}"
    ))
    .execute(&mut *tx)
    .await
    .context("INSERT … ON CONFLICT")?;
    Ok(())
}
