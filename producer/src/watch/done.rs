//! Reading `tally.done` to learn when every byte of a pending file version is done (summed or
//! rejected), and how many bytes were rejected.
//!
//! A file can be done before the watch sees it pending: another producer (`producer serve`
//! writing into the watched folder, an operator's `publish`) announced it first, and the
//! parsers skip the watch's own, later announcement without a new done record. So the tracker
//! keeps the latest done record of every stream in its folder for [`RECENT_KEEP`], and
//! matches pending files against what it keeps, not only against records read in this poll.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{Liveness, Throttle};
use tally_core::{KafkaArgs, Topics};
use tally_model::identity;
use tally_model::messages::StreamDone;

/// How long a done record of a file in the folder is kept for a pending version to match: far
/// longer than a file takes from landing in the folder to being announced by the watch.
pub const RECENT_KEEP: Duration = Duration::from_secs(3600);

/// Tracks `tally.done` to learn when every byte of a pending file version is done.
pub(super) struct DoneTracker {
    consumer: BaseConsumer,
    topic: String,
    /// The watched folder: only done records of files in it are kept.
    dir: PathBuf,
    /// The latest done record of each stream in the folder, with when it was read.
    recent: HashMap<String, (StreamDone, Instant)>,
    /// Read errors (a broker outage), logged at a bounded rate.
    errors: Throttle,
    /// The last poll ran out of its budget with records still coming (catching up at start).
    behind: bool,
}

impl DoneTracker {
    pub(super) fn new(kafka: &KafkaArgs, topics: &Topics, dir: &Path) -> anyhow::Result<Self> {
        let group = format!("{}.producer-done-reader", topics.parser_group);
        let consumer = tally_core::kafka::reader(kafka, &group, tally_core::kafka::Ends::Silent)?;
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
            dir: dir.to_path_buf(),
            recent: HashMap::new(),
            errors: Throttle::new(Duration::from_secs(10)),
            behind: false,
        })
    }

    /// Whether the last [`DoneTracker::poll`] left records unread: poll again at once.
    pub(super) fn behind(&self) -> bool {
        self.behind
    }

    /// Reads the done records already fetched, for at most `budget` (it never waits for
    /// more); returns pending versions (file id → path and stream) that are done: every byte
    /// summed or rejected, or superseded by a later version of the same stream (a file that
    /// grew or was rewritten; its own units all came first).
    pub(super) fn poll(
        &mut self,
        budget: Duration,
        pending: &HashMap<String, (PathBuf, Option<String>)>,
        liveness: &Liveness,
    ) -> Vec<FileDone> {
        let mut complete = Vec::new();
        let deadline = Instant::now() + budget;
        self.behind = false;
        while let Some(message) = self.consumer.poll(Duration::ZERO) {
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
                .and_then(|p| serde_json::from_slice::<StreamDone>(p).ok())
            else {
                continue;
            };
            // A later version counted instead: judged on records read now, never on kept
            // ones (a kept record of an older version says nothing about a newer one).
            complete.extend(pending.iter().filter_map(|(id, (_, stream))| {
                (*id != done.file_id && stream.as_deref() == Some(&done.stream))
                    .then(|| superseded_by(id, &done))?
            }));
            if pending.contains_key(&done.file_id) {
                complete.extend(finished(&done));
            }
            if Path::new(&done.path).starts_with(&self.dir) {
                self.recent
                    .insert(done.stream.clone(), (done, Instant::now()));
            }
            if Instant::now() >= deadline {
                self.behind = true;
                break;
            }
        }
        self.recent
            .retain(|_, (_, seen)| seen.elapsed() < RECENT_KEEP);
        // Every byte of the version itself done: also judged on the kept records of the folder
        // (done before the version was pending).
        complete.extend(self.recent.values().filter_map(|(done, _)| {
            pending
                .contains_key(&done.file_id)
                .then(|| finished(done))?
        }));
        complete.sort_by(|a, b| a.id.cmp(&b.id));
        complete.dedup_by(|a, b| a.id == b.id);
        liveness.positions(&self.consumer, &self.topic);
        complete
    }
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

/// A file version whose bytes are all done.
pub(super) struct FileDone {
    pub(super) id: String,
    pub(super) file_bytes: u64,
    /// Bytes whose units were rejected (dead-lettered, not in the totals).
    pub(super) rejected_bytes: u64,
    /// A later version of the file was counted instead: the file at the path is another
    /// version now, so no life-cycle action applies to this one.
    pub(super) superseded: bool,
}
