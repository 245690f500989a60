//! What an operator sees of running stages: `--http-addr` with `/metrics`, `/livez` and
//! `/readyz`, read over plain HTTP from real processes.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{free_port, http_get, sample, wait_http, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn every_stage_serves_metrics_liveness_and_readiness() {
    let mut p = Pipeline::new("ops-http").await;
    let (paths, expected) = p.generate(3, 300_000, 2000, 9).await;
    let paths: Vec<std::path::PathBuf> = paths.iter().map(Into::into).collect();
    let lines: usize = paths
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
        .sum();

    let ports: HashMap<&str, u16> = ["watch", "parser", "aggregator", "db-client"]
        .into_iter()
        .map(|s| (s, free_port()))
        .collect();
    let with_http = |mut args: Vec<String>, stage: &str| {
        args.extend([
            "--http-addr".to_owned(),
            format!("127.0.0.1:{}", ports[stage]),
        ]);
        args
    };
    // Everything before the files: each stage must become ready on its own.
    let parser = with_http(p.parser_args("p1"), "parser");
    let aggregator = with_http(p.aggregator_args("a1"), "aggregator");
    let db_client = with_http(
        vec!["db-client".to_owned(), "--from-totals".to_owned()],
        "db-client",
    );
    let _parser = p.spawn("parser", &parser);
    let _aggregator = p.spawn("aggregator", &aggregator);
    let _db = p.spawn("db-client", &db_client);
    for stage in ["parser", "aggregator", "db-client"] {
        wait_http(ports[stage], "/readyz", TIMEOUT, |s, b| {
            s == 200 && b == "ready\n"
        })
        .await;
        let (status, _) = wait_http(ports[stage], "/livez", TIMEOUT, |_, _| true).await;
        assert_eq!(status, 200, "{stage} /livez");
        // Before any work, a scrape already sees the stage's counters (at zero).
        let (_, text) = wait_http(ports[stage], "/metrics", TIMEOUT, |_, _| true).await;
        for name in tally_core::metrics::counters(stage) {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{stage} /metrics before any work has no {name}:\n{text}"
            );
        }
    }

    // The watcher moves the generated files in; it is ready once the broker answers.
    let staging = p.dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for f in &paths {
        std::fs::rename(f, staging.join(f.file_name().unwrap())).unwrap();
    }
    let watch = with_http(p.watch_args(&["--settle-ms", "0"]), "watch");
    let _watch = p.spawn("watch", &watch);
    wait_http(ports["watch"], "/readyz", TIMEOUT, |s, _| s == 200).await;
    for f in &paths {
        std::fs::rename(staging.join(f.file_name().unwrap()), f).unwrap();
    }
    p.wait_ingested(3, TIMEOUT).await;
    p.assert_totals(&expected, "ingest with every stage serving HTTP")
        .await;

    let metrics = |stage: &'static str| {
        let port = ports[stage];
        move || async move {
            tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
                .await
                .unwrap()
                .unwrap()
                .1
        }
    };
    let watch_text = metrics("watch")().await;
    assert_eq!(
        sample(&watch_text, "tally_producer_files_announced_total", ""),
        Some(3.0),
        "{watch_text}"
    );
    let parser_text = metrics("parser")().await;
    assert_eq!(
        sample(&parser_text, "tally_parser_lines_total", ""),
        Some(lines as f64),
        "{parser_text}"
    );
    assert_eq!(
        sample(
            &parser_text,
            "tally_parser_units_total",
            "outcome=\"summed\""
        ),
        Some(3.0)
    );
    assert!(sample(
        &parser_text,
        "tally_parser_transaction_duration_seconds_count",
        ""
    )
    .is_some_and(|n| n >= 1.0));
    assert!(parser_text.contains("# TYPE tally_parser_transaction_duration_seconds histogram"));
    let aggregator_text = metrics("aggregator")().await;
    assert!(
        sample(&aggregator_text, "tally_aggregator_records_in_total", "").is_some_and(|n| n >= 3.0)
    );
    let db_text = metrics("db-client")().await;
    let rows = sample(&db_text, "tally_db_client_rows_upserted_total", "").unwrap_or(0.0);
    assert!(rows >= expected.len() as f64, "{db_text}");

    // Consumer lag per partition, from librdkafka's statistics (every 5 s); all consumed: 0.
    for stage in ["parser", "aggregator", "db-client"] {
        let name = format!("tally_{}_consumer_lag_records", stage.replace('-', "_"));
        let (_, text) = wait_http(ports[stage], "/metrics", Duration::from_secs(30), |_, b| {
            b.contains(&format!("{name}{{partition=\""))
        })
        .await;
        assert_eq!(sample(&text, &name, ""), Some(0.0), "{stage}: {text}");
    }
    // No consumer id or path in any label.
    for text in [&watch_text, &parser_text, &aggregator_text, &db_text] {
        for line in text.lines().filter(|l| l.contains('{')) {
            assert!(!line.contains("/"), "a path in a label: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_names_what_is_missing_and_liveness_stays_up() {
    let mut p = Pipeline::new("ops-ready").await;
    // A db-client whose database is down (nothing listens there): alive, not ready.
    let db_port = free_port();
    let closed_pg = format!("postgres://postgres@127.0.0.1:{}/tally", free_port());
    let db_client = p.spawn(
        "db-client",
        &[
            "db-client",
            "--database-url",
            &closed_pg,
            "--http-addr",
            &format!("127.0.0.1:{db_port}"),
        ],
    );
    let (_, reason) = wait_http(db_port, "/readyz", TIMEOUT, |s, _| s == 503).await;
    assert_eq!(reason, "PostgreSQL is not reachable\n");
    assert_eq!(http_get(db_port, "/livez").unwrap().0, 200);

    // A parser whose broker is down: alive, not ready, and says why.
    let parser_port = free_port();
    let mut args = p.parser_args("p1");
    args.extend([
        "--bootstrap-servers".to_owned(),
        format!("127.0.0.1:{}", free_port()),
        "--http-addr".to_owned(),
        format!("127.0.0.1:{parser_port}"),
    ]);
    let parser = p.spawn("parser", &args);
    let (_, reason) = wait_http(parser_port, "/readyz", TIMEOUT, |s, _| s == 503).await;
    assert_eq!(reason, "Kafka is not reachable\n");
    assert_eq!(http_get(parser_port, "/livez").unwrap().0, 200);
    drop((db_client, parser));
}

#[tokio::test(flavor = "multi_thread")]
async fn what_will_not_heal_fails_at_start_with_one_line() {
    let p = Pipeline::new("ops-failfast").await;
    let data = p.data.to_str().unwrap().to_owned();
    let no_db = p.database_url.rsplit_once('/').unwrap().0.to_owned() + "/no_such_database";
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let no_topics = format!("{}-never-made", p.prefix);
    let announced = p.data.join("announced.txt");
    std::fs::write(&announced, "a 1\n").unwrap();
    let announced = announced.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["parser", "--data-root", "/no/such/dir"],
            "is not a directory",
        ),
        (
            vec!["producer", "watch", "--dir", "/no/such/dir"],
            "/no/such/dir",
        ),
        (
            vec!["db-client", "--database-url", &no_db],
            "does not exist",
        ),
        (
            vec!["db-client", "--database-url", "mysql://root@127.0.0.1/x"],
            "not a PostgreSQL URL",
        ),
        (
            vec!["parser", "--data-root", &data, "--threads", "0"],
            "at least 1",
        ),
        (vec!["sum", "--chunk-bytes", "0", "x"], "at least 1"),
        // A pipeline whose topics were never made: the announcer must neither wait nor make
        // the topic with the broker's defaults (its metadata request names it).
        (
            vec![
                "producer",
                "--topic-prefix",
                &no_topics,
                "publish",
                &announced,
            ],
            "run `tally init` first",
        ),
        (
            vec!["producer", "--unit-bytes", "0", "publish", "x"],
            "at least 1",
        ),
        (vec!["aggregator", "--keys-max", "0"], "at least 1"),
        (vec!["aggregator", "--memory-max", "0"], "at least 1 byte"),
        (
            vec!["sum", "--memory-max", "2 parsecs", "x"],
            "unknown size unit",
        ),
        (
            vec!["parser", "--data-root", &data, "--keys-max", "0"],
            "at least 1",
        ),
        (vec!["db-client", "--batch-records-max", "0"], "at least 1"),
        // librdkafka refuses the setting: no retry can fix it.
        (
            vec!["aggregator", "-X", "compression.type=bogus"],
            "Invalid value",
        ),
        (
            vec![
                "parser",
                "--data-root",
                &data,
                "--kafka-security-protocol",
                "sasl-ssl",
            ],
            "TALLY_KAFKA_SASL_USERNAME",
        ),
        (
            vec!["db-client", "--http-addr", &taken_addr],
            "cannot listen",
        ),
    ];
    // scripts/test exports the services' SASL user and password: without them here, SASL
    // lacks its credentials.
    let no_sasl = [
        ("TALLY_KAFKA_SASL_USERNAME", ""),
        ("TALLY_KAFKA_SASL_PASSWORD", ""),
    ];
    for (args, says) in cases {
        let out = p.output(&args, &no_sasl, Duration::from_secs(30)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(
            last.contains(says),
            "{args:?}: last line `{last}` does not say `{says}`\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_flat_one_object_per_line_and_text_has_no_colours() {
    let p = Pipeline::new("ops-logs").await;
    let no_db = p.database_url.rsplit_once('/').unwrap().0.to_owned() + "/no_such_database";
    let secret_url = no_db.replace("postgres@", "postgres:s3cret-pw@") + "?password=s3cret-q";
    // Trust authentication on loopback: the password is ignored, the command logs and succeeds.
    let good_secret_url =
        p.database_url.replace("postgres@", "postgres:s3cret-pw@") + "?password=s3cret-q";
    for args in [
        vec!["init", "--database-url", &good_secret_url],
        vec!["db-client", "--database-url", &secret_url],
        vec!["db-client", "--batch-records-max", "0"],
        vec!["parser", "--data-root", "/no/such/dir"],
    ] {
        let out = p
            .output(
                &args,
                &[("TALLY_LOG_FORMAT", "json")],
                Duration::from_secs(30),
            )
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty());
        for line in stderr.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
            assert!(v.get("fields").is_none(), "not flattened: {line}");
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
        }
        assert!(
            !stderr.contains("s3cret"),
            "a password in the logs:\n{stderr}"
        );
    }
    // Text on a pipe: no colour codes; a started stage logs its fields as text.
    let out = p
        .output(
            &["parser", "--data-root", "/no/such/dir"],
            &[("TALLY_LOG_FORMAT", "text")],
            Duration::from_secs(30),
        )
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI codes on a pipe: {stderr:?}"
    );
    assert!(stderr.starts_with("tally: error:"), "{stderr}");
}
