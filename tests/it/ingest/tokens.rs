//! Tokens against `producer serve`: a tokens file that goes bad fails closed, upload ids
//! belong to their token, and one token cannot hold every slot or the disk.

use super::*;

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
        assert!(body.contains("no token is valid"), "{what}: {body}");
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
    add_site_b(&p);
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
    add_site_b(&p);
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
