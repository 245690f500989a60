//! One file to the server, by the protocol in docs/messages.md ("Ingest over HTTP"): ask how
//! much the server holds (`HEAD`), send the rest (`PUT` with `Content-Range`), and keep at it
//! through network errors, 5xx, 408, 423 and 429 (honouring `Retry-After`, else backing off),
//! until the server says the file is in, or says no for good, or the time runs out.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use reqwest::{header, Response, StatusCode};
use tally_core::backoff::Backoff;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::protocol::{self, Algorithm, ContentRange};

/// How a file got in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    /// Announced by this push.
    Announced,
    /// The server had it already (an earlier push of the same bytes).
    Already,
}

/// Where and as whom to push.
pub struct Target {
    /// The HTTP client.
    pub client: reqwest::Client,
    /// The server's base URL (`https://host:port`).
    pub base: reqwest::Url,
    /// The bearer token.
    pub token: String,
    /// The checksum sent with each upload.
    pub algorithm: Algorithm,
    /// How long to keep trying one file.
    pub give_up_after: Duration,
}

/// Pushes `path`, reporting the bytes the server holds to `progress` (total, then held).
pub async fn push(
    target: &Target,
    path: &Path,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<In> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_owned();
    protocol::check_name(&name).map_err(|r| anyhow::anyhow!("{name:?}: {r}"))?;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let size = meta.len();
    let file_time = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let (algorithm, owned) = (target.algorithm, path.to_owned());
    // The first `size` bytes only: what is sent is what is checksummed.
    let checksum = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        protocol::checksum_of(algorithm, std::fs::File::open(owned)?.take(size))
    })
    .await?
    .with_context(|| format!("cannot read {}", path.display()))?;
    let id = protocol::upload_id(&name, size, &checksum);
    let files = target.base.join(&format!("v1/files/{name}"))?;
    let uploads = target.base.join(&format!("v1/uploads/{id}"))?;
    progress.set_length(size);
    let deadline = Instant::now() + target.give_up_after;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    // Asking again where an upload stands: short pauses, growing (a proxy that shortens every
    // body must not make this spin).
    let mut asked = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut bad_checksums = 0;
    let mut last = String::from("no answer yet");
    loop {
        if Instant::now() > deadline {
            bail!("gave up after {:?}: {last}", target.give_up_after);
        }
        let offset = match held(target, &uploads).await {
            Ok(offset) => offset.min(size),
            Err(Held::Refused(status)) => bail!("HEAD {uploads}: {status}"),
            Err(Held::Failed(error)) => {
                last = format!("{error:#}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        progress.set_position(offset);
        let what = Upload {
            files: &files,
            id: &id,
            checksum: &checksum.to_string(),
            file_time,
            path,
            offset,
            size,
        };
        let response = match send(target, &what, progress).await {
            Ok(r) => r,
            Err(error) => {
                last = format!("{error:#}");
                tracing::debug!(file = %name, error = last, "upload interrupted, resuming");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let status = response.status();
        let wait = retry_after(&response);
        let offset_header = response.headers().contains_key(protocol::UPLOAD_OFFSET);
        let text = response.text().await.unwrap_or_default();
        last = format!("{status}: {}", text.trim());
        match status {
            StatusCode::CREATED => return Ok(In::Announced),
            StatusCode::OK => return Ok(In::Already),
            // Part of it is held, or another offset than we thought: ask again, after a pause
            // (a proxy that shortens every body must not make this spin).
            StatusCode::ACCEPTED => tokio::time::sleep(asked.next_delay()).await,
            StatusCode::CONFLICT if offset_header => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            StatusCode::UNPROCESSABLE_ENTITY if bad_checksums < 2 => {
                // The server dropped what it had; once more from the start.
                bad_checksums += 1;
                tracing::warn!(file = %name, "{last}; sending again");
            }
            status if retried(status) => {
                let delay = wait.unwrap_or_else(|| backoff.next_delay());
                tracing::info!(file = %name, status = status.as_u16(), ?delay, "server busy, waiting");
                tokio::time::sleep(delay).await;
            }
            // A status we cannot fix by trying again (400, 401, 409, 413, 507, …).
            _ => bail!("{last}"),
        }
    }
}

/// Why `HEAD` gave no offset.
enum Held {
    /// The server said no for good (401, 403, 400, …).
    Refused(StatusCode),
    /// A network error or a busy server: try again.
    Failed(anyhow::Error),
}

/// How many bytes of the upload the server holds (0 for one it does not know).
async fn held(target: &Target, uploads: &reqwest::Url) -> Result<u64, Held> {
    let response = target
        .client
        .head(uploads.clone())
        .bearer_auth(&target.token)
        .send()
        .await
        .map_err(|e| Held::Failed(e.into()))?;
    match response.status() {
        StatusCode::NOT_FOUND => Ok(0),
        StatusCode::OK => response
            .headers()
            .get(protocol::UPLOAD_OFFSET)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Held::Failed(anyhow::anyhow!("the server did not say how much it holds"))
            }),
        status if retried(status) => Err(Held::Failed(anyhow::anyhow!("HEAD: {status}"))),
        status => Err(Held::Refused(status)),
    }
}

/// Statuses worth trying again (507, a full disk, is not: the server forgot the upload).
fn retried(status: StatusCode) -> bool {
    (status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE)
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::LOCKED | StatusCode::TOO_MANY_REQUESTS
        )
}

/// One `PUT`: the bytes of `path` from `offset` to `size`.
struct Upload<'a> {
    files: &'a reqwest::Url,
    id: &'a str,
    checksum: &'a str,
    file_time: Option<u64>,
    path: &'a Path,
    offset: u64,
    size: u64,
}

/// `PUT`s the bytes from `offset` to the end.
async fn send(
    target: &Target,
    upload: &Upload<'_>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Response> {
    let Upload {
        files,
        id,
        checksum,
        file_time,
        path,
        offset,
        size,
    } = *upload;
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let range = ContentRange {
        start: (offset < size).then_some(offset),
        end: (offset < size).then_some(size - 1),
        total: size,
    };
    let bar = progress.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(size - offset), 256 << 10)
        .inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                bar.inc(bytes.len() as u64);
            }
        });
    let mut request = target
        .client
        .put(files.clone())
        .bearer_auth(&target.token)
        .header(protocol::UPLOAD_ID, id)
        .header(protocol::CHECKSUM, checksum)
        .header(header::CONTENT_RANGE, range.to_string())
        .header(header::CONTENT_LENGTH, size - offset);
    if let Some(time) = file_time {
        request = request.header(protocol::FILE_TIME, time);
    }
    Ok(request
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?)
}

fn retry_after(response: &Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(300)))
}
