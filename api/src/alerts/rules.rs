//! Threshold alert rules (pure): read from `--alert-rules FILE`, a JSON array of
//!
//! ```json
//! {"name": "big-day", "consumer": 42, "window": "day", "tz": "UTC",
//!  "threshold": 1000000, "url": "https://hooks.example.com/tally", "secret": "…16+ chars…"}
//! ```
//!
//! `consumer` is a consumer id or `"all"`; `window` `hour`, `day` or `month`; `tz` an IANA zone
//! (default `UTC`); `threshold` an integer (a JSON number or a string of digits); `secret` signs
//! the webhook's requests (HMAC-SHA256). Names are unique: a crossing is recorded per rule
//! name, consumer and window.

use std::collections::HashSet;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::window::Window;

/// Shortest secret accepted.
pub const SECRET_CHARS_MIN: usize = 16;

/// One rule, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// One consumer, or all (`None`).
    pub consumer: Option<i64>,
    /// The window its threshold applies to.
    pub window: Window,
    /// The zone the window is cut in.
    pub tz: String,
    /// Usage in a window at or above it is a crossing.
    pub threshold: i128,
    /// Where crossings are posted.
    pub url: String,
    /// Signs the requests.
    pub secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    consumer: serde_json::Value,
    window: String,
    #[serde(default = "utc")]
    tz: String,
    threshold: serde_json::Value,
    url: String,
    secret: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// Parses a rules file's text.
pub fn parse(text: &str) -> anyhow::Result<Vec<Rule>> {
    let raw: Vec<RawRule> = serde_json::from_str(text).context("expected a JSON array of rules")?;
    let mut names = HashSet::new();
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("rule {} ({})", i + 1, r.name);
            if r.name.is_empty()
                || !r
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                bail!("{at}: a name is letters, digits, '.', '_' and '-'");
            }
            if !names.insert(r.name.clone()) {
                bail!("{at}: the name is given twice");
            }
            let consumer = match &r.consumer {
                serde_json::Value::String(s) if s == "all" => None,
                v => match v.as_i64() {
                    Some(id) if id >= 0 => Some(id),
                    _ => bail!("{at}: consumer is an id from 0 or \"all\""),
                },
            };
            let window = match r.window.as_str() {
                "hour" => Window::Hour,
                "day" => Window::Day,
                "month" => Window::Month,
                _ => bail!("{at}: window is hour, day or month"),
            };
            let threshold = match &r.threshold {
                serde_json::Value::Number(n) => n.as_i64().map(i128::from),
                serde_json::Value::String(s) => s.parse::<i128>().ok(),
                _ => None,
            }
            .with_context(|| format!("{at}: threshold is an integer"))?;
            if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                bail!("{at}: url starts with http:// or https://");
            }
            if r.secret.len() < SECRET_CHARS_MIN {
                bail!("{at}: the secret is shorter than {SECRET_CHARS_MIN} characters");
            }
            Ok(Rule {
                name: r.name,
                consumer,
                window,
                tz: r.tz,
                threshold,
                url: r.url,
                secret: r.secret,
            })
        })
        .collect()
}

/// The signature header's value for `body` sent at `at` (Unix seconds): `t=AT,v1=HEX`, the
/// HMAC-SHA256 of `AT.BODY` under the rule's secret (a receiver recomputes it, and refuses
/// old `t` to stop replays).
pub fn signature(secret: &str, at: u64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{at}.{body}").as_bytes());
    let v1 = crate::console::session::hex(&mac.finalize().into_bytes());
    format!("t={at},v1={v1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_checked() {
        let good = r#"[{"name":"a","consumer":42,"window":"day","threshold":10,"url":"http://x/","secret":"0123456789abcdef"},
                       {"name":"b","consumer":"all","window":"hour","tz":"Europe/Berlin","threshold":"170141183460469231731687303715884105727","url":"https://x/","secret":"0123456789abcdef"}]"#;
        let rules = parse(good).unwrap();
        assert_eq!(rules[0].consumer, Some(42));
        assert_eq!(rules[0].tz, "UTC");
        assert_eq!(rules[1].consumer, None);
        assert_eq!(rules[1].threshold, i128::MAX);
        for bad in [
            r#"[{"name":"a","consumer":-1,"window":"day","threshold":1,"url":"http://x","secret":"0123456789abcdef"}]"#,
            r#"[{"name":"a","consumer":1,"window":"week","threshold":1,"url":"http://x","secret":"0123456789abcdef"}]"#,
            r#"[{"name":"a","consumer":1,"window":"day","threshold":1.5,"url":"http://x","secret":"0123456789abcdef"}]"#,
            r#"[{"name":"a","consumer":1,"window":"day","threshold":1,"url":"ftp://x","secret":"0123456789abcdef"}]"#,
            r#"[{"name":"a","consumer":1,"window":"day","threshold":1,"url":"http://x","secret":"short"}]"#,
            r#"[{"name":"a b","consumer":1,"window":"day","threshold":1,"url":"http://x","secret":"0123456789abcdef"}]"#,
            r#"[{"name":"a","consumer":1,"window":"day","threshold":1,"url":"http://x","secret":"0123456789abcdef","x":1}]"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let twice = format!("[{0},{0}]", &good[1..good.find('}').unwrap() + 1]);
        assert!(parse(&twice).is_err());
    }

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        // HMAC-SHA256("key", "1.{}") computed independently (Python's hmac module).
        assert_eq!(
            signature("key", 1, "{}"),
            "t=1,v1=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
    }
}
