//! `tally producer watch`: announce files written into a directory by any program, once they
//! are complete, and apply the life-cycle action once every unit of a file is done.
//!
//! A file is complete when it is in the directory under its final name (names starting with `.`
//! or ending in `.tmp`, `.part` or `.lock` are ignored), no `<name>.lock` exists beside it, and
//! it was not modified for `--settle-ms` (for writers that write in place: a file still being
//! written keeps changing its mtime).
//! inotify (via `notify`) triggers a scan at once; a periodic rescan covers file systems
//! without inotify (NFS) and missed events.
//!
//! What was announced and finished is kept in `<dir>/.tally-producer`, one line per event, so a
//! restarted producer announces only what it had not announced yet. A file that changes after
//! it was announced is a new version and is announced again once complete: the parsers count
//! only what the earlier version did not (an append adds its new lines; a rewrite in place is
//! counted as new content, its old version's uncounted units rejected). A new file under an
//! old name is announced. A crash between the Kafka commit and that line re-announces a file:
//! harmless, the parsers' done-state skips its bytes.

mod done;
mod kept;
mod lifecycle;
mod state;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::Watcher;
use tally_core::args::{RescanArgs, SettleArgs};
use tally_core::liveness::{self, Liveness, Step};
use tally_core::shutdown::CancellationToken;
use tally_core::{KafkaArgs, LivenessArgs, Topics};

use crate::announce::{self, Announcer, Split};
use done::DoneTracker;
pub use lifecycle::{apply_after_done, list_rejected, AfterDone, REJECTED_FILE};
use state::{format_inode, inode_of, stream_of, Inode, State};

/// Least time from the end of a scan to the next one that events start: a writer appending to
/// a file in the folder raises an event per write, and a scan reads the whole folder. A lone
/// event (a rename into the folder) is scanned at once. See [`scan_spacing`].
pub const SCAN_SPACING: Duration = Duration::from_millis(50);

/// How long after a scan that took `took` the next one that events start may come:
/// [`SCAN_SPACING`], or four times the scan where that is longer, so that scans of a large
/// folder take at most a fifth of a core however many events come.
pub fn scan_spacing(took: Duration) -> Duration {
    SCAN_SPACING.max(took.saturating_mul(4))
}

/// Longest sleep between two reads of the done topic (what is done waits that long at most for
/// its life-cycle action).
const DONE_LOOK: Duration = Duration::from_millis(50);

/// What happens to a file once every byte of it is done (`producer watch`, `standalone`).
#[derive(Debug, Clone, clap::Args)]
pub struct AfterDoneArgs {
    /// Once every unit of a file is done: keep, delete, or archive:DIR
    /// (also spelled `--after done=delete`).
    #[arg(
        long = "after-done",
        alias = "after",
        env = "TALLY_AFTER_DONE",
        default_value = "keep"
    )]
    pub after_done: AfterDone,
}

/// Arguments of `tally producer watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Directory to watch (not recursive).
    #[arg(long, env = "TALLY_WATCH_DIR")]
    pub dir: PathBuf,
    /// The full rescans.
    #[command(flatten)]
    pub rescan: RescanArgs,
    /// When a file is complete.
    #[command(flatten)]
    pub settle: SettleArgs,
    /// What happens to a file once it is done.
    #[command(flatten)]
    pub after: AfterDoneArgs,
    /// Exit after the first scan (announce what is complete, then stop).
    #[arg(long)]
    pub once: bool,
    /// Liveness watchdog.
    #[command(flatten)]
    pub liveness: LivenessArgs,
}

/// Whether an event of the watched folder `dir` may change what a scan finds (`producer
/// watch`, `standalone`). Reads are not: a scan opens the folder and reads its files, and each
/// such event starting a scan would keep the folder scanned for ever while nothing changes.
/// Nor is a change to a file no scan looks at (a temporary, partial or hidden one, the watch's
/// own state file), until it is renamed to a data file's name; a lock file is looked at.
pub fn may_change_a_scan(dir: &Path, event: &notify::Result<notify::Event>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let Ok(event) = event else {
        return true;
    };
    if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
    {
        return false;
    }
    // No path: lost events (a full queue, notify's `Rescan` flag) and the like.
    event.paths.is_empty()
        || event.paths.iter().any(|path| {
            path == dir
                || path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_none_or(|name| is_candidate_name(name) || name.ends_with(".lock"))
        })
}

/// Whether `name` may be a finished data file (not a temp, partial, hidden or lock file).
pub fn is_candidate_name(name: &str) -> bool {
    !(name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".lock"))
}

/// What a scan found: complete files to announce (with their physical identity), and when the
/// next file still being written settles, if any.
struct Scan {
    found: Vec<(Vec<tally_model::messages::WorkUnit>, Option<Inode>)>,
    next_settled: Option<Instant>,
}

/// Whether the entry `name` of `dir` (with metadata `meta`) is a complete file by the rules
/// above: `Some(Duration::ZERO)` if it is, `Some(wait)` if it may be once unmodified for `wait`
/// more, `None` if it is no data file (a hidden, temporary, partial or lock file, one with a
/// `.lock` beside it, not a regular file).
pub fn completeness(
    dir: &Path,
    name: &str,
    meta: &fs::Metadata,
    settle: Duration,
) -> Option<Duration> {
    if !is_candidate_name(name) || !meta.is_file() || dir.join(format!("{name}.lock")).exists() {
        return None;
    }
    Some(unsettled_for(meta, settle))
}

/// How long `meta`'s file must still stay unmodified to count as complete (zero: it is).
fn unsettled_for(meta: &fs::Metadata, settle: Duration) -> Duration {
    let age = meta
        .modified()
        .ok()
        .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
        .unwrap_or(Duration::ZERO);
    settle.saturating_sub(age)
}

/// A data file of a folder by the rules above: its path, metadata, and how long it must stay
/// unmodified still to count as complete (zero: it is).
pub struct Candidate {
    /// Where it is.
    pub path: PathBuf,
    /// Its metadata when listed.
    pub meta: fs::Metadata,
    /// What [`completeness`] said.
    pub wait: Duration,
}

/// The data files of `dir` (complete or still settling), in name order.
pub fn candidates(dir: &Path, settle: Duration) -> anyhow::Result<Vec<Candidate>> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    tracing::debug!(entries = entries.len(), "folder listed");
    entries.sort_by_key(|e| e.file_name());
    Ok(entries
        .into_iter()
        .filter_map(|entry| {
            let name = entry.file_name();
            let meta = entry.metadata().ok()?;
            let wait = completeness(dir, name.to_str()?, &meta, settle)?;
            Some(Candidate {
                path: entry.path(),
                meta,
                wait,
            })
        })
        .collect())
}

fn scan(dir: &Path, state: &mut State, split: &Split, settle: Duration) -> anyhow::Result<Scan> {
    let mut found = Vec::new();
    let mut next_settled: Option<Instant> = None;
    for Candidate { path, meta, wait } in candidates(dir, settle)? {
        let id = announce::file_id(&meta);
        if state.announced.contains(&id) {
            continue;
        }
        let inode = inode_of(&meta);
        if !wait.is_zero() {
            // Still being written, perhaps: look again once it may have settled.
            let at = Instant::now() + wait;
            next_settled = Some(next_settled.map_or(at, |n| n.min(at)));
            continue;
        }
        if state.refused.contains(&id) {
            continue;
        }
        match announce::describe(&path, split) {
            Ok(units) => found.push((units, inode)),
            Err(error) => match error.downcast_ref::<announce::Refused>() {
                Some(refused) => {
                    announce::say_refused(refused);
                    state.refused.insert(id);
                }
                // Vanished or replaced between listing and stat: the next scan sees what is
                // there.
                None => tracing::debug!(%error, "skipping file for now"),
            },
        }
    }
    Ok(Scan {
        found,
        next_settled,
    })
}

/// Runs the watcher until `shutdown` is cancelled (or after one scan with `--once`).
pub fn run(
    kafka: &KafkaArgs,
    split: &Split,
    args: &WatchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let topics = Topics::new(&kafka.topic_prefix);
    let mut state = State::load(&dir)?;
    let transactional_id = format!("{}.producer.{}", kafka.topic_prefix, dir.display());
    let liveness = Liveness::start("watch", kafka, &args.liveness, Duration::ZERO)?;
    // Started (or restarted) during a broker outage: wait for the broker, as every stage does.
    let start = liveness.step("start the watcher");
    let connect = || -> anyhow::Result<_> {
        Ok((
            Announcer::new(kafka, &transactional_id)?,
            DoneTracker::new(kafka, &topics, &dir)?,
        ))
    };
    let started = if args.once {
        connect()
    } else {
        liveness::retry(shutdown, "start the watcher", connect)
    };
    let (mut announcer, mut tracker) = match started {
        Ok(clients) => clients,
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(error) => return Err(error),
    };
    drop(start);
    // Open from the first failed announcement to the next one that succeeds.
    let mut failing: Option<Step> = None;

    let (tx, rx) = std::sync::mpsc::channel();
    let watched = dir.clone();
    let mut watcher = notify::recommended_watcher(move |event| {
        if may_change_a_scan(&watched, &event) {
            let _ = tx.send(());
        }
    })
    .context("cannot start inotify")?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(%error, "inotify unavailable, relying on periodic rescans");
    }
    tracing::info!(dir = %dir.display(), pending = state.pending.len(), "watching");

    let rescan = Duration::from_millis(args.rescan.rescan_interval_ms.max(10));
    let settle = Duration::from_millis(args.settle.settle_ms);
    let mut next_scan = Instant::now();
    // An event came since the last scan; when events may start the next one.
    let mut triggered = false;
    let mut spaced_at = Instant::now();
    while !shutdown.is_cancelled() {
        // Asleep until an event, the next scan or the next look at the done topic: a file
        // renamed into the folder is scanned at once, not after a wait on the done topic.
        let due = if triggered {
            next_scan.min(spaced_at)
        } else {
            next_scan
        };
        let wait = if tracker.behind() {
            Duration::ZERO
        } else {
            due.saturating_duration_since(Instant::now()).min(DONE_LOOK)
        };
        match rx.recv_timeout(wait) {
            Ok(()) => triggered = true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
        while rx.try_recv().is_ok() {
            triggered = true;
        }
        let now = Instant::now();
        if (triggered && now >= spaced_at) || now >= next_scan {
            triggered = false;
            next_scan = now + rescan;
            let scanned = scan(&dir, &mut state, split, settle)?;
            spaced_at = Instant::now() + scan_spacing(now.elapsed());
            if let Some(at) = scanned.next_settled {
                next_scan = next_scan.min(at);
            }
            for (units, inode) in scanned.found {
                let (id, path) = (units[0].file_id.clone(), units[0].path.clone());
                let version = if inode.is_some_and(|i| state.inodes.contains(&i)) {
                    "a new version (changed since announced)"
                } else {
                    "a new file"
                };
                let started = Instant::now();
                let announced = announcer.announce(&units);
                metrics::histogram!(tally_core::metrics::stage("watch").batch_seconds)
                    .record(started.elapsed());
                if let Err(error) = announced {
                    if args.once {
                        return Err(error);
                    }
                    failing.get_or_insert_with(|| liveness.step("announce a file"));
                    metrics::counter!(tally_core::metrics::stage("watch").retries).increment(1);
                    // Not recorded as announced: the next scan tries again.
                    tracing::error!(
                        error = format!("{error:#}"),
                        path,
                        "cannot announce, will retry"
                    );
                    next_scan = Instant::now() + rescan;
                    break;
                }
                state.record(&format!("announced {id} {} {path}", format_inode(inode)))?;
                failing = None;
                {
                    use tally_core::metrics as m;
                    metrics::counter!(m::PRODUCER_FILES).increment(1);
                    metrics::counter!(m::PRODUCER_UNITS).increment(units.len() as u64);
                    let bytes: u64 = units.iter().map(|u| u.end - u.start).sum();
                    metrics::counter!(m::PRODUCER_BYTES).increment(bytes);
                }
                liveness.progress();
                state.announced.insert(id.clone());
                state.inodes.extend(inode);
                tracker.added(&id);
                state
                    .pending
                    .insert(id, (PathBuf::from(&path), stream_of(inode)));
                tracing::info!(path, units = units.len(), version, "announced");
            }
            if args.once {
                break;
            }
        }
        for file in tracker.poll(DONE_LOOK, &state.pending, &liveness) {
            let id = &file.id;
            if let Some((path, _)) = state.pending.remove(id) {
                if file.superseded {
                    tracing::info!(path = %path.display(), "a later version of the file was counted");
                } else if file.rejected_bytes > 0 {
                    // Not (fully) in the totals: the file is all that is left of those lines.
                    tracing::error!(
                        path = %path.display(),
                        rejected_bytes = file.rejected_bytes,
                        file_bytes = file.file_bytes,
                        "file not fully counted (units rejected, reasons on the dead-letter \
                         topic); left in place and listed in {REJECTED_FILE}"
                    );
                    list_rejected(&dir, file.rejected_bytes, file.file_bytes, &path)?;
                } else if let Err(error) = apply_after_done(&args.after.after_done, id, &path) {
                    tracing::error!(%error, "life-cycle action failed; file left in place");
                }
                state.record(&format!("finished {id}"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_names() {
        assert!(is_candidate_name("usage-1.txt"));
        for name in [".x", "x.tmp", "x.part", "x.lock", ".tmp"] {
            assert!(!is_candidate_name(name), "{name}");
        }
    }
}
