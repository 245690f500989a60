//! `tally report --from T1 --to T2 [--consumer ID] [--by hour|day|month] [--csv]`: usage per
//! consumer and period from `consumer_period_totals`, in UTC, streamed (millions of rows do
//! not sit in memory). A period that has not ended yet is marked `open`: files still arriving
//! add to it (and late files can add to a closed one, which the next report shows).
//!
//! Periods coarser than `--by` (rolled up, `tally rollup`) report at their start: a day rolled
//! up from hours shows as one row at midnight under `--by hour`.

use std::io::Write;

use anyhow::Context;
use futures_util::TryStreamExt;
use sqlx::postgres::PgPoolOptions;
use sqlx::Row;
use tally_core::DatabaseArgs;

/// Granularity of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// Per hour.
    Hour,
    /// Per day (UTC).
    Day,
    /// Per calendar month (UTC).
    Month,
}

impl By {
    fn unit(self) -> &'static str {
        match self {
            By::Hour => "hour",
            By::Day => "day",
            By::Month => "month",
        }
    }
}

/// Arguments of `tally report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// First instant of the report (inclusive): a date or date-time PostgreSQL reads, UTC
    /// unless it names an offset (`2026-11-01`, `2026-11-01T06:00Z`).
    #[arg(long)]
    pub from: String,
    /// End of the report (exclusive), in the same forms.
    #[arg(long)]
    pub to: String,
    /// Only this consumer.
    #[arg(long)]
    pub consumer: Option<i64>,
    /// Granularity.
    #[arg(long, value_enum, default_value_t = By::Day)]
    pub by: By,
    /// CSV with a header (`consumer_id,period_start,total,open`) instead of aligned text.
    #[arg(long)]
    pub csv: bool,
}

/// Runs `tally report`, writing to stdout.
pub async fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            args.database
                .connect_options()?
                .options([("timezone", "UTC")]),
        )
        .await
        .with_context(|| format!("cannot connect to {}", args.database.redacted_url()))?;
    let range: (String, String) =
        sqlx::query_as("SELECT $1::timestamptz::text, $2::timestamptz::text")
            .bind(&args.from)
            .bind(&args.to)
            .fetch_one(&pool)
            .await
            .context(
                "--from and --to must be dates or date-times (2026-11-01, 2026-11-01T06:00Z)",
            )?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match write_report(&pool, args, &mut out).await {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("report from {} to {}", range.0, range.1)),
        Ok(()) => match out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => Ok(other?),
        },
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn write_report(
    pool: &sqlx::PgPool,
    args: &ReportArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query(
        "SELECT consumer_id,
                to_char(date_trunc($3, period_start), 'YYYY-MM-DD\"T\"HH24:MI\"Z\"') AS period,
                sum(total)::text AS total,
                date_trunc($3, period_start) + ('1 ' || $3)::interval > now() AS open
         FROM consumer_period_totals
         WHERE period_start >= $1::timestamptz AND period_start < $2::timestamptz
           AND ($4::bigint IS NULL OR consumer_id = $4)
         GROUP BY consumer_id, date_trunc($3, period_start)
         ORDER BY consumer_id, date_trunc($3, period_start)",
    )
    .bind(&args.from)
    .bind(&args.to)
    .bind(args.by.unit())
    .bind(args.consumer)
    .fetch(pool);
    if args.csv {
        writeln!(out, "consumer_id,period_start,total,open")?;
    } else {
        writeln!(
            out,
            "{:>20}  {:<17}  {:>24}  state",
            "consumer_id", "period_start", "total"
        )?;
    }
    let mut count = 0u64;
    while let Some(row) = rows.try_next().await.context("read period totals")? {
        let id: i64 = row.get("consumer_id");
        let period: String = row.get("period");
        let total: String = row.get("total");
        let open: bool = row.get("open");
        if args.csv {
            writeln!(out, "{id},{period},{total},{open}")?;
        } else {
            let state = if open { "open" } else { "closed" };
            writeln!(out, "{id:>20}  {period:<17}  {total:>24}  {state}")?;
        }
        count += 1;
    }
    if !args.csv && count == 0 {
        writeln!(out, "(no usage in this range)")?;
    }
    Ok(())
}
