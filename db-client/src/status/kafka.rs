//! What `tally status` reads from Kafka: the announced files and rejections (files and
//! dead-letter topics), the stages' lag per partition counted in records, the log bounds the
//! gap rule needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::inspect::read_topic;
use tally_core::messages::{DeadLetter, WorkUnit};
use tally_core::{kafka, KafkaArgs, Topics};

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
