//! `GET /v1/usage?from=&to=&window=&tz=&cursor=&limit=`: every consumer's usage per window,
//! in `(consumer_id, window_start)` order.
//!
//! - JSON: pages of at most `limit` rows (default [`LIMIT_DEFAULT`], at most [`LIMIT_MAX`]),
//!   each with the cursor of the next page. A cursor is the last row's key, so paging is stable
//!   while ingestion goes on: a page never repeats or skips a key, and a row of a later page
//!   shows its usage at the time it is read.
//! - CSV (`Accept: text/csv`): all rows, in constant memory. The period rows are read in
//!   primary-key order (an index scan, no grouping or sort in PostgreSQL) and each consumer's
//!   windows summed here as they pass, through a bounded channel to the response body (a slow
//!   client slows the query down, a gone one stops it, and one that takes nothing for the
//!   server's idle timeout is disconnected: `core/src/server/listen.rs`).
//!   Header `consumer_id,window_start,usage`. An export holds a database connection for its
//!   whole length, so a replica runs at most half its `--database-connections` at once; one
//!   more is a 503 with `Retry-After`.
//!
//! Only consumers with usage in a window have a row for it. The request is checked as for a
//! consumer's usage (`usage::checked`).

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;
use serde_json::json;

use crate::routes::{authorize, page_limit, timed, Refusal, Shared};
use crate::usage::checked;
use crate::value;
use crate::window::{rfc3339, Usage};

/// Rows per JSON page unless `limit` says otherwise.
pub const LIMIT_DEFAULT: i64 = 1000;
/// Most rows per JSON page.
pub const LIMIT_MAX: i64 = 10_000;
/// Bytes of CSV sent as one piece of the body.
const CHUNK_BYTES: usize = 64 * 1024;

/// A JSON page: the rows after `($5, $6)` (consumer, window start in Unix seconds): consumer,
/// window start, its zone offset, usage; at most `$7`, in key order. Windows are cut by
/// `date_trunc` in the zone, which the request check has shown to agree with the stored
/// periods. The next
/// `$7 + 1` consumers with usage in the range come first, straight from the primary key's
/// order (the cursor's own consumer may have no row left after the cursor, each other one has
/// at least one), and only their rows are grouped: a page costs the same wherever its cursor
/// is. (Grouping everything from the cursor on and cutting it at `$7` lets the planner choose
/// a full scan and sort: 1.3 s for a page in the middle of 1M consumers, against 15 ms.)
///
/// The consumers' current periods (on `consumer_totals`, no index on their period) are read
/// only up to the `$7 + 1`-th consumer of the period rows: the page cannot reach past it. Else
/// a page of an old range, which no current period is in, would read every consumer from the
/// cursor on (a page per table scan).
const PAGE: &str = "
    WITH rows AS (
        SELECT DISTINCT consumer_id FROM consumer_period_history
        WHERE consumer_id >= $5
          AND period_start >= to_timestamp($1) AND period_start < to_timestamp($2)
        ORDER BY consumer_id LIMIT $7 + 1
    ), reach AS (
        SELECT CASE WHEN count(*) > $7 THEN max(consumer_id) ELSE 9223372036854775807 END AS id
        FROM rows
    )
    SELECT c.consumer_id, g.s, g.o, g.u
    FROM (SELECT consumer_id FROM rows
          UNION
          (SELECT consumer_id FROM consumer_totals
           WHERE consumer_id >= $5 AND consumer_id <= (SELECT id FROM reach)
             AND period_start >= to_timestamp($1) AND period_start < to_timestamp($2)
           ORDER BY consumer_id LIMIT $7 + 1)
          ORDER BY consumer_id LIMIT $7 + 1) c
    CROSS JOIN LATERAL (
        SELECT extract(epoch FROM date_trunc($4, period_start, $3))::bigint AS s,
               extract(epoch FROM date_trunc($4, period_start, $3) AT TIME ZONE $3)::bigint
                 - extract(epoch FROM date_trunc($4, period_start, $3))::bigint AS o,
               sum(total)::text AS u
        FROM consumer_period_totals t
        WHERE t.consumer_id = c.consumer_id
          AND period_start >= to_timestamp($1) AND period_start < to_timestamp($2)
        GROUP BY 1, 2) g
    WHERE (c.consumer_id, g.s) > ($5, $6)
    ORDER BY 1, 2
    LIMIT $7";

/// A page's cursor: the last row's key, `consumer.window_start`.
fn cursor(text: &str) -> Result<(i64, i64), Refusal> {
    text.split_once('.')
        .and_then(|(id, start)| Some((id.parse().ok()?, start.parse().ok()?)))
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad cursor: pass next_cursor from the previous page as it is",
            )
        })
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/csv"))
}

/// `GET /v1/usage`.
pub async fn all_usage(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let (usage, windows) = checked(&api, &params).await?;
    let after = match params.get("cursor") {
        Some(text) => cursor(text)?,
        None => (0, i64::MIN),
    };
    if wants_csv(&headers) {
        let permit =
            Refusal::take_slot(&api.exports, "CSV exports", "half its database connections")?;
        return Ok(csv(&api, usage, &windows, after, permit));
    }
    let limit = page_limit(&params, LIMIT_DEFAULT, LIMIT_MAX)?;
    let rows: Vec<(i64, i64, i64, String)> = timed(
        &api,
        bind(sqlx::query_as(PAGE), &usage, after)
            .bind(limit)
            .fetch_all(&api.pool),
    )
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|(id, start, _, _)| format!("{id}.{start}")))
        .flatten();
    let rows: Vec<_> = rows
        .iter()
        .map(|(id, start, offset, total)| {
            json!({
                "consumer_id": id,
                "window_start": rfc3339(*start, *offset),
                "usage": value::total(total),
            })
        })
        .collect();
    Ok(Json(json!({
        "window": usage.window.name(),
        "tz": usage.tz,
        "from": rfc3339(usage.from, 0),
        "to": rfc3339(usage.to, 0),
        "rows": rows,
        "next_cursor": next,
    }))
    .into_response())
}

/// Binds the request's values to [`PAGE`].
fn bind<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    usage: &'q Usage,
    after: (i64, i64),
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(usage.from as f64)
        .bind(usage.to as f64)
        .bind(&usage.tz)
        .bind(usage.window.name())
        .bind(after.0)
        .bind(after.1)
}

/// The period rows of a range from consumer `$3` on, in key order (index scans merged: no
/// grouping, no time zone arithmetic per row in PostgreSQL). A (consumer, period) can come
/// twice (a period row and the consumer's current period): adjacent, summed by [`Fold`].
const PERIODS: &str = "
    SELECT consumer_id, extract(epoch FROM period_start)::bigint, total::text
    FROM consumer_period_totals
    WHERE period_start >= to_timestamp($1) AND period_start < to_timestamp($2)
      AND consumer_id >= $3
    ORDER BY consumer_id, period_start";

/// Sums of consecutive period rows that fall in one window of one consumer (rows come in
/// (consumer, period start) order, so a window's rows are adjacent).
struct Fold<'a> {
    /// Window starts, ascending (the request's windows).
    starts: &'a [i64],
    current: Option<(i64, usize, i128)>,
}

impl Fold<'_> {
    /// Adds a row; returns the (consumer, window, usage) it completed, if any.
    fn add(&mut self, id: i64, period_start: i64, total: i128) -> Option<(i64, usize, i128)> {
        let window = self
            .starts
            .partition_point(|&s| s <= period_start)
            .checked_sub(1)?;
        match &mut self.current {
            Some((cid, cw, sum)) if *cid == id && *cw == window => {
                *sum = sum.saturating_add(total);
                None
            }
            current => current.replace((id, window, total)),
        }
    }
}

/// The CSV export: a task reads the period rows in key order and sums each consumer's windows
/// as they pass (the windows' labels formatted once), sending the body in pieces through a
/// channel of two pieces, so memory stays constant whatever the number of rows.
fn csv(
    api: &Shared,
    usage: Usage,
    windows: &[crate::usage::Row],
    after: (i64, i64),
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let pool = api.pool.clone();
    let starts: Vec<i64> = windows.iter().map(|w| w.start).collect();
    let labels: Vec<String> = windows
        .iter()
        .map(|w| rfc3339(w.start, w.start_offset))
        .collect();
    tokio::spawn(async move {
        let _permit = permit; // held while the query runs
        let mut piece = Vec::with_capacity(CHUNK_BYTES + 128);
        piece.extend_from_slice(b"consumer_id,window_start,usage\n");
        let mut rows = sqlx::query_as::<_, (i64, i64, String)>(PERIODS)
            .bind(usage.from as f64)
            .bind(usage.to as f64)
            .bind(after.0)
            .fetch(&pool);
        let mut fold = Fold {
            starts: &starts,
            current: None,
        };
        let (mut id_text, mut sum_text) = (itoa::Buffer::new(), itoa::Buffer::new());
        let mut write = |piece: &mut Vec<u8>, (id, window, sum): (i64, usize, i128)| {
            if (id, starts[window]) > after {
                piece.extend_from_slice(id_text.format(id).as_bytes());
                piece.push(b',');
                piece.extend_from_slice(labels[window].as_bytes());
                piece.push(b',');
                piece.extend_from_slice(sum_text.format(sum).as_bytes());
                piece.push(b'\n');
            }
        };
        let failed = loop {
            match rows.try_next().await {
                Ok(Some((id, start, total))) => {
                    // NUMERIC beyond i128 cannot come from sums of i64 amounts in practice.
                    let Ok(total) = total.parse::<i128>() else {
                        break Some(format!("a total of consumer {id} exceeds 128 bits"));
                    };
                    if let Some(done) = fold.add(id, start, total) {
                        write(&mut piece, done);
                    }
                    if piece.len() >= CHUNK_BYTES {
                        let full =
                            std::mem::replace(&mut piece, Vec::with_capacity(CHUNK_BYTES + 128));
                        if tx.send(Ok(Bytes::from(full))).await.is_err() {
                            return; // the client is gone: the query stops with the stream
                        }
                    }
                }
                Ok(None) => {
                    if let Some(last) = fold.current.take() {
                        write(&mut piece, last);
                    }
                    let _ = tx.send(Ok(Bytes::from(piece))).await;
                    return;
                }
                Err(error) => break Some(error.to_string()),
            }
        };
        // The status line is sent: end the body short, so the client sees a broken
        // transfer, never a complete-looking partial export.
        tracing::warn!(error = failed.unwrap_or_default(), "CSV export failed");
        let _ = tx
            .send(Err(std::io::Error::other("the export query failed")))
            .await;
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (piece, rx))
    });
    (
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::Fold;

    #[test]
    fn adjacent_rows_of_a_consumer_s_window_are_summed() {
        let starts = [0, 10, 20];
        let mut fold = Fold {
            starts: &starts,
            current: None,
        };
        let rows = [
            (1, 0, 5),
            (1, 5, 1),
            (1, 10, 2),
            (2, 10, 3),
            (2, 25, -4),
            (3, 20, 1),
        ];
        let mut done: Vec<_> = rows
            .iter()
            .filter_map(|&(id, at, total)| fold.add(id, at, total))
            .collect();
        done.extend(fold.current.take());
        assert_eq!(
            done,
            vec![(1, 0, 6), (1, 1, 2), (2, 1, 3), (2, 2, -4), (3, 2, 1)]
        );
    }
}
