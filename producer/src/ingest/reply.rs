//! How the ingest server answers: a refusal (counted and logged), headers on a response,
//! headers of a request.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tally_core::metrics as m;

/// A refusal: status, a one-line reason, maybe headers; counted and logged.
pub(super) fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    let reason = reason.into();
    metrics::counter!(m::PRODUCER_INGEST_REFUSED, "status" => status.as_str().to_owned())
        .increment(1);
    tracing::info!(status = status.as_u16(), %reason, "upload refused");
    (status, format!("{reason}\n")).into_response()
}

/// `response` with header `name` set to `value`.
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

/// `response` with `Retry-After` of at least a second.
pub(super) fn retry_after(response: Response, after: Duration) -> Response {
    with_header(response, "retry-after", after.as_secs().max(1))
}

/// Header `name` of a request, when it is text.
pub(super) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
