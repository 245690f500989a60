//! Uploads cut by the network, or by a server killed mid-upload, resume: totals exact, each
//! file counted once, the generator's bytes and times kept.

use super::*;

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

fn holds_a_part(tmp: &Path) -> bool {
    std::fs::read_dir(tmp).is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| {
            e.file_name().to_string_lossy().ends_with(".part")
                && e.metadata().is_ok_and(|m| m.len() > 0)
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_cut_at_random_offsets_resume_over_tls_and_count_once() {
    let mut p = Pipeline::new("ingest-cut").await;
    let outgoing = p.dir.join("outgoing");
    let (files, expected) = p.generate_in(&outgoing, 4, 3_000_000, 4000, 61).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    // The generator's times travel with the files (they decide the usage period).
    for (i, file) in files.iter().enumerate() {
        crate::support::periods::set_mtime(
            file,
            crate::support::periods::OCT_31_22H + i as i64 * 3600,
        );
    }
    let (ca, cert, key) = tls_files();
    let data = p.data.clone();
    let port = free_port();
    let mut args = serve_args(
        &p,
        port,
        &data,
        &["--tls-cert-file", &cert, "--tls-key-file", &key],
    );
    // Fixed dates in the past (2026-10-31 on): no window, or the test expires 35 days on (a
    // producer option, before `serve`).
    args.splice(1..1, ["--file-time-max-age".to_owned(), "off".to_owned()]);
    let server = p.spawn("serve", &args);
    wait_listening(port, &server).await;
    let cuts = Arc::new(AtomicUsize::new(0));
    let proxy = cutting_proxy(port, cuts.clone()).await;
    let _counting = start_counting(&mut p);

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

#[tokio::test(flavor = "multi_thread")]
async fn the_server_killed_mid_upload_loses_nothing_and_counts_each_file_once() {
    let mut p = Pipeline::new("ingest-kill").await;
    let outgoing = p.dir.join("outgoing");
    let (files, expected) = p.generate_in(&outgoing, 6, 8_000_000, 3000, 63).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    let data = p.data.clone();
    let (mut server, port) = serve(&mut p, &data, &[]).await;
    let _counting = start_counting(&mut p);
    p.envs.push(("TALLY_INGEST_TOKEN".into(), TOKEN.into()));
    let args = push_args(&format!("http://127.0.0.1:{port}"), None, &files);
    let mut pusher = p.spawn("push", &args);
    let mut next = clock_rng("serve kill");
    for _ in 0..4 {
        wait_listening(port, &server).await;
        // Killed while it holds part of an upload (or after 30 s, whatever it is doing).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !holds_a_part(&data.join(".tmp")) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(next() % 40)).await;
        server.kill9();
        tokio::time::sleep(Duration::from_millis(next() % 500)).await;
        // Same port, same folder: what the killed one left is resumed or announced.
        let args = serve_args(&p, port, &data, &[]);
        server = p.spawn("serve", &args);
    }
    pusher_finishes_exact(
        &p,
        &mut pusher,
        files.len(),
        &expected,
        "pushes across server kills",
    )
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
