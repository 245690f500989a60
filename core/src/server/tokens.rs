//! Who may call a public server (uploads to `tally producer serve`, reads from `tally api`):
//! bearer tokens from `--tokens-file`, one `name token` per line (`#` starts a
//! comment). The file is read again whenever its size or modification time changes (at every
//! request, and every [`RELOAD_EVERY`] on a thread of its own), so tokens are added and revoked
//! without a restart.
//!
//! Revocation fails closed: a file that is gone, cannot be read, no longer parses or holds no
//! token is read once more after [`REREAD_PAUSE`] (it may have been caught mid-write; replace it
//! by a rename, not in place), and if it is still bad, no token is valid until it is fixed: an
//! error in the log, and `/readyz` says why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::liveness::Liveness;
use anyhow::{bail, Context};

/// Shortest token accepted.
pub const TOKEN_CHARS_MIN: usize = 16;

/// How long a tokens file that reads bad is given before it counts (a writer mid-write).
pub const REREAD_PAUSE: Duration = Duration::from_millis(200);

/// How often the file is looked at when no request comes.
pub const RELOAD_EVERY: Duration = Duration::from_millis(250);

/// The readiness condition of a tokens file that is bad.
const CONDITION: &str = "tokens";

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
    liveness: Option<Liveness>,
}

struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    tokens: HashMap<String, String>,
    /// Since when the file reads bad, while it gets its one more read.
    suspect_since: Option<Instant>,
}

/// The tokens of the file at `path`, or why there are none.
fn read(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the tokens file {}", path.display()))?;
    let tokens = parse(&text).with_context(|| format!("in {}", path.display()))?;
    if tokens.is_empty() {
        bail!("the tokens file {} holds no token", path.display());
    }
    Ok(tokens)
}

impl Tokens {
    /// Reads `path` (an error if it cannot be read or parsed, or holds no token); a bad file
    /// later makes `liveness` not ready.
    pub fn load(path: &Path, liveness: Option<Liveness>) -> anyhow::Result<Self> {
        let tokens = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                stamp: stamp(path),
                tokens,
                suspect_since: None,
            }),
            liveness,
        })
    }

    /// Reads the file again if it changed (or is getting its one more read).
    pub fn refresh(&self) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh_locked(&mut loaded);
    }

    fn refresh_locked(&self, loaded: &mut Loaded) {
        let now = stamp(&self.path);
        if now == loaded.stamp && loaded.suspect_since.is_none() {
            return;
        }
        match read(&self.path) {
            Ok(tokens) => {
                tracing::info!(path = %self.path.display(), tokens = tokens.len(), "tokens reloaded");
                loaded.tokens = tokens;
                loaded.stamp = now;
                loaded.suspect_since = None;
                if let Some(liveness) = &self.liveness {
                    liveness.ready(CONDITION);
                }
            }
            Err(error) => match loaded.suspect_since {
                None => {
                    tracing::warn!(path = %self.path.display(), error = format!("{error:#}"), "the tokens file reads bad; reading it once more shortly (caught mid-write?)");
                    loaded.suspect_since = Some(Instant::now());
                }
                Some(since) if since.elapsed() < REREAD_PAUSE => {}
                Some(_) => {
                    let reason = format!("no token is valid: {error:#}");
                    tracing::error!(path = %self.path.display(), error = format!("{error:#}"), "the tokens file is bad: NO TOKEN IS VALID until it is fixed");
                    loaded.tokens.clear();
                    loaded.stamp = now;
                    loaded.suspect_since = None;
                    if let Some(liveness) = &self.liveness {
                        liveness.not_ready(CONDITION, reason);
                    }
                }
            },
        }
    }

    /// The tokens of `name` (a name may have several, during a rotation), in a fixed order.
    pub fn tokens_of(&self, name: &str) -> Vec<String> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh_locked(&mut loaded);
        let mut tokens: Vec<String> = loaded
            .tokens
            .iter()
            .filter(|(_, n)| n.as_str() == name)
            .map(|(t, _)| t.clone())
            .collect();
        tokens.sort();
        tokens
    }

    /// The name of the token in `authorization` (`Bearer <token>`), if it is one of ours.
    pub fn check(&self, authorization: Option<&str>) -> Option<String> {
        let (scheme, presented) = authorization?.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let presented = presented.trim();
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh_locked(&mut loaded);
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
        let tokens = Tokens::load(&path, None).unwrap();
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

        // A bad file counts once it stays bad past the pause: no token is valid.
        for bad in ["", "# nobody\n", "b 9999999999999999999999\nmalformed\n"] {
            std::fs::write(&path, "b 9999999999999999999999\n").unwrap();
            tokens.refresh();
            assert!(tokens
                .check(Some("Bearer 9999999999999999999999"))
                .is_some());
            std::fs::write(&path, bad).unwrap();
            tokens.refresh();
            std::thread::sleep(REREAD_PAUSE + Duration::from_millis(50));
            assert_eq!(
                tokens.check(Some("Bearer 9999999999999999999999")),
                None,
                "{bad:?}"
            );
        }
        // Gone: closed too, and open again once it is back.
        std::fs::remove_file(&path).unwrap();
        tokens.refresh();
        std::thread::sleep(REREAD_PAUSE + Duration::from_millis(50));
        assert_eq!(tokens.check(Some("Bearer 9999999999999999999999")), None);
        std::fs::write(&path, "b 9999999999999999999999\n").unwrap();
        assert!(tokens
            .check(Some("Bearer 9999999999999999999999"))
            .is_some());
        // Caught mid-write: bad once, good at the second read.
        std::fs::write(&path, "b 99999").unwrap();
        tokens.refresh();
        std::fs::write(
            &path,
            "b 9999999999999999999999\nc 8888888888888888888888\n",
        )
        .unwrap();
        std::thread::sleep(REREAD_PAUSE);
        assert!(tokens
            .check(Some("Bearer 8888888888888888888888"))
            .is_some());
        std::fs::remove_file(&path).unwrap();
    }
}
