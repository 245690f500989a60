//! `producer serve` and `producer push` against the real services: uploads through a proxy
//! that cuts connections at random byte offsets resume to exact totals with each file
//! announced once; bad names, traversal, wrong tokens and checksums, oversized bodies, stalled
//! clients and a full disk each get their status and leave nothing behind; with the parsers
//! stopped the server throttles, and the pushers finish by themselves once parsers return.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_core::messages::WorkUnit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::read_committed;
use crate::support::Stage;
use crate::support::{clock_rng, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN: &str = "site-a-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The test CA and the server certificate `scripts/services` made.
fn tls_files() -> (String, String, String) {
    let ca = std::env::var("TALLY_TLS_CA_FILE").expect("TALLY_TLS_CA_FILE (scripts/services env)");
    let dir = Path::new(&ca).parent().unwrap();
    let file = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    (ca.clone(), file("server.pem"), file("server.key"))
}

/// Starts `producer serve` into `dir` (tokens: site-a); returns it and its port once it answers.
async fn serve(p: &mut Pipeline, dir: &Path, extra: &[&str]) -> (Stage, u16) {
    let tokens = p.dir.join("tokens");
    std::fs::write(&tokens, format!("# test\nsite-a {TOKEN}\n")).unwrap();
    let port = free_port();
    let mut args: Vec<String> = ["producer", "serve", "--listen"].map(String::from).to_vec();
    args.push(format!("127.0.0.1:{port}"));
    args.extend(["--dir".into(), dir.to_str().unwrap().into()]);
    args.extend(["--tokens-file".into(), tokens.to_str().unwrap().into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let stage = p.spawn("serve", &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not listen: {}",
            stage.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (stage, port)
}

/// A TCP proxy on loopback to `upstream` that cuts each connection (both ways) once it has
/// forwarded a random number of request bytes (every fourth connection is left whole).
async fn cutting_proxy(upstream: u16, cuts: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut next = clock_rng("cutting proxy");
    tokio::spawn(async move {
        for n in 0u64.. {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let limit = match n % 4 {
                3 => u64::MAX,
                _ => 16_384 + next() % 3_000_000,
            };
            let cuts = cuts.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                let (mut ri, mut wi) = inbound.split();
                let (mut ro, mut wo) = outbound.split();
                let up = async {
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 16_384];
                    loop {
                        let n = match ri.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let n = n.min((limit - sent) as usize);
                        if wo.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        sent += n as u64;
                        if sent >= limit {
                            cuts.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                };
                let down = tokio::io::copy(&mut ro, &mut wi);
                tokio::select! {
                    () = up => {}
                    _ = down => {}
                }
                // Dropping both sockets here cuts the connection.
            });
        }
    });
    port
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

fn holds_a_part(tmp: &Path) -> bool {
    std::fs::read_dir(tmp).is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| {
            e.file_name().to_string_lossy().ends_with(".part")
                && e.metadata().is_ok_and(|m| m.len() > 0)
        })
    })
}

fn push_args(url: &str, ca: Option<&str>, files: &[PathBuf]) -> Vec<String> {
    let mut args: Vec<String> = ["producer", "push", "--to", url].map(String::from).to_vec();
    if let Some(ca) = ca {
        args.extend(["--ca-file".into(), ca.into()]);
    }
    args.extend(files.iter().map(|f| f.to_str().unwrap().to_owned()));
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_cut_at_random_offsets_resume_over_tls_and_count_once() {
    let mut p = Pipeline::new("ingest-cut").await;
    let outgoing = p.dir.join("outgoing");
    let (files, expected) = p.generate_in(&outgoing, 4, 3_000_000, 4000, 61).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    // The generator's times travel with the files (they decide the usage period).
    for (i, file) in files.iter().enumerate() {
        crate::periods::set_mtime(file, crate::periods::OCT_31_22H + i as i64 * 3600);
    }
    let (ca, cert, key) = tls_files();
    let data = p.data.clone();
    let (_server, port) = serve(
        &mut p,
        &data,
        &["--tls-cert-file", &cert, "--tls-key-file", &key],
    )
    .await;
    let cuts = Arc::new(AtomicUsize::new(0));
    let proxy = cutting_proxy(port, cuts.clone()).await;
    let _parser = p.spawn("parser", &p.parser_args("p1"));
    let _db = p.spawn("db-client", &["db-client"]);

    let url = format!("https://localhost:{proxy}");
    let args = push_args(&url, Some(&ca), &files);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "push failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("in\t")).count(),
        4,
        "{stdout}"
    );
    assert!(
        cuts.load(Ordering::Relaxed) > 0,
        "the proxy cut no connection"
    );

    p.wait_ingested(4, TIMEOUT).await;
    p.assert_totals(&expected, "pushes through a cutting proxy")
        .await;
    let announced = announcements(&p);
    assert!(
        announced.values().all(|n| *n == 1),
        "a unit announced twice: {announced:?}"
    );
    let landed: Vec<String> = names_in(&p.data)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(landed.len(), 4, "{landed:?}");
    for (file, name) in files.iter().zip(&landed) {
        let there = p.data.join(name);
        assert_eq!(std::fs::read(file).unwrap(), std::fs::read(&there).unwrap());
        let mtime = |f: &Path| std::fs::metadata(f).unwrap().modified().unwrap();
        assert_eq!(mtime(file), mtime(&there), "{name} did not keep its time");
    }
    assert!(
        names_in(&p.data.join(".tmp"))
            .iter()
            .all(|n| n.ends_with(".json")),
        "bytes left in .tmp: {:?}",
        names_in(&p.data.join(".tmp"))
    );

    // The same files again (a client that lost the answer): in already, nothing announced.
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("in already\t"))
            .count(),
        4,
        "{stdout}"
    );
    assert_eq!(announcements(&p), announced);
    p.assert_totals(&expected, "pushing the same files again")
        .await;
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

#[tokio::test(flavor = "multi_thread")]
async fn refusals_get_their_status_and_leave_nothing_behind() {
    let mut p = Pipeline::new("ingest-refuse").await;
    let data = p.data.clone();
    let (server, port) = serve(
        &mut p,
        &data,
        &[
            "--max-file-bytes",
            "1000000",
            "--idle-timeout-ms",
            "1000",
            "--partial-ttl-s",
            "2",
        ],
    )
    .await;
    let auth = format!("Bearer {TOKEN}");
    let ok = [("authorization", auth.as_str())];
    let body = b"1 10\n2 20\n";
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("hidden name", put(".hidden", &ok, body), 400),
        ("slash, encoded", put("a%2Fb", &ok, body), 400),
        ("traversal", put("../escape", &ok, body), 400),
        ("traversal, encoded", put("%2E%2E%2Fescape", &ok, body), 400),
        ("dot-dot", put("..", &ok, body), 400),
        ("temporary name", put("x.tmp", &ok, body), 400),
        ("space", put("a%20b", &ok, body), 400),
        ("too long", put(&"a".repeat(201), &ok, body), 400),
        ("no token", put("a.dat", &[], body), 401),
        (
            "wrong token",
            put(
                "a.dat",
                &[("authorization", "Bearer site-a-0123456789abcdeX")],
                body,
            ),
            401,
        ),
        (
            "wrong checksum",
            put(
                "a.dat",
                &[
                    ok[0],
                    ("tally-checksum", "xxh3:00000000000000000000000000000000"),
                ],
                body,
            ),
            422,
        ),
        (
            "declared too big",
            put("big.dat", &ok, &vec![b'1'; 1_000_001]),
            413,
        ),
        (
            "bad upload id",
            put("a.dat", &[ok[0], ("tally-upload-id", "../x")], body),
            400,
        ),
    ];
    for (what, request, status) in cases {
        assert_eq!(raw(port, &request, None).await, status, "{what}");
    }
    // Too big without saying so: a chunked body that grows past the limit.
    let mut chunked = format!(
        "PUT /v1/files/chunked.dat HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: {auth}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        chunked.extend(std::iter::repeat_n(b'7', 100_000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(
        raw(port, &chunked, None).await,
        413,
        "chunked past the limit"
    );
    // A client that stalls mid-body: 408; a resumable one keeps its bytes until the TTL.
    for (name, id) in [
        ("stall.dat", None),
        ("stall-resumable.dat", Some("stalled-upload-1")),
    ] {
        let mut headers = vec![ok[0]];
        if let Some(id) = id {
            headers.push(("tally-upload-id", id));
        }
        let mut request = put(name, &headers, &[b'5'; 100]);
        request.truncate(request.len() - 60);
        assert_eq!(
            raw(port, &request, Some(Duration::from_secs(3))).await,
            408,
            "{name}"
        );
    }
    // Headers that trickle in are cut too (no status: the request never began).
    let slow = raw(
        port,
        b"PUT /v1/files/slow.dat HTTP/1.1\r\nhost: x\r\n",
        Some(Duration::from_secs(3)),
    )
    .await;
    assert!(slow == 0 || slow == 408, "slow headers answered {slow}");
    // Nothing in the folder, nothing announced, and the stalled bytes gone after the TTL.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = names_in(&data.join(".tmp"));
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left in .tmp: {left:?}\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(names_in(&data), vec![".tmp".to_owned()]);
    assert!(!p.dir.join("escape").exists());
    assert!(announcements(&p).is_empty());

    // A good upload still goes in (with its checksum), and a name once taken stays taken.
    let sum = tally_producer::protocol::checksum_of(
        tally_producer::protocol::Algorithm::Sha256,
        &body[..],
    )
    .unwrap();
    let good = put(
        "a.dat",
        &[ok[0], ("tally-checksum", &sum.to_string())],
        body,
    );
    assert_eq!(raw(port, &good, None).await, 201);
    assert_eq!(
        raw(port, &put("a.dat", &ok, b"3 30\n"), None).await,
        409,
        "name taken"
    );
    assert_eq!(std::fs::read(data.join("a.dat")).unwrap(), body);
    assert_eq!(announcements(&p).len(), 1);

    // push says which files are not in, and exits 1: a wrong token, a name taken.
    let other = p.dir.join("b.dat");
    std::fs::write(&other, body).unwrap();
    let taken = p.dir.join("a.dat");
    std::fs::write(&taken, b"4 40\n").unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let args = push_args(&url, None, &[other.clone(), taken.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wrong = "site-a-0123456789abcdeX";
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", wrong)], TIMEOUT)
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("NOT in\t")).count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("401"), "{stdout}");

    // Tokens are read again when the file changes: a new one lets its holder in.
    let tokens = p.dir.join("tokens");
    let next = p.dir.join("tokens.new");
    std::fs::write(&next, format!("site-a {TOKEN}\nsite-b {wrong}\n")).unwrap();
    std::fs::rename(&next, &tokens).unwrap();
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", wrong)], TIMEOUT)
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the taken name must fail: {stdout}");
    assert!(
        stdout.contains(&format!("in\t{}", other.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("NOT in\t{}", taken.display())) && stdout.contains("409"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(data.join("a.dat")).unwrap(),
        body,
        "a taken name was overwritten"
    );
    assert_eq!(announcements(&p).len(), 2);
    assert!(server.log_text().contains("tokens reloaded"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_507_and_leaves_nothing() {
    let mut p = Pipeline::new("ingest-full").await;
    let small = p.dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "tmpfs",
            small.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a 1 MiB tmpfs (it needs root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let (_server, port) = serve(&mut p, &small, &["--min-free-bytes", "0"]).await;
    let auth = format!("Bearer {TOKEN}");
    // Declared too big for the free space: refused before a byte is written.
    let declared = put(
        "declared.dat",
        &[("authorization", &auth)],
        &vec![b'1'; 2_000_000],
    );
    assert_eq!(raw(port, &declared, None).await, 507);
    // Chunked, so the size is unknown: the disk fills during the upload.
    let mut chunked = format!(
        "PUT /v1/files/chunked.dat HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: {auth}\r\ntally-upload-id: full-disk-upload\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        chunked.extend(std::iter::repeat_n(b'7', 100_000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(port, &chunked, None).await, 507);
    assert_eq!(names_in(&small), vec![".tmp".to_owned()]);
    assert!(
        names_in(&small.join(".tmp")).is_empty(),
        "{:?}",
        names_in(&small.join(".tmp"))
    );
    assert!(announcements(&p).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_parsers_stopped_the_server_throttles_and_pushers_finish_when_they_return() {
    let mut p = Pipeline::new("ingest-throttle").await;
    let outgoing = p.dir.join("outgoing");
    let (files, expected) = p.generate_in(&outgoing, 6, 200_000, 500, 62).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    let data = p.data.clone();
    let http = free_port().to_string();
    let http_addr = format!("127.0.0.1:{http}");
    let (server, port) = serve(
        &mut p,
        &data,
        &[
            "--max-backlog-records",
            "2",
            "--throttle-every-ms",
            "200",
            "--retry-after-s",
            "1",
            "--http-addr",
            &http_addr,
        ],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let args = push_args(&url, None, &files);
    p.envs.push(("TALLY_INGEST_TOKEN".into(), TOKEN.into()));
    let mut pusher = p.spawn("push", &args);
    // No parser: the backlog grows past its bound and the server refuses the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let throttle = raw(
            port,
            b"GET /v1/throttle HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            None,
        )
        .await;
        if throttle == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never throttled: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let landed = names_in(&data).len() - 1;
    assert!(
        landed < files.len(),
        "all {landed} files taken with no parser running"
    );
    assert!(
        pusher.exit_within(Duration::ZERO).await.is_none(),
        "the pusher gave up"
    );
    assert!(server.log_text().contains("refusing new uploads"));
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let http: u16 = http.parse().unwrap();
    assert_eq!(
        raw(http, get("/readyz").as_bytes(), None).await,
        503,
        "ready while throttled"
    );
    assert_eq!(raw(http, get("/metrics").as_bytes(), None).await, 200);

    let _parser = p.spawn("parser", &p.parser_args("p1"));
    let _db = p.spawn("db-client", &["db-client"]);
    let status = pusher
        .exit_within(TIMEOUT)
        .await
        .expect("the pusher did not finish");
    assert!(status.success(), "{}", pusher.log_text());
    p.wait_ingested(files.len() as i64, TIMEOUT).await;
    p.assert_totals(&expected, "after the throttle lifted")
        .await;
    assert!(announcements(&p).values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_killed_mid_upload_loses_nothing_and_counts_each_file_once() {
    let mut p = Pipeline::new("ingest-kill").await;
    let outgoing = p.dir.join("outgoing");
    let (files, expected) = p.generate_in(&outgoing, 6, 8_000_000, 3000, 63).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    let data = p.data.clone();
    let (mut server, port) = serve(&mut p, &data, &[]).await;
    let _parser = p.spawn("parser", &p.parser_args("p1"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.envs.push(("TALLY_INGEST_TOKEN".into(), TOKEN.into()));
    let args = push_args(&format!("http://127.0.0.1:{port}"), None, &files);
    let mut pusher = p.spawn("push", &args);
    let mut next = clock_rng("serve kill");
    for _ in 0..4 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "serve did not come back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Killed while it holds part of an upload (or after 30 s, whatever it is doing).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !holds_a_part(&data.join(".tmp")) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(next() % 40)).await;
        server.kill9();
        tokio::time::sleep(Duration::from_millis(next() % 500)).await;
        // Same port, same folder: what the killed one left is resumed or announced.
        let mut args: Vec<String> = ["producer", "serve", "--listen"].map(String::from).to_vec();
        args.push(format!("127.0.0.1:{port}"));
        args.extend(["--dir".into(), data.to_str().unwrap().into()]);
        args.extend([
            "--tokens-file".into(),
            p.dir.join("tokens").to_str().unwrap().into(),
        ]);
        server = p.spawn("serve", &args);
    }
    let status = pusher
        .exit_within(TIMEOUT)
        .await
        .expect("the pusher did not finish");
    assert!(status.success(), "{}", pusher.log_text());
    p.wait_ingested(files.len() as i64, TIMEOUT).await;
    p.assert_totals(&expected, "pushes across server kills")
        .await;
    // A file announced again after a kill between its announcement and its record is summed
    // once all the same (the parsers' done set).
    let summed = p.summed_units();
    assert!(
        summed.values().all(|n| *n == 1),
        "a unit summed twice: {summed:?}"
    );
    let landed: Vec<String> = names_in(&data)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(landed.len(), files.len(), "{landed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn push_watch_clears_local_files_only_once_the_server_took_them() {
    let mut p = Pipeline::new("ingest-watch").await;
    let staging = p.dir.join("staging");
    let (files, expected) = p.generate_in(&staging, 4, 300_000, 700, 64).await;
    let outbox = p.dir.join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let archive = p.dir.join("sent");
    // The server is not there yet: nothing may be cleared.
    let port = free_port();
    p.envs.push(("TALLY_INGEST_TOKEN".into(), TOKEN.into()));
    let args: Vec<String> = [
        "producer",
        "push",
        "--to",
        &format!("http://127.0.0.1:{port}"),
        "--watch",
        outbox.to_str().unwrap(),
        "--settle-ms",
        "300",
        "--after-push",
        &format!("archive:{}", archive.display()),
    ]
    .map(String::from)
    .to_vec();
    let _pusher = p.spawn("push-watch", &args);
    for file in &files {
        let file = Path::new(file);
        std::fs::rename(file, outbox.join(file.file_name().unwrap())).unwrap();
    }
    // One more, still being written behind a lock file.
    std::fs::write(outbox.join("late.txt.lock"), b"").unwrap();
    std::fs::write(outbox.join("late.txt"), b"1 5\n2 7\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        names_in(&outbox).len(),
        6,
        "cleared before the server confirmed"
    );

    let data = p.data.clone();
    let tokens = p.dir.join("tokens");
    std::fs::write(&tokens, format!("site-a {TOKEN}\n")).unwrap();
    let serve_args: Vec<String> = [
        "producer",
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--dir",
        data.to_str().unwrap(),
        "--tokens-file",
        tokens.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let _server = p.spawn("serve", &serve_args);
    let _parser = p.spawn("parser", &p.parser_args("p1"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(4, TIMEOUT).await;
    p.assert_totals(&expected, "pushed by push --watch").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while names_in(&outbox).len() > 2 {
        assert!(Instant::now() < deadline, "outbox: {:?}", names_in(&outbox));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(names_in(&archive).len(), 4, "{:?}", names_in(&archive));
    assert!(!data.join("late.txt").exists(), "a locked file was pushed");
    // The lock goes: the last file follows.
    std::fs::remove_file(outbox.join("late.txt.lock")).unwrap();
    p.wait_ingested(5, TIMEOUT).await;
    let mut with_late = expected.clone();
    *with_late.entry(1).or_default() += 5;
    *with_late.entry(2).or_default() += 7;
    p.assert_totals(&with_late, "the unlocked file").await;
}

/// docs/operations.md: `producer watch --after-done delete` beside `serve` clears the pushed
/// files once counted; its second announcement of each is skipped by the parsers.
#[tokio::test(flavor = "multi_thread")]
async fn watch_beside_serve_clears_counted_files_without_counting_twice() {
    let mut p = Pipeline::new("ingest-lifecycle").await;
    let outgoing = p.dir.join("outgoing");
    let (files, expected) = p.generate_in(&outgoing, 3, 400_000, 900, 65).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    let data = p.data.clone();
    let (_server, port) = serve(&mut p, &data, &[]).await;
    let watch = p.watch_args(&["--after-done", "delete", "--settle-ms", "200"]);
    let _watch = p.spawn("watch", &watch);
    let _parser = p.spawn("parser", &p.parser_args("p1"));
    let _db = p.spawn("db-client", &["db-client"]);
    let args = push_args(&format!("http://127.0.0.1:{port}"), None, &files);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    p.wait_ingested(3, TIMEOUT).await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left: Vec<String> = names_in(&data)
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "not cleared: {left:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    p.assert_totals(&expected, "pushed, counted, cleared").await;
    let summed = p.summed_units();
    assert!(
        summed.values().all(|n| *n == 1),
        "a unit summed twice: {summed:?}"
    );
    // Pushed again while the record is kept: in already, nothing counted again.
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("in already\t"))
            .count(),
        3,
        "{stdout}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "pushed again after clearing")
        .await;
}
