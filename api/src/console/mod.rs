//! The web console at `/`: pages drawn in the browser from the api's own `/v1` endpoints,
//! every asset served from here (no CDN, no external request: the Content-Security-Policy
//! allows this origin only).
//!
//! Signing in: a browser exchanges a read token once for a session cookie (`HttpOnly`,
//! `SameSite=Strict`, `Secure` under TLS), through the form at `/` (`POST /login`) or a
//! single-use link from `tally api login-link` (`GET /login?link=…`, [`link`]). Cookies and
//! links are signed with the token ([`session`]), so any replica accepts them; a link's nonce
//! is recorded in PostgreSQL (`api_login_links_used`) before it signs anyone in, so it works
//! once across all replicas. A token never appears in a URL, a page or a log line.

pub mod link;
pub mod session;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::routes::{Api, Shared};

/// The session cookie's name.
pub const COOKIE: &str = "tally_session";

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");
const ICON: &str = include_str!("assets/favicon.svg");

/// This origin only: no inline script, no external request of any kind.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The name the request's session cookie was made for, if it is valid.
pub fn session_name(api: &Api, headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))?;
    session::check_session(value, now(), |name| api.tokens.tokens_of(name))
}

/// A page of the console: HTML, not cached, under the policy.
fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        body,
    )
        .into_response()
}

fn login_page(status: StatusCode, message: &str) -> Response {
    let message = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"bad\">{message}</p>")
    };
    html(status, LOGIN.replace("<!--MESSAGE-->", &message))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the console when signed in, else the sign-in form.
pub async fn index(State(api): State<Shared>, headers: HeaderMap) -> Response {
    match session_name(&api, &headers) {
        Some(_) => html(StatusCode::OK, INDEX.to_owned()),
        None => login_page(StatusCode::OK, ""),
    }
}

/// `GET /console.js`, `/console.css`, `/favicon.svg`: the assets (nothing secret in them).
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// See [`script`].
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// See [`script`].
pub async fn icon() -> Response {
    asset("image/svg+xml", ICON)
}

/// The `Set-Cookie` of a new session for `name`, signed with `token` (one of the name's).
fn session_cookie(api: &Api, name: &str, token: &str) -> Option<HeaderValue> {
    let value = session::session(name, token, now() + session::SESSION_SECONDS);
    let secure = if api.tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
        session::SESSION_SECONDS
    ))
    .ok()
}

/// A form post from another origin is refused (the browser says where it comes from).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host)
}

/// `POST /login` (form `token=…`): a session for the token's name, then the console.
pub async fn login_form(State(api): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if !same_origin(&headers) {
        return login_page(
            StatusCode::FORBIDDEN,
            "Sign in from this console's own page.",
        );
    }
    let token = url_form(&body).remove("token").unwrap_or_default();
    let token = token.trim();
    let name = api.tokens.check(Some(&format!("Bearer {token}")));
    let Some(cookie) = name
        .as_deref()
        .and_then(|name| session_cookie(&api, name, token))
    else {
        return login_page(StatusCode::UNAUTHORIZED, "That is not a valid read token.");
    };
    tracing::info!(
        name = name.as_deref().unwrap_or_default(),
        "console sign-in"
    );
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// `GET /login?link=…`: a login link, used once, signs the browser in. The answer is a page
/// that moves on to `/` by itself (a same-site step, so the strict cookie goes with it).
pub async fn login_link(
    State(api): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let refused = || {
        login_page(
            StatusCode::FORBIDDEN,
            "This link is not valid: it expired, was used already, or its token was removed. \
             Ask for a new one.",
        )
    };
    let Some(value) = params.get("link") else {
        return refused();
    };
    let Some((name, nonce)) = session::check_link(value, now(), |name| api.tokens.tokens_of(name))
    else {
        return refused();
    };
    // Once across every replica: the first to record the nonce signs in.
    let first: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM api_login_links_used WHERE used_at < now() - interval '1 day')
         INSERT INTO api_login_links_used (nonce) VALUES ($1)
         ON CONFLICT DO NOTHING RETURNING nonce",
    )
    .bind(&nonce)
    .fetch_optional(&api.pool)
    .await;
    match first {
        Ok(Some(_)) => {}
        Ok(None) => return refused(),
        Err(error) => {
            tracing::warn!(%error, "cannot record a login link");
            return login_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database did not answer; try the link again.",
            );
        }
    }
    let tokens = api.tokens.tokens_of(&name);
    let Some(cookie) = tokens
        .first()
        .and_then(|token| session_cookie(&api, &name, token))
    else {
        return refused();
    };
    tracing::info!(name, "console sign-in by link");
    let mut response = html(
        StatusCode::OK,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"0;url=/\"><title>tally</title></head>\
         <body><p>Signed in. <a href=\"/\">Open the console</a>.</p></body></html>"
            .to_owned(),
    );
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// `POST /logout`: the cookie is dropped.
pub async fn logout() -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tally_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    response
}

/// `application/x-www-form-urlencoded` fields.
fn url_form(body: &[u8]) -> HashMap<String, String> {
    let decode = |text: &str| -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    match std::str::from_utf8(&bytes[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((decode(key), decode(value)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_decoded() {
        let form = url_form(b"token=abc%2Bdef+g%3D&x=%zz&y=%4");
        assert_eq!(form["token"], "abc+def g=");
        assert_eq!(form["x"], "%zz");
        assert_eq!(form["y"], "%4");
    }

    #[test]
    fn only_this_origin_may_post() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8480"));
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8480"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
    }
}
