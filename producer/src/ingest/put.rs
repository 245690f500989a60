//! What a `PUT /v1/files/{name}` says about itself in its headers: the upload id (resumable or
//! once), checksum, `Content-Range`, length and file time, checked against each other before
//! any byte is taken.

// A refusal is a whole response, built once where it is decided.
#![allow(clippy::result_large_err)]

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use super::reply::{header, refuse};
use crate::protocol::{self, Checksum, ContentRange};

/// What a `PUT` says about itself.
pub(super) struct Put {
    pub(super) id: String,
    pub(super) resumable: bool,
    pub(super) checksum: Option<Checksum>,
    pub(super) range: Option<ContentRange>,
    pub(super) total: Option<u64>,
    pub(super) file_time: Option<i64>,
}

/// Reads and checks the upload headers of a `PUT`.
pub(super) fn read_put(headers: &HeaderMap) -> Result<Put, Response> {
    let bad = |reason: String| refuse(StatusCode::BAD_REQUEST, reason);
    let (id, resumable) = match header(headers, protocol::UPLOAD_ID) {
        Some(id) => {
            protocol::check_upload_id(id).map_err(|r| bad(r.to_owned()))?;
            (id.to_owned(), true)
        }
        None => (format!("once-{}", unique_suffix()), false),
    };
    let checksum = header(headers, protocol::CHECKSUM)
        .map(str::parse::<Checksum>)
        .transpose()
        .map_err(bad)?;
    let range = header(headers, header::CONTENT_RANGE.as_str())
        .map(str::parse::<ContentRange>)
        .transpose()
        .map_err(bad)?;
    if range.is_some() && !resumable {
        return Err(bad(format!(
            "Content-Range needs a {} header",
            protocol::UPLOAD_ID
        )));
    }
    let length = header(headers, header::CONTENT_LENGTH.as_str())
        .map(|l| {
            l.parse::<u64>()
                .map_err(|_| bad("bad Content-Length".into()))
        })
        .transpose()?;
    if let (Some(r), Some(l)) = (range, length) {
        if r.carried() != l {
            return Err(bad(format!(
                "Content-Range {r} does not match Content-Length {l}"
            )));
        }
    }
    let file_time = header(headers, protocol::FILE_TIME)
        .map(|t| {
            t.trim()
                .parse::<i64>()
                .map_err(|_| bad(format!("{}: unix seconds", protocol::FILE_TIME)))
        })
        .transpose()?;
    let total = range.map(|r| r.total).or(length);
    Ok(Put {
        id,
        resumable,
        checksum,
        range,
        total,
        file_time,
    })
}

/// A suffix no other upload of this process or any other has.
fn unique_suffix() -> String {
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
