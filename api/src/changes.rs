//! `GET /v1/changes`: the totals' changes as Server-Sent Events, read from the change log the
//! writers add to in the same transactions as their upserts (`tally_changes`,
//! `tally_db_client::changes`).
//!
//! Each event is one row of the log: `event: totals` carries consumers' running totals after
//! a transaction, `event: periods` the deltas it added to their periods; at most 1,000
//! consumers each. Its `id` is `TX-SEQ` (the writing transaction's id, a number rising within
//! it), and events come in id order.
//!
//! - Nothing twice, nothing missed, nothing rolled back: only events of transactions older
//!   than the oldest writer of the log still running are read (`tally_change_log_horizon()`,
//!   migration `20261203000004_change_log_writers.sql`), so every writer before a reader's
//!   position has ended and no event can appear behind it later, however the parallel writers'
//!   commits interleave. A change is sent once every writer that began before it has ended (a
//!   batch transaction lasts at most 120 s); other transactions on the server, however long
//!   they stay open, hold nothing back. The horizon is read in a statement before the events:
//!   the events' snapshot must be later than its look at the running writers.
//! - Resuming: `Last-Event-ID` (the header a browser's EventSource sends on reconnect, or the
//!   `last_event_id` parameter) continues after that event, also on another replica or after a
//!   restart. Without it the stream starts now (`from=oldest`: at the oldest change kept).
//! - A position before what the log still holds (pruned after the writers'
//!   `--change-log-retention-minutes`, or written while `--change-log off`) is a 410: changes
//!   may be missing, read the totals again and follow from now. A stream that falls behind the
//!   retention ends with `event: gone`; one that sees the log switched off ends with
//!   `event: off`.
//! - Bounds: a replica serves at most half its `--max-connections` as streams at once (one
//!   more is a 503 with `Retry-After`), so that streams, which are never closed for room,
//!   cannot take every connection.
//! - Backpressure: events go through a bounded channel; a slow client slows its own reads, a
//!   gone one ends them. A comment line every 15 s keeps idle connections open through proxies.
//!   A stream is a request in flight for as long as it lasts, so the server's idle timeout
//!   does not end a quiet one; a client that takes nothing of it for that long is let go.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::routes::{authorize, timed, Refusal, Shared};
use crate::value;
use crate::window::rfc3339;

/// How often a follower asks for new changes when it has read all there were.
pub const POLL: Duration = Duration::from_millis(200);
/// Longest a stream stays silent: then a comment line goes out.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events read per query.
const READ: i64 = 64;

/// An event id: (transaction id, sequence number). Ordered as the log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    tx: u64,
    seq: i64,
}

impl Position {
    /// Parses `TX-SEQ`.
    pub fn parse(text: &str) -> Option<Self> {
        let (tx, seq) = text.trim().split_once('-')?;
        Some(Self {
            tx: tx.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// Before every event of transaction `tx` (and after all earlier ones).
    fn before(tx: u64) -> Self {
        Self { tx, seq: i64::MIN }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.tx, self.seq)
    }
}

/// The log's setting and its gone mark (the last event pruned, or where it was switched).
struct LogState {
    enabled: bool,
    gone: Option<Position>,
}

async fn log_state(api: &crate::routes::Api) -> Result<LogState, Refusal> {
    let (enabled, gone_tx, gone_seq): (bool, Option<String>, Option<i64>) = timed(
        api,
        sqlx::query_as("SELECT enabled, gone_tx::text, gone_seq FROM tally_change_log")
            .fetch_one(&api.pool),
    )
    .await?;
    Ok(LogState {
        enabled,
        gone: gone_mark(gone_tx.as_deref(), gone_seq),
    })
}

/// The gone mark's columns as a position (none: nothing was ever lost).
fn gone_mark(tx: Option<&str>, seq: Option<i64>) -> Option<Position> {
    Some(Position {
        tx: tx?.parse().ok()?,
        seq: seq?,
    })
}

fn gone_refusal(at: Position) -> Refusal {
    Refusal::new(
        StatusCode::GONE,
        format!(
            "changes after {at} are no longer all kept (past the change log's retention, or \
             written with the log off): read the totals again and follow from now"
        ),
    )
}

/// `GET /v1/changes`.
pub async fn changes(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let asked = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(params.get("last_event_id").map(String::as_str))
        .filter(|id| !id.is_empty());
    let asked = match asked {
        Some(text) => Some(Position::parse(text).ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad Last-Event-ID: pass the id of the last event received, as it is",
            )
        })?),
        None => None,
    };
    let oldest = match params.get("from").map(String::as_str) {
        None | Some("now") => false,
        Some("oldest") => true,
        Some(_) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "from must be now or oldest",
            ))
        }
    };
    let state = log_state(&api).await?;
    if !state.enabled {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "the change log is off (the writers run with --change-log off)",
        ));
    }
    let start = match asked {
        Some(at) if state.gone.is_some_and(|gone| at < gone) => return Err(gone_refusal(at)),
        Some(at) => at,
        // From now: what is not yet readable (transactions still running, and later ones).
        None => {
            let from = if oldest {
                Position::before(0)
            } else {
                Position::before(api.horizon.get(&api).await?)
            };
            state.gone.map_or(from, |gone| gone.max(from))
        }
    };
    let permit = Refusal::take_slot(&api.streams, "change streams", "half its connection limit")?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _permit = permit; // held while the stream lasts
        follow(api, start, sender).await;
    });
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), receiver))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// One row of the log, as read.
type Row = (
    String,              // tx
    i64,                 // seq
    String,              // written_at
    Vec<i64>,            // consumer ids
    Option<Vec<String>>, // totals
    Option<Vec<i64>>,    // period starts (Unix seconds)
    Option<Vec<String>>, // deltas
);

/// The change log's horizon ([module docs](self)), computed at most once per half [`POLL`]
/// and shared by the replica's streams: it looks at the server's lock table, which a
/// thousand followers should not each do five times a second. A horizon stays true later (it
/// only trails), so a shared one delays a change by at most that much.
#[derive(Default)]
pub struct Horizon {
    last: tokio::sync::Mutex<Option<(Instant, u64)>>,
}

impl Horizon {
    async fn get(&self, api: &crate::routes::Api) -> Result<u64, Refusal> {
        let mut last = self.last.lock().await;
        if let Some((at, horizon)) = *last {
            if at.elapsed() < POLL / 2 {
                return Ok(horizon);
            }
        }
        let asked = Instant::now();
        let horizon: String = timed(
            api,
            sqlx::query_scalar("SELECT tally_change_log_horizon()::text").fetch_one(&api.pool),
        )
        .await?;
        let horizon = horizon.parse().unwrap_or(0);
        *last = Some((asked, horizon));
        Ok(horizon)
    }
}

/// What one read of the log saw: the gone mark and the events after a position, both from
/// the same snapshot.
struct Read {
    gone: Option<Position>,
    rows: Vec<Row>,
}

/// The mark's columns and an event's, as read; the event's are NULL when none was there.
type ReadRow = (
    Option<String>,      // gone_tx
    Option<i64>,         // gone_seq
    Option<String>,      // tx
    Option<i64>,         // seq
    Option<String>,      // written_at
    Option<Vec<i64>>,    // consumer ids
    Option<Vec<String>>, // totals
    Option<Vec<i64>>,    // period starts
    Option<Vec<String>>, // deltas
);

/// The events after `at` that can no longer change (at most [`READ`]), with the gone mark.
async fn read_after(api: &crate::routes::Api, at: Position) -> Result<Read, Refusal> {
    // First the horizon, then the events, each statement with a snapshot of its own (see the
    // module docs): in one statement the events would be read with a snapshot older than the
    // horizon's look at the running writers.
    let horizon = api.horizon.get(api).await?;
    if horizon <= at.tx {
        return Ok(Read {
            gone: None,
            rows: Vec::new(),
        });
    }
    // The gone mark in the events' statement: a prune deletes events and moves the mark in
    // one transaction, so a snapshot without the events it deleted has the mark past them.
    // Read apart, a prune between the two would leave a gap no mark tells of.
    let read: Vec<ReadRow> = timed(
        api,
        sqlx::query_as(
            "SELECT l.gone_tx::text, l.gone_seq, e.tx::text, e.seq,
                    to_char(e.written_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    e.consumer_ids, e.totals::text[],
                    ARRAY(SELECT extract(epoch FROM s)::bigint FROM unnest(e.period_starts) s),
                    e.deltas::text[]
             FROM tally_change_log l
             LEFT JOIN LATERAL (
               SELECT * FROM tally_changes
               WHERE (tx, seq) > ($1::text::xid8, $2) AND tx < $4::text::xid8
               ORDER BY tx, seq
               LIMIT $3
             ) e ON true
             ORDER BY e.tx, e.seq",
        )
        .bind(at.tx.to_string())
        .bind(at.seq)
        .bind(READ)
        .bind(horizon.to_string())
        .fetch_all(&api.pool),
    )
    .await?;
    let gone = read
        .first()
        .and_then(|(tx, seq, ..)| gone_mark(tx.as_deref(), *seq));
    let rows = read
        .into_iter()
        .filter_map(|(_, _, tx, seq, written_at, ids, totals, starts, deltas)| {
            Some((tx?, seq?, written_at?, ids?, totals, starts, deltas))
        })
        .collect();
    Ok(Read { gone, rows })
}

/// A row as one event.
fn event(row: &Row) -> (Position, String) {
    let (tx, seq, written_at, ids, totals, starts, deltas) = row;
    let at = Position {
        tx: tx.parse().unwrap_or(0),
        seq: *seq,
    };
    let (kind, data) = match (totals, starts, deltas) {
        (Some(totals), _, _) => {
            let consumers: Vec<_> = ids
                .iter()
                .zip(totals)
                .map(|(id, total)| json!({"consumer_id": id, "total": value::total(total)}))
                .collect();
            (
                "totals",
                json!({"transaction": tx, "written_at": written_at, "consumers": consumers}),
            )
        }
        (None, Some(starts), Some(deltas)) => {
            let periods: Vec<_> = ids
                .iter()
                .zip(starts)
                .zip(deltas)
                .map(|((id, start), delta)| {
                    json!({
                        "consumer_id": id,
                        "period_start": rfc3339(*start, 0),
                        "delta": value::total(delta),
                    })
                })
                .collect();
            (
                "periods",
                json!({"transaction": tx, "written_at": written_at, "periods": periods}),
            )
        }
        _ => ("unknown", json!({"transaction": tx})),
    };
    (at, format!("id: {at}\nevent: {kind}\ndata: {data}\n\n"))
}

/// Sends the events after `at` to `out` as they become readable, until the client goes, the
/// server shuts down, or the log can no longer continue from where the stream is.
async fn follow(api: Shared, mut at: Position, out: tokio::sync::mpsc::Sender<Bytes>) {
    let send = |text: String| {
        let out = out.clone();
        async move { out.send(Bytes::from(text)).await.is_ok() }
    };
    if !send("retry: 2000\n\n".to_owned()).await {
        return;
    }
    let mut last_sent = Instant::now();
    loop {
        let mut read_all = true;
        match log_state(&api).await {
            Ok(state) if !state.enabled => {
                send(
                    "event: off\ndata: {\"error\":\"the change log was switched off\"}\n\n".into(),
                )
                .await;
                return;
            }
            // PostgreSQL away (here or below): the stream stays open and tries again.
            Ok(_) => match read_after(&api, at).await {
                Ok(read) if read.gone.is_some_and(|gone| at < gone) => {
                    let why = gone_refusal(at).why().to_owned();
                    send(format!(
                        "event: gone\ndata: {}\n\n",
                        json!({ "error": why })
                    ))
                    .await;
                    return;
                }
                Ok(read) => {
                    read_all = (read.rows.len() as i64) < READ;
                    for row in &read.rows {
                        let (next, text) = event(row);
                        if !send(text).await {
                            return;
                        }
                        at = next;
                        last_sent = Instant::now();
                    }
                    metrics::counter!(tally_core::metrics::API_CHANGE_EVENTS)
                        .increment(read.rows.len() as u64);
                }
                Err(_) => {}
            },
            Err(_) => {}
        }
        if last_sent.elapsed() >= KEEP_ALIVE {
            if !send(": keep-alive\n\n".to_owned()).await {
                return;
            }
            last_sent = Instant::now();
        }
        if !read_all {
            continue;
        }
        tokio::select! {
            () = api.shutdown.cancelled() => return,
            () = out.closed() => return,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_as_the_log() {
        let a = Position::parse("10-5").unwrap();
        let b = Position::parse("10-6").unwrap();
        let c = Position::parse("11-1").unwrap();
        assert!(a < b && b < c);
        assert!(Position::before(11) < c && Position::before(11) > b);
        assert_eq!(a.to_string(), "10-5");
        assert_eq!(Position::parse("x-1"), None);
        assert_eq!(Position::parse("10"), None);
    }
}
