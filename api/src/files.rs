//! `GET /v1/files?state=&cursor=&limit=`: the files ledger (`ingested_files`), newest first
//! (by when a file was first counted), in pages with keyset cursors: stable while files keep
//! arriving (a new file lands before the first page, never inside a later one).
//!
//! Rejection reasons live in Kafka only (the dead-letter topic): each file carries those of
//! `tally status`'s report (`rejections`, null while Kafka cannot be read), and
//! `state=rejected` lists the report's rejected files, with or without a ledger row.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::routes::{authorize, page_limit, timed, Refusal, Shared};

/// Files per page unless `limit` says otherwise.
pub const LIMIT_DEFAULT: i64 = 100;
/// Most files per page.
pub const LIMIT_MAX: i64 = 1000;

/// A page after `($1, $2)` (first counted, in whole microseconds since the epoch: exact, unlike
/// a float; file id; `$1` null for the first page), of
/// state `$3` (`complete`, `in-progress` or any), `$4` rows.
const PAGE: &str = "
    SELECT file_id, path, complete, file_bytes, bytes, lines, bad_lines, units_ingested,
           (extract(epoch FROM first_ingested_at) * 1000000)::bigint,
           to_char(first_ingested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           to_char(last_ingested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    FROM ingested_files
    WHERE ($1::bigint IS NULL
           OR (first_ingested_at, file_id)
              < (timestamptz 'epoch' + $1::bigint * interval '1 microsecond', $2))
      AND ($3 = 'any' OR complete = ($3 = 'complete'))
    ORDER BY first_ingested_at DESC, file_id DESC
    LIMIT $4";

type Row = (
    String,
    String,
    bool,
    i64,
    i64,
    i64,
    i64,
    i32,
    i64,
    String,
    String,
);

/// `GET /v1/files`.
pub async fn files(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let bad = |why: String| Refusal::new(StatusCode::BAD_REQUEST, why);
    let state = match params.get("state").map(String::as_str) {
        None | Some("any") => "any",
        Some("complete") => "complete",
        Some("in-progress") => "in-progress",
        Some("rejected") => return rejected(&api).await,
        Some(other) => {
            return Err(bad(format!(
                "state must be complete, in-progress, rejected or any, not {other:?}"
            )))
        }
    };
    let limit = page_limit(&params, LIMIT_DEFAULT, LIMIT_MAX)?;
    let after: (Option<i64>, String) = match params.get("cursor") {
        None => (None, String::new()),
        Some(text) => text
            .split_once('.')
            .and_then(|(at, id)| Some((Some(at.parse().ok()?), id.to_owned())))
            .ok_or_else(|| bad("bad cursor: pass next_cursor from the previous page".into()))?,
    };
    let rows: Vec<Row> = timed(
        &api,
        sqlx::query_as(PAGE)
            .bind(after.0)
            .bind(&after.1)
            .bind(state)
            .bind(limit)
            .fetch_all(&api.pool),
    )
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| format!("{}.{}", r.8, r.0)))
        .flatten();
    // Rejections live in Kafka only: from `tally status`'s report (null if it cannot be read).
    let reasons = crate::status::report(&api)
        .await
        .ok()
        .map(|r| rejections(&r));
    let files: Vec<_> = rows
        .into_iter()
        .map(|r| {
            let rejections = reasons.as_ref().map(|by_file| {
                by_file
                    .get(&r.0)
                    .map_or_else(Vec::new, |(_, list)| list.clone())
            });
            json!({
                "file_id": r.0,
                "path": r.1,
                "state": if r.2 { "complete" } else { "in-progress" },
                "file_bytes": r.3,
                "bytes_counted": r.4,
                "lines": r.5,
                "bad_lines": r.6,
                "units_counted": r.7,
                "first_counted_at": r.9,
                "last_counted_at": r.10,
                "rejections": rejections,
            })
        })
        .collect();
    Ok(Json(json!({ "files": files, "next_cursor": next })).into_response())
}

/// The rejected units of `tally status`'s report by file id: (path, `[{unit_id, reason}]`).
fn rejections(report: &serde_json::Value) -> HashMap<String, (String, Vec<serde_json::Value>)> {
    let mut by_file: HashMap<String, (String, Vec<serde_json::Value>)> = HashMap::new();
    for r in report["rejected"].as_array().into_iter().flatten() {
        let unit = r["unit_id"].as_str().unwrap_or_default();
        let Some((file, _)) = unit.rsplit_once('/') else {
            continue;
        };
        by_file
            .entry(file.to_owned())
            .or_insert_with(|| {
                (
                    r["path"].as_str().unwrap_or_default().to_owned(),
                    Vec::new(),
                )
            })
            .1
            .push(json!({"unit_id": unit, "reason": r["reason"]}));
    }
    by_file
}

/// `state=rejected`: the files with rejected units that are not complete, from `tally status`'s
/// report (its latest `--status-scan-records` dead letters), whether or not the ledger holds
/// them (a file whose every unit was rejected has no ledger row). One page.
async fn rejected(api: &crate::routes::Api) -> Result<Response, Refusal> {
    let report = crate::status::report(api).await?;
    let mut files: Vec<_> = rejections(&report)
        .into_iter()
        .map(|(file_id, (path, list))| {
            json!({"file_id": file_id, "path": path, "state": "rejected", "rejections": list})
        })
        .collect();
    files.sort_by(|a, b| a["file_id"].as_str().cmp(&b["file_id"].as_str()));
    Ok(Json(json!({ "files": files, "next_cursor": null })).into_response())
}
