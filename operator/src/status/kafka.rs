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
use tally_model::messages::{DeadLetter, WorkUnit};

use super::{Lag, Rejected};

/// What Kafka says.
pub(super) struct FromKafka {
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

pub(super) fn read_kafka(
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
    // Bad lines written in full, per unit, until its summary (which counts them too) comes.
    let mut written: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
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

    let consumer = kafka::reader(args, "tally-status", kafka::Ends::Silent)?;
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
