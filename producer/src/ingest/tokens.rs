//! Who may upload: bearer tokens from `--tokens-file`, one `name token` per line (`#` starts a
//! comment). The file is read again whenever its size or modification time changes, so tokens
//! are added and revoked without a restart; a file that no longer parses, or holds no token
//! (replace it by a rename, not in place), keeps the tokens read before it, with an error in
//! the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{bail, Context};

/// Shortest token accepted.
pub const TOKEN_CHARS_MIN: usize = 16;

/// Parses a tokens file: token → name.
pub fn parse(text: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut tokens = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
            bail!("line {}: expected `name token`", n + 1);
        };
        if token.len() < TOKEN_CHARS_MIN {
            bail!(
                "line {}: the token of {name} is shorter than {TOKEN_CHARS_MIN} characters",
                n + 1
            );
        }
        if tokens.insert(token.to_owned(), name.to_owned()).is_some() {
            bail!("line {}: a token given twice", n + 1);
        }
    }
    Ok(tokens)
}

/// The tokens of a file, reloaded when it changes.
pub struct Tokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    tokens: HashMap<String, String>,
}

impl Tokens {
    /// Reads `path` (an error if it cannot be read or parsed, or holds no token).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the tokens file {}", path.display()))?;
        let tokens = parse(&text).with_context(|| format!("in {}", path.display()))?;
        if tokens.is_empty() {
            bail!("the tokens file {} holds no token", path.display());
        }
        Ok(Self {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                stamp: stamp(path),
                tokens,
            }),
        })
    }

    /// The name of the token in `authorization` (`Bearer <token>`), if it is one of ours.
    pub fn check(&self, authorization: Option<&str>) -> Option<String> {
        let (scheme, presented) = authorization?.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let presented = presented.trim();
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path);
        if now != loaded.stamp {
            loaded.stamp = now;
            match std::fs::read_to_string(&self.path)
                .map_err(anyhow::Error::from)
                .and_then(|t| parse(&t))
            {
                Ok(tokens) if tokens.is_empty() => {
                    tracing::error!(path = %self.path.display(), "the tokens file holds no token now (caught mid-write?); the tokens read before stay");
                }
                Ok(tokens) => {
                    tracing::info!(path = %self.path.display(), tokens = tokens.len(), "tokens reloaded");
                    loaded.tokens = tokens;
                }
                Err(error) => {
                    tracing::error!(path = %self.path.display(), error = format!("{error:#}"), "cannot reload the tokens file; the tokens read before stay");
                }
            }
        }
        // Compare with every token, each in constant time: how long a check takes tells
        // nothing about which bytes matched.
        let mut found = None;
        for (token, name) in &loaded.tokens {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(name.clone());
            }
        }
        found
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_tokens() {
        let t = parse(
            "# generators\nsite-a 0123456789abcdef0123\n\nsite-b  fedcba9876543210fedc # b\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t["0123456789abcdef0123"], "site-a");
        assert!(parse("lonely\n").is_err());
        assert!(parse("a short\n").is_err());
        assert!(parse("a 0123456789abcdef0123\nb 0123456789abcdef0123\n").is_err());
    }

    #[test]
    fn checks_and_reloads() {
        let path = std::env::temp_dir().join(format!("tally-tokens-{}", std::process::id()));
        std::fs::write(&path, "a 0123456789abcdef0123\n").unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(
            tokens.check(Some("Bearer 0123456789abcdef0123")).as_deref(),
            Some("a")
        );
        assert_eq!(tokens.check(Some("Bearer 0123456789abcdef0124")), None);
        assert_eq!(tokens.check(Some("0123456789abcdef0123")), None);
        assert_eq!(tokens.check(None), None);
        // Revoked and replaced (a different size, so the change is seen at once).
        std::fs::write(&path, "b 9999999999999999999999\n").unwrap();
        assert_eq!(tokens.check(Some("Bearer 0123456789abcdef0123")), None);
        assert_eq!(
            tokens
                .check(Some("Bearer 9999999999999999999999"))
                .as_deref(),
            Some("b")
        );
        std::fs::remove_file(&path).unwrap();
    }
}
