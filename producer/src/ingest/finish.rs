//! An upload whose bytes are all in: verify them, find whether they are counted already
//! (the ingested topic), link them into the folder, announce them. Runs on a blocking thread.

use std::io;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::reply::{refuse, retry_after, with_header};
use super::shared::Ingest;
use super::store::{Record, State as Stage};
use crate::protocol::{self, Algorithm, Checksum};

/// 200: the file `name` of `total` bytes is counted already; nothing is announced again.
pub(super) fn in_already(token: &str, name: &str, total: Option<u64>) -> Response {
    metrics::counter!(tally_core::metrics::PRODUCER_INGEST_UPLOADS, "token" => token.to_owned(), "outcome" => "repeated").increment(1);
    with_header(
        (StatusCode::OK, format!("{name} is in already\n")).into_response(),
        protocol::UPLOAD_OFFSET,
        total.unwrap_or(0),
    )
}

/// A failed write: 507 (the upload forgotten) when the disk is full, else 500.
pub(super) fn io_refusal(ingest: &Ingest, id: &str, error: &io::Error) -> Response {
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
pub(super) fn complete(ingest: &Ingest, record: &mut Record, token: &str) -> Response {
    let part = ingest.store.part(&record.id);
    // The server's own digest of the bytes (the client's checksum checked on the same read
    // when it is XXH3 too): what "counted already" compares.
    let digest = match protocol::checksum_file(Algorithm::Xxh3, &part) {
        Ok(c) => c,
        Err(e) => return io_refusal(ingest, &record.id, &e),
    };
    if let Some(expected) = record
        .checksum
        .as_ref()
        .and_then(|c| c.parse::<Checksum>().ok())
    {
        let actual = match expected.algorithm {
            Algorithm::Xxh3 => Ok(digest.clone()),
            other => protocol::checksum_file(other, &part),
        };
        let actual = match actual {
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
    // One upload of a name at a time from here to its announcement: a second one with the
    // same bytes then finds them counted, never counts them again.
    let Some(_name) = ingest.claim(&format!("name:{}", record.name)) else {
        return retry_after(
            refuse(
                StatusCode::LOCKED,
                format!("another upload of {} is finishing", record.name),
            ),
            Duration::from_secs(1),
        );
    };
    let digest = digest.to_string();
    if ingest.ingested.knows(&record.name, &digest) {
        record.state = Stage::Announced;
        if let Err(e) = ingest.store.save(record) {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}"));
        }
        ingest.store.remove_part(&record.id);
        tracing::info!(name = %record.name, token, %digest, "received bytes counted already; not announced again");
        return in_already(token, &record.name, record.total);
    }
    record.digest = Some(digest);
    if let Some(time) = record.file_time {
        // The generator's time, not the arrival's: the file's usage period.
        if let Err(error) = ingest.store.set_file_time(&record.id, time) {
            tracing::warn!(%error, name = %record.name, "cannot set the file's time; it keeps its arrival time");
        }
    }
    match ingest.store.link(record) {
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
        // Linked but not synced, perhaps: never forget an upload that may be in the folder
        // (the client's retry or the sweep finishes it).
        Err(e) if ingest.store.link_done(&record.id, &record.name) => {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}"));
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
pub(super) fn announce_linked(ingest: &Ingest, record: &mut Record) -> Response {
    match ingest.announce(record) {
        Ok(units) => with_header(
            (
                StatusCode::CREATED,
                format!("{} is in ({units} units)\n", record.name),
            )
                .into_response(),
            protocol::UPLOAD_OFFSET,
            record.total.unwrap_or(0),
        ),
        Err(error) => retry_after(
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} is received, not yet announced: {error:#}", record.name),
            ),
            ingest.limits.retry_after,
        ),
    }
}
