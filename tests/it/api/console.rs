//! The web console in a real browser (headless chromium over the DevTools protocol), beside a
//! real pipeline: signed in by a link from `tally api login-link` (once only) and by the form,
//! every page loaded, the numbers shown compared with PostgreSQL and `tally status`, no error
//! reported by any page, the token never in a URL, a page, a cookie the page can read or the
//! log. A screenshot per page goes to target/console/ for people to look at.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tally_testkit::browser::Browser;

use super::{conforms, get, response_schema, start_api, Pipeline, TIMEOUT, TOKEN};

fn shot(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/console")
        .join(format!("{name}.png"))
}

/// Opens `#page` (the console is loaded) and waits until it is drawn; no page error on the
/// way.
fn open(b: &mut Browser, page: &str, ready: &str) {
    b.eval(&format!(
        "document.body.dataset.ready = ''; location.hash = '#{page}'"
    ))
    .unwrap();
    b.wait_for(
        "document.body.dataset.ready",
        &json!(ready),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| {
        let text = b.eval("document.body.innerText").unwrap_or_default();
        panic!("{page}: {e}; the page says {text}")
    });
    let problems = b.problems();
    assert!(problems.is_empty(), "{page}: {problems:?}");
    b.screenshot(&shot(page.split('/').next().unwrap_or(page)))
        .unwrap();
}

/// `[[attribute, text], …]` of the elements matching `selector`.
fn shown(b: &mut Browser, selector: &str, key: &str, value: &str) -> Vec<(String, String)> {
    let expression = format!(
        "[...document.querySelectorAll('{selector}')].map(e => [e.closest('[{key}]').getAttribute('{key}'), e.querySelector('[{value}]') ? e.querySelector('[{value}]').getAttribute('{value}') : e.getAttribute('{value}')])"
    );
    let value = b.eval(&expression).unwrap();
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap_or_default().to_owned(),
                pair[1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn text(b: &mut Browser, selector: &str) -> String {
    b.eval(&format!(
        "document.querySelector('{selector}') ? document.querySelector('{selector}').textContent : null"
    ))
    .unwrap()
    .as_str()
    .unwrap_or_else(|| panic!("nothing shows {selector}"))
    .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_what_postgres_holds_in_a_real_browser() {
    let mut p = Pipeline::new("console").await;
    let (mut files, _) = p.generate(2, 1 << 20, 300, 11).await;
    let bad = p.data.join("with-bad-lines.txt");
    std::fs::write(&bad, "7 5\nnot a line\n7 6\n").unwrap();
    files.push(bad.to_str().unwrap().to_owned());
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.publish("1048576", &files).await;
    p.wait_ingested(files.len() as i64, TIMEOUT).await;
    let (api, port) = start_api(&mut p).await;
    let base = format!("http://127.0.0.1:{port}");
    let tokens = p.dir.join("read-tokens");
    let link = p
        .tally(&[
            "api",
            "login-link",
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--name",
            "console",
            "--url",
            &base,
        ])
        .await;
    let link = link.trim().to_owned();
    assert!(link.starts_with(&format!("{base}/login?link=")), "{link}");
    assert!(!link.contains(TOKEN));

    // What the pages must show, from PostgreSQL and `tally status`.
    let status: Value =
        serde_json::from_str(&p.tally(&["status", "--json"]).await).expect("status JSON");
    let top: Vec<(i64, String)> = sqlx::query_as(
        "SELECT consumer_id, total::text FROM consumer_totals
         ORDER BY consumer_totals.total DESC, consumer_id LIMIT 20",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    let per_day: Vec<(String, String)> = sqlx::query_as(
        "SELECT to_char(date_trunc('day', period_start, 'UTC') AT TIME ZONE 'UTC',
                        'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                sum(total)::text
         FROM consumer_period_totals GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    let (seven_total, seven_updated): (String, String) = sqlx::query_as(
        "SELECT total::text,
                to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
         FROM consumer_totals WHERE consumer_id = 7",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();

    // The endpoints the console draws from, as documented.
    let (_, doc) = get(port, "/v1/openapi.json", Some(TOKEN)).await;
    let range = "from=2026-01-01T00:00:00Z&to=2028-01-01T00:00:00Z&window=month";
    for (path, asked) in [
        ("/v1/status", "/v1/status".to_owned()),
        ("/v1/top", "/v1/top?limit=5".to_owned()),
        ("/v1/usage/total", format!("/v1/usage/total?{range}")),
    ] {
        let (code, body) = get(port, &asked, Some(TOKEN)).await;
        assert_eq!(code, 200, "{asked}: {body}");
        conforms(&doc, response_schema(&doc, path, "200"), &body, path);
    }
    let (_, body) = get(port, &format!("/v1/usage/total?{range}"), Some(TOKEN)).await;
    let all: i64 = body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["usage"].as_i64().unwrap())
        .sum();
    let stored: String = sqlx::query_scalar("SELECT sum(total)::text FROM consumer_totals")
        .fetch_one(&p.pool)
        .await
        .unwrap();
    assert_eq!(all.to_string(), stored, "all usage by month vs the totals");

    tokio::task::block_in_place(|| {
        let mut b = Browser::start().unwrap();

        // Not signed in: the form, and the API refuses the browser.
        b.navigate(&format!("{base}/")).unwrap();
        assert_eq!(
            b.eval("!!document.getElementById('token')").unwrap(),
            json!(true)
        );
        let refused = b.eval("fetch('/v1/top').then(r => r.status)").unwrap();
        assert_eq!(refused, json!(401));
        b.screenshot(&shot("sign-in")).unwrap();
        b.problems(); // the 401 above is logged by the browser

        // The link signs in once.
        b.navigate(&link).unwrap();
        b.wait_for(
            "document.body.dataset.ready",
            &json!("health"),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            b.eval("document.cookie").unwrap(),
            json!(""),
            "the session cookie is HttpOnly"
        );
        assert_eq!(b.eval("location.pathname").unwrap(), json!("/"));

        // Health: the figures `tally status` gives.
        open(&mut b, "health", "health");
        for (key, figure) in [
            ("files-announced", "announced"),
            ("files-complete", "complete"),
            ("files-in-progress", "in_progress"),
            ("files-rejected", "rejected"),
        ] {
            assert_eq!(
                text(&mut b, &format!("[data-figure={key}]")),
                status["files"][figure].to_string(),
                "{key}"
            );
        }
        let dead = shown(&mut b, "tr[data-dead-kind]", "data-dead-kind", "data-value");
        let expected_dead: Vec<(String, String)> = status["dead_letters"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(kind, n)| (kind.clone(), n.to_string()))
            .collect();
        assert!(!expected_dead.is_empty(), "a bad line is a dead letter");
        assert_eq!(dead, expected_dead);
        let lag = shown(&mut b, "tr[data-lag]", "data-stage", "data-value");
        assert!(lag.iter().any(|(stage, _)| stage == "db-client"), "{lag:?}");
        assert!(lag.iter().all(|(_, n)| n == "0"), "all consumed: {lag:?}");

        // Top consumers: PostgreSQL's 20 highest totals, in order.
        open(&mut b, "top", "top");
        let rows = shown(&mut b, "tr[data-consumer]", "data-consumer", "data-total");
        let expected: Vec<(String, String)> = top
            .iter()
            .map(|(id, t)| (id.to_string(), t.clone()))
            .collect();
        assert_eq!(rows, expected);

        // Usage per day: the chart's bars and the table are PostgreSQL's sums.
        open(&mut b, "usage", "usage");
        let bars = shown(&mut b, "svg.chart rect", "data-window", "data-usage");
        let nonzero: Vec<(String, String)> = bars.into_iter().filter(|(_, u)| u != "0").collect();
        assert_eq!(nonzero, per_day);
        let table = shown(&mut b, "tr[data-window]", "data-window", "data-usage");
        assert_eq!(table.len(), 7, "{table:?}");

        // A consumer's page.
        open(&mut b, "consumer/7", "consumer");
        assert_eq!(text(&mut b, "[data-figure=total]"), seven_total);
        assert_eq!(text(&mut b, "[data-figure=updated-at]"), seven_updated);

        // The token shows nowhere the browser can see.
        let page = b
            .eval("document.documentElement.outerHTML + location.href")
            .unwrap();
        assert!(!page.as_str().unwrap().contains(TOKEN));

        // A used link does not sign in again; signing out ends the session.
        b.eval("fetch('/logout', {method: 'POST'}).then(r => r.status)")
            .unwrap();
        b.navigate(&link).unwrap();
        let body = b.eval("document.body.innerText").unwrap();
        assert!(body.as_str().unwrap().contains("not valid"), "{body}");
        b.problems(); // the 403
        b.navigate(&format!("{base}/")).unwrap();
        assert_eq!(
            b.eval("!!document.getElementById('token')").unwrap(),
            json!(true)
        );

        // The form: a wrong token is refused, the right one signs in.
        for (token, signed_in) in [("not-the-token-0123456789", false), (TOKEN, true)] {
            b.navigate(&format!("{base}/")).unwrap();
            b.leave_by(&format!(
                "document.getElementById('token').value = '{token}'; document.querySelector('form').submit(); true"
            ))
            .unwrap();
            if signed_in {
                b.wait_for(
                    "document.body.dataset.ready",
                    &json!("health"),
                    Duration::from_secs(30),
                )
                .unwrap();
            } else {
                let body = b.eval("document.body.innerText").unwrap();
                assert!(
                    body.as_str().unwrap().contains("not a valid read token"),
                    "{body}"
                );
                b.problems(); // the 401
            }
            assert!(!b
                .eval("location.href")
                .unwrap()
                .as_str()
                .unwrap()
                .contains(token));
        }
        let problems = b.problems();
        assert!(problems.is_empty(), "{problems:?}");
    });
    assert!(
        !api.log_text().contains(TOKEN),
        "the token is in the api's log"
    );
}
