//! The watcher's memory of a directory, in `<dir>/.tally-producer`: one line per announced or
//! finished file, appended and synced, so a restarted watcher announces only what it had not.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

const STATE_FILE: &str = ".tally-producer";

/// The physical file behind an announcement: device, inode and birth time. Unlike the file id
/// it survives changes of content, and unlike (device, inode) alone it is not fooled by a new
/// file that got a recycled inode number.
pub(super) type Inode = (u64, u64, i128);

pub(super) fn inode_of(meta: &fs::Metadata) -> Option<Inode> {
    use std::os::unix::fs::MetadataExt;
    let born = meta
        .created()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((meta.dev(), meta.ino(), born.as_nanos() as i128))
}

/// The producer's memory of a directory.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Files announced and not finished: file id → path.
    pub(super) pending: HashMap<String, (PathBuf, Option<String>)>,
    /// Every file id ever announced from this directory.
    pub(super) announced: HashSet<String>,
    /// The physical files behind them (where the file system reports birth times).
    pub(super) inodes: HashSet<Inode>,
    /// Files refused (their time is outside the window), said once each (not kept on disk).
    pub(super) refused: HashSet<String>,
    pub(super) log: Option<fs::File>,
}

impl State {
    pub(super) fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let mut state = State::default();
        if let Ok(file) = fs::File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                let mut parts = line.splitn(4, ' ');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some("announced"), Some(id), Some(inode), Some(p)) => {
                        state.announced.insert(id.to_owned());
                        let inode = parse_inode(inode);
                        state
                            .pending
                            .insert(id.to_owned(), (PathBuf::from(p), stream_of(inode)));
                        state.inodes.extend(inode);
                    }
                    (Some("finished"), Some(id), _, _) => {
                        state.pending.remove(id);
                    }
                    _ => tracing::warn!(line, "ignoring unreadable producer state line"),
                }
            }
        }
        state.log = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        );
        Ok(state)
    }

    pub(super) fn record(&mut self, line: &str) -> anyhow::Result<()> {
        let log = self.log.as_mut().context("state not loaded")?;
        writeln!(log, "{line}")?;
        log.sync_data()?;
        Ok(())
    }
}

/// The stream id (`tally_model::identity::stream_id`) of a physical file.
pub(super) fn stream_of(inode: Option<Inode>) -> Option<String> {
    inode.map(|(dev, ino, born)| format!("{dev:x}-{ino:x}-{:x}", born as u128))
}

pub(super) fn format_inode(inode: Option<Inode>) -> String {
    inode.map_or_else(
        || "-".to_owned(),
        |(dev, ino, born)| format!("{dev}:{ino}:{born}"),
    )
}

fn parse_inode(s: &str) -> Option<Inode> {
    let mut parts = s.split(':');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}
