//! `tally api` beside a real pipeline: what it answers is what PostgreSQL holds (totals, usage
//! per window in a zone, every consumer's usage in pages and as CSV, the files ledger), it
//! refuses what it cannot answer exactly and says why, it answers nothing without a read
//! token, and its OpenAPI document describes its real responses.

use std::time::Duration;

use serde_json::Value;

use crate::support::{free_port, http_get_with, wait_http, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(120);
const TOKEN: &str = "read-token-0123456789abcdef";

/// `GET path` with the read token (or `token`): (status, JSON body).
async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, Value) {
    let path = path.to_owned();
    let bearer = token.map(|t| format!("Bearer {t}"));
    let (status, body) = tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        http_get_with(port, &path, &headers)
    })
    .await
    .unwrap()
    .expect("the API answers");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, json)
}

/// Checks `value` against the OpenAPI `schema` (the subset the document uses: `$ref`, `type`,
/// `oneOf`, `required`, `properties`, `additionalProperties: false`, `minimum`, `items`).
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    if let Err(why) = check(doc, schema, value, at) {
        panic!("not as documented: {why}");
    }
}

/// [`conforms`], as a result: `Err(where and why)`.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let fail = |why: String| Err(format!("{at}: {why}"));
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return check(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(choices) = schema["oneOf"].as_array() {
        let fits = choices
            .iter()
            .filter(|c| check(doc, c, value, at).is_ok())
            .count();
        return if fits == 1 {
            Ok(())
        } else {
            fail(format!("{value} fits {fits} of {schema}"))
        };
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = value.as_object() else {
                return fail(format!("{value} is no object"));
            };
            for key in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(key.as_str().unwrap_or_default()) {
                    return fail(format!("{key} missing"));
                }
            }
            for (key, field) in object {
                match schema["properties"].get(key) {
                    Some(property) => check(doc, property, field, &format!("{at}.{key}"))?,
                    None if schema["additionalProperties"] == Value::Bool(false) => {
                        return fail(format!("{key} is not in the document"));
                    }
                    None => {}
                }
            }
            Ok(())
        }
        Some("integer") if !(value.is_i64() || value.is_u64()) => {
            fail(format!("{value} is no integer"))
        }
        Some("integer") => match (schema["minimum"].as_i64(), value.as_i64()) {
            (Some(min), Some(n)) if n < min => fail(format!("{value} < {min}")),
            _ => Ok(()),
        },
        Some("string") if !value.is_string() => fail(format!("{value} is no string")),
        Some("null") if !value.is_null() => fail(format!("{value} is not null")),
        Some("boolean") if !value.is_boolean() => fail(format!("{value} is no boolean")),
        Some("string" | "null" | "boolean") => Ok(()),
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail(format!("{value} is no array"));
            };
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        other => fail(format!("schema type {other:?} not checked here")),
    }
}

/// The schema of `path`'s GET answer with `status`, from the document.
fn response_schema<'a>(doc: &'a Value, path: &str, status: &str) -> &'a Value {
    let mut response = &doc["paths"][path]["get"]["responses"][status];
    if let Some(reference) = response["$ref"].as_str() {
        response = &doc["components"]["responses"]
            [reference.trim_start_matches("#/components/responses/")];
    }
    &response["content"]["application/json"]["schema"]
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_totals_are_what_postgres_holds_and_need_a_read_token() {
    let mut p = Pipeline::new("api").await;
    let big = i64::MAX;
    let file = p.data.join("usage.txt");
    std::fs::write(
        &file,
        format!("1 5\n2 7\noops\n1 10\n7 {big}\n1 -5\n7 {big}\n"),
    )
    .unwrap();
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.publish("1048576", &[file.to_str().unwrap()]).await;
    p.wait_ingested(1, TIMEOUT).await;

    let (api, port) = start_api(&mut p).await;

    // Without a token, or with a wrong one: nothing.
    for token in [None, Some("read-token-0123456789abcdeX")] {
        let (status, body) = get(port, "/v1/consumers/1", token).await;
        assert_eq!(status, 401, "{body}");
        assert!(body["error"].is_string(), "{body}");
    }

    let (status, doc) = get(port, "/v1/openapi.json", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");

    let path = "/v1/consumers/{id}";
    for id in [1i64, 2, 7] {
        let (status, body) = get(port, &format!("/v1/consumers/{id}"), Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        conforms(&doc, response_schema(&doc, path, "200"), &body, "consumer");
        let (total, updated): (String, f64) = sqlx::query_as(
            "SELECT total::text, extract(epoch FROM updated_at)::float8 FROM consumer_totals
             WHERE consumer_id = $1",
        )
        .bind(id)
        .fetch_one(&p.pool)
        .await
        .unwrap();
        assert_eq!(body["consumer_id"], id);
        let shown = match &body["total"] {
            Value::String(s) => s.clone(),
            number => number.to_string(),
        };
        assert_eq!(shown, total, "consumer {id}");
        let at = body["updated_at"].as_str().unwrap();
        assert!(at.ends_with('Z'), "{at}");
        let parsed: f64 = sqlx::query_scalar("SELECT extract(epoch FROM $1::timestamptz)::float8")
            .bind(at)
            .fetch_one(&p.pool)
            .await
            .unwrap();
        assert!((parsed - updated).abs() < 1e-5, "{at} against {updated}");
    }
    // Past 2^53 - 1 a total is a string, digit for digit.
    let (_, body) = get(port, "/v1/consumers/7", Some(TOKEN)).await;
    assert_eq!(body["total"], "18446744073709551614");
    let (_, body) = get(port, "/v1/consumers/1", Some(TOKEN)).await;
    assert_eq!(body["total"], 15);

    for (asked, status) in [
        ("/v1/consumers/99", 404),
        ("/v1/consumers/abc", 400),
        ("/v1/consumers/-1", 400),
        ("/v1/consumers/9223372036854775808", 400),
        ("/v1/consumers/1%27%20OR%201=1", 400),
        ("/v1/nothing", 404),
    ] {
        let (got, body) = get(port, asked, Some(TOKEN)).await;
        assert_eq!(got, status, "{asked}: {body}");
        if asked.starts_with("/v1/consumers") {
            let code = status.to_string();
            conforms(&doc, response_schema(&doc, path, &code), &body, asked);
        }
    }
    // The dead letters, from Kafka, a page of one at a time: what the topic holds.
    let in_topic: Vec<Value> = p
        .read_topic(&p.topics.dead_letter)
        .iter()
        .map(|(_, payload)| serde_json::from_slice(payload).unwrap())
        .collect();
    assert_eq!(in_topic.len(), 2, "{in_topic:?}");
    let mut read = Vec::new();
    let mut cursor = String::new();
    for page in 0.. {
        let (status, body) = get(
            port,
            &format!("/v1/dead-letters?limit=1{cursor}"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        conforms(
            &doc,
            response_schema(&doc, "/v1/dead-letters", "200"),
            &body,
            "dead",
        );
        read.extend(
            body["dead_letters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["record"].clone()),
        );
        cursor = format!("&cursor={}", body["next_cursor"].as_str().unwrap());
        if body["end"] == true {
            assert_eq!(page, 2, "two pages of one, then the end: {body}");
            break;
        }
    }
    assert_eq!(read, in_topic);
    assert!(read.iter().all(|d| d["kind"] == "bad-line"), "{read:?}");
    // Coming back later with the last cursor: nothing new, still the end.
    let (_, body) = get(
        port,
        &format!("/v1/dead-letters?limit=1{cursor}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(body["dead_letters"], serde_json::json!([]), "{body}");
    let (status, _) = get(port, "/v1/dead-letters?cursor=zz", Some(TOKEN)).await;
    assert_eq!(status, 400);

    assert!(!api.log_text().contains(TOKEN), "a token in the log");
}

/// `got` equals `expected`; else the first difference, not thousands of rows.
fn same_rows(got: &[String], expected: &[String], what: &str) {
    let first = got.iter().zip(expected).position(|(g, e)| g != e);
    assert!(
        first.is_none() && got.len() == expected.len(),
        "{what}: {} rows for {}; first difference at {first:?}: {:?} for {:?}",
        got.len(),
        expected.len(),
        first.map(|i| &got[i]),
        first.map(|i| &expected[i]),
    );
}

/// Starts `tally api` on `p` with a fresh read-tokens file; returns (stage, port).
async fn start_api(p: &mut Pipeline) -> (crate::support::Stage, u16) {
    let tokens = p.dir.join("read-tokens");
    std::fs::write(&tokens, format!("# readers\nconsole {TOKEN}\n")).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = p.spawn(
        "api",
        &[
            "api",
            "--listen",
            &listen,
            "--tokens-file",
            tokens.to_str().unwrap(),
        ],
    );
    wait_http(port, "/readyz", TIMEOUT, |status, _| status == 200).await;
    (api, port)
}

/// The usage values of an answer, by window start.
fn windows(body: &Value) -> Vec<(String, i64)> {
    body["usage"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|w| {
            (
                w["window_start"].as_str().unwrap().to_owned(),
                w["usage"].as_i64().unwrap(),
            )
        })
        .collect()
}

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
    let mut paged = Vec::new();
    let mut next = String::new();
    let mut pages = 0;
    loop {
        let asked = format!("/v1/usage?{range}&limit=1000{next}");
        let (status, body) = get(port, &asked, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        conforms(
            &doc,
            response_schema(&doc, "/v1/usage", "200"),
            &body,
            "page",
        );
        pages += 1;
        for row in body["rows"].as_array().unwrap() {
            paged.push(format!(
                "{},{},{}",
                row["consumer_id"],
                row["window_start"].as_str().unwrap(),
                row["usage"]
            ));
        }
        match body["next_cursor"].as_str() {
            Some(cursor) => next = format!("&cursor={cursor}"),
            None => break,
        }
    }
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
    let mut listed = Vec::new();
    let mut next = String::new();
    loop {
        let (status, body) = get(port, &format!("/v1/files?limit=3{next}"), Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        conforms(
            &doc,
            response_schema(&doc, "/v1/files", "200"),
            &body,
            "files",
        );
        listed.extend(body["files"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(cursor) => next = format!("&cursor={cursor}"),
            None => break,
        }
    }
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
