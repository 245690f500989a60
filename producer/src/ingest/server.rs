//! The HTTP side of `producer serve`: the routes, who may call them, `HEAD /v1/uploads/{id}`,
//! `GET /v1/throttle`, and how refusals are answered. `PUT /v1/files/{name}` is in
//! [`super::upload`]. What each status means is in docs/messages.md ("Ingest over HTTP").

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, put};
use axum::Router;
use tally_core::liveness::Liveness;
use tally_core::metrics as m;

use super::store::{Record, State as Stage, Store};
use super::throttle;
use super::tokens::Tokens;
use crate::announce::{self, Announcer, Split};
use crate::protocol;

/// The limits of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest file accepted.
    pub max_file_bytes: u64,
    /// Longest wait for the next bytes of a body.
    pub idle_timeout: Duration,
    /// `Retry-After` of a refusal for load.
    pub retry_after: Duration,
}

/// What the handlers share.
pub struct Ingest {
    /// Uploads on disk.
    pub store: Store,
    /// Who may write.
    pub tokens: Tokens,
    /// Whether new uploads wait.
    pub throttle: throttle::Shared,
    /// Announces finished files (one Kafka transaction each).
    pub announcer: Mutex<Announcer>,
    /// How files split into units.
    pub split: Split,
    /// Limits.
    pub limits: Limits,
    /// Uploads receiving bytes at once.
    pub slots: tokio::sync::Semaphore,
    /// Upload ids a request (or the sweep) is working on.
    pub busy: Arc<Mutex<HashSet<String>>>,
    /// The watchdog.
    pub liveness: Liveness,
}

/// The routes.
pub fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/files/{*name}", put(super::upload::put_file))
        .route("/v1/uploads/{id}", head(head_upload))
        .route("/v1/throttle", get(get_throttle))
        .with_state(ingest)
}

/// A refusal: status, a one-line reason, maybe headers; counted and logged.
pub(super) fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    let reason = reason.into();
    metrics::counter!(m::PRODUCER_INGEST_REFUSED, "status" => status.as_str().to_owned())
        .increment(1);
    tracing::info!(status = status.as_u16(), %reason, "upload refused");
    (status, format!("{reason}\n")).into_response()
}

pub(super) fn with_header(
    mut response: Response,
    name: &'static str,
    value: impl ToString,
) -> Response {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        response.headers_mut().insert(name, v);
    }
    response
}

pub(super) fn retry_after(response: Response, after: Duration) -> Response {
    with_header(response, "retry-after", after.as_secs().max(1))
}

/// Holds an upload id for one piece of work (a request, or the sweep) until dropped.
pub struct Busy {
    ids: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Ingest {
    /// Holds upload `id`, unless something else holds it.
    pub fn claim(&self, id: &str) -> Option<Busy> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.insert(id.to_owned()).then(|| Busy {
            ids: self.busy.clone(),
            id: id.to_owned(),
        })
    }

    /// Announces the linked file of `record` and records it announced (blocking). A file no
    /// longer in the folder as linked (another inode, or none) was taken by something else
    /// that announces files there (`producer watch`, whose life cycle runs only once a file
    /// is done): recorded as announced, with a warning, rather than retried for ever.
    pub fn announce(&self, record: &mut Record) -> anyhow::Result<usize> {
        let path = self.store.dir().join(&record.name);
        let units = match announce::describe(&path, &self.split) {
            Ok(units) => units,
            Err(error) if !self.store.holds_linked(record) => {
                tracing::warn!(name = %record.name, error = format!("{error:#}"), "the file left the folder before it was announced here; taking it as announced by another producer");
                record.state = Stage::Announced;
                self.store.save(record)?;
                return Ok(0);
            }
            Err(error) => return Err(error),
        };
        {
            let _step = self.liveness.step("announce");
            self.announcer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .announce(&units)?;
        }
        self.liveness.progress();
        let bytes: u64 = units.iter().map(|u| u.end - u.start).sum();
        self.throttle.announced(units.len(), bytes);
        metrics::counter!(m::PRODUCER_FILES).increment(1);
        metrics::counter!(m::PRODUCER_UNITS).increment(units.len() as u64);
        metrics::counter!(m::PRODUCER_BYTES).increment(bytes);
        metrics::counter!(m::PRODUCER_INGEST_UPLOADS, "token" => record.token.clone(), "outcome" => "announced").increment(1);
        tracing::info!(name = %record.name, token = %record.token, units = units.len(), "announced");
        record.state = Stage::Announced;
        self.store.save(record)?;
        Ok(units.len())
    }
}

pub(super) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn head_upload(
    State(ingest): State<Arc<Ingest>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if ingest
        .tokens
        .check(header(&headers, header::AUTHORIZATION.as_str()))
        .is_none()
    {
        return refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is needed");
    }
    if protocol::check_upload_id(&id).is_err() {
        return refuse(StatusCode::BAD_REQUEST, "bad upload id");
    }
    let record = match ingest.store.load(&id) {
        Ok(Some(r)) => r,
        Ok(None) => return StatusCode::NOT_FOUND.into_response(),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (offset, state) = match record.state {
        Stage::Receiving => (ingest.store.held(&id), "receiving"),
        Stage::Linked | Stage::Announced => (record.total.unwrap_or(0), "complete"),
    };
    let mut response = StatusCode::OK.into_response();
    for (name, value) in [
        (protocol::UPLOAD_OFFSET, offset.to_string()),
        (protocol::UPLOAD_STATE, state.to_owned()),
        (protocol::UPLOAD_NAME, record.name.clone()),
    ] {
        response = with_header(response, name, value);
    }
    response
}

async fn get_throttle(State(ingest): State<Arc<Ingest>>) -> Response {
    let state = ingest.throttle.now();
    let status = if state.throttled {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let json = serde_json::to_string(&state).unwrap_or_default() + "\n";
    (status, [(header::CONTENT_TYPE, "application/json")], json).into_response()
}
