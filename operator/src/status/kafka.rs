//! What `tally status` reads from Kafka: the announced files and rejections (files and
//! dead-letter topics), the stages' lag per partition counted in records, the log bounds the
//! gap rule needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::inspect::read_topic;
use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tally_core::backlog::{committed_offsets, records_between};
use tally_core::{kafka, KafkaArgs, Topics};
use tally_model::messages::DeadLetter;

use super::{Lag, Rejected};

/// What Kafka says.
pub(super) struct FromKafka {
    /// Figures read from part of a topic only, one line each.
    pub(super) partial: Vec<String>,
    pub(super) announced: BTreeSet<String>,
    pub(super) rejected: Vec<Rejected>,
    pub(super) dead_letters: BTreeMap<String, u64>,
    pub(super) bad_line_reasons: BTreeMap<String, u64>,
    pub(super) lag: Vec<Lag>,
    /// (log start, high watermark) per topic and partition.
    pub(super) watermarks: HashMap<String, BTreeMap<i32, (i64, i64)>>,
    /// The db-client's lag per (topic, partition) it stored an offset for.
    pub(super) db_lag: BTreeMap<(String, i32), i64>,
}

/// The one field of a work unit `status` needs (the rest is not parsed).
#[derive(serde::Deserialize)]
struct FileOf {
    file_id: String,
}

/// Where to start reading a partition with records `low..high` so that at most `budget`
/// records of the topic are read, its partitions sharing it; notes when records are left out.
fn tail(
    budget: u64,
    partitions: i32,
    cut: &std::cell::Cell<bool>,
) -> impl Fn(i64, i64) -> i64 + '_ {
    let share = (budget / partitions.max(1) as u64).max(1) as i64;
    move |low, high| {
        let from = low.max(high - share);
        if from > low {
            cut.set(true);
        }
        from
    }
}

pub(super) fn read_kafka(
    args: &KafkaArgs,
    topics: &Topics,
    stored: &[(String, i32, i64)],
    scan_records: u64,
) -> anyhow::Result<FromKafka> {
    let mut announced = BTreeSet::new();
    let mut partial = Vec::new();
    let files_cut = std::cell::Cell::new(false);
    let probe = kafka::reader(args, "tally-status", kafka::Ends::Silent)?;
    let files_partitions = kafka::partition_count(&probe, &topics.files)?;
    let dead_partitions = kafka::partition_count(&probe, &topics.dead_letter)?;
    read_topic(
        args,
        &topics.files,
        |_| true,
        tail(scan_records, files_partitions, &files_cut),
        |m| {
            if let Some(unit) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<FileOf>(p).ok())
            {
                announced.insert(unit.file_id);
            }
        },
    )
    .context("cannot read the files topic")?;
    let began = std::time::Instant::now();
    tracing::debug!("status: files topic read");
    if files_cut.get() {
        partial.push(format!(
            "files: only the last {scan_records} announcements were read (--scan-records)"
        ));
    }
    let dead_cut = std::cell::Cell::new(false);
    let mut rejected = Vec::new();
    let mut dead_letters: BTreeMap<String, u64> = BTreeMap::new();
    let mut bad_line_reasons: BTreeMap<String, u64> = BTreeMap::new();
    // Bad lines written in full, per unit, until its summary (which counts them too) comes.
    let mut written: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    read_topic(
        args,
        &topics.dead_letter,
        |_| true,
        tail(scan_records, dead_partitions, &dead_cut),
        |m| {
            let Some(letter) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<DeadLetter>(p).ok())
            else {
                return;
            };
            let kind = match letter {
                DeadLetter::BadLine {
                    unit_id, reason, ..
                } => {
                    *bad_line_reasons.entry(reason.clone()).or_default() += 1;
                    *written
                        .entry(unit_id)
                        .or_default()
                        .entry(reason)
                        .or_default() += 1;
                    "bad_line"
                }
                DeadLetter::BadLinesSummary {
                    unit_id, by_reason, ..
                } => {
                    let seen = written.remove(&unit_id).unwrap_or_default();
                    for (reason, n) in by_reason {
                        let already = seen.get(&reason).copied().unwrap_or(0);
                        *bad_line_reasons.entry(reason).or_default() += n.saturating_sub(already);
                    }
                    "bad_lines_summary"
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
    tracing::debug!(
        elapsed_ms = began.elapsed().as_millis() as u64,
        "status: dead letters read"
    );
    if dead_cut.get() {
        partial.push(format!(
            "dead letters: only the last {scan_records} records were read (--scan-records)"
        ));
    }

    // Short fetch waits: each lag count below reads a partition's few last offsets, and the
    // broker's default half-second wait per fetch would add up over the partitions.
    // A partition's end is asked for, not an error worth a log line (the context says so).
    let consumer: rdkafka::consumer::BaseConsumer<tally_core::rebalance::RebalanceLog> =
        kafka::consumer_config(args, "tally-status")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10")
            .create_with_context(tally_core::rebalance::RebalanceLog::default())
            .map_err(kafka::quiet)
            .context("cannot create a Kafka client (tally-status)")?;
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
    tracing::debug!(
        elapsed_ms = began.elapsed().as_millis() as u64,
        "status: watermarks read"
    );
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
    tracing::debug!(
        elapsed_ms = began.elapsed().as_millis() as u64,
        "status: group lag read"
    );
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
        partial,
        announced,
        rejected,
        dead_letters,
        bad_line_reasons,
        lag,
        watermarks,
        db_lag,
    })
}
