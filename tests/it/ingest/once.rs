//! Once is forever: bytes counted under a name are answered "in already" whenever they come
//! again under that name, whoever sends them and however.

use super::*;

/// `sha256:<hex>` of a file, by coreutils.
fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

/// The files pushed again in three ways; each answer must be "in already".
async fn push_again(p: &Pipeline, port: u16, push: &[&str], files: &[PathBuf], label: &str) {
    // `push`: XXH3 and an upload id.
    let out = p
        .output(push, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let repeated = stdout
        .lines()
        .filter(|l| l.starts_with("in already\t"))
        .count();
    assert_eq!(repeated, files.len(), "{label}: {stdout}");
    // Another token, another checksum kind, no upload id; then no checksum at all.
    let bearer = format!("Bearer {OTHER}");
    for file in files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let body = std::fs::read(file).unwrap();
        let sum = sha256(file);
        let with_sha = [("authorization", bearer.as_str()), ("tally-checksum", &sum)];
        let code = raw(port, &put(name, &with_sha, &body), None).await;
        assert_eq!(code, 200, "{label}: {name} with SHA-256");
        let bare = [("authorization", bearer.as_str())];
        let code = raw(port, &put(name, &bare, &body), None).await;
        assert_eq!(code, 200, "{label}: {name} bare");
    }
}

/// Pushed, counted, the records expired and the folder's copies deleted: the same bytes again
/// under the same names (by `push` with its XXH3, by another token with SHA-256, without any
/// checksum or upload id, after a restart of the server) are each "in already", and nothing is
/// counted twice; other bytes under a name counted before are a new file, counted.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_counted_once_are_never_counted_again_under_their_name() {
    let mut p = Pipeline::new("ingest-once").await;
    add_site_b(&p);
    let outgoing = p.dir.join("outgoing");
    let (files, mut expected) = p.generate_in(&outgoing, 2, 200_000, 500, 71).await;
    let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
    let data = p.data.clone();
    // Finished uploads are remembered for a second only; the sweep runs every second.
    let extra = ["--completed-ttl-s", "1", "--partial-ttl-s", "2"];
    let port = free_port();
    let args = serve_args(&p, port, &data, &extra);
    add_site_b(&p);
    let mut server = p.spawn("serve", &args);
    wait_listening(port, &server).await;
    let _counting = start_counting(&mut p);
    let url = format!("http://127.0.0.1:{port}");
    let push = push_args(&url, None, &files);
    let push: Vec<&str> = push.iter().map(String::as_str).collect();
    let out = p
        .output(&push, &[("TALLY_INGEST_TOKEN", TOKEN)], TIMEOUT)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    p.wait_ingested(2, TIMEOUT).await;
    p.assert_totals(&expected, "pushed once").await;

    // The records expire; the counted copies leave the folder (as `watch --after-done
    // delete` does).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for file in &files {
        std::fs::remove_file(data.join(file.file_name().unwrap())).unwrap();
    }
    push_again(&p, port, &push, &files, "records expired, copies deleted").await;

    // A restarted server knows them from the ingested topic.
    server.kill9();
    let mut server = p.spawn("serve", &args);
    wait_listening(port, &server).await;
    push_again(&p, port, &push, &files, "after a restart").await;
    assert!(
        names_in(&data).iter().all(|n| n.starts_with('.')),
        "{:?}",
        names_in(&data)
    );

    // Other bytes under a name counted before: a new file, counted once.
    let name = files[0].file_name().unwrap().to_str().unwrap();
    let body = b"1 5\n2 7\n";
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        raw(port, &put(name, &[("authorization", &bearer)], body), None).await,
        201
    );
    *expected.entry(1).or_default() += 5;
    *expected.entry(2).or_default() += 7;
    p.wait_ingested(3, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "pushed again in every way")
        .await;
    let summed = p.summed_units();
    assert!(
        summed.values().all(|n| *n == 1),
        "a unit summed twice: {summed:?}"
    );
    let announced = announcements(&p);
    assert!(
        announced.values().all(|n| *n == 1),
        "announced twice: {announced:?}"
    );
    server.kill9();
}

/// A server's once-set load (`Ingested::load`) reads the ingested topic to its high watermark:
/// a mark in an announcement still open (another replica's, its commit not yet returned or its
/// markers on the way) is waited for, and is known once committed; an aborted one never is.
/// Read only to the last stable offset, the load would end first, and the file's bytes pushed
/// again to this server would be counted twice.
#[test]
fn a_load_waits_for_an_open_announcement_of_another_replica() {
    use rdkafka::producer::Producer;
    use tally_core::shutdown::CancellationToken;
    use tally_core::txn::producer;
    use tally_producer::ingest::once::{key, Ingested, Mark};

    let (args, topic, writer) = crate::compacted_topic_with_writer("once-load", |prefix| {
        tally_core::Topics::new(prefix).ingested
    });
    let digest = |name: &str| format!("xxh3:{:032x}", name.len());
    let mark = |name: &str| {
        let value = serde_json::to_vec(&Mark {
            name: name.to_owned(),
            digest: digest(name),
            bytes: 10,
            token: "test".to_owned(),
            announced_at: 0,
        })
        .unwrap();
        let record_key = key(name, &digest(name));
        producer::send(&writer, &topic, Some(0), Some(&record_key), &value).unwrap();
    };
    let shutdown = CancellationToken::new();
    let load = || {
        let (tx, rx) = std::sync::mpsc::channel();
        let (args, shutdown) = (args.clone(), shutdown.clone());
        std::thread::spawn(move || {
            let _ = tx.send(Ingested::load(&args, &shutdown));
        });
        rx
    };
    let knows = |ingested: &Ingested, name: &str| ingested.knows(name, &digest(name));

    writer.begin_transaction().unwrap();
    mark("first.txt");
    writer.commit_transaction(Duration::from_secs(30)).unwrap();
    writer.begin_transaction().unwrap();
    mark("open.txt");
    writer.flush(Duration::from_secs(30)).unwrap();
    let pending = load();
    assert!(
        pending.recv_timeout(Duration::from_secs(4)).is_err(),
        "the load ended while an announcement was open"
    );
    writer.commit_transaction(Duration::from_secs(30)).unwrap();
    let ingested = pending
        .recv_timeout(Duration::from_secs(30))
        .expect("the load did not end once the announcement committed")
        .unwrap();
    assert!(knows(&ingested, "first.txt"));
    assert!(
        knows(&ingested, "open.txt"),
        "a committed announcement was missed"
    );

    writer.begin_transaction().unwrap();
    mark("aborted.txt");
    writer.flush(Duration::from_secs(30)).unwrap();
    let pending = load();
    assert!(pending.recv_timeout(Duration::from_secs(2)).is_err());
    writer.abort_transaction(Duration::from_secs(30)).unwrap();
    let ingested = pending
        .recv_timeout(Duration::from_secs(30))
        .expect("the load did not end once the announcement aborted")
        .unwrap();
    assert!(
        !knows(&ingested, "aborted.txt"),
        "an aborted mark was loaded"
    );
    assert!(knows(&ingested, "open.txt"));
    shutdown.cancel();
}
