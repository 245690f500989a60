//! Reading `tally.done` to learn when every byte of a pending file version is done (summed or
//! rejected), and how many bytes were rejected.
//!
//! The records are judged against the pending versions by [`super::kept`], which also keeps
//! the latest record of every stream in the folder for versions that become pending later.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{Liveness, Throttle};
use tally_core::{KafkaArgs, Topics};
use tally_model::messages::StreamDone;

use super::kept::{self, FileDone, Kept, Pending};

/// Tracks `tally.done` to learn when every byte of a pending file version is done.
pub(super) struct DoneTracker {
    consumer: BaseConsumer,
    topic: String,
    /// The records read, judged against the pending versions and kept for later ones.
    kept: Kept,
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
            kept: Kept::new(dir, Instant::now()),
            errors: Throttle::new(Duration::from_secs(10)),
            behind: false,
        })
    }

    /// Whether the last [`DoneTracker::poll`] left records unread: poll again at once.
    pub(super) fn behind(&self) -> bool {
        self.behind
    }

    /// A version that became pending: the next [`DoneTracker::poll`] returns it if a record
    /// read before says it is done already (counted before the watch announced it).
    pub(super) fn added(&mut self, id: &str) {
        self.kept.added(id);
    }

    /// Reads the done records already fetched, for at most `budget` (it never waits for
    /// more); returns pending versions that are done: every byte summed or rejected, or
    /// superseded by a later version of the same stream (a file that grew or was rewritten;
    /// its own units all came first).
    pub(super) fn poll(
        &mut self,
        budget: Duration,
        pending: &Pending,
        liveness: &Liveness,
    ) -> Vec<FileDone> {
        let deadline = Instant::now() + budget;
        self.behind = false;
        let mut by_stream = None;
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
            let by_stream = by_stream.get_or_insert_with(|| kept::by_stream(pending));
            let now = Instant::now();
            self.kept.record(done, pending, by_stream, now);
            if now >= deadline {
                self.behind = true;
                break;
            }
        }
        liveness.positions(&self.consumer, &self.topic);
        self.kept.take(pending, Instant::now())
    }
}
