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
//! restarted producer announces only what it had not announced yet. A file whose content
//! changes after it was announced (same device, inode and birth time) is not announced again:
//! that would count its old lines twice. It is reported at ERROR; the parsers reject its units
//! if they had not parsed them yet (another identity). A new file under an old name is
//! announced. A crash between the Kafka commit and that line re-announces a file: harmless,
//! the parsers' done-set skips its units.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use notify::Watcher;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{self, Liveness, Step, Throttle};
use tally_core::messages::{Outcome, UnitDone};
use tally_core::shutdown::CancellationToken;
use tally_core::{KafkaArgs, LivenessArgs, Topics};

use crate::announce::{self, Announcer};

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

/// Arguments of `tally producer watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Directory to watch (not recursive).
    #[arg(long)]
    pub dir: PathBuf,
    /// Full rescan interval, the fallback when inotify misses events (e.g. on NFS).
    #[arg(long, env = "TALLY_RESCAN_INTERVAL_MS", default_value_t = 5_000)]
    pub rescan_interval_ms: u64,
    /// Once every unit of a file is done: keep, delete, or archive:DIR
    /// (also spelled `--after done=delete`).
    #[arg(
        long = "after-done",
        alias = "after",
        env = "TALLY_AFTER_DONE",
        default_value = "keep"
    )]
    pub after_done: AfterDone,
    /// Exit after the first scan (announce what is complete, then stop).
    #[arg(long)]
    pub once: bool,
    /// For writers that use neither a rename nor a `.lock` file: a file is complete only once
    /// it was not modified (size and mtime stable) for this long. A renamed-in file whose last
    /// write is older than this is announced at once.
    #[arg(long, env = "TALLY_SETTLE_MS", default_value_t = 2_000)]
    pub settle_ms: u64,
    /// Liveness watchdog.
    #[command(flatten)]
    pub liveness: LivenessArgs,
}

/// Whether `name` may be a finished data file (not a temp, partial, hidden or lock file).
pub fn is_candidate_name(name: &str) -> bool {
    !(name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".lock"))
}

const STATE_FILE: &str = ".tally-producer";

/// The physical file behind an announcement: device, inode and birth time. Unlike the file id
/// it survives changes of content, and unlike (device, inode) alone it is not fooled by a new
/// file that got a recycled inode number.
type Inode = (u64, u64, i128);

fn inode_of(meta: &fs::Metadata) -> Option<Inode> {
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
struct State {
    /// Files announced and not finished: file id → path.
    pending: HashMap<String, PathBuf>,
    /// Every file id ever announced from this directory.
    announced: HashSet<String>,
    /// The physical files behind them (where the file system reports birth times).
    inodes: HashSet<Inode>,
    /// Changed files already reported, so that each is reported once.
    reported: HashSet<String>,
    log: Option<fs::File>,
}

impl State {
    fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let mut state = State::default();
        if let Ok(file) = fs::File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                let mut parts = line.splitn(4, ' ');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some("announced"), Some(id), Some(inode), Some(p)) => {
                        state.announced.insert(id.to_owned());
                        state.pending.insert(id.to_owned(), PathBuf::from(p));
                        if let Some(inode) = parse_inode(inode) {
                            state.inodes.insert(inode);
                        }
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

    fn record(&mut self, line: &str) -> anyhow::Result<()> {
        let log = self.log.as_mut().context("state not loaded")?;
        writeln!(log, "{line}")?;
        log.sync_data()?;
        Ok(())
    }
}

fn format_inode(inode: Option<Inode>) -> String {
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

/// Tracks `tally.done` to learn when every unit of a pending file is done.
struct DoneTracker {
    consumer: BaseConsumer,
    topic: String,
    /// file id → (units of the file, ids of its units seen done, how many were rejected).
    progress: HashMap<String, (u32, HashSet<String>, u32)>,
    /// Read errors (a broker outage), logged at a bounded rate.
    errors: Throttle,
}

impl DoneTracker {
    fn new(kafka: &KafkaArgs, topics: &Topics) -> anyhow::Result<Self> {
        let group = format!("{}.producer-done-reader", topics.parser_group);
        let consumer: BaseConsumer = tally_core::kafka::consumer_config(kafka, &group)
            .create()
            .context("cannot create the done-topic consumer")?;
        let metadata = consumer
            .fetch_metadata(Some(&topics.done), Duration::from_secs(30))
            .context("cannot read done-topic metadata")?;
        let mut tpl = TopicPartitionList::new();
        for topic in metadata.topics() {
            for p in topic.partitions() {
                tpl.add_partition_offset(&topics.done, p.id(), Offset::Beginning)?;
            }
        }
        if tpl.count() == 0 {
            bail!("topic {} has no partitions (run `tally init`)", topics.done);
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            topic: topics.done.clone(),
            progress: HashMap::new(),
            errors: Throttle::new(Duration::from_secs(10)),
        })
    }

    /// Reads done records for up to `wait`; returns files whose units are all done.
    fn poll(
        &mut self,
        wait: Duration,
        pending: &HashMap<String, PathBuf>,
        liveness: &Liveness,
    ) -> Vec<FileDone> {
        let mut complete = Vec::new();
        let deadline = Instant::now() + wait;
        while let Some(message) = self
            .consumer
            .poll(deadline.saturating_duration_since(Instant::now()))
        {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    // A broker outage: the consumer reconnects by itself; keep polling.
                    if let Some(skipped) = self.errors.allow() {
                        tracing::warn!(%error, skipped, "done-topic read failed");
                    }
                    break;
                }
            };
            liveness.progress();
            let Some(done) = message
                .payload()
                .and_then(|p| serde_json::from_slice::<UnitDone>(p).ok())
            else {
                continue;
            };
            if !pending.contains_key(&done.file_id) {
                continue;
            }
            let entry = self
                .progress
                .entry(done.file_id.clone())
                .or_insert_with(|| (done.units, HashSet::new(), 0));
            if entry.1.insert(done.unit_id) && done.outcome == Outcome::Rejected {
                entry.2 += 1;
            }
            if entry.1.len() as u32 >= entry.0 {
                let (units, _, rejected) = entry.clone();
                self.progress.remove(&done.file_id);
                complete.push(FileDone {
                    id: done.file_id,
                    units,
                    rejected,
                });
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        liveness.positions(&self.consumer, &self.topic);
        complete
    }
}

/// A file whose units are all done.
struct FileDone {
    id: String,
    units: u32,
    /// Units rejected (dead-lettered, not in the totals).
    rejected: u32,
}

/// Where `watch` lists the files it left in place because not all of their units were counted.
pub const REJECTED_FILE: &str = ".tally-rejected";

/// Lists a file not (fully) counted in `<dir>/.tally-rejected`, one line each:
/// `<unix time> <rejected>/<units> <path>`.
fn list_rejected(dir: &Path, file: &FileDone, path: &Path) -> anyhow::Result<()> {
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
        "{when} {}/{} {}",
        file.rejected,
        file.units,
        path.display()
    )?;
    out.sync_data()?;
    Ok(())
}

/// Applies `action` to the file `id` at `path`, if the file there is still that file.
fn apply_after_done(action: &AfterDone, id: &str, path: &Path) -> anyhow::Result<()> {
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

/// The complete, not yet announced files in `dir`, with their physical identity.
/// What a scan found: complete files to announce (with their physical identity), and when the
/// next file still being written settles, if any.
struct Scan {
    found: Vec<(Vec<tally_core::messages::WorkUnit>, Option<Inode>)>,
    next_settled: Option<Instant>,
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

fn scan(dir: &Path, state: &mut State, unit_bytes: u64, settle: Duration) -> anyhow::Result<Scan> {
    let mut found = Vec::new();
    let mut next_settled: Option<Instant> = None;
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_candidate_name(name) || dir.join(format!("{name}.lock")).exists() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let id = announce::file_id(&meta);
        if !meta.is_file() || state.announced.contains(&id) {
            continue;
        }
        let inode = inode_of(&meta);
        if inode.is_some_and(|i| state.inodes.contains(&i)) {
            // The same physical file, with other content than when it was announced: its
            // writer broke the contract. Announcing it again would count its old lines twice.
            if state.reported.insert(id) {
                tracing::error!(
                    path = %entry.path().display(),
                    "file changed after it was announced; not announced again (its units are \
                     rejected by the parsers if not parsed yet)"
                );
            }
            continue;
        }
        let wait = unsettled_for(&meta, settle);
        if !wait.is_zero() {
            // Still being written, perhaps: look again once it may have settled.
            let at = Instant::now() + wait;
            next_settled = Some(next_settled.map_or(at, |n| n.min(at)));
            continue;
        }
        match announce::describe(&entry.path(), unit_bytes) {
            Ok(units) => found.push((units, inode)),
            // Vanished or replaced between listing and stat: the next scan sees what is there.
            Err(error) => tracing::debug!(%error, "skipping file for now"),
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
    unit_bytes: u64,
    args: &WatchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let topics = Topics::new(&kafka.topic_prefix);
    let mut state = State::load(&dir)?;
    let transactional_id = format!("{}.producer.{}", kafka.topic_prefix, dir.display());
    let liveness = Liveness::start("watch", kafka, args.liveness.limit(Duration::ZERO));
    // Started (or restarted) during a broker outage: wait for the broker, as every stage does.
    let start = liveness.step("start the watcher");
    let connect = || -> anyhow::Result<_> {
        Ok((
            Announcer::new(kafka, &transactional_id)?,
            DoneTracker::new(kafka, &topics)?,
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
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = tx.send(());
    })
    .context("cannot start inotify")?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(%error, "inotify unavailable, relying on periodic rescans");
    }
    tracing::info!(dir = %dir.display(), pending = state.pending.len(), "watching");

    let rescan = Duration::from_millis(args.rescan_interval_ms.max(10));
    let settle = Duration::from_millis(args.settle_ms);
    let mut next_scan = Instant::now();
    while !shutdown.is_cancelled() {
        let mut triggered = false;
        while rx.try_recv().is_ok() {
            triggered = true;
        }
        if triggered || Instant::now() >= next_scan {
            next_scan = Instant::now() + rescan;
            let scanned = scan(&dir, &mut state, unit_bytes, settle)?;
            if let Some(at) = scanned.next_settled {
                next_scan = next_scan.min(at);
            }
            for (units, inode) in scanned.found {
                let (id, path) = (units[0].file_id.clone(), units[0].path.clone());
                if let Err(error) = announcer.announce(&units) {
                    if args.once {
                        return Err(error);
                    }
                    failing.get_or_insert_with(|| liveness.step("announce a file"));
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
                liveness.progress();
                state.announced.insert(id.clone());
                state.inodes.extend(inode);
                state.pending.insert(id, PathBuf::from(&path));
                tracing::info!(path, units = units.len(), "announced");
            }
            if args.once {
                break;
            }
        }
        for file in tracker.poll(Duration::from_millis(200), &state.pending, &liveness) {
            let id = &file.id;
            if let Some(path) = state.pending.remove(id) {
                if file.rejected > 0 {
                    // Not (fully) in the totals: the file is all that is left of those lines.
                    tracing::error!(
                        path = %path.display(),
                        rejected = file.rejected,
                        units = file.units,
                        "file not fully counted (units rejected, reasons on the dead-letter \
                         topic); left in place and listed in {REJECTED_FILE}"
                    );
                    list_rejected(&dir, &file, &path)?;
                } else if let Err(error) = apply_after_done(&args.after_done, id, &path) {
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
