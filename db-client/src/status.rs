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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use tally_core::inspect::read_topic;
use tally_core::messages::{DeadLetter, WorkUnit};
use tally_core::{kafka, DatabaseArgs, KafkaArgs, Topics};

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
    let topics = Topics::new(&args.kafka.topic_prefix);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(args.database.connect_options()?)
        .await
        .with_context(|| format!("cannot connect to {}", args.database.redacted_url()))?;
    let ledger: Vec<(String, bool)> =
        sqlx::query_as("SELECT file_id, complete FROM ingested_files")
            .fetch_all(&pool)
            .await
            .context("cannot read the ledger (has the db-client run `tally migrate`?)")?;
    let last: Option<String> = sqlx::query_scalar(
        "SELECT to_char(max(ingested_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
         FROM ingested_units",
    )
    .fetch_one(&pool)
    .await?;
    let stored: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM kafka_offsets")
            .fetch_all(&pool)
            .await?;

    let kafka_args = args.kafka.clone();
    let kafka_topics = topics.clone();
    let stored_copy = stored.clone();
    let mut from_kafka =
        tokio::task::spawn_blocking(move || read_kafka(&kafka_args, &kafka_topics, &stored_copy))
            .await??;

    let complete: BTreeSet<&str> = ledger
        .iter()
        .filter(|(_, c)| *c)
        .map(|(f, _)| f.as_str())
        .collect();
    let mut report = Report {
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

/// What Kafka says.
struct FromKafka {
    announced: BTreeSet<String>,
    rejected: Vec<Rejected>,
    dead_letters: BTreeMap<String, u64>,
    bad_line_reasons: BTreeMap<String, u64>,
    lag: Vec<Lag>,
    /// (log start, high watermark) per topic and partition.
    watermarks: HashMap<String, BTreeMap<i32, (i64, i64)>>,
    /// The db-client's lag per (topic, partition) it stored an offset for.
    db_lag: BTreeMap<(String, i32), i64>,
}

fn read_kafka(
    args: &KafkaArgs,
    topics: &Topics,
    stored: &[(String, i32, i64)],
) -> anyhow::Result<FromKafka> {
    let mut announced = BTreeSet::new();
    read_topic(
        args,
        &topics.files,
        |_| true,
        |low, _| low,
        |m| {
            if let Some(unit) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<WorkUnit>(p).ok())
            {
                announced.insert(unit.file_id);
            }
        },
    )
    .context("cannot read the files topic")?;
    let mut rejected = Vec::new();
    let mut dead_letters: BTreeMap<String, u64> = BTreeMap::new();
    let mut bad_line_reasons: BTreeMap<String, u64> = BTreeMap::new();
    read_topic(
        args,
        &topics.dead_letter,
        |_| true,
        |low, _| low,
        |m| {
            let Some(letter) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<DeadLetter>(p).ok())
            else {
                return;
            };
            let kind = match letter {
                DeadLetter::BadLine { reason, .. } => {
                    *bad_line_reasons.entry(reason).or_default() += 1;
                    "bad_line"
                }
                DeadLetter::RejectedUnit {
                    unit_id,
                    path,
                    reason,
                } => {
                    rejected.push(Rejected {
                        path,
                        unit_id,
                        reason,
                    });
                    "rejected_unit"
                }
                DeadLetter::BadNotification { .. } => "bad_notification",
            };
            *dead_letters.entry(kind.to_owned()).or_default() += 1;
        },
    )
    .context("cannot read the dead-letter topic")?;

    let consumer: BaseConsumer = kafka::consumer_config(args, "tally-status").create()?;
    let mut watermarks: HashMap<String, BTreeMap<i32, (i64, i64)>> = HashMap::new();
    for topic in [&topics.files, &topics.sums, &topics.totals] {
        let partitions = kafka::partition_count(&consumer, topic)?;
        let mut marks = BTreeMap::new();
        for p in 0..partitions {
            marks.insert(
                p,
                consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?,
            );
        }
        watermarks.insert(topic.clone(), marks);
    }
    let mut lag = Vec::new();
    let mut db_lag = BTreeMap::new();
    for (stage, group, topic) in [
        ("parser", &topics.parser_group, &topics.files),
        ("aggregator", &topics.aggregator_group, &topics.sums),
    ] {
        let marks = &watermarks[topic.as_str()];
        let committed = committed_offsets(args, group, topic, marks.len() as i32)?;
        if committed.values().all(Option::is_none) && stage == "aggregator" {
            continue; // no aggregator in this pipeline
        }
        for (&p, &(low, end)) in marks {
            let position = committed.get(&p).copied().flatten();
            let from = position.unwrap_or(low).max(low);
            lag.push(Lag {
                stage,
                topic: topic.clone(),
                partition: p,
                position,
                end,
                lag: records_between(&consumer, topic, p, from, end)?,
            });
        }
    }
    for (topic, partition, next) in stored {
        let Some(&(low, end)) = watermarks.get(topic).and_then(|m| m.get(partition)) else {
            continue;
        };
        let lag_records = if *next < low {
            (end - next).max(0) // halted: reported as such by the caller
        } else {
            records_between(&consumer, topic, *partition, *next, end)?
        };
        db_lag.insert((topic.clone(), *partition), lag_records);
    }
    Ok(FromKafka {
        announced,
        rejected,
        dead_letters,
        bad_line_reasons,
        lag,
        watermarks,
        db_lag,
    })
}

/// The committed offsets of `group` on `topic` (none where it never committed).
fn committed_offsets(
    args: &KafkaArgs,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let consumer: BaseConsumer = kafka::consumer_config(args, group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// Records up to this many are counted one by one (transaction markers are not records);
/// a longer lag is the offset difference.
const COUNT_UP_TO: i64 = 10_000;

/// Committed records in `[from, end)` of the partition: counted by reading when there are at
/// most [`COUNT_UP_TO`] offsets (with `read_committed`, markers and aborted records are never
/// delivered), else `end - from`.
fn records_between(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    end: i64,
) -> anyhow::Result<i64> {
    if from >= end {
        return Ok(0);
    }
    if end - from > COUNT_UP_TO {
        return Ok(end - from);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let mut count = 0;
    let mut idle = std::time::Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.offset() < end => {
                count += 1;
                idle = std::time::Instant::now();
            }
            Some(Ok(_)) => return Ok(count),
            Some(Err(e)) => return Err(e.into()),
            None => {
                if kafka::position_of(consumer, topic, partition)? >= end {
                    return Ok(count);
                }
            }
        }
    }
    // Could not read to the end in time: the offsets are the best answer.
    Ok(end - from)
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
