//! `tally verify --expect FILE`: compares `consumer_totals` with an expected-totals file in
//! `tally sum`'s output format (`consumer_id total` lines) and prints the differences.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context};
use sqlx::postgres::PgPoolOptions;
use tally_core::DatabaseArgs;

/// Arguments of `tally verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Expected totals: `consumer_id total` lines (the output of `tally sum`).
    #[arg(long)]
    pub expect: PathBuf,
}

/// How the database differs from the expectation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Differences {
    /// Consumers compared.
    pub expected: usize,
    /// `(consumer_id, expected, actual)` where they differ; a missing side is `0`.
    pub wrong: Vec<(i64, i128, i128)>,
}

/// Reads an expected-totals file.
pub fn read_expected(path: &std::path::Path) -> anyhow::Result<HashMap<i64, i128>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut expected = HashMap::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let Some((id, total)) = line.split_once(' ') else {
            bail!("{}:{}: expected `consumer_id total`", path.display(), n + 1);
        };
        let id: i64 = id
            .parse()
            .with_context(|| format!("{}:{}: bad consumer id", path.display(), n + 1))?;
        let total: i128 = total
            .parse()
            .with_context(|| format!("{}:{}: bad total", path.display(), n + 1))?;
        *expected.entry(id).or_default() += total;
    }
    Ok(expected)
}

/// Compares the totals in the database with `expected`.
pub async fn compare(
    database: &tally_core::DatabaseArgs,
    expected: &HashMap<i64, i128>,
) -> anyhow::Result<Differences> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(database.connect_options()?)
        .await?;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT consumer_id, total::text FROM consumer_totals")
            .fetch_all(&pool)
            .await?;
    let mut actual: HashMap<i64, i128> = HashMap::with_capacity(rows.len());
    for (id, total) in rows {
        let total: i128 = total
            .parse()
            .with_context(|| format!("total of {id} does not fit 128 bits"))?;
        actual.insert(id, total);
    }
    let mut wrong = Vec::new();
    for (&id, &want) in expected {
        let got = actual.get(&id).copied().unwrap_or(0);
        if got != want {
            wrong.push((id, want, got));
        }
    }
    for (&id, &got) in &actual {
        if !expected.contains_key(&id) && got != 0 {
            wrong.push((id, 0, got));
        }
    }
    wrong.sort_unstable();
    Ok(Differences {
        expected: expected.len(),
        wrong,
    })
}

/// Runs `tally verify`: prints differences, fails if there are any.
pub async fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    let expected = read_expected(&args.expect)?;
    let diff = compare(&args.database, &expected)
        .await
        .with_context(|| format!("cannot read totals from {}", args.database.redacted_url()))?;
    for (id, want, got) in diff.wrong.iter().take(20) {
        println!("consumer {id}: expected {want}, database has {got}");
    }
    if diff.wrong.is_empty() {
        println!("verify: all {} consumer totals match", diff.expected);
        Ok(())
    } else {
        bail!(
            "{} of {} consumer totals differ",
            diff.wrong.len(),
            diff.expected
        )
    }
}
