//! Matching done records against the watch's pending file versions, without Kafka.
//!
//! A version is done when a done record says every byte of it is summed or rejected, or when a
//! record of a later version of the same stream covers its size (superseded). A record can come
//! before the version is pending: another producer announced the file first, and the parsers
//! skip the watch's own announcement without writing a new record. So the latest record of each
//! stream in the folder is kept for [`RECENT_KEEP`], and a version that becomes pending is
//! looked up there once: at the end of the first read after it was added, after that read's
//! own records (a later version read then supersedes it instead).
//!
//! The work per record is constant, and so is the work of a poll that reads nothing: a watch
//! that polls every few milliseconds does not walk every stream done in the last hour.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tally_model::identity;
use tally_model::messages::StreamDone;

/// How long a done record of a file in the folder is kept for a pending version to match: far
/// longer than a file takes from landing in the folder to being announced by the watch.
pub const RECENT_KEEP: Duration = Duration::from_secs(3600);

/// How often the kept records are pruned of those older than [`RECENT_KEEP`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Pending versions: file id → path and stream (if known).
pub(super) type Pending = HashMap<String, (PathBuf, Option<String>)>;

/// A file version whose bytes are all done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileDone {
    pub(super) id: String,
    pub(super) file_bytes: u64,
    /// Bytes whose units were rejected (dead-lettered, not in the totals).
    pub(super) rejected_bytes: u64,
    /// A later version of the file was counted instead: the file at the path is another
    /// version now, so no life-cycle action applies to this one.
    pub(super) superseded: bool,
}

/// The latest done record of each stream in the folder, and the versions found done.
pub(super) struct Kept {
    /// The watched folder: only records of files in it are kept.
    dir: PathBuf,
    /// Stream → its latest record and when it was read.
    streams: HashMap<String, (StreamDone, Instant)>,
    /// File id of a kept record → its stream.
    files: HashMap<String, String>,
    /// When the kept records were last pruned.
    pruned: Instant,
    /// Versions found done by the records read, not yet handed out by [`Kept::take`].
    found: Vec<FileDone>,
    /// Versions that became pending since the last [`Kept::take`], to look up among the kept
    /// records then.
    added: Vec<String>,
}

impl Kept {
    pub(super) fn new(dir: &Path, now: Instant) -> Self {
        Self {
            dir: dir.to_path_buf(),
            streams: HashMap::new(),
            files: HashMap::new(),
            pruned: now,
            found: Vec::new(),
            added: Vec::new(),
        }
    }

    /// Judges one record read from the done topic against `pending`, whose versions are
    /// indexed by stream in `by_stream` ([`by_stream`]), and keeps it if its file is in the
    /// folder.
    pub(super) fn record(
        &mut self,
        done: StreamDone,
        pending: &Pending,
        by_stream: &HashMap<&str, Vec<&str>>,
        now: Instant,
    ) {
        // A later version counted instead: judged on records read now, never on kept ones (a
        // kept record of an older version says nothing about a newer one).
        for id in by_stream.get(done.stream.as_str()).into_iter().flatten() {
            if *id != done.file_id {
                self.found.extend(superseded_by(id, &done));
            }
        }
        if pending.contains_key(&done.file_id) {
            self.found.extend(finished(&done));
        }
        if Path::new(&done.path).starts_with(&self.dir) {
            if let Some((old, _)) = self.streams.get(&done.stream) {
                self.files.remove(&old.file_id);
            }
            self.files.insert(done.file_id.clone(), done.stream.clone());
            self.streams.insert(done.stream.clone(), (done, now));
        }
    }

    /// A version that became pending; the next [`Kept::take`] looks it up among the kept
    /// records (done before the watch announced it).
    pub(super) fn added(&mut self, id: &str) {
        self.added.push(id.to_string());
    }

    /// The versions found done since the last call, each once: those the records read since
    /// found, then the versions added since that a kept record read less than
    /// [`RECENT_KEEP`] ago finishes, if still `pending`. A version found both ways is reported
    /// as the records found it. Prunes the kept records read longer than [`RECENT_KEEP`] ago,
    /// at most once per [`PRUNE_EVERY`].
    pub(super) fn take(&mut self, pending: &Pending, now: Instant) -> Vec<FileDone> {
        if now.saturating_duration_since(self.pruned) >= PRUNE_EVERY {
            self.pruned = now;
            let files = &mut self.files;
            self.streams.retain(|_, (done, seen)| {
                let keep = now.saturating_duration_since(*seen) < RECENT_KEEP;
                if !keep {
                    files.remove(&done.file_id);
                }
                keep
            });
        }
        let mut found = std::mem::take(&mut self.found);
        for id in std::mem::take(&mut self.added) {
            let kept = self
                .files
                .get(&id)
                .and_then(|stream| self.streams.get(stream));
            if let Some((done, seen)) = kept {
                if done.file_id == id
                    && pending.contains_key(&id)
                    && now.saturating_duration_since(*seen) < RECENT_KEEP
                {
                    found.extend(finished(done));
                }
            }
        }
        // Stable: of a version found twice, the first (a record's verdict) stays.
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.dedup_by(|a, b| a.id == b.id);
        found
    }

    /// How many streams are kept, and how many file ids are indexed.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.streams.len(), self.files.len())
    }
}

/// The pending versions whose stream is known, by stream.
pub(super) fn by_stream(pending: &Pending) -> HashMap<&str, Vec<&str>> {
    let mut index: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, (_, stream)) in pending {
        if let Some(stream) = stream {
            index.entry(stream.as_str()).or_default().push(id.as_str());
        }
    }
    index
}

/// The version `done` describes, when every byte of it is summed or rejected.
fn finished(done: &StreamDone) -> Option<FileDone> {
    done.finished(done.file_bytes).then(|| FileDone {
        id: done.file_id.clone(),
        file_bytes: done.file_bytes,
        rejected_bytes: done.rejected.bytes(),
        superseded: false,
    })
}

/// The pending version `id` of `done`'s stream, when `done` (another version) already covers
/// its size: a later version was counted instead.
fn superseded_by(id: &str, done: &StreamDone) -> Option<FileDone> {
    identity::file_id_size(id)
        .is_some_and(|size| done.file_bytes >= size)
        .then(|| FileDone {
            id: id.to_string(),
            file_bytes: done.file_bytes,
            rejected_bytes: 0,
            superseded: true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/data/in";

    /// A done record of `stream`'s version `file_id` (`file_bytes` long), with `summed` of
    /// it summed, in `dir`.
    fn done(stream: &str, file_id: &str, file_bytes: u64, summed: u64, dir: &str) -> StreamDone {
        serde_json::from_value(serde_json::json!({
            "stream": stream, "file_id": file_id, "path": format!("{dir}/{stream}.txt"),
            "file_bytes": file_bytes, "fingerprint": 1,
            "summed": if summed > 0 { vec![[0, summed]] } else { vec![] }, "rejected": [],
        }))
        .unwrap()
    }

    fn pending(entries: &[(&str, Option<&str>)]) -> Pending {
        entries
            .iter()
            .map(|(id, stream)| {
                let path = PathBuf::from(format!("{DIR}/{id}"));
                (id.to_string(), (path, stream.map(str::to_string)))
            })
            .collect()
    }

    /// Reads `records` as one poll does, with `pending` as it stands.
    fn read(kept: &mut Kept, records: Vec<StreamDone>, pending: &Pending, now: Instant) {
        let index = by_stream(pending);
        for record in records {
            kept.record(record, pending, &index, now);
        }
    }

    fn ids(found: &[FileDone]) -> Vec<(&str, bool)> {
        found
            .iter()
            .map(|f| (f.id.as_str(), f.superseded))
            .collect()
    }

    // File ids carry their size in hex, last (`identity::file_id_size`).
    const SMALL: &str = "fe00-1-2-a"; // 10 bytes
    const LARGE: &str = "fe00-1-3-14"; // 20 bytes

    #[test]
    fn a_record_read_while_pending_finishes_its_version_once() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let pending = pending(&[("f1", Some("s1"))]);
        read(&mut kept, vec![done("s1", "f1", 10, 4, DIR)], &pending, t);
        assert!(kept.take(&pending, t).is_empty(), "4 of 10 bytes summed");
        let twice = vec![done("s1", "f1", 10, 10, DIR), done("s1", "f1", 10, 10, DIR)];
        read(&mut kept, twice, &pending, t);
        assert_eq!(ids(&kept.take(&pending, t)), [("f1", false)]);
        assert!(kept.take(&pending, t).is_empty(), "handed out once");
    }

    #[test]
    fn a_version_without_a_known_stream_is_finished_by_its_file_id() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let pending = pending(&[("f1", None)]);
        read(&mut kept, vec![done("s1", "f1", 10, 10, DIR)], &pending, t);
        assert_eq!(ids(&kept.take(&pending, t)), [("f1", false)]);
    }

    #[test]
    fn a_version_done_before_it_was_pending_is_found_once_added() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let none = Pending::new();
        let records = vec![
            done("s1", "f1", 10, 10, DIR),
            done("s2", "f2", 10, 10, "/elsewhere"),
        ];
        read(&mut kept, records, &none, t);
        assert!(kept.take(&none, t).is_empty());
        let pending = pending(&[("f1", Some("s1")), ("f2", Some("s2"))]);
        kept.added("f1");
        kept.added("f2");
        assert_eq!(
            ids(&kept.take(&pending, t)),
            [("f1", false)],
            "f2 is outside the folder: not kept"
        );
        assert!(kept.take(&pending, t).is_empty(), "looked up once");
    }

    #[test]
    fn a_later_version_read_in_the_same_poll_outweighs_the_kept_record() {
        // The watch announces SMALL, done before; before its next read, the file grew and was
        // counted, in the folder or after it was moved out of it (then it is not kept).
        for dir in [DIR, "/elsewhere"] {
            let t = Instant::now();
            let mut kept = Kept::new(Path::new(DIR), t);
            let none = Pending::new();
            read(&mut kept, vec![done("s1", SMALL, 10, 10, DIR)], &none, t);
            let pending = pending(&[(SMALL, Some("s1"))]);
            kept.added(SMALL);
            read(&mut kept, vec![done("s1", LARGE, 20, 20, dir)], &pending, t);
            assert_eq!(ids(&kept.take(&pending, t)), [(SMALL, true)], "{dir}");
        }
    }

    #[test]
    fn a_newer_record_of_a_stream_replaces_the_kept_one() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let none = Pending::new();
        let records = vec![
            done("s1", SMALL, 10, 10, DIR),
            done("s1", LARGE, 20, 20, DIR),
        ];
        read(&mut kept, records, &none, t);
        assert_eq!(kept.len(), (1, 1));
        let pending = pending(&[(SMALL, Some("s1"))]);
        kept.added(SMALL);
        assert!(
            kept.take(&pending, t).is_empty(),
            "SMALL's record is gone; a kept record never supersedes"
        );
    }

    #[test]
    fn records_read_longer_ago_than_the_keep_count_no_more() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let none = Pending::new();
        read(&mut kept, vec![done("s1", "f1", 10, 10, DIR)], &none, t);
        let later = t + RECENT_KEEP / 2;
        read(&mut kept, vec![done("s2", "f2", 10, 10, DIR)], &none, later);
        let pending = pending(&[("f1", Some("s1")), ("f2", Some("s2"))]);
        // A prune 10 s before f1's record is an hour old; then the two are added, an hour
        // and a second after it, before the next prune.
        assert!(kept
            .take(&none, t + RECENT_KEEP - Duration::from_secs(10))
            .is_empty());
        assert_eq!(kept.len(), (2, 2));
        let now = t + RECENT_KEEP + Duration::from_secs(1);
        kept.added("f1");
        kept.added("f2");
        assert_eq!(ids(&kept.take(&pending, now)), [("f2", false)]);
        kept.take(&pending, now + PRUNE_EVERY);
        assert_eq!(kept.len(), (1, 1), "f1's record and its index entry pruned");
    }

    #[test]
    fn a_version_no_longer_pending_is_not_reported() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let none = Pending::new();
        read(&mut kept, vec![done("s1", "f1", 10, 10, DIR)], &none, t);
        kept.added("f1");
        assert!(kept.take(&none, t).is_empty());
    }

    /// The watch polls every few milliseconds; a poll that reads nothing must not walk the
    /// streams done in the last hour (tens of thousands in a busy folder). 200,000 kept
    /// records and 20,000 polls 50 ms apart (16 prunes): a walk per poll would be 4·10⁹ steps.
    #[test]
    fn a_poll_that_reads_nothing_does_not_walk_the_kept_records() {
        let t = Instant::now();
        let mut kept = Kept::new(Path::new(DIR), t);
        let none = Pending::new();
        let records = (0..200_000)
            .map(|i| done(&format!("s{i}"), &format!("f{i}"), 10, 10, DIR))
            .collect();
        read(&mut kept, records, &none, t);
        let started = Instant::now();
        for i in 0..20_000u32 {
            let now = t + Duration::from_millis(50 * u64::from(i));
            assert!(kept.take(&none, now).is_empty());
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "20,000 polls took {took:?}");
        assert_eq!(kept.len(), (200_000, 200_000), "none older than the keep");
    }
}
