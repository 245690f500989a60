//! The console's pipeline view, as JSON endpoints anyone with a read token may use:
//!
//! - `GET /v1/status`: `tally status`'s report (files by state, rejected files with their
//!   reasons, lag per stage and partition, dead letters by kind, halted partitions), read by
//!   the same code ([`tally_operator::status::collect_from`]) from PostgreSQL and Kafka. It
//!   reads up to `--status-scan-records` records of two topics, so one read serves all
//!   requests for [`STATUS_FRESH`].
//! - `GET /v1/top?limit=`: the consumers with the highest running totals, one read at a time
//!   shared by the requests around it ([`TopSource`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::routes::{authorize, page_limit, timed, Refusal, Shared};
use crate::value;

/// How long one status read answers for.
pub const STATUS_FRESH: Duration = Duration::from_secs(5);

/// Where `/v1/status` comes from, and its last read.
pub struct StatusSource {
    /// The brokers.
    pub kafka: tally_core::KafkaArgs,
    /// Most records read of the files and dead-letter topics.
    pub scan_records: u64,
    /// The last report and when it was read.
    pub last: tokio::sync::Mutex<Option<(Instant, Value)>>,
}

/// `GET /v1/status`.
pub async fn status(State(api): State<Shared>, headers: HeaderMap) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    Ok(Json(report(&api).await?).into_response())
}

/// The last report if younger than [`STATUS_FRESH`], else a new one.
pub(crate) async fn report(api: &crate::routes::Api) -> Result<Value, Refusal> {
    // One read at a time; requests meanwhile wait for it and share it.
    let mut last = api.status.last.lock().await;
    if let Some((at, report)) = last.as_ref() {
        if at.elapsed() < STATUS_FRESH {
            return Ok(report.clone());
        }
    }
    let read =
        tally_operator::status::collect_from(&api.pool, &api.status.kafka, api.status.scan_records);
    let report = match tokio::time::timeout(api.query_timeout + Duration::from_secs(20), read).await
    {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => {
            tracing::warn!(error = format!("{error:#}"), "status not read");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the status could not be read from PostgreSQL and Kafka; try again",
            ));
        }
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the status took too long to read; try again",
            ))
        }
    };
    let report = serde_json::to_value(&report).unwrap_or(Value::Null);
    *last = Some((Instant::now(), report.clone()));
    Ok(report)
}

/// Consumers per `/v1/top` unless `limit` says otherwise.
pub const TOP_DEFAULT: i64 = 20;
/// Most consumers per `/v1/top`.
pub const TOP_MAX: i64 = 100;

/// One row of `/v1/top`: consumer id, total and when it changed, as text.
type TopRow = (i64, String, String);

/// Where `/v1/top` comes from. The read scans the whole of `consumer_totals` (no index orders
/// totals: one would cost every upsert), so a replica runs one at a time, and requests share
/// it: a request is answered by the first read that *starts* after it arrived (never an older
/// one), and every request waiting while a read runs is answered by the next one. Any number
/// of clients cost PostgreSQL at most one scan at a time per replica.
#[derive(Default)]
pub struct TopSource {
    /// Requests arrived so far; a request's number is its place in this count.
    arrived: AtomicU64,
    /// The last read: the number of the last request that arrived before it started, and the
    /// [`TOP_MAX`] highest totals.
    last: tokio::sync::Mutex<Option<(u64, Arc<Vec<TopRow>>)>>,
}

impl TopSource {
    /// The [`TOP_MAX`] highest totals, read after request number `arrived` came in.
    async fn read(
        &self,
        api: &crate::routes::Api,
        arrived: u64,
    ) -> Result<Arc<Vec<TopRow>>, Refusal> {
        let mut last = self.last.lock().await;
        if let Some((covers, rows)) = last.as_ref() {
            if *covers >= arrived {
                return Ok(rows.clone());
            }
        }
        // Everyone counted so far arrived before this read starts.
        let covers = self.arrived.load(Ordering::SeqCst);
        // The order names the table's column: a bare `total` would be the select list's text,
        // which sorts 99999 above 100002.
        let rows: Vec<TopRow> = timed(
            api,
            sqlx::query_as(
                "SELECT consumer_id, total::text,
                        to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                 FROM consumer_totals ORDER BY consumer_totals.total DESC, consumer_id LIMIT $1",
            )
            .bind(TOP_MAX)
            .fetch_all(&api.pool),
        )
        .await?;
        metrics::counter!(tally_core::metrics::API_TOP_READS).increment(1);
        let rows = Arc::new(rows);
        *last = Some((covers, rows.clone()));
        Ok(rows)
    }
}

/// `GET /v1/top?limit=`: highest running totals first (ties by consumer id), from a read
/// shared with the requests around it ([`TopSource`]), within the query timeout.
pub async fn top(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let limit = page_limit(&params, TOP_DEFAULT, TOP_MAX)?;
    let arrived = api.top.arrived.fetch_add(1, Ordering::SeqCst) + 1;
    let rows = tokio::time::timeout(api.query_timeout, api.top.read(&api, arrived))
        .await
        .map_err(|_| Refusal::database_unavailable())??;
    let consumers: Vec<_> = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|(id, total, at)| {
            json!({"consumer_id": id, "total": value::total(total), "updated_at": at})
        })
        .collect();
    Ok(Json(json!({ "consumers": consumers })).into_response())
}
