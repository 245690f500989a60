//! `tally api`'s usage per window in a zone (or a refusal that says why), every consumer's
//! usage in pages and as CSV, and the files ledger in pages, against PostgreSQL.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::{
    all_pages, conforms, get, http_get_with, response_schema, same_rows, start_api, start_api_with,
    windows, Pipeline, TIMEOUT, TOKEN,
};

/// Windows cut in the zone asked for or refused with why; every consumer in pages and as
/// CSV; the files ledger in pages.
#[tokio::test(flavor = "multi_thread")]
async fn usage_per_window_pages_csv_and_files_are_what_postgres_holds() {
    use crate::support::periods::set_mtime;
    let mut p = Pipeline::new("api-usage").await;
    // 2026-11-01T00:00Z; Berlin is at +01:00 all month.
    let day = 1_793_491_200;
    let files = [
        ("a.txt", day + 22 * 3600 + 1800, "1 5\n"), // Berlin Nov 1, 23:30
        ("b.txt", day + 23 * 3600 + 600, "1 7\n"),  // Berlin Nov 2, 00:10
        ("c.txt", day + 34 * 3600, "1 11\n2 3\n"),  // Berlin Nov 2, 11:00
    ];
    let many: String = (100..5100).map(|id| format!("{id} 2\n")).collect();
    // Consumer 3 in the two hours Berlin calls 02:00 (the fall-back of 2026-10-25).
    let fall_back = 1_792_886_400; // 2026-10-25T00:00Z, 02:00 CEST
    let extra = [
        ("d.txt", day + 34 * 3600, many.as_str()),
        ("e.txt", fall_back + 1800, "3 1\n"),
        ("f.txt", fall_back + 3600 + 1800, "3 2\n"),
    ];
    let mut paths = Vec::new();
    for (name, time, text) in files.into_iter().chain(extra) {
        let path = p.data.join(name);
        std::fs::write(&path, text).unwrap();
        set_mtime(&path, time);
        paths.push(path.to_str().unwrap().to_owned());
    }
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.publish("1048576", &paths).await;
    p.wait_ingested(6, TIMEOUT).await;
    let (_api, port) = start_api(&mut p).await;
    let ask = |query: &str| format!("/v1/consumers/1/usage?{query}");

    let (status, body) = get(
        port,
        &ask("from=2026-11-01T00:00:00%2B01:00&to=2026-11-03T00:00:00%2B01:00&window=day&tz=Europe/Berlin"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        windows(&body),
        [
            ("2026-11-01T00:00:00+01:00".to_owned(), 5),
            ("2026-11-02T00:00:00+01:00".to_owned(), 18)
        ]
    );
    assert_eq!(body["usage"][1]["window_end"], "2026-11-03T00:00:00+01:00");
    let (_, doc) = get(port, "/v1/openapi.json", Some(TOKEN)).await;
    let path = "/v1/consumers/{id}/usage";
    conforms(&doc, response_schema(&doc, path, "200"), &body, "usage");
    assert_eq!(body["consumer_id"], 1);

    let (_, body) = get(
        port,
        &ask("from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z&window=day"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        windows(&body),
        [
            ("2026-11-01T00:00:00Z".to_owned(), 12),
            ("2026-11-02T00:00:00Z".to_owned(), 11)
        ]
    );
    // Hours, over a range that starts mid-day: windows with nothing are there, as 0.
    let (_, body) = get(
        port,
        &ask("from=2026-11-01T21:00:00Z&to=2026-11-02T00:00:00Z&window=hour&tz=UTC"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        windows(&body),
        [
            ("2026-11-01T21:00:00Z".to_owned(), 0),
            ("2026-11-01T22:00:00Z".to_owned(), 5),
            ("2026-11-01T23:00:00Z".to_owned(), 7)
        ]
    );
    // Berlin's repeated hour is two windows, in a consumer's usage and in everyone's.
    let hours = "from=2026-10-25T00:00:00Z&to=2026-10-25T02:00:00Z&window=hour&tz=Europe/Berlin";
    let (_, body) = get(port, &format!("/v1/consumers/3/usage?{hours}"), Some(TOKEN)).await;
    let twice = [
        ("2026-10-25T02:00:00+02:00".to_owned(), 1),
        ("2026-10-25T02:00:00+01:00".to_owned(), 2),
    ];
    assert_eq!(windows(&body), twice, "{body}");
    let (_, body) = get(port, &format!("/v1/usage?{hours}"), Some(TOKEN)).await;
    let rows: Vec<(String, i64)> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["window_start"].as_str().unwrap().to_owned(),
                r["usage"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, twice, "{body}");
    // The whole range adds up to what PostgreSQL holds for the consumer.
    let (_, body) = get(
        port,
        &ask("from=2026-10-01T00:00:00Z&to=2026-12-01T00:00:00Z&window=month"),
        Some(TOKEN),
    )
    .await;
    let stored: String = sqlx::query_scalar(
        "SELECT sum(total)::text FROM consumer_period_totals WHERE consumer_id = 1",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();
    let months = windows(&body);
    assert_eq!(
        months.iter().map(|(_, u)| u).sum::<i64>().to_string(),
        stored
    );
    assert_eq!(months[1], ("2026-11-01T00:00:00Z".to_owned(), 23));

    // Refused, with why: a zone whose hours or days start inside the stored hours, a window
    // finer than the period, a zone nobody knows, a range off the period grid.
    for (query, why) in [
        (
            "from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&window=hour&tz=Asia/Kolkata",
            "inside stored periods",
        ),
        (
            "from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z&window=day&tz=Asia/Kolkata",
            "inside stored periods",
        ),
        (
            "from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&tz=Mars/Olympus",
            "unknown time zone",
        ),
        (
            "from=2026-11-01T00:30:00Z&to=2026-11-02T00:00:00Z",
            "boundary",
        ),
        (
            "from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&window=week",
            "hour, day or month",
        ),
        ("to=2026-11-02T00:00:00Z", "from is needed"),
    ] {
        let (status, body) = get(port, &ask(query), Some(TOKEN)).await;
        assert_eq!(status, 400, "{query}: {body}");
        conforms(&doc, response_schema(&doc, path, "400"), &body, query);
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(why), "{query}: {error}");
    }
    let (status, _) = get(
        port,
        &ask("from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z"),
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Every consumer, per UTC day: paged JSON and the CSV export hold the same rows.
    let mut expected = vec![
        "1,2026-11-01T00:00:00Z,12".to_owned(),
        "1,2026-11-02T00:00:00Z,11".to_owned(),
        "2,2026-11-02T00:00:00Z,3".to_owned(),
    ];
    expected.extend((100..5100).map(|id| format!("{id},2026-11-02T00:00:00Z,2")));
    let range = "from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z&window=day";
    let (rows, pages) = all_pages(
        port,
        &doc,
        "/v1/usage",
        &format!("{range}&limit=1000"),
        "rows",
    )
    .await;
    let paged: Vec<String> = rows
        .iter()
        .map(|row| {
            format!(
                "{},{},{}",
                row["consumer_id"],
                row["window_start"].as_str().unwrap(),
                row["usage"]
            )
        })
        .collect();
    assert_eq!(pages, 6, "5003 rows in pages of 1000");
    same_rows(&paged, &expected, "pages");
    let bearer = format!("Bearer {TOKEN}");
    let asked = format!("/v1/usage?{range}");
    let (status, csv) = tokio::task::spawn_blocking(move || {
        let headers = [("Authorization", bearer.as_str()), ("Accept", "text/csv")];
        http_get_with(port, &asked, &headers)
    })
    .await
    .unwrap()
    .expect("the export ends with its last chunk");
    assert_eq!(status, 200, "{csv}");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("consumer_id,window_start,usage"));
    same_rows(
        &lines.map(str::to_owned).collect::<Vec<_>>(),
        &expected,
        "CSV",
    );
    for (query, why) in [
        (format!("{range}&cursor=abc"), "bad cursor"),
        (format!("{range}&limit=0"), "limit"),
        (format!("{range}&limit=10001"), "limit"),
        (
            "from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&window=hour&tz=Asia/Kolkata".into(),
            "inside stored periods",
        ),
    ] {
        let (status, body) = get(port, &format!("/v1/usage?{query}"), Some(TOKEN)).await;
        assert_eq!(status, 400, "{query}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(why), "{query}: {error}");
    }

    // The files ledger, newest first, in pages: what ingested_files holds.
    let (listed, _) = all_pages(port, &doc, "/v1/files", "limit=3", "files").await;
    let ledger: Vec<(String, i64, i64, bool)> = sqlx::query_as(
        "SELECT file_id, lines, bytes, complete FROM ingested_files
         ORDER BY first_ingested_at DESC, file_id DESC",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert_eq!(listed.len(), 6);
    for (file, (id, lines, bytes, complete)) in listed.iter().zip(&ledger) {
        assert_eq!(file["file_id"], id.as_str());
        assert_eq!(file["lines"], *lines);
        assert_eq!(file["bytes_counted"], *bytes);
        assert_eq!(
            file["state"],
            if *complete { "complete" } else { "in-progress" }
        );
    }
    let (_, body) = get(port, "/v1/files?state=in-progress", Some(TOKEN)).await;
    assert_eq!(body["files"], serde_json::json!([]), "{body}");
    for query in ["state=done", "limit=0", "cursor=x"] {
        let (status, body) = get(port, &format!("/v1/files?{query}"), Some(TOKEN)).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
}

/// `GET /v1/usage` as CSV with the read token: (status, body), `None` if the body is cut short.
async fn export(port: u16, query: &str) -> Option<(u16, String)> {
    let path = format!("/v1/usage?{query}");
    tokio::task::spawn_blocking(move || {
        let bearer = format!("Bearer {TOKEN}");
        let headers = [("Authorization", bearer.as_str()), ("Accept", "text/csv")];
        http_get_with(port, &path, &headers)
    })
    .await
    .unwrap()
}

/// A CSV export holds a database connection for its whole length: a replica runs at most half
/// its connections' worth at once (one more is a 503 that says why), the other requests keep
/// theirs meanwhile, and a client that stops reading is disconnected after the idle timeout,
/// which ends its export and frees its connection for the next.
#[tokio::test(flavor = "multi_thread")]
async fn exports_are_bounded_and_a_reader_that_stops_is_let_go() {
    let mut p = Pipeline::new("api-export-stall").await;
    let hour = 1_793_491_200; // 2026-11-01T00:00Z
    tally_db_client::copy::ensure_partitions(&p.pool, &[hour])
        .await
        .unwrap();
    // About 14 MB of CSV: more than the socket buffers between the api and a client hold.
    let rows = 400_000;
    sqlx::query(
        "INSERT INTO consumer_period_history (consumer_id, period_start, total)
         SELECT g, to_timestamp($1), g FROM generate_series(1, $2) g",
    )
    .bind(hour as f64)
    .bind(rows)
    .execute(&p.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO consumer_totals (consumer_id, total) VALUES (7, 7)")
        .execute(&p.pool)
        .await
        .unwrap();
    let idle = Duration::from_secs(3);
    let idle_ms = idle.as_millis().to_string();
    let extra = ["--database-connections", "2", "--idle-timeout-ms", &idle_ms];
    let (_api, port) = start_api_with(&mut p, &extra).await;
    let query = "from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&window=hour";

    // A reader that takes the response's first bytes and then nothing.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stalled,
        "GET /v1/usage?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
         Accept: text/csv\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 1024];
    let n = stalled.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let stalled_at = Instant::now();

    // Its export runs (or waits on it): a second one is refused, a total still answers.
    let (status, body) = export(port, query).await.expect("a whole answer");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("CSV exports"), "{body}");
    let (status, body) = get(port, "/v1/consumers/7", Some(TOKEN)).await;
    assert_eq!(
        (status, &body["total"]),
        (200, &serde_json::json!(7)),
        "{body}"
    );

    // Once the idle timeout has passed with nothing taken, the reader is let go and the next
    // export runs whole.
    let csv = loop {
        assert!(
            stalled_at.elapsed() < idle + Duration::from_secs(20),
            "the stalled export still holds its connection"
        );
        match export(port, query).await {
            Some((200, csv)) => break csv,
            Some((503, _)) => tokio::time::sleep(Duration::from_millis(250)).await,
            other => panic!("{other:?}"),
        }
    };
    assert!(
        stalled_at.elapsed() >= idle,
        "let go before its idle timeout"
    );
    assert_eq!(csv.lines().count(), rows as usize + 1);
    assert_eq!(csv.lines().nth(7), Some("7,2026-11-01T00:00:00Z,7"));

    // The stalled reader's body ends short: no last chunk, so it cannot pass for a whole export.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        rest.len() < 13_000_000,
        "{} bytes after the stall",
        rest.len()
    );
    assert!(!rest.ends_with(b"\r\n0\r\n\r\n"), "a complete-looking body");
}

/// Usage kept in both places (period rows, and consumers' current periods on their totals
/// rows, migration `20261206000001_current_period.sql`), interleaved by consumer: every page
/// of `GET /v1/usage` and the CSV export give each consumer's usage once, summed where a
/// (consumer, period) is in both, however the pages fall; an old range, which no current
/// period is in, pages through the period rows alone.
#[tokio::test(flavor = "multi_thread")]
async fn usage_in_period_rows_and_current_periods_pages_once_each() {
    let mut p = Pipeline::new("api-usage-both").await;
    let hour = 1_793_491_200; // 2026-11-01T00:00Z
    tally_db_client::copy::ensure_partitions(&p.pool, &[hour])
        .await
        .unwrap();
    // Ids 1..=60: multiples of 3 in period rows only, others ≡ 1 on their row only, others
    // ≡ 2 in both (2 on the row, 1 in a period row); ids from 40 on have their current period
    // an hour later (out of the first hour's range).
    sqlx::query(
        "INSERT INTO consumer_period_totals (consumer_id, period_start, total)
         SELECT g, to_timestamp($1), 1 FROM generate_series(1, 60) g WHERE g % 3 <> 1",
    )
    .bind(hour as f64)
    .execute(&p.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO consumer_totals (consumer_id, total, period_start, period_total)
         SELECT g, 3, CASE WHEN g < 40 THEN to_timestamp($1) ELSE to_timestamp($1 + 3600) END, 2
         FROM generate_series(1, 60) g WHERE g % 3 <> 0",
    )
    .bind(hour as f64)
    .execute(&p.pool)
    .await
    .unwrap();
    let (_api, port) = start_api(&mut p).await;
    let (_, doc) = get(port, "/v1/openapi.json", Some(TOKEN)).await;
    let expected = |range_hour: i64| -> Vec<(i64, i64)> {
        (1..=60)
            .filter_map(|g: i64| {
                let row = if g % 3 == 1 { 0 } else { 1 };
                let current_hour = if g < 40 { hour } else { hour + 3600 };
                let current = if g % 3 != 0 && current_hour == range_hour {
                    2
                } else {
                    0
                };
                let here = if range_hour == hour { row } else { 0 } + current;
                (here > 0).then_some((g, here))
            })
            .collect()
    };
    let stamp = |at: i64| format!("2026-11-01T{:02}:00:00Z", (at - hour) / 3600);
    for (at, limit) in [(hour, 4), (hour, 7), (hour + 3600, 5), (hour, 1000)] {
        let (from, to) = (stamp(at), stamp(at + 3600));
        let query = format!("from={from}&to={to}&window=hour&limit={limit}");
        let (rows, pages) = all_pages(port, &doc, "/v1/usage", &query, "rows").await;
        let got: Vec<(i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r["consumer_id"].as_i64().unwrap(),
                    r["usage"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, expected(at), "{query} ({pages} pages)");
        let csv = export(port, &query).await.unwrap().1;
        let lines: Vec<(i64, i64)> = csv
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        assert_eq!(lines, expected(at), "CSV of {query}");
    }
}
