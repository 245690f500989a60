//! `PUT /v1/files/{name}`: an upload's way from bytes to announcement. Check who and what,
//! find or start the upload's record, stream the body onto its part file, and once all bytes
//! are in: verify the checksum, link the file into the folder, announce it.
// The `Err` of these steps is the HTTP answer itself, built once per request.
#![allow(clippy::result_large_err)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tally_core::metrics as m;
use tokio::io::AsyncWriteExt;

use super::server::{header, refuse, retry_after, with_header, Ingest};
use super::store::{Record, State as Stage};
use super::throttle;
use crate::protocol::{self, Checksum, ContentRange};

/// What a `PUT` says about itself.
struct Put {
    id: String,
    resumable: bool,
    checksum: Option<Checksum>,
    range: Option<ContentRange>,
    total: Option<u64>,
}

fn read_put(headers: &HeaderMap) -> Result<Put, Response> {
    let bad = |reason: String| refuse(StatusCode::BAD_REQUEST, reason);
    let (id, resumable) = match header(headers, protocol::UPLOAD_ID) {
        Some(id) => {
            protocol::check_upload_id(id).map_err(|r| bad(r.to_owned()))?;
            (id.to_owned(), true)
        }
        None => (format!("once-{}", uuid_like()), false),
    };
    let checksum = header(headers, protocol::CHECKSUM)
        .map(str::parse::<Checksum>)
        .transpose()
        .map_err(bad)?;
    let range = header(headers, header::CONTENT_RANGE.as_str())
        .map(str::parse::<ContentRange>)
        .transpose()
        .map_err(bad)?;
    let length = header(headers, header::CONTENT_LENGTH.as_str())
        .map(|l| {
            l.parse::<u64>()
                .map_err(|_| bad("bad Content-Length".into()))
        })
        .transpose()?;
    if let (Some(r), Some(l)) = (range, length) {
        let carried = r.start.zip(r.end).map_or(0, |(s, e)| e - s + 1);
        if carried != l {
            return Err(bad(format!(
                "Content-Range {r} does not match Content-Length {l}"
            )));
        }
    }
    let total = range.map(|r| r.total).or(length);
    Ok(Put {
        id,
        resumable,
        checksum,
        range,
        total,
    })
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}-{}-{}",
        nanos,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// `PUT /v1/files/{name}`.
pub(super) async fn put_file(
    State(ingest): State<Arc<Ingest>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(token) = ingest
        .tokens
        .check(header(&headers, header::AUTHORIZATION.as_str()))
    else {
        return with_header(
            refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is needed"),
            "www-authenticate",
            "Bearer",
        );
    };
    if let Err(reason) = protocol::check_name(&name) {
        return refuse(StatusCode::BAD_REQUEST, format!("{name:?}: {reason}"));
    }
    let put = match read_put(&headers) {
        Ok(p) => p,
        Err(response) => return response,
    };
    if let Some(total) = put.total.filter(|t| *t > ingest.limits.max_file_bytes) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{total} bytes is over the limit of {}",
                ingest.limits.max_file_bytes
            ),
        );
    }
    let Some(_busy) = ingest.claim(&put.id) else {
        return retry_after(
            refuse(StatusCode::LOCKED, "another request is writing this upload"),
            Duration::from_secs(1),
        );
    };
    let record = match ingest.store.load(&put.id) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")),
    };
    let mut record = match record {
        Some(r) => match resume(&ingest, r, &name, &put).await {
            Ok(r) => r,
            Err(response) => return response,
        },
        None => match begin(&ingest, &name, &put, &token) {
            Ok(r) => r,
            Err(response) => return response,
        },
    };
    let held = ingest.store.held(&put.id);
    let start = put.range.and_then(|r| r.start);
    if start.unwrap_or(held) != held || (start.is_none() && put.range.is_none() && held > 0) {
        return with_header(
            refuse(
                StatusCode::CONFLICT,
                format!("the server holds {held} bytes of this upload"),
            ),
            protocol::UPLOAD_OFFSET,
            held,
        );
    }
    let Ok(_slot) = ingest.slots.try_acquire() else {
        return retry_after(
            refuse(StatusCode::TOO_MANY_REQUESTS, "too many uploads at once"),
            Duration::from_secs(1),
        );
    };
    let held = match receive(&ingest, &record, held, body).await {
        Ok(h) => h,
        Err(response) => return response,
    };
    if record.total.is_none() {
        // A body of unknown length that ended normally is the whole file.
        record.total = Some(held);
    }
    let total = record.total.unwrap_or(held);
    if held < total {
        return with_header(
            (
                StatusCode::ACCEPTED,
                format!("{held} of {total} bytes held\n"),
            )
                .into_response(),
            protocol::UPLOAD_OFFSET,
            held,
        );
    }
    let done = ingest.clone();
    match tokio::task::spawn_blocking(move || complete(&done, &mut record, &token)).await {
        Ok(response) => response,
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A new upload: throttle, name and space checks, then its record.
fn begin(ingest: &Ingest, name: &str, put: &Put, token: &str) -> Result<Record, Response> {
    let state = ingest.throttle.now();
    if state.throttled {
        return Err(retry_after(
            refuse(StatusCode::SERVICE_UNAVAILABLE, state.reasons.join("; ")),
            ingest.limits.retry_after,
        ));
    }
    if ingest.store.dir().join(name).exists() {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("{name} exists in the folder (another upload of that name)"),
        ));
    }
    if let (Some(total), Some(free)) = (put.total, throttle::free_bytes(ingest.store.dir())) {
        if total > free {
            return Err(refuse(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("{total} bytes do not fit in the {free} bytes free"),
            ));
        }
    }
    let record = Record {
        id: put.id.clone(),
        name: name.to_owned(),
        total: put.total,
        checksum: put.checksum.as_ref().map(ToString::to_string),
        token: token.to_owned(),
        state: Stage::Receiving,
        resumable: put.resumable,
    };
    ingest
        .store
        .save(&record)
        .map_err(|e| io_refusal(ingest, &record.id, &e))?;
    Ok(record)
}

/// A known upload: the same file? Finished already? Announce a linked one.
async fn resume(
    ingest: &Arc<Ingest>,
    mut record: Record,
    name: &str,
    put: &Put,
) -> Result<Record, Response> {
    let same_checksum = match (&record.checksum, &put.checksum) {
        (Some(a), Some(b)) => *a == b.to_string(),
        _ => true,
    };
    if record.name != name || !same_checksum {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("upload {} is of another file or other bytes", record.id),
        ));
    }
    match (record.total, put.total) {
        (Some(a), Some(b)) if a != b => {
            return Err(refuse(
                StatusCode::CONFLICT,
                format!("upload {} has {a} bytes, not {b}", record.id),
            ))
        }
        (None, Some(b)) => record.total = Some(b),
        _ => {}
    }
    if record.checksum.is_none() {
        record.checksum = put.checksum.as_ref().map(ToString::to_string);
    }
    match record.state {
        Stage::Receiving => Ok(record),
        Stage::Announced => {
            metrics::counter!(m::PRODUCER_INGEST_UPLOADS, "token" => record.token.clone(), "outcome" => "repeated").increment(1);
            Err(with_header(
                (StatusCode::OK, format!("{} is in already\n", record.name)).into_response(),
                protocol::UPLOAD_OFFSET,
                record.total.unwrap_or(0),
            ))
        }
        Stage::Linked => {
            let done = ingest.clone();
            let response = tokio::task::spawn_blocking(move || announce_linked(&done, &mut record))
                .await
                .unwrap_or_else(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
            Err(response)
        }
    }
}

/// Streams `body` onto the upload's part file; the bytes held after it.
async fn receive(ingest: &Ingest, record: &Record, held: u64, body: Body) -> Result<u64, Response> {
    let file = match ingest.store.append(&record.id) {
        Ok(f) => tokio::fs::File::from_std(f),
        Err(e) => return Err(io_refusal(ingest, &record.id, &e)),
    };
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut stream = body.into_data_stream();
    let limit = record.total.unwrap_or(ingest.limits.max_file_bytes);
    let mut held = held;
    let mut received = 0u64;
    let failure = loop {
        match tokio::time::timeout(ingest.limits.idle_timeout, stream.next()).await {
            Err(_) => {
                break Some(refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("no bytes for {:?}", ingest.limits.idle_timeout),
                ))
            }
            Ok(None) => break None,
            Ok(Some(Err(error))) => {
                // The client went away or broke the framing: keep what arrived if it can resume.
                tracing::info!(id = %record.id, %error, held, "upload interrupted");
                break Some(refuse(StatusCode::BAD_REQUEST, format!("body: {error}")));
            }
            Ok(Some(Ok(bytes))) => {
                if held + bytes.len() as u64 > limit {
                    let _ = out.flush().await;
                    ingest.store.remove(&record.id);
                    return Err(refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("more than {limit} bytes"),
                    ));
                }
                if let Err(e) = out.write_all(&bytes).await {
                    return Err(io_refusal(ingest, &record.id, &e));
                }
                held += bytes.len() as u64;
                received += bytes.len() as u64;
            }
        }
    };
    let flushed = out.flush().await;
    metrics::counter!(m::PRODUCER_INGEST_BYTES, "token" => record.token.clone())
        .increment(received);
    if let Err(e) = flushed {
        return Err(io_refusal(ingest, &record.id, &e));
    }
    match failure {
        None => Ok(held),
        Some(response) => {
            if !record.resumable {
                ingest.store.remove(&record.id);
            }
            Err(response)
        }
    }
}

/// A failed write: 507 (the upload forgotten) when the disk is full, else 500.
fn io_refusal(ingest: &Ingest, id: &str, error: &io::Error) -> Response {
    if error.raw_os_error() == Some(libc::ENOSPC) || error.raw_os_error() == Some(libc::EDQUOT) {
        ingest.store.remove(id);
        return refuse(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("disk full: {error}"),
        );
    }
    refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}"))
}

/// All bytes are in: verify, link into the folder, announce (blocking).
fn complete(ingest: &Ingest, record: &mut Record, token: &str) -> Response {
    if let Some(expected) = record
        .checksum
        .as_ref()
        .and_then(|c| c.parse::<Checksum>().ok())
    {
        let actual =
            match protocol::checksum_file(expected.algorithm, &ingest.store.part(&record.id)) {
                Ok(c) => c,
                Err(e) => return io_refusal(ingest, &record.id, &e),
            };
        if actual != expected {
            ingest.store.remove(&record.id);
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the body's checksum is {actual}, not {expected}; nothing kept"),
            );
        }
    }
    match ingest.store.link(&record.id, &record.name) {
        Ok(true) => {}
        Ok(false) => {
            ingest.store.remove(&record.id);
            return refuse(
                StatusCode::CONFLICT,
                format!(
                    "{} exists in the folder (another upload of that name)",
                    record.name
                ),
            );
        }
        Err(e) => return io_refusal(ingest, &record.id, &e),
    }
    record.state = Stage::Linked;
    if let Err(e) = ingest.store.save(record) {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}"));
    }
    ingest.store.remove_part(&record.id);
    tracing::info!(name = %record.name, token, bytes = record.total, "file received");
    announce_linked(ingest, record)
}

/// Announces a linked file: 201, or 503 when Kafka does not take it (the client retries; the
/// sweep retries too).
fn announce_linked(ingest: &Ingest, record: &mut Record) -> Response {
    match ingest.announce(record) {
        Ok(units) => {
            metrics::counter!(m::PRODUCER_INGEST_UPLOADS, "token" => record.token.clone(), "outcome" => "announced").increment(1);
            tracing::info!(name = %record.name, token = %record.token, units, "announced");
            with_header(
                (
                    StatusCode::CREATED,
                    format!("{} is in ({units} units)\n", record.name),
                )
                    .into_response(),
                protocol::UPLOAD_OFFSET,
                record.total.unwrap_or(0),
            )
        }
        Err(error) => retry_after(
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} is received, not yet announced: {error:#}", record.name),
            ),
            ingest.limits.retry_after,
        ),
    }
}
