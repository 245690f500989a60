//! `GET /v1/consumers/{id}/usage`: a consumer's usage per window, from the period totals.
//! The request is checked first ([`crate::window`]); the windows are cut by PostgreSQL in the
//! zone asked for (its time zone database, so DST days are 23 or 25 hours), and a window whose
//! boundaries fall inside a stored period is refused rather than answered approximately.

use std::collections::{HashMap, HashSet};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::routes::{authorize, consumer_id, timed, Refusal, Shared};
use crate::value;
use crate::window::{self, Usage};

/// Window starts in the zone: hours step in absolute time (an hour is an hour on DST days),
/// days and months step in local calendar time. One step past `to`, for the last window's end.
const STARTS: &str = "
    SELECT s AS start FROM generate_series(
        date_trunc('hour', to_timestamp($1), $3), to_timestamp($2), interval '1 hour') AS s
    WHERE $4 = 'hour'
    UNION
    SELECT l AT TIME ZONE $3 FROM generate_series(
        date_trunc($4, to_timestamp($1) AT TIME ZONE $3),
        (to_timestamp($2) AT TIME ZONE $3) + $5::interval, $5::interval) AS l
    WHERE $4 <> 'hour'";

/// The windows of a request: (start, its zone offset, end, its offset) in Unix seconds, the
/// first starting at or before `from`, the last ending at or after `to`; `with` adds common
/// table expressions (`, name AS (…)`) that `usage_of` may read.
fn windows_sql(with: &str, usage_of: &str) -> String {
    format!(
        "WITH starts AS ({STARTS}){with},
         w AS (SELECT start, lead(start) OVER (ORDER BY start) AS stop FROM starts)
         SELECT extract(epoch FROM w.start)::bigint,
                extract(epoch FROM w.start AT TIME ZONE $3)::bigint
                  - extract(epoch FROM w.start)::bigint,
                extract(epoch FROM w.stop)::bigint,
                extract(epoch FROM w.stop AT TIME ZONE $3)::bigint
                  - extract(epoch FROM w.stop)::bigint,
                ({usage_of})::text
         FROM w
         WHERE w.stop IS NOT NULL AND w.start < to_timestamp($2) AND w.stop > to_timestamp($1)
         ORDER BY w.start"
    )
}

/// The time zones PostgreSQL knows (read once).
pub async fn zones(api: &crate::routes::Api) -> Result<&HashSet<String>, Refusal> {
    api.zones
        .get_or_try_init(|| async {
            let names: Vec<String> = timed(
                api,
                sqlx::query_scalar("SELECT name FROM pg_timezone_names").fetch_all(&api.pool),
            )
            .await?;
            Ok(names.into_iter().collect())
        })
        .await
}

/// One window of an answer: its start and end (Unix seconds) with the zone's offsets there.
pub(crate) struct Row {
    pub(crate) start: i64,
    pub(crate) start_offset: i64,
    stop: i64,
    stop_offset: i64,
    usage: String,
}

/// Checks that every window boundary inside the range is a period boundary.
fn check_aligned(usage: &Usage, rows: &[Row]) -> Result<(), Refusal> {
    for row in rows {
        for at in [row.start.max(usage.from), row.stop.min(usage.to)] {
            if !window::aligned(at, usage.period) {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{} windows in {} start inside stored periods (at {}): choose a zone whose offset is a whole number of periods, or a coarser window",
                        usage.window.name(),
                        usage.tz,
                        window::rfc3339(at, 0)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn answer(usage: &Usage, rows: &[Row]) -> serde_json::Value {
    let windows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "window_start": window::rfc3339(r.start, r.start_offset),
                "window_end": window::rfc3339(r.stop, r.stop_offset),
                "usage": value::total(&r.usage),
            })
        })
        .collect();
    json!({
        "window": usage.window.name(),
        "tz": usage.tz,
        "from": window::rfc3339(usage.from, 0),
        "to": window::rfc3339(usage.to, 0),
        "usage": windows,
    })
}

/// The windows of `usage` with `usage_of` (SQL; `$6` is bound to `consumer`) per window,
/// checked to fall on stored period boundaries.
async fn windows(
    api: &crate::routes::Api,
    usage: &Usage,
    with: &str,
    usage_of: &str,
    consumer: i64,
) -> Result<Vec<Row>, Refusal> {
    let sql = windows_sql(with, usage_of);
    let rows: Vec<(i64, i64, i64, i64, String)> = timed(
        api,
        sqlx::query_as(&sql)
            .bind(usage.from as f64)
            .bind(usage.to as f64)
            .bind(&usage.tz)
            .bind(usage.window.name())
            .bind(usage.window.step())
            .bind(consumer)
            .fetch_all(&api.pool),
    )
    .await?;
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|(start, start_offset, stop, stop_offset, usage)| Row {
            start,
            start_offset,
            stop,
            stop_offset,
            usage,
        })
        .collect();
    check_aligned(usage, &rows)?;
    Ok(rows)
}

/// A usage request's parameters, checked against the stored period and PostgreSQL's zones.
async fn parse(
    api: &crate::routes::Api,
    params: &HashMap<String, String>,
) -> Result<Usage, Refusal> {
    let known = zones(api).await?;
    window::parse(params, api.period, |tz| known.contains(tz))
        .map_err(|why| Refusal::new(StatusCode::BAD_REQUEST, why))
}

/// Reads and checks a usage request: its parameters, then its window boundaries against
/// the stored periods (one query over the windows, no usage read). The request, and its
/// windows in order.
pub(crate) async fn checked(
    api: &crate::routes::Api,
    params: &HashMap<String, String>,
) -> Result<(Usage, Vec<Row>), Refusal> {
    let usage = parse(api, params).await?;
    let windows = windows(api, &usage, "", "SELECT $6::bigint", 0).await?;
    Ok((usage, windows))
}

/// `GET /v1/consumers/{id}/usage?from=&to=&window=&tz=`.
pub async fn consumer_usage(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let id = consumer_id(&id)?;
    let usage = parse(&api, &params).await?;
    let rows = windows(
        &api,
        &usage,
        "",
        "SELECT coalesce(sum(c.total), 0) FROM consumer_period_totals c
         WHERE c.consumer_id = $6
           AND c.period_start >= greatest(w.start, to_timestamp($1))
           AND c.period_start < least(w.stop, to_timestamp($2))",
        id,
    )
    .await?;
    let mut body = answer(&usage, &rows);
    body["consumer_id"] = json!(id);
    Ok(Json(body).into_response())
}

/// `GET /v1/usage/total?from=&to=&window=&tz=`: all consumers' usage per window, as a
/// consumer's (the console's chart), from `usage_period_totals` (all consumers' usage per
/// period, kept by the writers): a few rows per period, however many consumers there are.
pub async fn total_usage(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let usage = parse(&api, &params).await?;
    let rows = windows(
        &api,
        &usage,
        ", per_period AS (
           SELECT period_start, sum(total) AS total FROM usage_period_totals
           WHERE period_start >= to_timestamp($1) AND period_start < to_timestamp($2)
             AND $6::bigint = 0 -- no consumer here
           GROUP BY period_start)",
        "SELECT coalesce(sum(p.total), 0) FROM per_period p
         WHERE p.period_start >= greatest(w.start, to_timestamp($1))
           AND p.period_start < least(w.stop, to_timestamp($2))",
        0,
    )
    .await?;
    Ok(Json(answer(&usage, &rows)).into_response())
}
