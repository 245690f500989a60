//! The HTTP side of `producer serve`: the routes, `HEAD /v1/uploads/{id}` and
//! `GET /v1/throttle`. `PUT /v1/files/{name}` is in [`super::upload`], how refusals are
//! answered in `reply.rs`. What each status means is in docs/messages.md ("Ingest over HTTP").

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, put};
use axum::Router;

use super::reply::{header, refuse, with_header};
use super::shared::Ingest;
use super::store::State as Stage;
use crate::protocol;

/// The routes.
pub fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/files/{*name}", put(super::upload::put_file))
        .route("/v1/uploads/{id}", head(head_upload))
        .route("/v1/throttle", get(get_throttle))
        .with_state(ingest)
}

async fn head_upload(
    State(ingest): State<Arc<Ingest>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = ingest
        .tokens
        .check(header(&headers, header::AUTHORIZATION.as_str()))
    else {
        return refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is needed");
    };
    if protocol::check_upload_id(&id).is_err() {
        return refuse(StatusCode::BAD_REQUEST, "bad upload id");
    }
    // This token's upload of that id: another token's is not found.
    let id = protocol::scoped_upload_id(&token, &id);
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
