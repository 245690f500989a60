//! `PUT /v1/files/{name}`: an upload's way from bytes to announcement. Check who and what,
//! find or start the upload's record, stream the body onto its part file, and once all bytes
//! are in: verify the checksum, link the file into the folder, announce it (`finish.rs`).
//!
//! After the checks, the work runs in a task of its own that holds the upload id until it is
//! finished: a client that goes away drops the handler, never a write or a link in flight, so
//! a resumed request never meets the bytes of the one before it. Disk calls that sync run on
//! blocking threads.
// The `Err` of these steps is the HTTP answer itself, built once per request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::finish::{announce_linked, complete, in_already, io_refusal};
use super::put::{read_put, Put};
use super::reply::{header, refuse, retry_after, with_header};
use super::shared::Ingest;
use super::store::{Record, State as Stage};
use super::throttle;
use crate::protocol::{self, Algorithm};

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
    let mut put = match read_put(&headers) {
        Ok(p) => p,
        Err(response) => return response,
    };
    if put.resumable {
        put.id = protocol::scoped_upload_id(&token, &put.id);
    }
    // A file time outside the window would book usage into a closed period: refused before
    // any byte is taken, whether the header says it or the name does.
    let in_window = match put.file_time {
        Some(time) => ingest
            .split
            .window
            .check_now(time)
            .map_err(|why| format!("{}: {why}", protocol::FILE_TIME)),
        None => Ok(()),
    }
    .and_then(|()| ingest.split.check_name(&name).map_err(|r| r.0));
    if let Err(why) = in_window {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    if let Some(total) = put.total.filter(|t| *t > ingest.limits.max_file_bytes) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{total} bytes is over the limit of {}",
                ingest.limits.max_file_bytes
            ),
        );
    }
    tokio::spawn(upload(ingest, name, put, token, body))
        .await
        .unwrap_or_else(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Runs `f` on a blocking thread; a panic there is a 500.
async fn blocking<T: Send + 'static>(
    ingest: &Arc<Ingest>,
    f: impl FnOnce(&Ingest) -> Result<T, Response> + Send + 'static,
) -> Result<T, Response> {
    let ingest = ingest.clone();
    tokio::task::spawn_blocking(move || f(&ingest))
        .await
        .unwrap_or_else(|e| Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))
}

/// Forgets upload `id` (its bytes and record), on a blocking thread.
async fn forget(ingest: &Arc<Ingest>, id: String) {
    let ingest = ingest.clone();
    let _ = tokio::task::spawn_blocking(move || ingest.store.remove(&id)).await;
}

/// The upload, holding its id from the first look at its record to the answer.
async fn upload(
    ingest: Arc<Ingest>,
    name: String,
    put: Put,
    token: String,
    body: Body,
) -> Response {
    let Some(_busy) = ingest.claim(&put.id) else {
        return retry_after(
            refuse(StatusCode::LOCKED, "another request is writing this upload"),
            Duration::from_secs(1),
        );
    };
    let Ok(_slot) = ingest.slots.try_acquire() else {
        return retry_after(
            refuse(StatusCode::TOO_MANY_REQUESTS, "too many uploads at once"),
            Duration::from_secs(1),
        );
    };
    let Some((_receiving, tokens)) = ingest.start_receiving(&token) else {
        return retry_after(
            refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this token has {} uploads receiving already",
                    ingest.limits.max_uploads_per_token
                ),
            ),
            Duration::from_secs(1),
        );
    };
    let put = Arc::new(put);
    let (p, n, t) = (put.clone(), name.clone(), token.clone());
    let (mut record, held) = match blocking(&ingest, move |i| prepare(i, &n, &p, &t)).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    // Where this body goes: it must start where the held bytes end, and carry no more than
    // its range says (none for `bytes */TOTAL`), the total, or the limit.
    if let Some(start) = put.range.map(|r| r.start.unwrap_or(held)) {
        if start != held {
            return with_header(
                refuse(
                    StatusCode::CONFLICT,
                    format!("the server holds {held} bytes of this upload, not {start}"),
                ),
                protocol::UPLOAD_OFFSET,
                held,
            );
        }
    }
    let limit = match put.range {
        Some(range) => range.end.map_or(held, |end| end + 1),
        None => record.total.unwrap_or(ingest.limits.max_file_bytes),
    };
    // What this token may still hold: its own bound, and its share of the free space.
    let (t, id) = (token.clone(), record.id.clone());
    let quota = match blocking(&ingest, move |i| Ok(i.quota_left(&t, &id, tokens))).await {
        Ok(q) => q,
        Err(answer) => return answer,
    };
    // A declared size over it waits at once; a body of unknown length is cut where it passes.
    let quota_end = held.saturating_add(quota);
    let declared = put.range.is_some() || record.total.is_some();
    if declared && limit > quota_end {
        return retry_after(
            refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this upload needs {} more bytes; this token may hold {quota} more in \
                     unfinished uploads now (its quota, or its share of the free space)",
                    limit - held
                ),
            ),
            ingest.limits.retry_after,
        );
    }
    let held = match receive(&ingest, &record, held, limit.min(quota_end), body).await {
        Ok(held) => held,
        Err(answer) => {
            if !record.resumable {
                let id = record.id.clone();
                forget(&ingest, id).await;
            }
            return answer;
        }
    };
    // A body without a length that ended cleanly is the whole file.
    let total = *record.total.get_or_insert(held);
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
    blocking(&ingest, move |i| Ok(complete(i, &mut record, &token)))
        .await
        .unwrap_or_else(|answer| answer)
}

/// Finds the upload's record, or starts one (blocking): `Err` is the answer when there is
/// nothing to receive (refused, or finished already).
fn prepare(ingest: &Ingest, name: &str, put: &Put, token: &str) -> Result<(Record, u64), Response> {
    let record = match ingest.store.load(&put.id) {
        Ok(Some(record)) => resume(ingest, record, name, put)?,
        Ok(None) => begin(ingest, name, put, token)?,
        Err(e) => return Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    };
    let held = ingest.store.held(&put.id);
    Ok((record, held))
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
    // Bytes counted already, by the client's own XXH3: answered before any byte is sent.
    let xxh3 = put
        .checksum
        .as_ref()
        .filter(|c| c.algorithm == Algorithm::Xxh3)
        .map(ToString::to_string);
    if xxh3
        .as_ref()
        .is_some_and(|d| ingest.ingested.knows(name, d))
    {
        return Err(in_already(token, name, put.total));
    }
    // A name in the folder refuses another file up front; bytes that may be the ones counted
    // under that name (no XXH3 to tell) are taken and compared once they are in.
    if ingest.store.dir().join(name).exists()
        && (xxh3.is_some() || !ingest.ingested.knows_name(name))
    {
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
        file_time: put.file_time,
        inode: None,
        digest: None,
    };
    ingest
        .store
        .save(&record)
        .map_err(|e| io_refusal(ingest, &record.id, &e))?;
    ingest.note_partial(token, &record.id);
    Ok(record)
}

/// A known upload: the same file? Finished already? Announce a linked one.
fn resume(ingest: &Ingest, mut record: Record, name: &str, put: &Put) -> Result<Record, Response> {
    let same_checksum = match (&record.checksum, &put.checksum) {
        (Some(a), Some(b)) => *a == b.to_string(),
        _ => true,
    };
    if record.name != name || !same_checksum {
        return Err(refuse(
            StatusCode::CONFLICT,
            "this upload id is of another file or other bytes".to_owned(),
        ));
    }
    match (record.total, put.total) {
        (Some(a), Some(b)) if a != b => {
            return Err(refuse(
                StatusCode::CONFLICT,
                format!("this upload has {a} bytes, not {b}"),
            ))
        }
        (None, Some(b)) => record.total = Some(b),
        _ => {}
    }
    if record.checksum.is_none() {
        record.checksum = put.checksum.as_ref().map(ToString::to_string);
    }
    record.file_time = record.file_time.or(put.file_time);
    match record.state {
        Stage::Receiving => Ok(record),
        Stage::Announced => Err(in_already(&record.token, &record.name, record.total)),
        Stage::Linked => Err(announce_linked(ingest, &mut record)),
    }
}

/// Streams `body` onto the upload's part file, up to `limit` bytes in all; the bytes held
/// after it.
async fn receive(
    ingest: &Arc<Ingest>,
    record: &Record,
    held: u64,
    limit: u64,
    body: Body,
) -> Result<u64, Response> {
    let id = record.id.clone();
    let file = blocking(ingest, move |i| {
        i.store.append(&id).map_err(|e| io_refusal(i, &id, &e))
    })
    .await?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut stream = body.into_data_stream();
    let mut held = held;
    let mut received = 0u64;
    let started = std::time::Instant::now();
    let failure = loop {
        // A trickle holds a slot as long as a stall would: past the idle timeout, the
        // average must reach the minimum rate.
        let elapsed = started.elapsed();
        if elapsed > ingest.limits.idle_timeout
            && (received as f64) < ingest.limits.min_rate as f64 * elapsed.as_secs_f64()
        {
            break Some(refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "{received} bytes in {elapsed:.1?}: slower than {} bytes/s",
                    ingest.limits.min_rate
                ),
            ));
        }
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
                    let over = limit == ingest.limits.max_file_bytes
                        || record.total.is_some_and(|t| t == limit);
                    let quota = record.total.is_none() && limit < ingest.limits.max_file_bytes;
                    let id = record.id.clone();
                    forget(ingest, id).await;
                    if quota {
                        return Err(retry_after(
                            refuse(
                                StatusCode::TOO_MANY_REQUESTS,
                                format!(
                                    "past {limit} bytes: this token's quota of unfinished \
                                     uploads, or its share of the free space"
                                ),
                            ),
                            ingest.limits.retry_after,
                        ));
                    }
                    return Err(if over {
                        refuse(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("more than {limit} bytes"),
                        )
                    } else {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            "the body is longer than its Content-Range",
                        )
                    });
                }
                if let Err(e) = out.write_all(&bytes).await {
                    let id = record.id.clone();
                    return Err(blocking(ingest, move |i| Ok(io_refusal(i, &id, &e)))
                        .await
                        .unwrap_or_else(|a| a));
                }
                held += bytes.len() as u64;
                received += bytes.len() as u64;
            }
        }
    };
    let flushed = out.flush().await;
    metrics::counter!(tally_core::metrics::PRODUCER_INGEST_BYTES, "token" => record.token.clone())
        .increment(received);
    if let Err(e) = flushed {
        let id = record.id.clone();
        return Err(blocking(ingest, move |i| Ok(io_refusal(i, &id, &e)))
            .await
            .unwrap_or_else(|a| a));
    }
    match failure {
        None => Ok(held),
        Some(answer) => Err(answer),
    }
}
