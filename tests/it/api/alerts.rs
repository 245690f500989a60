//! Threshold alerts beside a real pipeline, to a receiver that fails, answers too slowly and
//! goes away for a while, with the sending replica killed half-way: every crossing reaches the
//! receiver under exactly one idempotency key, signed, a rule for all consumers in grouped
//! requests, nothing for a window already crossed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tally_api::alerts::rules::signature;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{start_api_with, Pipeline, TIMEOUT};
use crate::support::free_port;

const SECRET: &str = "webhook-secret-0123456789";

/// One request the receiver took: its idempotency key, body, and whether its signature held.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    body: Value,
    signed: bool,
}

/// A webhook receiver on `port` that fails the first two requests (500), holds the third
/// past the sender's timeout (and keeps it: the answer is what gets lost), then goes away for
/// 3 s after the fourth, then answers 200.
fn receiver(port: u16) -> Arc<Mutex<Vec<Received>>> {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let seen = got.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                n += 1;
                let this = n;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(socket);
                    let (mut key, mut sig, mut length) = (String::new(), String::new(), 0);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line.split_once(':').unwrap_or((line, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "idempotency-key" => key = value.trim().to_owned(),
                            "x-tally-signature" => sig = value.trim().to_owned(),
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let body = String::from_utf8(body).unwrap();
                    let at: u64 = sig
                        .strip_prefix("t=")
                        .and_then(|s| s.split(',').next())
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    let signed = signature(SECRET, at, &body) == sig;
                    let status = match this {
                        1 | 2 => "500 Internal Server Error",
                        3 => {
                            seen.lock().unwrap().push(Received {
                                key: key.clone(),
                                body: serde_json::from_str(&body).unwrap(),
                                signed,
                            });
                            tokio::time::sleep(Duration::from_secs(12)).await;
                            "200 OK"
                        }
                        _ => {
                            seen.lock().unwrap().push(Received {
                                key,
                                body: serde_json::from_str(&body).unwrap(),
                                signed,
                            });
                            "200 OK"
                        }
                    };
                    let mut socket = reader.into_inner();
                    let _ = socket
                        .write_all(
                            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                });
                if n == 4 {
                    break;
                }
            }
            if n == 4 {
                // Gone for a while: connections refused.
                drop(listener);
                tokio::time::sleep(Duration::from_secs(3)).await;
                n += 1;
            }
        }
    });
    got
}

/// (rule, consumer) → the idempotency keys that carried it.
fn crossings(got: &[Received]) -> BTreeMap<(String, i64), BTreeSet<String>> {
    let mut by = BTreeMap::<(String, i64), BTreeSet<String>>::new();
    for r in got {
        let rule = r.body["rule"].as_str().unwrap().to_owned();
        for c in r.body["crossings"].as_array().unwrap() {
            by.entry((rule.clone(), c["consumer_id"].as_i64().unwrap()))
                .or_default()
                .insert(r.key.clone());
        }
    }
    by
}

async fn start_api(p: &mut Pipeline, rules: &std::path::Path) -> (crate::support::Stage, u16) {
    let rules = rules.to_str().unwrap();
    start_api_with(p, &["--alert-rules", rules, "--alert-interval-ms", "300"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn each_crossing_reaches_a_failing_receiver_once_under_one_key() {
    let mut p = Pipeline::new("alerts").await;
    let hook = free_port();
    let got = receiver(hook);
    let rules = p.dir.join("alert-rules.json");
    std::fs::write(
        &rules,
        format!(
            r#"[{{"name":"one","consumer":1,"window":"day","threshold":10,"url":"http://127.0.0.1:{hook}/hook","secret":"{SECRET}"}},
                {{"name":"all","consumer":"all","window":"day","threshold":100,"url":"http://127.0.0.1:{hook}/hook","secret":"{SECRET}"}}]"#
        ),
    )
    .unwrap();
    let first = p.data.join("first.txt");
    let lines: String = std::iter::once("1 5\n".to_owned())
        .chain((2..=40).map(|id| format!("{id} 150\n")))
        .collect();
    std::fs::write(&first, lines).unwrap();
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.publish("1048576", &[first.to_str().unwrap()]).await;
    p.wait_ingested(1, TIMEOUT).await;

    // The first replica takes the lock; once the receiver saw a request, a second starts and
    // the first is killed: the second takes over.
    let (mut a, _) = start_api(&mut p, &rules).await;
    tally_testkit::eventually(TIMEOUT, "a first request", || async {
        tally_testkit::holds(!got.lock().unwrap().is_empty(), || "none".into())
    })
    .await;
    let (_b, _) = start_api(&mut p, &rules).await;
    a.kill9();

    // More usage: consumer 1 crosses its rule; consumer 2 is already over "all" this window.
    let second = p.data.join("second.txt");
    std::fs::write(&second, "1 6\n2 500\n").unwrap();
    p.publish("1048576", &[second.to_str().unwrap()]).await;
    p.wait_ingested(2, TIMEOUT).await;

    let mut expected: BTreeSet<(String, i64)> = (2..=40).map(|id| ("all".to_owned(), id)).collect();
    expected.insert(("one".to_owned(), 1));
    tally_testkit::eventually(
        Duration::from_secs(180),
        "every crossing delivered",
        || async {
            let by = crossings(&got.lock().unwrap());
            let undelivered: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM alert_deliveries WHERE delivered_at IS NULL",
            )
            .fetch_one(&p.pool)
            .await
            .unwrap();
            tally_testkit::holds(
                by.keys().cloned().collect::<BTreeSet<_>>() == expected && undelivered == 0,
                || {
                    format!(
                        "{} of {} crossings, {undelivered} deliveries pending",
                        by.len(),
                        expected.len()
                    )
                },
            )
        },
    )
    .await;
    // A little longer: nothing more comes (no crossing twice, nothing for consumer 2 again).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = got.lock().unwrap().clone();
    let by = crossings(&got);
    assert_eq!(by.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (crossing, keys) in &by {
        assert_eq!(keys.len(), 1, "{crossing:?} under {keys:?}");
    }
    assert!(
        got.iter().all(|r| r.signed),
        "a request's signature does not hold"
    );
    // The request whose answer was lost came again, with its key.
    let mut per_key = BTreeMap::<&str, usize>::new();
    for r in &got {
        *per_key.entry(r.key.as_str()).or_default() += 1;
    }
    assert!(
        per_key.values().any(|&n| n > 1),
        "no request was sent again: {per_key:?}"
    );
    // Grouped: 39 consumers of "all" in at most 3 requests.
    let all_keys: BTreeSet<&String> = by
        .iter()
        .filter(|((rule, _), _)| rule == "all")
        .flat_map(|(_, keys)| keys)
        .collect();
    assert!(
        all_keys.len() <= 3,
        "{} requests for one rule's window",
        all_keys.len()
    );
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM alert_crossings")
        .fetch_one(&p.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 40);
}
