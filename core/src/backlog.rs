//! What a consumer group has not finished on a topic: its committed offsets, and the committed
//! records between them and the end of each partition (counted, or summed by a measure of
//! each record, such as the bytes a work unit covers).
//!
//! `tally status` reports the stages' lag with it; the ingest server (`producer serve`) holds
//! uploads back when the parsers' backlog passes a bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::{kafka, KafkaArgs};

/// Records up to this many per partition are read one by one (transaction markers are not
/// records); a longer backlog is the offset difference, and its measure is unknown.
pub const READ_UP_TO: i64 = 10_000;

/// The offsets `group` committed on `topic`, per partition (`None`: nothing committed).
pub fn committed_offsets(
    args: &KafkaArgs,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let consumer = kafka::reader(args, group, kafka::Ends::Silent)?;
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

/// Committed records in `[from, end)` of the partition: counted by reading when there are at
/// most [`READ_UP_TO`] offsets (with `read_committed`, markers and aborted records are never
/// delivered), else `end - from`.
pub fn records_between<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    from: i64,
    end: i64,
) -> anyhow::Result<i64> {
    let mut count = 0;
    match read_between(consumer, topic, partition, from, end, |_| count += 1)? {
        true => Ok(count),
        // Too many, or could not read to the end in time: the offsets are the best answer.
        false => Ok(end - from),
    }
}

/// Hands each committed record of `[from, end)` to `each`; `false` when it did not read them
/// all (more than [`READ_UP_TO`] offsets, or the end not reached within 5 s without a record).
/// A consumer with `enable.partition.eof` knows the end at once even when a transaction
/// marker is the last offset; without it, that case waits the 5 s. The consumer is left
/// without an assignment: a long-lived one (the ingest server's throttle) fetches nothing
/// between its looks.
pub fn read_between<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    from: i64,
    end: i64,
    each: impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<bool> {
    if from >= end {
        return Ok(true);
    }
    if end - from > READ_UP_TO {
        return Ok(false);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let read = read_assigned(consumer, topic, partition, end, each);
    // Taken back only after a poll: one taken back before its fetch started can leave
    // librdkafka fetching the partition for good (parser/src/doneset.rs). Failing, it leaves
    // the reader fetching, which costs the broker polls but no answer.
    let _ = consumer.unassign();
    read
}

/// [`read_between`] once the partition is assigned at `from`.
fn read_assigned<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    end: i64,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<bool> {
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.offset() < end => {
                each(&m);
                idle = Instant::now();
            }
            Some(Ok(_)) => return Ok(true),
            // With `enable.partition.eof`: the end, past any trailing transaction marker.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if p == partition => {
                return Ok(true)
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(e.into()),
            None => {
                if kafka::position_of(consumer, topic, partition)? >= end {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// What a group has not finished on a topic, over all its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Records between the committed positions and the ends: counted where a partition was
    /// read whole, else the offset difference (transaction markers included).
    pub records: u64,
    /// The sum of `measure` over the committed records in between; `None` when a partition
    /// held more than [`READ_UP_TO`] offsets, or could not be read to its end.
    pub measured: Option<u64>,
}

/// The backlog of `group` on `topic`: from each committed offset (or the log start when the
/// group committed nothing) to the high watermark, with `measure` summed over the records.
pub fn backlog(
    args: &KafkaArgs,
    consumer: &BaseConsumer,
    group: &str,
    topic: &str,
    measure: impl Fn(&[u8]) -> u64,
) -> anyhow::Result<Backlog> {
    let partitions = kafka::partition_count(consumer, topic)?;
    anyhow::ensure!(partitions > 0, "topic {topic} does not exist");
    let committed = committed_offsets(args, group, topic, partitions)?;
    let mut total = Backlog {
        records: 0,
        measured: Some(0),
    };
    for p in 0..partitions {
        let (low, end) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let from = committed.get(&p).copied().flatten().unwrap_or(low).max(low);
        let (mut sum, mut count) = (0u64, 0u64);
        let whole = read_between(consumer, topic, p, from, end, |m| {
            sum += m.payload().map_or(0, &measure);
            count += 1;
        })?;
        total.records += if whole {
            count
        } else {
            (end - from).max(0) as u64
        };
        total.measured = match (total.measured, whole) {
            (Some(before), true) => Some(before + sum),
            _ => None,
        };
    }
    Ok(total)
}
