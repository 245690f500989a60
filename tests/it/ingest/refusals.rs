//! What the server refuses, with which status, and that nothing is left behind.

use super::*;

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
    let chunked = put_chunked("chunked.dat", &[ok[0]]);
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
    tally_testkit::eventually(Duration::from_secs(60), "nothing left in .tmp", || async {
        let left = names_in(&data.join(".tmp"));
        tally_testkit::holds(left.is_empty(), || {
            format!("{left:?}\n{}", server.log_text())
        })
    })
    .await;
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
    let chunked = put_chunked(
        "chunked.dat",
        &[
            ("authorization", &auth),
            ("tally-upload-id", "full-disk-upload"),
        ],
    );
    assert_eq!(raw(port, &chunked, None).await, 507);
    assert_eq!(names_in(&small), vec![".tmp".to_owned()]);
    assert!(
        names_in(&small.join(".tmp")).is_empty(),
        "{:?}",
        names_in(&small.join(".tmp"))
    );
    assert!(announcements(&p).is_empty());
}

/// A pushed `Tally-File-Time` outside the window is a 400 before any byte is taken; one inside
/// is taken.
#[tokio::test(flavor = "multi_thread")]
async fn file_times_outside_the_window_are_refused_before_any_byte() {
    let mut p = Pipeline::new("ingest-file-time").await;
    let dir = p.dir.join("incoming");
    let (_server, port) = serve(&mut p, &dir, &[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let auth = format!("Bearer {TOKEN}");
    for (name, time, want) in [
        ("old.dat", now - 36 * 86_400, 400),
        ("ahead.dat", now + 2 * 3600, 400),
        ("ancient.dat", -2_000_000_000, 400),
        ("far.dat", 253_402_300_000, 400),
        ("fine.dat", now - 3 * 86_400, 201),
    ] {
        let time = time.to_string();
        let request = put(
            name,
            &[("authorization", auth.as_str()), ("tally-file-time", &time)],
            b"1 1\n",
        );
        assert_eq!(raw(port, &request, None).await, want, "{name} at {time}");
        assert_eq!(dir.join(name).exists(), want == 201, "{name}");
    }
    assert_eq!(announcements(&p).len(), 1);
}
