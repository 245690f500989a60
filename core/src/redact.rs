//! Secrets never printed: redaction at the source, and a scrub of every line the process writes.
//!
//! Two layers, because one is not enough:
//! - at the source, a value that may hold a secret is shown redacted ([`redact_url`],
//!   [`redact_option`]) and the argument parsers that see secrets never echo their input
//!   ([`crate::args::Quiet`]);
//! - every secret the process learns (a URL's password, a password file, `-X` values of secret
//!   keys) is [`register`]ed, and every log line, final error and argument error passes
//!   through [`scrub`], which replaces registered secrets and any URL's password it finds.
//!   Whatever a library puts in its error text (librdkafka prints config values, HTTP clients
//!   print URLs), it leaves the process scrubbed.

use std::borrow::Cow;
use std::sync::RwLock;

/// Secrets shorter than this are not scrubbed from free text (replacing every `a` of a log
/// line helps nobody); they are still redacted at the source.
const MIN_SCRUBBED: usize = 4;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `secret` so that [`scrub`] removes it from any text from now on.
pub fn register(secret: &str) {
    if secret.len() < MIN_SCRUBBED {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_owned());
        // Longest first, so that a secret holding another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
    // Its percent-encoded form shows up in URLs.
    let encoded = percent_encode(secret);
    if encoded != secret && !secrets.contains(&encoded) {
        secrets.push(encoded);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the secrets a URL carries (its password, and `password`-like query values).
pub fn register_url(url: &str) {
    for secret in url_secrets(url) {
        register(&secret);
        register(&percent_decode(&secret));
    }
}

/// Whether a configuration key (a librdkafka property, a query parameter, a flag) names a
/// secret: passwords, secrets, tokens, private keys, credentials.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential", "passwd", "pwd"]
        .iter()
        .any(|word| key.contains(word))
        || (key.contains("key") && !key.contains("keytab") && !key.ends_with("location"))
        || key == "sasl.oauthbearer.config"
}

/// `key=value` as it may be shown: the value of a secret key as `***`.
pub fn redact_option(key: &str, value: &str) -> String {
    if is_secret_key(key) {
        format!("{key}=***")
    } else {
        format!("{key}={value}")
    }
}

/// `text` with every registered secret, and the password of any URL in it, replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|p| p.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), "***"));
        }
    }
    drop(secrets);
    if out.contains("://") {
        let scrubbed: String = scrub_urls(&out);
        if scrubbed != out {
            out = Cow::Owned(scrubbed);
        }
    }
    out
}

/// Replaces the password of every `scheme://user:password@…` in free text.
fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The URL runs to the next white space or quote.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        out.push_str(redact_after_scheme(url).as_str());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A URL (or connection string) with its passwords replaced by `***`, for logs and errors.
///
/// A password may hold any character, `@`, `/`, `?` and `#` included, unencoded: the user
/// information is everything up to the *last* `@`, and whatever follows the user name there is
/// hidden. When in doubt, more is hidden, never less. A string that is no URL but names a
/// password (`host=h password=p`) is hidden whole.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", redact_after_scheme(rest)),
        None if url.contains('@') || is_secret_key(url) => "***".to_owned(),
        None => url.to_owned(),
    }
}

fn redact_after_scheme(rest: &str) -> String {
    match rest.rfind('@') {
        Some(at) if rest[..at].contains(':') => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{user}:***@{}", redact_query(&rest[at + 1..]))
        }
        _ => redact_query(rest),
    }
}

/// The query parameters of secret keys as `***`.
fn redact_query(rest: &str) -> String {
    let Some((base, query)) = rest.split_once('?') else {
        return rest.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, v)) => {
                if is_secret_key(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            }
            None => p.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// The secrets a URL carries: its password (up to the last `@`) and secret query values.
fn url_secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    if let Some(at) = rest.rfind('@') {
        if let Some((_, password)) = rest[..at].split_once(':') {
            out.push(password.to_owned());
        }
    }
    for part in rest.split(['?', '&', ' ']) {
        if let Some((k, v)) = part.split_once('=') {
            if is_secret_key(k) && !v.is_empty() {
                out.push(v.to_owned());
            }
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard error, every write scrubbed (the log writer of [`crate::telemetry`]).
pub struct ScrubbedStderr;

impl std::io::Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPES: &[&str] = &[
        "postgres://u:S3CRET@h:1/db",
        "postgresql+asyncpg://u:S3CRET@h/db",
        "mysql://u:S3CRET@h/db",
        "postgres://u:S3?CRET@h/db",
        "postgres://u:S3CRET?x@h/db?sslmode=require",
        "postgres://u:S3@CRET@h/db",
        "postgres://u:S3/CRET@h/db",
        "postgres://u:S3#CRET@h/db",
        "postgres://u:S3:CRET@h/db",
        "postgres://u@h/db?sslmode=require&password=S3CRET",
        "postgres://u@h/db?PassWord=S3CRET&x=1",
        "postgres://:S3CRET@h/db",
        "host=h password=S3CRET dbname=x",
        "u:S3CRET@h",
    ];

    #[test]
    fn no_shape_of_url_shows_its_password() {
        for url in SHAPES {
            let shown = redact_url(url);
            for piece in ["S3CRET", "CRET", "S3"] {
                assert!(!shown.contains(piece), "{url} shown as {shown}");
            }
        }
        assert_eq!(
            redact_url("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact_url("postgres://u@h:1/db"), "postgres://u@h:1/db");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn scrub_removes_registered_secrets_and_url_passwords() {
        register("hunter2-secret");
        register("tiny");
        let text = "error: auth failed for hunter2-secret at postgres://me:pw-in-url@db/x done";
        let out = scrub(text);
        assert!(!out.contains("hunter2-secret"), "{out}");
        assert!(!out.contains("pw-in-url"), "{out}");
        assert!(out.contains("postgres://me:***@db/x done"), "{out}");
        register_url("postgres://u:p%40ss-word@h/db");
        assert!(!scrub("p@ss-word and p%40ss-word").contains("ss-word"));
    }

    #[test]
    fn secret_keys() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl_key",
            "sasl.oauthbearer.client.secret",
            "ssl.keystore.password",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "debug",
            "ssl.ca.location",
            "sasl.kerberos.keytab",
            "linger.ms",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }
}
