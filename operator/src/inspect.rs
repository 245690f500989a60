//! `tally inspect TOPIC`: a pipeline topic's committed records as text, or as JSON lines with
//! `--json`, so that the binary sums format costs an operator nothing. Reads `read_committed`
//! from the start (or `--from-end N` records before the end of each partition) up to the high
//! watermarks seen at start, then exits.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use tally_core::{kafka, KafkaArgs, Topics};
use tally_model::codec;
use tally_model::messages::SumsRecord;

/// Which topic to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Work units (`<prefix>.files`).
    Files,
    /// Done-states of files (`<prefix>.done`).
    Done,
    /// The parsers' sums (`<prefix>.sums`).
    Sums,
    /// The aggregators' totals (`<prefix>.totals`).
    Totals,
    /// Bad lines and notifications (`<prefix>.dead-letter`).
    DeadLetter,
}

/// Arguments of `tally inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The topic.
    #[arg(value_enum)]
    pub topic: Which,
    /// One JSON object per record: partition, offset, key and the decoded record.
    #[arg(long)]
    pub json: bool,
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Start this many records before each partition's end (default: from the start).
    #[arg(long)]
    pub from_end: Option<i64>,
}

/// Prints the topic's records to stdout.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let topics = Topics::new(&args.kafka.topic_prefix);
    let topic = match args.topic {
        Which::Files => topics.files,
        Which::Done => topics.done,
        Which::Sums => topics.sums,
        Which::Totals => topics.totals,
        Which::DeadLetter => topics.dead_letter,
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut failed = Ok(());
    read_topic(
        &args.kafka,
        &topic,
        |p| args.partition.is_none_or(|only| only == p),
        |low, high| args.from_end.map_or(low, |n| (high - n).max(low)),
        |message| {
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let record = render(args.topic, message.payload());
            let (p, o) = (message.partition(), message.offset());
            let written = if args.json {
                let line = json!({"partition": p, "offset": o, "key": key, "record": record});
                writeln!(out, "{line}")
            } else {
                writeln!(
                    out,
                    "{p}:{o} key={} {}",
                    key.as_deref().unwrap_or("-"),
                    text(&record)
                )
            };
            if failed.is_ok() {
                failed = written;
            }
        },
    )?;
    failed?;
    out.flush()?;
    Ok(())
}

/// Reads the committed records of `topic` (the partitions `wanted`), each from
/// `start(log start, high watermark)` up to the high watermark as it was when reading began,
/// handing each to `each`. Gives up after 10 s without a record.
pub fn read_topic(
    kafka_args: &KafkaArgs,
    topic: &str,
    wanted: impl Fn(i32) -> bool,
    start: impl Fn(i64, i64) -> i64,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    let consumer = kafka::reader(kafka_args, "tally-inspect", kafka::Ends::Silent)?;
    let partitions = kafka::partition_count(&consumer, topic).context("cannot reach Kafka")?;
    anyhow::ensure!(partitions > 0, "topic {topic} does not exist");
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in (0..partitions).filter(|p| wanted(*p)) {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let from = start(low, high);
        // Nothing to read there: not waited for (an empty partition has no position to
        // compare with its end).
        if from >= high {
            continue;
        }
        tpl.add_partition_offset(topic, p, Offset::Offset(from))?;
        ends.push((p, high));
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    // Partitions still to read, to their ends. A record at the end closes its partition; the
    // consumer's positions (past transaction markers and aborted records) are asked only when
    // nothing comes: asking them per record costs more than reading it.
    let mut open: HashMap<i32, i64> = ends.into_iter().collect();
    let mut idle = Instant::now();
    while !open.is_empty() && idle.elapsed() <= Duration::from_secs(10) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            open.retain(|&p, high| {
                kafka::position_of(&consumer, topic, p).map_or(true, |pos| pos < *high)
            });
            continue;
        };
        let message = message?;
        idle = Instant::now();
        if open
            .get(&message.partition())
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            open.remove(&message.partition());
        }
        each(&message);
    }
    Ok(())
}

/// The record as JSON: sums records decoded from their binary form; a tombstone is null; a
/// record that cannot be decoded says why.
fn render(which: Which, payload: Option<&[u8]>) -> serde_json::Value {
    let Some(payload) = payload else {
        return serde_json::Value::Null;
    };
    let decoded = match which {
        Which::Sums | Which::Totals => codec::decode(payload)
            .map(|r: SumsRecord| serde_json::to_value(r).expect("serialisable"))
            .map_err(|e| e.to_string()),
        _ => serde_json::from_slice(payload).map_err(|e| e.to_string()),
    };
    decoded.unwrap_or_else(|error| {
        json!({"undecodable": error, "raw": String::from_utf8_lossy(&payload[..payload.len().min(256)])})
    })
}

/// A record on one line: sums as `sums N: id=sum id=sum …` (`sums N period=START: …` with a
/// period, its start in Unix seconds), anything else as compact JSON.
fn text(record: &serde_json::Value) -> String {
    if record.is_null() {
        return "tombstone".to_owned();
    }
    if record["type"] == "sums" {
        if let Some(pairs) = record["sums"].as_array() {
            let each: Vec<String> = pairs.iter().map(|p| format!("{}={}", p[0], p[1])).collect();
            let period = match record["period"].as_i64() {
                Some(start) => format!(" period={start}"),
                None => String::new(),
            };
            return format!("sums {}{period}: {}", pairs.len(), each.join(" "));
        }
    }
    record.to_string()
}
