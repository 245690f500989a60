//! Uploads over time: backpressure while the parsers are stopped, `push --watch`, and the
//! files' life cycle with `producer watch` beside the server.

use super::*;

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
    // The throttle thread logs the change at its next look, after requests already saw it.
    tally_testkit::eventually(
        Duration::from_secs(30),
        "the server logs that it refuses new uploads",
        || async {
            let log = server.log_text();
            tally_testkit::holds(log.contains("refusing new uploads"), || log)
        },
    )
    .await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let http: u16 = http.parse().unwrap();
    assert_eq!(
        raw(http, get("/readyz").as_bytes(), None).await,
        503,
        "ready while throttled"
    );
    assert_eq!(raw(http, get("/metrics").as_bytes(), None).await, 200);

    let _counting = start_counting(&mut p);
    pusher_finishes_exact(
        &p,
        &mut pusher,
        files.len(),
        &expected,
        "after the throttle lifted",
    )
    .await;
    assert!(announcements(&p).values().all(|n| *n == 1));
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
    let serve_args = serve_args(&p, port, &data, &[]);
    let _server = p.spawn("serve", &serve_args);
    let _counting = start_counting(&mut p);
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
    let _counting = start_counting(&mut p);
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
