//! The endpoints. `/v1/…` need a read token (`Authorization: Bearer …`); `/livez`, `/readyz`
//! and `/metrics` do not (they say nothing about usage), as on every other stage.
//!
//! Errors are JSON `{"error": "…"}` with the status: 400 for a request that cannot be
//! answered as asked (and why), 401 without a valid token, 404 for a consumer with no usage,
//! 503 when PostgreSQL does not answer within `--query-timeout-ms`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tally_core::liveness::Liveness;
use tally_core::server::tokens::Tokens;
use tally_model::period::Period;

use crate::value;

/// The OpenAPI 3 document of the `/v1` endpoints.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the handlers share.
pub struct Api {
    /// The database.
    pub pool: PgPool,
    /// Who may read.
    pub tokens: Tokens,
    /// Readiness conditions (a bad tokens file).
    pub liveness: Liveness,
    /// The process's metrics, for `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Longest a query may take.
    pub query_timeout: Duration,
    /// The stored period (`--period`, as the parsers run).
    pub period: Period,
    /// The brokers (dead letters).
    pub kafka: tally_core::KafkaArgs,
    /// The dead-letter topic.
    pub dead_letter_topic: String,
    /// The time zones PostgreSQL knows, read at the first request that names one.
    pub zones: tokio::sync::OnceCell<HashSet<String>>,
    /// Cancelled when the server shuts down: long responses (change streams) end.
    pub shutdown: tally_core::shutdown::CancellationToken,
    /// Served over TLS: session cookies are `Secure`.
    pub tls: bool,
    /// Reads `tally status`'s report (`/v1/status`), and the last one with when it was read.
    pub status: crate::status::StatusSource,
    /// Reads `/v1/top`, one at a time.
    pub top: crate::status::TopSource,
    /// The change log's horizon, shared by the replica's `/v1/changes` streams.
    pub horizon: crate::changes::Horizon,
    /// CSV exports running at once, each on a database connection for its whole length: at
    /// most half the pool, so that the other requests keep theirs.
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Change streams open at once: at most half the connection limit, so that streams
    /// (never closed for room) leave room for other requests.
    pub streams: Arc<tokio::sync::Semaphore>,
}

pub(crate) type Shared = Arc<Api>;

/// The routes, on `state`.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/consumers/{id}", get(consumer))
        .route(
            "/v1/consumers/{id}/usage",
            get(crate::usage::consumer_usage),
        )
        .route("/v1/usage", get(crate::export::all_usage))
        .route("/v1/files", get(crate::files::files))
        .route("/v1/dead-letters", get(crate::dead::dead_letters))
        .route("/v1/changes", get(crate::changes::changes))
        .route("/v1/status", get(crate::status::status))
        .route("/v1/top", get(crate::status::top))
        .route("/v1/usage/total", get(crate::usage::total_usage))
        .route("/", get(crate::console::index))
        .route("/console.js", get(crate::console::script))
        .route("/console.css", get(crate::console::style))
        .route("/favicon.svg", get(crate::console::icon))
        .route("/favicon.ico", get(crate::console::icon))
        .route(
            "/login",
            get(crate::console::login_link).post(crate::console::login_form),
        )
        .route("/logout", axum::routing::post(crate::console::logout))
        .route("/livez", get(|| async { "live\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { Refusal::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// An answer other than 200: its status and why, sent as JSON `{"error": why}`.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    why: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, why: impl Into<String>) -> Self {
        Self {
            status,
            why: why.into(),
        }
    }

    /// One of `slots`' permits, held as long as the response lasts; a 503 saying that as many
    /// `what` as this replica serves at once (`bound`) are running when none is free.
    pub(crate) fn take_slot(
        slots: &Arc<tokio::sync::Semaphore>,
        what: &str,
        bound: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Self> {
        slots.clone().try_acquire_owned().map_err(|_| {
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "as many {what} as this replica serves at once ({bound}) are running; try again"
                ),
            )
        })
    }

    /// The 503 of a query that failed or took too long.
    pub(crate) fn database_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer; try again",
        )
    }

    /// Why.
    pub(crate) fn why(&self) -> &str {
        &self.why
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.why }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        response
    }
}

/// The caller's token name (from `Authorization: Bearer`, or a console session cookie), or
/// the 401.
pub(crate) fn authorize(api: &Api, headers: &HeaderMap) -> Result<String, Refusal> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    api.tokens
        .check(authorization)
        .or_else(|| crate::console::session_name(api, headers))
        .ok_or_else(|| Refusal::new(StatusCode::UNAUTHORIZED, "a valid read token is needed"))
}

/// Runs `query` within the query timeout; a failure is a 503 (logged, not shown: it may name
/// the server).
pub(crate) async fn timed<T>(
    api: &Api,
    query: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Refusal> {
    let failed = match tokio::time::timeout(api.query_timeout, query).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {:?}", api.query_timeout),
    };
    tracing::warn!(error = failed, "query failed");
    Err(Refusal::database_unavailable())
}

async fn openapi(State(api): State<Shared>, headers: HeaderMap) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
}

/// A page size from `params["limit"]`: `default` when absent, else 1 to `max`, or a 400.
pub(crate) fn page_limit(
    params: &std::collections::HashMap<String, String>,
    default: i64,
    max: i64,
) -> Result<i64, Refusal> {
    match params.get("limit").map(|l| l.parse::<i64>()) {
        None => Ok(default),
        Some(Ok(n)) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be from 1 to {max}"),
        )),
    }
}

/// A consumer id from a path: a non-negative 64-bit integer, as in the data files.
pub(crate) fn consumer_id(text: &str) -> Result<i64, Refusal> {
    match text.parse::<i64>() {
        Ok(id) if id >= 0 && !text.starts_with('+') => Ok(id),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("consumer id must be an integer from 0 to {}", i64::MAX),
        )),
    }
}

/// `GET /v1/consumers/{id}`: the running total.
async fn consumer(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    authorize(&api, &headers)?;
    let id = consumer_id(&id)?;
    let row: Option<(String, String)> = timed(
        &api,
        sqlx::query_as(
            "SELECT total::text,
                    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM consumer_totals WHERE consumer_id = $1",
        )
        .bind(id)
        .fetch_optional(&api.pool),
    )
    .await?;
    let (total, updated_at) = row.ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no usage recorded for consumer {id}"),
        )
    })?;
    Ok(Json(json!({
        "consumer_id": id,
        "total": value::total(&total),
        "updated_at": updated_at,
    }))
    .into_response())
}

/// `/readyz`: 200 while the tokens file is good and PostgreSQL answers.
async fn readyz(State(api): State<Shared>) -> Response {
    if let Some(reason) = api.liveness.unready_reason() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response();
    }
    let probe = sqlx::query("SELECT 1").execute(&api.pool);
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(_)) => "ready\n".into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "PostgreSQL is not reachable\n",
        )
            .into_response(),
    }
}

async fn metrics(State(api): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.metrics.render(),
    )
        .into_response()
}
