//! Plain HTTP/1.1 from a test to a stage's `--http-addr` (`/metrics`, `/livez`, `/readyz`) or
//! to `tally api`, and reading Prometheus text.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A port nothing listens on right now, for a server the test starts next.
///
/// Taken below the kernel's ephemeral range (32768–60999 by default, where `bind(0)` picks):
/// every client connection of every process also takes its local port there, so a port
/// found with `bind(0)` can be taken by an outgoing connection (a Kafka client's, a pool's)
/// before the server binds it. Ports 21000–28999 hold no service of `scripts/services` and are
/// tried from a point of this process's own; a process never hands out one twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 21_000;
    const SPAN: u32 = 8_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// `GET path` from `127.0.0.1:port`: (status, body); `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, &[])
}

/// `GET path` from `127.0.0.1:port` with extra `headers` (name, value): (status, body, a
/// chunked body decoded);
/// `None` if nothing answers.
pub fn http_get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some((status, body))
}

/// A chunked body decoded; `None` if it is cut short (no last chunk).
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Polls `GET path` until `accept` takes the answer; panics with the last answer otherwise.
pub async fn wait_http(
    port: u16,
    path: &str,
    within: Duration,
    accept: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let until = Instant::now() + within;
    let mut last = None;
    while Instant::now() < until {
        let answer = tokio::task::spawn_blocking({
            let path = path.to_owned();
            move || http_get(port, &path)
        })
        .await
        .unwrap();
        if let Some((status, body)) = &answer {
            if accept(*status, body) {
                return (*status, body.clone());
            }
        }
        last = answer;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("GET :{port}{path} never answered as expected; last answer {last:?}");
}

/// The value of the sample `name{labels}` (labels as printed, `""` for none) in Prometheus
/// text, summed over every sample whose labels contain `labels`.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        if series_name == name && series_labels.contains(labels) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}
