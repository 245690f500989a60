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
            .map(Secret::new)
    }

    /// The first line of `path` (a mounted secret).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Secret> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read secret file {}: {e}", path.display()))?;
        Ok(Secret::new(
            text.lines().next().unwrap_or_default().to_owned(),
        ))
    }

    /// A secret, registered for scrubbing from every line the process writes.
    pub fn new(value: String) -> Secret {
        crate::redact::register(&value);
        Secret(value)
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

/// A clap value parser whose errors never echo the value, as clap's own "invalid value 'X'"
/// would: for arguments that may carry a secret (URLs, `-X key=value`).
pub struct Quiet<T>(pub fn(&str) -> Result<T, String>);

impl<T> Clone for Quiet<T> {
    fn clone(&self) -> Self {
        Quiet(self.0)
    }
}

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for Quiet<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        use clap::error::ErrorKind;
        let name = arg
            .map(|a| match a.get_long() {
                Some(long) => format!("--{long}"),
                None => a.get_id().to_string(),
            })
            .unwrap_or_default();
        let refuse = |kind, why: String| {
            clap::Error::raw(kind, format!("invalid value for {name}: {why}\n")).with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse(ErrorKind::InvalidUtf8, "not UTF-8".to_owned()))?;
        (self.0)(text).map_err(|why| refuse(ErrorKind::ValueValidation, why))
    }
}
