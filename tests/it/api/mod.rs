//! `tally api` beside a real pipeline: what it answers is what PostgreSQL holds (totals, usage
//! per window in a zone, every consumer's usage in pages and as CSV, the files ledger), it
//! refuses what it cannot answer exactly and says why, it answers nothing without a read
//! token, and its OpenAPI document describes its real responses.

use std::time::Duration;

use serde_json::Value;

use crate::support::{free_port, http_get_with, wait_http, Pipeline};

mod alerts;
mod changes;
mod console;
mod streams;
mod totals;
mod usage;

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
    start_api_with(p, &[]).await
}

/// [`start_api`] with `extra` flags.
async fn start_api_with(p: &mut Pipeline, extra: &[&str]) -> (crate::support::Stage, u16) {
    let tokens = p.dir.join("read-tokens");
    std::fs::write(&tokens, format!("# readers\nconsole {TOKEN}\n")).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "api",
        "--listen",
        &listen,
        "--tokens-file",
        tokens.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let api = p.spawn("api", &args);
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

/// Every page of `endpoint?query`, following `next_cursor` until it is null, each page checked
/// against the document: the items under `key` of all pages, and the number of pages.
async fn all_pages(
    port: u16,
    doc: &Value,
    endpoint: &str,
    query: &str,
    key: &str,
) -> (Vec<Value>, usize) {
    let (mut items, mut pages, mut next) = (Vec::new(), 0, String::new());
    loop {
        let asked = format!("{endpoint}?{query}{next}");
        let (status, body) = get(port, &asked, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        conforms(doc, response_schema(doc, endpoint, "200"), &body, endpoint);
        pages += 1;
        items.extend(body[key].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(cursor) => next = format!("&cursor={cursor}"),
            None => return (items, pages),
        }
    }
}
