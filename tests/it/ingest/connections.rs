//! Hostile connections against `producer serve` with its open-file limit at 1024: 2,000 silent
//! sockets do not keep a legitimate push from finishing in its normal time, every slot is
//! freed once they close, silent and slow connections are cut at their phase's timeout, and
//! HTTP/2 is refused.

use super::*;

/// Raises this test process's own open-file limit (2,000 sockets of its own).
fn raise_own_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// Open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Pushes `files`; how long it took.
async fn timed_push(p: &Pipeline, port: u16, files: &[PathBuf]) -> Duration {
    let args = push_args(&format!("http://127.0.0.1:{port}"), None, files);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = p
        .output(&args, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_silent_connections_do_not_stop_a_push() {
    raise_own_nofile();
    let mut p = Pipeline::new("ingest-connections").await;
    let dir = p.dir.join("incoming");
    let port = free_port();
    // Long phase timeouts: what lets the push through here is the limit and its eviction
    // rule, not the silent sockets timing out.
    let args = serve_args(&p, port, &dir, &["--request-timeout-ms", "120000"]);
    let server = p.spawn_with_nofile("serve", 1024, &args);
    wait_listening(port, &server).await;
    let pid = server.child.id();
    let outgoing = p.dir.join("outgoing");
    let (files, _) = p.generate_in(&outgoing, 4, 2_000_000, 500, 77).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();

    // The normal time, on a quiet server.
    let normal = timed_push(&p, port, &files[..2]).await;
    let quiet_fds = fds(pid);

    // 2,000 connections that never send a byte, held open.
    let mut hostile = Vec::new();
    for _ in 0..2000 {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            hostile.push(stream);
        }
    }
    assert_eq!(hostile.len(), 2000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fds(pid) < 1024,
        "the server holds {} descriptors with 2,000 connections open",
        fds(pid)
    );
    let loaded = timed_push(&p, port, &files[2..]).await;
    assert!(
        loaded <= normal * 3 + Duration::from_secs(2),
        "a push took {loaded:?} beside 2,000 silent connections, {normal:?} without"
    );
    let log = server.log_text();
    assert!(!log.contains("Too many open files"), "{log}");

    // They go away: every slot is freed.
    drop(hostile);
    tally_testkit::eventually(Duration::from_secs(10), "descriptors back", || async {
        let now = fds(pid);
        tally_testkit::holds(now <= quiet_fds + 8, || {
            format!("{now} descriptors open, {quiet_fds} before the connections")
        })
    })
    .await;
    assert_eq!(announcements(&p).len(), 4);
    eprintln!(
        "push of 2 files: {normal:?} on a quiet server, {loaded:?} beside 2,000 silent connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_slow_and_http2_connections_are_cut() {
    let mut p = Pipeline::new("ingest-phases").await;
    let dir = p.dir.join("incoming");
    let (_server, port) = serve(
        &mut p,
        &dir,
        &["--request-timeout-ms", "1000", "--idle-timeout-ms", "1500"],
    )
    .await;
    // Reads until the server closes; how long that took, and what it said.
    async fn until_closed(mut stream: TcpStream) -> (Duration, String) {
        let started = Instant::now();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut got)).await;
        (
            started.elapsed(),
            String::from_utf8_lossy(&got).into_owned(),
        )
    }
    let within = |took: Duration, limit: Duration| took >= limit / 2 && took < limit * 3;

    // Never a byte: cut at the request timeout.
    let silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (took, _) = until_closed(silent).await;
    assert!(
        within(took, Duration::from_millis(1000)),
        "silent: {took:?}"
    );

    // Headers trickling in, one byte every 300 ms: cut at the request timeout too.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        for b in b"GET /v1/throttle HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        started.elapsed()
    });
    let took = trickle.await.unwrap();
    assert!(
        took < Duration::from_secs(5),
        "slow headers held for {took:?}"
    );

    // Kept alive after a request, then silent: cut at the idle timeout.
    let mut kept = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    kept.write_all(b"GET /v1/throttle HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (took, said) = until_closed(kept).await;
    assert!(said.starts_with("HTTP/1.1 "), "{said}");
    assert!(
        within(took, Duration::from_millis(1500)),
        "idle keep-alive: {took:?}"
    );

    // HTTP/2 with prior knowledge: not spoken.
    let mut h2 = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (took, said) = until_closed(h2).await;
    assert!(
        !said.as_bytes().starts_with(&[0, 0]) && took < Duration::from_secs(5),
        "HTTP/2 answered: {said:?} after {took:?}"
    );
}
