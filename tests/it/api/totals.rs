//! `tally api`'s totals and dead letters against PostgreSQL and Kafka, behind a read token,
//! as the OpenAPI document describes them.

use serde_json::Value;

use std::time::Duration;

use tally_testkit::proxy::FaultProxy;

use super::{conforms, get, response_schema, start_api, start_api_with, Pipeline, TIMEOUT, TOKEN};
use crate::support::free_port;

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

#[tokio::test(flavor = "multi_thread")]
async fn files_carry_their_rejection_reasons() {
    let mut p = Pipeline::new("api-rejected").await;
    // Under --bad-lines=fail a unit with a bad line is rejected.
    let mut parser_args = p.parser_args("a");
    parser_args.extend(["--bad-lines".to_owned(), "fail".to_owned()]);
    let _parser = p.spawn("parser", &parser_args);
    let _db = p.spawn("db-client", &["db-client"]);
    let good = p.data.join("good.txt");
    std::fs::write(&good, "1 1\n").unwrap();
    // One unit, rejected: the ledger never holds the file.
    let bad = p.data.join("bad.txt");
    std::fs::write(&bad, "2 2\nnot a line\n").unwrap();
    // Several units, the last rejected: counted in part.
    let part = p.data.join("part.txt");
    std::fs::write(&part, format!("{}oops\n", "3 3\n".repeat(12))).unwrap();
    let paths: Vec<&str> = [&good, &bad, &part]
        .iter()
        .map(|f| f.to_str().unwrap())
        .collect();
    p.publish("16", &paths).await;
    let (_api, port) = start_api(&mut p).await;
    let (_, doc) = get(port, "/v1/openapi.json", Some(TOKEN)).await;

    let rejected = tally_testkit::eventually(TIMEOUT, "two rejected files", || async {
        let (status, body) = get(port, "/v1/files?state=rejected", Some(TOKEN)).await;
        let files = body["files"].as_array().cloned().unwrap_or_default();
        tally_testkit::holds(status == 200 && files.len() == 2, || body.to_string())?;
        Ok(body)
    })
    .await;
    conforms(
        &doc,
        response_schema(&doc, "/v1/files", "200"),
        &rejected,
        "rejected",
    );
    let paths: Vec<&str> = rejected["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(paths.iter().any(|p| p.ends_with("bad.txt")), "{rejected}");
    assert!(paths.iter().any(|p| p.ends_with("part.txt")), "{rejected}");
    for file in rejected["files"].as_array().unwrap() {
        let reasons = file["rejections"].as_array().unwrap();
        assert_eq!(reasons.len(), 1, "{file}");
        assert!(!reasons[0]["reason"].as_str().unwrap().is_empty());
    }

    // The ledger's files carry their reasons too: none for good.txt, one for part.txt.
    tally_testkit::eventually(TIMEOUT, "good.txt and part.txt in the ledger", || async {
        let (_, body) = get(port, "/v1/files", Some(TOKEN)).await;
        conforms(
            &doc,
            response_schema(&doc, "/v1/files", "200"),
            &body,
            "files",
        );
        let files = body["files"].as_array().cloned().unwrap_or_default();
        let of = |name: &str| {
            files
                .iter()
                .find(|f| f["path"].as_str().unwrap_or_default().ends_with(name))
                .map(|f| f["rejections"].as_array().map_or(usize::MAX, Vec::len))
        };
        tally_testkit::holds(
            of("good.txt") == Some(0) && of("part.txt") == Some(1) && of("bad.txt").is_none(),
            || body.to_string(),
        )
    })
    .await;
}

/// The api's pooled PostgreSQL connections die while idle (PostgreSQL restarts, a proxy or a
/// firewall drops them): the requests after that still answer, none fails for a dead
/// connection. The api pings only a connection idle for a second or more before using it
/// (not one per request, which cost a round trip each); this holds it to that.
#[tokio::test(flavor = "multi_thread")]
async fn connections_that_died_while_idle_fail_no_request() {
    let mut p = Pipeline::new("api-cut").await;
    sqlx::query("INSERT INTO consumer_totals (consumer_id, total) VALUES (1, 42)")
        .execute(&p.pool)
        .await
        .unwrap();
    // The api reaches PostgreSQL through a proxy that can close every connection at once.
    let (head, tail) = p
        .database_url
        .rsplit_once('@')
        .expect("user@host in the URL");
    let (upstream, rest) = tail.split_once('/').expect("a database in the URL");
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = FaultProxy::start(&listen, upstream).await.unwrap();
    let url = format!("{head}@{listen}/{rest}");
    let (_api, port) = start_api_with(&mut p, &["--database-url", &url]).await;

    for round in 0..3 {
        // Requests at once, so that the pool holds several connections.
        let answers = futures_util::future::join_all(
            (0..6).map(|_| get(port, "/v1/consumers/1", Some(TOKEN))),
        )
        .await;
        for (status, body) in answers {
            assert_eq!(status, 200, "round {round}: {body}");
            assert_eq!(body["total"], 42, "{body}");
        }
        assert!(proxy.open_connections() > 0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.cut();
        // Every idle connection is dead now; each request takes one while it can.
        for i in 0..6 {
            let (status, body) = get(port, "/v1/consumers/1", Some(TOKEN)).await;
            assert_eq!(
                status, 200,
                "round {round}, request {i} after the cut: {body}"
            );
        }
    }
}

/// `tally_api_top_reads_total` on the api's `/metrics`.
async fn top_reads(port: u16) -> u64 {
    let (status, body) = tokio::task::spawn_blocking(move || {
        crate::support::http_get_with(port, "/metrics", &[]).expect("the API answers")
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(!body.contains("tally_producer_"), "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("tally_api_top_reads_total "))
        .unwrap_or_else(|| panic!("no tally_api_top_reads_total: {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// `/v1/top` answers what PostgreSQL holds when the request arrives, and a crowd of requests
/// costs PostgreSQL one read of the table at a time, not one each.
#[tokio::test(flavor = "multi_thread")]
async fn top_consumers_are_current_and_a_crowd_shares_the_reads() {
    let mut p = Pipeline::new("api-top").await;
    sqlx::query(
        "INSERT INTO consumer_totals (consumer_id, total)
         SELECT g, g % 100003 FROM generate_series(1, 1000000) g",
    )
    .execute(&p.pool)
    .await
    .unwrap();
    let (_api, port) = start_api(&mut p).await;
    assert_eq!(top_reads(port).await, 0, "exported from the start");
    let top = |n: i64| {
        let pool = p.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT consumer_id FROM consumer_totals ORDER BY total DESC, consumer_id LIMIT $1",
            )
            .bind(n)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let ids = |body: &Value| -> Vec<i64> {
        body["consumers"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"))
            .iter()
            .map(|c| c["consumer_id"].as_i64().unwrap())
            .collect()
    };
    for limit in [1i64, 5, 100] {
        let (status, body) = get(port, &format!("/v1/top?limit={limit}"), Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ids(&body), top(limit).await, "limit {limit}");
    }
    // A change committed before a request is in its answer.
    for id in [7i64, 11, 13] {
        sqlx::query(
            "UPDATE consumer_totals SET total = total + 1000000000000 WHERE consumer_id = $1",
        )
        .bind(id)
        .execute(&p.pool)
        .await
        .unwrap();
        let (_, body) = get(port, "/v1/top?limit=3", Some(TOKEN)).await;
        assert_eq!(ids(&body), top(3).await, "after consumer {id}'s change");
        assert_eq!(ids(&body)[0], id, "{body}");
    }
    // 40 requests at once: a few reads serve them all.
    let before = top_reads(port).await;
    let answers =
        futures_util::future::join_all((0..40).map(|_| get(port, "/v1/top?limit=10", Some(TOKEN))))
            .await;
    let expected = top(10).await;
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(ids(&body), expected);
    }
    let reads = top_reads(port).await - before;
    assert!(
        (1..=10).contains(&reads),
        "40 requests at once cost {reads} reads of the table"
    );
}
