//! `GET /v1/dead-letters?cursor=&limit=`: the dead-letter topic (bad lines, their per-unit
//! summaries, rejected units, bad notifications), read from Kafka (it lives only there),
//! committed records only, oldest first within each partition.
//!
//! The cursor is the next offset of every partition (`partition:offset,…`): a page returns at
//! most `limit` records and moves each partition's offset past the records it returned, so
//! pages never repeat or skip a record, and a client that reached the end (`end: true`) can
//! come back later with the same cursor for what arrived since. Records deleted by retention
//! since are skipped (the read starts at the partition's first offset kept).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tally_core::kafka::{reader, Ends};
use tally_core::KafkaArgs;

use crate::routes::{authorize, page_limit, Refusal, Shared};

/// Records per page unless `limit` says otherwise.
pub const LIMIT_DEFAULT: i64 = 100;
/// Most records per page.
pub const LIMIT_MAX: i64 = 1000;

/// A page: the records and every partition's next offset.
struct Page {
    records: Vec<Value>,
    next: BTreeMap<i32, i64>,
    end: bool,
}

fn parse_cursor(text: &str) -> Option<BTreeMap<i32, i64>> {
    text.split(',')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (p, o) = part.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

fn format_cursor(next: &BTreeMap<i32, i64>) -> String {
    next.iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads one page of `topic` from `after` (blocking): each partition from its cursor offset
/// (or its first), until `limit` records or every partition's end, or `within`.
fn read_page(
    kafka: &KafkaArgs,
    topic: &str,
    after: &BTreeMap<i32, i64>,
    limit: i64,
    within: Duration,
) -> anyhow::Result<Page> {
    let group = format!("{}.api-dead-letters", kafka.topic_prefix);
    let consumer: BaseConsumer = reader(kafka, &group, Ends::Reported)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), within)
        .context("cannot read the dead-letter topic's metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut next = BTreeMap::new();
    let mut open = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, within)
            .context("cannot read the dead-letter topic's offsets")?;
        let from = after.get(&p).copied().unwrap_or(low).max(low);
        next.insert(p, from);
        if from < high {
            open.push(p);
            assignment.add_partition_offset(topic, p, Offset::Offset(from))?;
        }
    }
    let mut records = Vec::new();
    if !open.is_empty() {
        consumer.assign(&assignment)?;
    }
    let deadline = Instant::now() + within;
    while !open.is_empty() && (records.len() as i64) < limit {
        let Some(polled) = consumer.poll(deadline.saturating_duration_since(Instant::now())) else {
            anyhow::bail!("the dead-letter topic did not answer within {within:?}");
        };
        match polled {
            Ok(message) => {
                let p = message.partition();
                let record = message
                    .payload()
                    .and_then(|bytes| serde_json::from_slice::<Value>(bytes).ok())
                    .unwrap_or_else(|| json!({"kind": "undecodable"}));
                records.push(json!({
                    "partition": p,
                    "offset": message.offset(),
                    "timestamp_ms": message.timestamp().to_millis(),
                    "record": record,
                }));
                next.insert(p, message.offset() + 1);
            }
            Err(KafkaError::PartitionEOF(p)) => open.retain(|&q| q != p),
            Err(error) => return Err(error).context("cannot read the dead-letter topic"),
        }
    }
    Ok(Page {
        records,
        next,
        end: open.is_empty(),
    })
}

/// `GET /v1/dead-letters`.
pub async fn dead_letters(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let bad = |why: &str| Refusal::new(StatusCode::BAD_REQUEST, why);
    let limit = page_limit(&params, LIMIT_DEFAULT, LIMIT_MAX)?;
    let after = match params.get("cursor") {
        None => BTreeMap::new(),
        Some(text) => parse_cursor(text)
            .ok_or_else(|| bad("bad cursor: pass next_cursor from the previous page"))?,
    };
    let kafka = api.kafka.clone();
    let topic = api.dead_letter_topic.clone();
    let within = api.query_timeout;
    let page =
        tokio::task::spawn_blocking(move || read_page(&kafka, &topic, &after, limit, within))
            .await
            .map_err(|_| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "the read failed"))?
            .map_err(|error| {
                tracing::warn!(error = format!("{error:#}"), "dead-letter read failed");
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Kafka did not answer; try again",
                )
            })?;
    Ok(Json(json!({
        "dead_letters": page.records,
        "next_cursor": format_cursor(&page.next),
        "end": page.end,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let next = BTreeMap::from([(0, 5), (2, 17)]);
        assert_eq!(format_cursor(&next), "0:5,2:17");
        assert_eq!(parse_cursor("0:5,2:17"), Some(next));
        assert_eq!(parse_cursor(""), Some(BTreeMap::new()));
        assert_eq!(parse_cursor("0:x"), None);
        assert_eq!(parse_cursor("05"), None);
    }
}
