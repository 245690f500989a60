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

/// Revocation fails closed: a tokens file that is malformed, empty or gone leaves no token
/// valid (after one more read a moment later), and `/readyz` says why; a good file again lets
/// its holders back in.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_or_missing_tokens_file_leaves_no_token_valid() {
    let mut p = Pipeline::new("ingest-revoke").await;
    let dir = p.dir.join("incoming");
    let http = free_port();
    let http_addr = format!("127.0.0.1:{http}");
    let (server, port) = serve(&mut p, &dir, &["--http-addr", &http_addr]).await;
    let head = format!(
        "HEAD /v1/uploads/no-such-upload HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         authorization: Bearer {TOKEN}\r\n\r\n"
    );
    let status = || raw(port, head.as_bytes(), None);
    let readyz = || async {
        tokio::task::spawn_blocking(move || crate::support::http_get(http, "/readyz"))
            .await
            .unwrap()
            .unwrap_or_default()
    };
    assert_eq!(status().await, 404, "a valid token reaches the store");
    crate::support::wait_http(http, "/readyz", TIMEOUT, |s, _| s == 200).await;

    let tokens = p.dir.join("tokens");
    let good = std::fs::read_to_string(&tokens).unwrap();
    let replace = |text: &str| {
        let next = p.dir.join("tokens.new");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &tokens).unwrap();
    };
    let bad: [(&str, Option<&str>); 4] = [
        ("malformed", Some(&format!("{good}one malformed line\n"))),
        ("empty", Some("")),
        ("comments only", Some("# nobody\n")),
        ("deleted", None),
    ];
    for (what, text) in bad {
        match text {
            Some(text) => replace(text),
            None => std::fs::remove_file(&tokens).unwrap(),
        }
        tally_testkit::eventually(Duration::from_secs(5), what, || async {
            let code = status().await;
            tally_testkit::holds(code == 401, || format!("{what}: the old token got {code}"))
        })
        .await;
        let (code, body) = readyz().await;
        assert_eq!(code, 503, "{what}: /readyz {body}");
        assert!(body.contains("no upload token is valid"), "{what}: {body}");
        // A good file again: the token is back, and so is readiness.
        replace(&good);
        tally_testkit::eventually(Duration::from_secs(5), "the token back", || async {
            let code = status().await;
            tally_testkit::holds(code == 404, || format!("after {what}: {code}"))
        })
        .await;
        crate::support::wait_http(http, "/readyz", TIMEOUT, |s, _| s == 200).await;
    }
    assert!(server.log_text().contains("NO TOKEN IS VALID"));
}

/// Upload ids belong to their token: another token neither sees (HEAD), continues, nor
/// pre-empts (pre-creates) an upload of the same id; each token's upload of an id is its own.
#[tokio::test(flavor = "multi_thread")]
async fn upload_ids_are_scoped_to_their_token() {
    let mut p = Pipeline::new("ingest-scoped").await;
    let dir = p.dir.join("incoming");
    let (_server, port) = serve(&mut p, &dir, &[]).await;
    const OTHER: &str = "site-b-fedcba9876543210";
    let tokens = p.dir.join("tokens");
    let next = p.dir.join("tokens.new");
    std::fs::write(&next, format!("site-a {TOKEN}\nsite-b {OTHER}\n")).unwrap();
    std::fs::rename(&next, &tokens).unwrap();
    let bearer = |t: &str| format!("Bearer {t}");
    let head = |token: &str, id: &str| {
        format!(
            "HEAD /v1/uploads/{id} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             authorization: Bearer {token}\r\n\r\n"
        )
    };
    let slice = |token: &str, id: &str, name: &str, range: &str, body: &[u8]| {
        let auth = bearer(token);
        put(
            name,
            &[
                ("authorization", auth.as_str()),
                ("tally-upload-id", id),
                ("content-range", range),
            ],
            body,
        )
    };
    // Wait until site-b's token is in.
    tally_testkit::eventually(Duration::from_secs(5), "site-b's token", || async {
        let code = raw(port, head(OTHER, "nothing-yet").as_bytes(), None).await;
        tally_testkit::holds(code == 404, || format!("{code}"))
    })
    .await;

    // site-a holds half of upload `shared-id-1`.
    let a_body = b"1 1\n2 2\n3 3\n4 4\n5 5\n";
    let code = raw(
        port,
        &slice(TOKEN, "shared-id-1", "a.dat", "bytes 0-9/20", &a_body[..10]),
        None,
    )
    .await;
    assert_eq!(code, 202);
    // site-b does not see it, and cannot continue it: its own upload of that id is empty.
    assert_eq!(
        raw(port, head(OTHER, "shared-id-1").as_bytes(), None).await,
        404
    );
    let code = raw(
        port,
        &slice(
            OTHER,
            "shared-id-1",
            "a.dat",
            "bytes 10-19/20",
            b"9 9\n9 9\n9\n",
        ),
        None,
    )
    .await;
    assert_eq!(code, 409, "another token continued site-a's upload");
    // site-a's upload is untouched, and finishes with its own bytes.
    assert_eq!(
        raw(port, head(TOKEN, "shared-id-1").as_bytes(), None).await,
        200
    );
    let code = raw(
        port,
        &slice(
            TOKEN,
            "shared-id-1",
            "a.dat",
            "bytes 10-19/20",
            &a_body[10..],
        ),
        None,
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(std::fs::read(dir.join("a.dat")).unwrap(), a_body);

    // site-b pre-creates an id site-a will use, with other bytes and another name: site-a's
    // upload of that id is its own and goes through.
    let code = raw(
        port,
        &slice(OTHER, "guessable-id", "b.dat", "bytes 0-3/8", b"7 7\n"),
        None,
    )
    .await;
    assert_eq!(code, 202);
    let code = raw(
        port,
        &slice(TOKEN, "guessable-id", "c.dat", "bytes 0-7/8", b"6 6\n8 8\n"),
        None,
    )
    .await;
    assert_eq!(code, 201, "a pre-created id blocked another token's upload");
    assert_eq!(std::fs::read(dir.join("c.dat")).unwrap(), b"6 6\n8 8\n");
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

/// One token cannot take every slot or the disk: per-token uploads at once, bytes held in
/// unfinished uploads, and a minimum rate that cuts a trickle; another token's upload goes
/// through meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn one_token_cannot_hold_every_slot_or_the_disk() {
    let mut p = Pipeline::new("ingest-quotas").await;
    let dir = p.dir.join("incoming");
    let (_server, port) = serve(
        &mut p,
        &dir,
        &[
            "--max-uploads",
            "4",
            "--max-uploads-per-token",
            "2",
            "--max-partial-bytes-per-token",
            "1000",
            "--idle-timeout-ms",
            "1000",
            "--min-rate",
            "1000",
        ],
    )
    .await;
    const OTHER: &str = "site-b-fedcba9876543210";
    let next = p.dir.join("tokens.new");
    std::fs::write(&next, format!("site-a {TOKEN}\nsite-b {OTHER}\n")).unwrap();
    std::fs::rename(&next, p.dir.join("tokens")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let auth_a = format!("Bearer {TOKEN}");
    let auth_b = format!("Bearer {OTHER}");

    // site-a trickles two uploads: a byte every 200 ms.
    let trickle = |name: &'static str| {
        let auth = auth_a.clone();
        tokio::spawn(async move {
            let head = format!(
                "PUT /v1/files/{name} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
                 content-length: 100\r\nauthorization: {auth}\r\n\r\n"
            );
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let started = Instant::now();
            let mut response = Vec::new();
            for _ in 0..100 {
                if stream.write_all(b"7").await.is_err() {
                    break;
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        response.extend_from_slice(&buf[..n]);
                        break;
                    }
                    Err(_) => {}
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
                .await;
            (
                started.elapsed(),
                String::from_utf8_lossy(&response).into_owned(),
            )
        })
    };
    let slow = [trickle("slow-1.dat"), trickle("slow-2.dat")];
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A third upload of site-a waits (429); site-b's goes through.
    let code = raw(
        port,
        &put(
            "a-third.dat",
            &[("authorization", auth_a.as_str())],
            b"1 1\n",
        ),
        None,
    )
    .await;
    assert_eq!(code, 429, "a third upload of one token");
    let code = raw(
        port,
        &put("b.dat", &[("authorization", auth_b.as_str())], b"2 2\n"),
        None,
    )
    .await;
    assert_eq!(code, 201, "another token's upload beside the trickles");

    // The trickles are cut by the minimum rate, soon after the idle timeout.
    for handle in slow {
        let (took, said) = handle.await.unwrap();
        assert!(said.starts_with("HTTP/1.1 408"), "{said}");
        assert!(took < Duration::from_secs(4), "a trickle lasted {took:?}");
    }

    // Bytes held in unfinished uploads: site-a holds 900 of its 1000, so 200 more are refused;
    // site-b's are its own.
    let body = vec![b'8'; 900];
    let request = put(
        "held.dat",
        &[
            ("authorization", auth_a.as_str()),
            ("tally-upload-id", "held-upload-1"),
            ("content-range", "bytes 0-899/5000"),
        ],
        &body,
    );
    assert_eq!(raw(port, &request, None).await, 202);
    let request = put(
        "more.dat",
        &[("authorization", auth_a.as_str())],
        &[b'9'; 200],
    );
    assert_eq!(
        raw(port, &request, None).await,
        429,
        "past the token's quota"
    );
    let request = put(
        "b-more.dat",
        &[("authorization", auth_b.as_str())],
        b"3 3\n4 4\n",
    );
    assert_eq!(raw(port, &request, None).await, 201);
}
