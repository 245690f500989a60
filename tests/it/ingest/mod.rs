//! `producer serve` and `producer push` against the real services, and what those tests share
//! (a server, raw requests, reading back the folder and the files topic):
//!
//! - [`resume`]: uploads through a proxy that cuts connections at random byte offsets, and a
//!   server killed mid-upload, resume to exact totals with each file counted once;
//! - [`refusals`]: bad names, traversal, wrong tokens and checksums, oversized bodies, stalled
//!   clients and a full disk each get their status and leave nothing behind;
//! - [`connections`]: 2,000 silent connections beside a push, phase timeouts, no HTTP/2;
//! - [`once`]: bytes counted once are never counted again under their name: after the
//!   records expire, with another checksum kind or token, without an upload id, after a restart;
//!   a server's load of what was announced waits for another replica's open announcement;
//! - [`tokens`]: a tokens file gone bad fails closed, upload ids per token, per-token quotas;
//! - [`flow`]: with the parsers stopped the server throttles and the pushers finish by
//!   themselves once they return; `push --watch`; `producer watch` beside the server.

mod connections;
mod flow;
mod once;
mod refusals;
mod resume;
mod tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_model::messages::WorkUnit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::read_committed;
use crate::support::Stage;
use crate::support::{clock_rng, free_port, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN: &str = "site-a-0123456789abcdef";
/// A second generator's token.
const OTHER: &str = "site-b-fedcba9876543210";

/// Replaces the tokens file (by a rename) with site-a's and site-b's tokens.
fn add_site_b(p: &Pipeline) {
    let next = p.dir.join("tokens.new");
    std::fs::write(&next, format!("site-a {TOKEN}\nsite-b {OTHER}\n")).unwrap();
    std::fs::rename(&next, p.dir.join("tokens")).unwrap();
}

/// The test CA and the server certificate `scripts/services` made.
fn tls_files() -> (String, String, String) {
    let ca = std::env::var("TALLY_TLS_CA_FILE").expect("TALLY_TLS_CA_FILE (scripts/services env)");
    let dir = Path::new(&ca).parent().unwrap();
    let file = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    (ca.clone(), file("server.pem"), file("server.key"))
}

/// The arguments of `producer serve` on `port` into `dir`, with the tokens file (site-a) that
/// they name written.
fn serve_args(p: &Pipeline, port: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    let tokens = p.dir.join("tokens");
    std::fs::write(&tokens, format!("# test\nsite-a {TOKEN}\n")).unwrap();
    let mut args: Vec<String> = ["producer", "serve", "--listen"].map(String::from).to_vec();
    args.push(format!("127.0.0.1:{port}"));
    args.extend(["--dir".into(), dir.to_str().unwrap().into()]);
    args.extend(["--tokens-file".into(), tokens.to_str().unwrap().into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits (at most 60 s) until something listens on `port`.
async fn wait_listening(port: u16, stage: &Stage) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not listen: {}",
            stage.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `producer serve` into `dir` (tokens: site-a); returns it and its port once it answers.
async fn serve(p: &mut Pipeline, dir: &Path, extra: &[&str]) -> (Stage, u16) {
    let port = free_port();
    let args = serve_args(p, port, dir, extra);
    let stage = p.spawn("serve", &args);
    wait_listening(port, &stage).await;
    (stage, port)
}

/// A parser and a db-client, counting what lands (stopped when dropped).
fn start_counting(p: &mut Pipeline) -> [Stage; 2] {
    let parser = p.spawn("parser", &p.parser_args("p1"));
    [parser, p.spawn("db-client", &["db-client"])]
}

/// Waits for `pusher` to exit 0, then for its `files` files to be exactly in the totals.
async fn pusher_finishes_exact(
    p: &Pipeline,
    pusher: &mut Stage,
    files: usize,
    expected: &HashMap<i64, i128>,
    after: &str,
) {
    let status = pusher
        .exit_within(TIMEOUT)
        .await
        .expect("the pusher did not finish");
    assert!(status.success(), "{}", pusher.log_text());
    p.wait_ingested(files as i64, TIMEOUT).await;
    p.assert_totals(expected, after).await;
}

/// Work units on the files topic, by unit id: how many times each was announced.
fn announcements(p: &Pipeline) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for (_, payload) in read_committed(&p.kafka, &p.topics.files) {
        let unit: WorkUnit = serde_json::from_slice(&payload).unwrap();
        *count.entry(unit.unit_id).or_default() += 1;
    }
    count
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn push_args(url: &str, ca: Option<&str>, files: &[PathBuf]) -> Vec<String> {
    let mut args: Vec<String> = ["producer", "push", "--to", url].map(String::from).to_vec();
    if let Some(ca) = ca {
        args.extend(["--ca-file".into(), ca.into()]);
    }
    args.extend(files.iter().map(|f| f.to_str().unwrap().to_owned()));
    args
}

/// One raw HTTP/1.1 request; the status code (0 when the server closed without answering).
async fn raw(port: u16, request: &[u8], then: Option<Duration>) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request).await.unwrap();
    if let Some(stall) = then {
        tokio::time::sleep(stall).await;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn put(name: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "PUT /v1/files/{name} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A `PUT` with a chunked body of 2 MB (no length said up front).
fn put_chunked(name: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!(
        "PUT /v1/files/{name} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n"
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    for _ in 0..20 {
        bytes.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        bytes.extend(std::iter::repeat_n(b'7', 100_000));
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}
