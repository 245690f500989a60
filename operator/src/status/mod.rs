//! `tally status`: the pipeline at a glance, from Kafka and PostgreSQL, for an operator.
//!
//! - files: announced (distinct file versions on `tally.files`), complete (the ledger in
//!   PostgreSQL), rejected (a unit dead-lettered and the file not complete), in progress (the
//!   rest), with the rejections' reasons;
//! - lag per stage and partition: parsers and aggregators from their groups' committed offsets,
//!   the db-client from the offsets stored with the totals; a partition whose only records
//!   left are transaction markers reads 0;
//! - dead letters by kind (bad lines by reason);
//! - the last ingestion time;
//! - halted partitions: the db-client's next record was deleted before it was applied (the
//!   gap rule, docs/operations.md): it stops there until an operator decides.
//!
//! Exit status: 0 when nothing needs an operator, 1 when something does (a rejected file, a bad
//! notification, a halted partition), and an error when Kafka or PostgreSQL cannot be read.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use tally_core::{DatabaseArgs, KafkaArgs, Topics};

mod kafka;
use kafka::read_kafka;

/// Arguments of `tally status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read at most this many of the latest records of the files topic, and of the
    /// dead-letter topic: a status that reads less is marked partial and says which figures.
    /// Bounds how long `status` takes, however many announcements retention holds.
    #[arg(long, env = "TALLY_STATUS_SCAN_RECORDS", default_value_t = 10_000, value_parser = tally_core::args::positive_u64)]
    pub scan_records: u64,
}

/// What `tally status` found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// File versions by state.
    pub files: Files,
    /// Rejected units: path, unit and reason.
    pub rejected: Vec<Rejected>,
    /// Dead letters by kind (`bad_line`, `rejected_unit`, `bad_notification`).
    pub dead_letters: BTreeMap<String, u64>,
    /// Bad lines by reason.
    pub bad_line_reasons: BTreeMap<String, u64>,
    /// When the ledger last recorded an ingested unit (UTC, RFC 3339), if ever.
    pub last_ingestion: Option<String>,
    /// Lag per stage and partition.
    pub lag: Vec<Lag>,
    /// Partitions the db-client cannot go past without an operator.
    pub halted: Vec<Halted>,
    /// What needs an operator, one line each; empty when all is well.
    pub needs_operator: Vec<String>,
    /// Figures computed from part of a topic (its latest `--scan-records`), one line each;
    /// empty when every figure is whole.
    pub partial: Vec<String>,
}

/// File versions by state.
#[derive(Debug, Default, Serialize)]
pub struct Files {
    /// Distinct file versions announced (within the files topic's retention).
    pub announced: usize,
    /// Every byte in the totals.
    pub complete: usize,
    /// Announced, neither complete nor rejected.
    pub in_progress: usize,
    /// A unit dead-lettered, the file not complete.
    pub rejected: usize,
}

/// A rejected unit.
#[derive(Debug, Serialize)]
pub struct Rejected {
    /// The file.
    pub path: String,
    /// The unit.
    pub unit_id: String,
    /// Why.
    pub reason: String,
}

/// One partition's lag.
#[derive(Debug, Serialize)]
pub struct Lag {
    /// `parser`, `aggregator` or `db-client`.
    pub stage: &'static str,
    /// The input topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Where the stage will resume (none: never consumed).
    pub position: Option<i64>,
    /// The partition's end (high watermark).
    pub end: i64,
    /// Records not yet consumed.
    pub lag: i64,
}

/// A halted partition.
#[derive(Debug, Serialize)]
pub struct Halted {
    /// The db-client's input topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the totals need.
    pub next_offset: i64,
    /// The first offset still in the log.
    pub log_start: i64,
}

/// Runs `tally status`: prints the report; `Ok(false)` when something needs an operator.
pub async fn run(args: &StatusArgs) -> anyhow::Result<bool> {
    let report = collect(args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(report.needs_operator.is_empty())
}

/// Gathers the report.
pub async fn collect(args: &StatusArgs) -> anyhow::Result<Report> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(args.database.connect_options()?)
        .await
        .with_context(|| format!("cannot connect to {}", args.database.redacted_url()))?;
    collect_from(&pool, &args.kafka, args.scan_records).await
}

/// Gathers the report from `pool` and the brokers of `kafka`, reading at most `scan_records`
/// of the latest records of the files and dead-letter topics (`tally api` shares this).
pub async fn collect_from(
    pool: &sqlx::PgPool,
    kafka: &KafkaArgs,
    scan_records: u64,
) -> anyhow::Result<Report> {
    let topics = Topics::new(&kafka.topic_prefix);
    let ledger: Vec<(String, bool)> =
        sqlx::query_as("SELECT file_id, complete FROM ingested_files")
            .fetch_all(pool)
            .await
            .context("cannot read the ledger (has the db-client run `tally migrate`?)")?;
    let last: Option<String> = sqlx::query_scalar(
        "SELECT to_char(max(ingested_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
         FROM ingested_units",
    )
    .fetch_one(pool)
    .await?;
    let stored: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM kafka_offsets")
            .fetch_all(pool)
            .await?;

    let kafka_args = kafka.clone();
    let kafka_topics = topics.clone();
    let stored_copy = stored.clone();
    let began = std::time::Instant::now();
    let mut from_kafka = tokio::task::spawn_blocking(move || {
        read_kafka(&kafka_args, &kafka_topics, &stored_copy, scan_records)
    })
    .await??;
    tracing::debug!(
        elapsed_ms = began.elapsed().as_millis() as u64,
        "status: Kafka read"
    );

    let complete: BTreeSet<&str> = ledger
        .iter()
        .filter(|(_, c)| *c)
        .map(|(f, _)| f.as_str())
        .collect();
    let mut report = Report {
        partial: std::mem::take(&mut from_kafka.partial),
        last_ingestion: last,
        dead_letters: std::mem::take(&mut from_kafka.dead_letters),
        bad_line_reasons: std::mem::take(&mut from_kafka.bad_line_reasons),
        lag: std::mem::take(&mut from_kafka.lag),
        ..Report::default()
    };
    let rejected_files: BTreeSet<String> = from_kafka
        .rejected
        .iter()
        .filter_map(|r| r.unit_id.rsplit_once('/').map(|(f, _)| f))
        .filter(|f| !complete.contains(f))
        .map(str::to_owned)
        .collect();
    let announced = &from_kafka.announced;
    report.files = Files {
        announced: announced.len(),
        complete: announced
            .iter()
            .filter(|f| complete.contains(f.as_str()))
            .count(),
        rejected: rejected_files.len(),
        in_progress: announced
            .iter()
            .filter(|f| !complete.contains(f.as_str()) && !rejected_files.contains(f.as_str()))
            .count(),
    };
    report.rejected = std::mem::take(&mut from_kafka.rejected)
        .into_iter()
        .filter(|r| {
            r.unit_id
                .rsplit_once('/')
                .is_some_and(|(f, _)| rejected_files.contains(f))
        })
        .collect();

    // The db-client's lag and gaps, from the offsets stored with the totals.
    let stored_topics: BTreeSet<&str> = stored.iter().map(|(t, _, _)| t.as_str()).collect();
    for topic in [&topics.sums, &topics.totals] {
        if !stored_topics.contains(topic.as_str()) {
            continue;
        }
        for (partition, (log_start, end)) in &from_kafka.watermarks[topic.as_str()] {
            let next = stored
                .iter()
                .find(|(t, p, _)| t == topic && p == partition)
                .map(|(_, _, o)| *o);
            let position = next.unwrap_or(0);
            let lag = from_kafka
                .db_lag
                .get(&(topic.clone(), *partition))
                .copied()
                .unwrap_or((end - position).max(0));
            report.lag.push(Lag {
                stage: "db-client",
                topic: topic.clone(),
                partition: *partition,
                position: next,
                end: *end,
                lag,
            });
            if position < *log_start {
                report.halted.push(Halted {
                    topic: topic.clone(),
                    partition: *partition,
                    next_offset: position,
                    log_start: *log_start,
                });
            }
        }
    }

    for r in &report.rejected {
        report
            .needs_operator
            .push(format!("rejected: {} ({})", r.path, r.reason));
    }
    if let Some(n) = report.dead_letters.get("bad_notification") {
        report.needs_operator.push(format!(
            "{n} records on {} are not work units (tally inspect dead-letter)",
            topics.files
        ));
    }
    for h in &report.halted {
        report.needs_operator.push(format!(
            "halted: {} partition {}: records {}..{} were deleted before they were applied \
             (docs/operations.md, gaps)",
            h.topic, h.partition, h.next_offset, h.log_start
        ));
    }
    Ok(report)
}

/// The report as text.
pub fn text(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let f = &r.files;
    let _ = writeln!(
        out,
        "files: {} announced, {} complete, {} in progress, {} rejected",
        f.announced, f.complete, f.in_progress, f.rejected
    );
    for rej in &r.rejected {
        let _ = writeln!(out, "  rejected {}: {}", rej.path, rej.reason);
    }
    for part in &r.partial {
        let _ = writeln!(out, "partial: {part}");
    }
    let _ = writeln!(
        out,
        "last ingestion: {}",
        r.last_ingestion.as_deref().unwrap_or("never")
    );
    let letters: Vec<String> = r
        .dead_letters
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    let reasons: Vec<String> = r
        .bad_line_reasons
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "dead letters: {}{}",
        if letters.is_empty() {
            "none".to_owned()
        } else {
            letters.join(", ")
        },
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" (bad lines: {})", reasons.join(", "))
        }
    );
    let _ = writeln!(out, "lag (records not yet consumed):");
    let mut by_stage: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for l in &r.lag {
        by_stage
            .entry((l.stage, l.topic.as_str()))
            .or_default()
            .push(format!("p{}={}", l.partition, l.lag));
    }
    for ((stage, topic), parts) in by_stage {
        let _ = writeln!(out, "  {stage:<10} {topic}: {}", parts.join(" "));
    }
    if r.needs_operator.is_empty() {
        let _ = writeln!(out, "needs an operator: nothing");
    } else {
        let _ = writeln!(out, "needs an operator:");
        for line in &r.needs_operator {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}
