//! What happens to a file once every unit of it is done: keep, delete or archive it, but only
//! if all of its units were summed; a file with a rejected unit holds lines that are in no
//! total, so it stays where it is and is listed in `<dir>/.tally-rejected`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;

use crate::announce;

/// What to do with a file once every unit of it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterDone {
    /// Leave it.
    Keep,
    /// Delete it.
    Delete,
    /// Move it into this directory (same file system).
    Archive(PathBuf),
}

impl FromStr for AfterDone {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // `--after done=delete` reads as well as `--after-done delete`.
        let s = s.strip_prefix("done=").unwrap_or(s);
        match s {
            "keep" => Ok(AfterDone::Keep),
            "delete" => Ok(AfterDone::Delete),
            _ => match s.strip_prefix("archive:") {
                Some(dir) if !dir.is_empty() => Ok(AfterDone::Archive(PathBuf::from(dir))),
                _ => Err(format!("expected keep, delete or archive:DIR, got `{s}`")),
            },
        }
    }
}

/// Where `watch` lists the files it left in place because not all of their units were counted.
pub const REJECTED_FILE: &str = ".tally-rejected";

/// Lists a file not (fully) counted in `<dir>/.tally-rejected`, one line each:
/// `<unix time> <rejected bytes>/<file bytes> <path>`.
pub fn list_rejected(
    dir: &Path,
    rejected_bytes: u64,
    file_bytes: u64,
    path: &Path,
) -> anyhow::Result<()> {
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let list = dir.join(REJECTED_FILE);
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&list)
        .with_context(|| format!("cannot open {}", list.display()))?;
    writeln!(
        out,
        "{when} {rejected_bytes}/{file_bytes} {}",
        path.display()
    )?;
    out.sync_data()?;
    Ok(())
}

/// Applies `action` to the file `id` at `path`, if the file there is still that file.
pub fn apply_after_done(action: &AfterDone, id: &str, path: &Path) -> anyhow::Result<()> {
    let current = fs::metadata(path).ok().map(|m| announce::file_id(&m));
    if current.as_deref() != Some(id) {
        tracing::info!(path = %path.display(), "file done; a different file (or none) is there now, leaving it");
        return Ok(());
    }
    match action {
        AfterDone::Keep => {}
        AfterDone::Delete => {
            fs::remove_file(path).with_context(|| format!("cannot delete {}", path.display()))?
        }
        AfterDone::Archive(dir) => {
            fs::create_dir_all(dir)?;
            let target = dir.join(path.file_name().context("file without a name")?);
            fs::rename(path, &target).with_context(|| {
                format!("cannot move {} to {}", path.display(), target.display())
            })?;
        }
    }
    tracing::info!(path = %path.display(), ?action, "file done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_done_parses() {
        assert_eq!("keep".parse(), Ok(AfterDone::Keep));
        assert_eq!("delete".parse(), Ok(AfterDone::Delete));
        assert_eq!("archive:/a".parse(), Ok(AfterDone::Archive("/a".into())));
        assert_eq!(
            "done=archive:/a".parse(),
            Ok(AfterDone::Archive("/a".into()))
        );
        assert_eq!("done=delete".parse(), Ok(AfterDone::Delete));
        assert!("archive:".parse::<AfterDone>().is_err());
    }
}
