//! The write floor of scripts/bench-pipeline: the best hand-written path for a set of final
//! rows into `consumer_totals`, which no pipeline can beat. The rows (`<consumer_id> <total>`
//! lines, as `tally sum` prints them) are split by id range into `--sessions` shares; each
//! share is one transaction of its own session, all at once: binary COPY into a temporary
//! staging table, then one `INSERT … SELECT … ORDER BY consumer_id ON CONFLICT DO UPDATE`.
//! No Kafka, no offsets, no ledger. Prints the milliseconds from the first BEGIN to the last
//! COMMIT (reading the file is not counted).
//!
//! With a third argument, a period start in Unix seconds, every row is also added to that
//! period, in the same transaction, as a pipeline with periods on writes it (the consumer's
//! current period on its `consumer_totals` row, and that period's sum in
//! `usage_period_totals`); its monthly partition is created first, outside the time measured.
//!
//! With `CHANGE_LOG=on` in the environment the same statements also write the change log, as
//! the db-client does by default: run both to see what the log costs.
//!
//! `DATABASE_URL=… cargo run --release -p tally-db-client --example write_floor -- FILE [SESSIONS [PERIOD]]`

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use tally_db_client::{changes, copy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let file = args.next().context("usage: write_floor FILE [SESSIONS]")?;
    let sessions: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let period: Option<i64> = args.next().map(|s| s.parse()).transpose()?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let log = std::env::var("CHANGE_LOG").is_ok_and(|v| v == "on");
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
            match period {
                None => copy::upsert_totals(&mut tx, rows, log).await?,
                Some(start) => {
                    let periods: Vec<((i64, i64), i128)> = rows
                        .iter()
                        .map(|&(id, total)| ((id, start), total))
                        .collect();
                    copy::upsert_sums(&mut tx, rows.to_vec(), &periods, log).await?;
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
