//! Browser sign-in without server state (pure): a session cookie and a login link are each a
//! name, an expiry and an HMAC-SHA256 keyed with that name's read token, so every replica can
//! check them with the tokens file alone, and removing a token from the file ends its
//! sessions and links. Neither holds the token: a cookie or a link that leaks gives no token.
//!
//! - Session cookie value: `NAME_HEX.EXPIRY.MAC_HEX`, MAC over `session|NAME|EXPIRY`.
//! - Login link parameter: `NAME_HEX.EXPIRY.NONCE_HEX.MAC_HEX`, MAC over
//!   `link|NAME|EXPIRY|NONCE`. Single use is the api's part: it records the nonce in
//!   PostgreSQL before it signs the browser in (`crate::console`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a session lasts.
pub const SESSION_SECONDS: u64 = 12 * 3600;
/// How long a login link may be used.
pub const LINK_SECONDS: u64 = 60;

fn mac(token: &str, message: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("any key length");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn verify(token: &str, message: &str, given: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("any key length");
    mac.update(message.as_bytes());
    mac.verify_slice(given).is_ok()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 1024 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A session cookie's value for `name` (whose token is `token`), valid until `expiry` (Unix
/// seconds).
pub fn session(name: &str, token: &str, expiry: u64) -> String {
    let signed = mac(token, &format!("session|{name}|{expiry}"));
    format!("{}.{expiry}.{}", hex(name.as_bytes()), hex(&signed))
}

/// A login link's parameter for `name`, valid until `expiry`, with a random `nonce`.
pub fn link(name: &str, token: &str, expiry: u64, nonce: &[u8]) -> String {
    let nonce = hex(nonce);
    let signed = mac(token, &format!("link|{name}|{expiry}|{nonce}"));
    format!("{}.{expiry}.{nonce}.{}", hex(name.as_bytes()), hex(&signed))
}

/// A signed value split on `.`: the name (hex), the expiry, the middle fields, the MAC (hex),
/// when it has `middle + 3` fields, the name decodes, and the expiry lies after `now` and at
/// most `longest` seconds ahead.
fn signed(
    value: &str,
    middle: usize,
    now: u64,
    longest: u64,
) -> Option<(String, u64, Vec<&str>, Vec<u8>)> {
    let parts: Vec<&str> = value.split('.').collect();
    if parts.len() != middle + 3 {
        return None;
    }
    let name = String::from_utf8(unhex(parts[0])?).ok()?;
    let expiry: u64 = parts[1].parse().ok()?;
    if expiry <= now || expiry > now + longest {
        return None;
    }
    let given = unhex(parts[parts.len() - 1])?;
    Some((name, expiry, parts[2..parts.len() - 1].to_vec(), given))
}

/// Whether `given` is the MAC of `message` under one of `name`'s tokens.
fn signed_by(
    tokens_of: impl Fn(&str) -> Vec<String>,
    name: &str,
    message: &str,
    given: &[u8],
) -> bool {
    tokens_of(name)
        .iter()
        .any(|token| verify(token, message, given))
}

/// The name a session cookie was made for, if its MAC is right under one of the name's
/// tokens (`tokens_of`) and it has not expired at `now`.
pub fn check_session(
    value: &str,
    now: u64,
    tokens_of: impl Fn(&str) -> Vec<String>,
) -> Option<String> {
    let (name, expiry, _, given) = signed(value, 0, now, SESSION_SECONDS + 60)?;
    let message = format!("session|{name}|{expiry}");
    signed_by(tokens_of, &name, &message, &given).then_some(name)
}

/// A login link checked: `(name, nonce)` when its MAC is right and it has not expired at
/// `now` (it may still have been used: the caller records the nonce).
pub fn check_link(
    value: &str,
    now: u64,
    tokens_of: impl Fn(&str) -> Vec<String>,
) -> Option<(String, String)> {
    let (name, expiry, middle, given) = signed(value, 1, now, LINK_SECONDS + 5)?;
    let nonce = middle[0];
    if nonce.len() != 32 || unhex(nonce).is_none() {
        return None;
    }
    let message = format!("link|{name}|{expiry}|{nonce}");
    signed_by(tokens_of, &name, &message, &given).then(|| (name, nonce.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "read-token-0123456789abcdef";

    fn known(name: &str) -> Vec<String> {
        if name == "console" {
            vec!["an-older-token-0123456789".to_owned(), TOKEN.to_owned()]
        } else {
            Vec::new()
        }
    }

    #[test]
    fn a_session_is_good_for_its_name_until_it_expires() {
        let value = session("console", TOKEN, 1_000 + SESSION_SECONDS);
        assert!(!value.contains(TOKEN));
        assert_eq!(
            check_session(&value, 1_000, known).as_deref(),
            Some("console")
        );
        assert_eq!(check_session(&value, 1_000 + SESSION_SECONDS, known), None);
        // Another key, a changed expiry or name, a removed token: refused.
        let other = session(
            "console",
            "another-token-0123456789",
            1_000 + SESSION_SECONDS,
        );
        assert_eq!(check_session(&other, 1_000, known), None);
        let stretched = value.replacen(&format!("{}", 1_000 + SESSION_SECONDS), "999999999", 1);
        assert_eq!(check_session(&stretched, 1_000, known), None);
        assert_eq!(check_session(&value, 1_000, |_| Vec::new()), None);
        assert_eq!(check_session("", 1_000, known), None);
        assert_eq!(check_session("zz.1.zz", 1_000, known), None);
    }

    #[test]
    fn a_link_is_good_within_its_minute() {
        let value = link("console", TOKEN, 1_060, &[7; 16]);
        assert!(!value.contains(TOKEN));
        let (name, nonce) = check_link(&value, 1_000, known).unwrap();
        assert_eq!((name.as_str(), nonce.len()), ("console", 32));
        assert_eq!(check_link(&value, 1_060, known), None);
        // A link cannot pass as a session, nor a session as a link.
        assert_eq!(check_session(&value, 1_000, known), None);
        let as_session = session("console", TOKEN, 1_060);
        assert_eq!(check_link(&as_session, 1_000, known), None);
        // Valid for at most a minute from now, whatever the link says.
        let long = link("console", TOKEN, 1_000 + 3600, &[7; 16]);
        assert_eq!(check_link(&long, 1_000, known), None);
    }
}
