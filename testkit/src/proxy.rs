//! A fault-injecting TCP proxy for tests: every connection to its address is forwarded to
//! one upstream address, until the test cuts them all, blackholes them (bytes held in both
//! directions, sockets kept open, new connections accepted and held), or delays every chunk.
//! Runs on the test's tokio runtime; stops when dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Mode {
    /// Bumped by every cut: connections opened before it close.
    cuts: u64,
    /// Bytes are held, not forwarded.
    blackhole: bool,
    /// Added before every chunk forwarded.
    delay: Duration,
}

/// The proxy; see the module docs.
pub struct FaultProxy {
    mode: watch::Sender<Mode>,
    open: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` and forwards to `upstream`.
    pub async fn start(listen: &str, upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let (mode, _) = watch::channel(Mode::default());
        let open = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_owned();
        let (modes, count) = (mode.clone(), open.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let (mode, count, upstream) = (modes.subscribe(), count.clone(), upstream.clone());
                tokio::spawn(async move {
                    count.fetch_add(1, Ordering::Relaxed);
                    carry(client, &upstream, mode).await;
                    count.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Self { mode, open, accept })
    }

    /// Closes every open connection now.
    pub fn cut(&self) {
        self.mode.send_modify(|m| m.cuts += 1);
    }

    /// Holds (or, with `false`, forwards again) every byte, of open and new connections.
    pub fn blackhole(&self, on: bool) {
        self.mode.send_modify(|m| m.blackhole = on);
    }

    /// Delays every chunk forwarded by `delay` (zero: none).
    pub fn delay(&self, delay: Duration) {
        self.mode.send_modify(|m| m.delay = delay);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Every connection closes too.
        self.mode.send_modify(|m| {
            m.cuts += 1;
            m.blackhole = false;
        });
    }
}

/// Waits while the mode blackholes (false: a cut came, or the proxy is gone).
async fn through_blackhole(mode: &mut watch::Receiver<Mode>, cuts: u64) -> bool {
    loop {
        let now = *mode.borrow_and_update();
        if now.cuts != cuts {
            return false;
        }
        if !now.blackhole {
            return true;
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

/// One connection, from its accept to a cut or either side's close.
async fn carry(client: TcpStream, upstream: &str, mut mode: watch::Receiver<Mode>) {
    let cuts = mode.borrow().cuts;
    if !through_blackhole(&mut mode, cuts).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, mode.clone(), cuts);
    let down = pump(server_read, client_write, mode.clone(), cuts);
    let mut cut = mode.clone();
    tokio::select! {
        _ = up => {}
        _ = down => {}
        () = async {
            while cut.changed().await.is_ok() {
                if cut.borrow().cuts != cuts {
                    return;
                }
            }
        } => {}
    }
}

/// Forwards `from` to `to` chunk by chunk, as the mode says.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    cuts: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !through_blackhole(&mut mode, cuts).await {
            return;
        }
        let delay = mode.borrow().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_cuts_holds_and_delays() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let proxy = FaultProxy::start(&addr, &upstream).await.unwrap();
        let mut conn = TcpStream::connect(&addr).await.unwrap();
        let mut buf = [0u8; 5];
        conn.write_all(b"hello").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        proxy.blackhole(true);
        conn.write_all(b"held!").await.unwrap();
        let held =
            tokio::time::timeout(Duration::from_millis(300), conn.read_exact(&mut buf)).await;
        assert!(held.is_err(), "a blackhole forwarded bytes");
        proxy.blackhole(false);
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held!");

        proxy.delay(Duration::from_millis(200));
        let started = std::time::Instant::now();
        conn.write_all(b"slow!").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400));
        proxy.delay(Duration::ZERO);

        proxy.cut();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "not cut: {closed:?}"
        );
    }
}
