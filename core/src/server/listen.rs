//! A public server's connections (`tally producer serve`, `tally api`): accepted, bounded and
//! timed here, before any request reaches the handlers.
//!
//! - **A limit below the open-file limit** (`--max-connections`, by default the soft
//!   `RLIMIT_NOFILE` less a reserve for the server's own files and Kafka sockets). At the
//!   limit, a new connection evicts the oldest one that has no request in flight and never
//!   completed one (a silent socket), then the oldest idle keep-alive one; connections with a
//!   request in flight are never evicted. When nothing can be evicted the new connection is
//!   closed at once. A failed `accept` (out of descriptors after all) evicts and retries; it
//!   never stops the server.
//! - **A timeout for every phase**: the TLS handshake and the first complete request head
//!   within `--request-timeout-ms`; headers within it too (hyper's header timer); no bytes
//!   either way for `--idle-timeout-ms` while no request is in flight (between requests);
//!   a request's body is timed by its handler (408 after `--idle-timeout-ms` without bytes);
//!   a response the client takes nothing of for `--idle-timeout-ms` (every write waiting on a
//!   full socket: a reader that stopped reading, holding a CSV export's query or a change
//!   stream's memory) closes the connection. A request is in flight until its response's
//!   last byte is out, so a streamed response (an export, a change stream) is neither idle
//!   nor evicted while it lasts.
//! - **HTTP/1.1 only**: an HTTP/2 preface is a protocol error, so no stream multiplexing
//!   escapes the limits above.
//! - **Every close frees its slot**: a connection's entry leaves the table when its task ends,
//!   however it ends.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::shutdown::CancellationToken;

/// Descriptors kept for the server's own files, Kafka sockets and the metrics listener.
pub const FD_RESERVE: u64 = 256;

/// How connections are bounded and timed.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once.
    pub max_connections: usize,
    /// From accept to the first complete request head (TLS handshake included); also the
    /// limit for any request's headers.
    pub request_timeout: Duration,
    /// No bytes either way, with no request in flight; and longest a write may wait on a
    /// client that takes nothing, in flight or not.
    pub idle_timeout: Duration,
}

/// The connection limit that fits under this process's open-file limit.
pub fn default_max_connections() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(65_536);
    soft.saturating_sub(FD_RESERVE).clamp(16, 65_536) as usize
}

/// Connections refused or closed by the limits, for the logs and tests.
#[derive(Debug, Default)]
pub struct Counts {
    /// Connections evicted to make room.
    pub evicted: AtomicU64,
    /// Connections closed at accept: the table was full of requests in flight.
    pub refused: AtomicU64,
    /// Connections closed for a timeout of theirs.
    pub timed_out: AtomicU64,
}

/// One open connection.
struct Conn {
    opened: Instant,
    /// Milliseconds since `opened` of the last byte read or written.
    last_io_ms: AtomicU64,
    /// Milliseconds since `opened` when a write began to wait on a full socket; `u64::MAX`:
    /// no write waits.
    blocked_since_ms: AtomicU64,
    /// Whether a complete request head ever arrived.
    served: AtomicBool,
    /// Requests in flight now: from their head until their response's body is done.
    in_flight: AtomicUsize,
    /// Asks the connection's task to close it.
    close: CancellationToken,
}

impl Conn {
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// How long a write has waited on the client, if one does.
    fn write_blocked_for(&self) -> Option<Duration> {
        let since = self.blocked_since_ms.load(Ordering::Relaxed);
        (since != u64::MAX).then(|| {
            self.opened
                .elapsed()
                .saturating_sub(Duration::from_millis(since))
        })
    }

    /// Notes whether a write waits on a full socket (`Pending`) or went through.
    fn note_write<T>(&self, polled: &Poll<T>) {
        if polled.is_pending() {
            let ms = self.opened.elapsed().as_millis() as u64;
            let _ = self.blocked_since_ms.compare_exchange(
                u64::MAX,
                ms,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.blocked_since_ms.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// A write's outcome, noted: whether it waits on the client, and bytes gone out.
    fn wrote(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        self.note_write(&polled);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }
}

/// The open connections.
#[derive(Default)]
struct Table {
    next: u64,
    open: HashMap<u64, Arc<Conn>>,
}

/// The table's entry of a connection, removed when its task ends.
struct Entry {
    table: Arc<Mutex<Table>>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.table).open.remove(&self.id);
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes the connection that matters least, if one may be closed: the oldest that never
/// completed a request, else the oldest idle one; never one with a request in flight.
fn evict(table: &Mutex<Table>) -> bool {
    let table = lock(table);
    let idle = table
        .open
        .values()
        .filter(|c| c.in_flight.load(Ordering::Relaxed) == 0 && !c.close.is_cancelled());
    let victim = idle.min_by_key(|c| (c.served.load(Ordering::Relaxed), c.opened));
    match victim {
        Some(conn) => {
            conn.close.cancel();
            true
        }
        None => false,
    }
}

/// Serves `app` on `listener` (TLS when `tls` is given) until `shutdown`, then lets open
/// requests finish for up to 10 s.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    bounds: Bounds,
    counts: Arc<Counts>,
    shutdown: CancellationToken,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    let mut accept_errors = 0u64;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of descriptors (or a transient error): make room, wait a moment, go on.
                accept_errors += 1;
                if accept_errors.is_power_of_two() {
                    tracing::warn!(%error, accept_errors, "cannot accept a connection; closing an idle one");
                }
                evict(&table);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let full = lock(&table).open.len() >= bounds.max_connections;
        if full {
            if evict(&table) {
                counts.evicted.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                drop(tcp);
                continue;
            }
        }
        let _ = tcp.set_nodelay(true);
        let conn = Arc::new(Conn {
            opened: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            blocked_since_ms: AtomicU64::new(u64::MAX),
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            close: shutdown.child_token(),
        });
        let entry = {
            let mut t = lock(&table);
            t.next += 1;
            let id = t.next;
            t.open.insert(id, conn.clone());
            Entry {
                table: table.clone(),
                id,
            }
        };
        let (tls, app, counts) = (tls.clone(), app.clone(), counts.clone());
        tokio::spawn(async move {
            let _entry = entry;
            let io = Watched {
                inner: tcp,
                conn: conn.clone(),
            };
            match tls {
                None => connection(io, app, conn, bounds, counts).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(bounds.request_timeout, acceptor.accept(io));
                    let stream = tokio::select! {
                        () = conn.close.cancelled() => return,
                        done = handshake => done,
                    };
                    match stream {
                        Ok(Ok(stream)) => connection(stream, app, conn, bounds, counts).await,
                        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                        Err(_) => {
                            counts.timed_out.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    // Stop taking connections; let the open ones finish their requests.
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock(&table).open.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1.1 connection on `io`, closed by the phase timeouts, an eviction or shutdown.
async fn connection<IO>(io: IO, app: Router, conn: Arc<Conn>, bounds: Bounds, counts: Arc<Counts>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let (app, conn) = (app.clone(), conn.clone());
            async move {
                conn.served.store(true, Ordering::Relaxed);
                conn.in_flight.fetch_add(1, Ordering::Relaxed);
                let in_flight = InFlight(conn);
                let response = app.oneshot(request.map(axum::body::Body::new)).await?;
                // In flight until its body has gone out (or the connection is gone): a
                // streamed response (an export, a change stream) is not an idle connection.
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bounds.request_timeout)
        .keep_alive(true);
    let served = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended");
                }
                return;
            }
            () = conn.close.cancelled() => {
                // Evicted, or shutting down: a request in flight may finish (10 s).
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(10), served.as_mut()).await;
                return;
            }
            _ = tick.tick() => {
                let idle = conn.in_flight.load(Ordering::Relaxed) == 0;
                let first_late = !conn.served.load(Ordering::Relaxed)
                    && conn.opened.elapsed() > bounds.request_timeout;
                let stalled = conn
                    .write_blocked_for()
                    .is_some_and(|blocked| blocked > bounds.idle_timeout);
                if stalled || idle && (first_late || conn.idle_for() > bounds.idle_timeout) {
                    counts.timed_out.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Counts a request in flight until dropped (with its response's body).
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A response body that keeps its request counted in flight until it is dropped (hyper drops
/// it once its last frame is out, or with the connection).
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket that notes when bytes last went through it.
struct Watched<T> {
    inner: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.conn.wrote(polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.conn.note_write(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Vectored writes pass through (hyper then sends a head and a body chunk without copying
    // them into one buffer).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.conn.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
