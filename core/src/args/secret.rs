//! Secrets (passwords): read from env vars or files, never shown by `Debug` or in logs.

/// A secret (a password): never shown by `Debug` or in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value of env var `name`, if set and not empty.
    pub fn from_env(name: &str) -> Option<Secret> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
    }

    /// The first line of `path` (a mounted secret).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Secret> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read secret file {}: {e}", path.display()))?;
        Ok(Secret(text.lines().next().unwrap_or_default().to_owned()))
    }

    /// The secret itself, for the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

pub(super) fn readable(path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}
