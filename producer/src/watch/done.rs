//! Reading `tally.done` to learn when every byte of a pending file version is done (summed or
//! rejected), and how many bytes were rejected.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::liveness::{Liveness, Throttle};
use tally_core::{KafkaArgs, Topics};
use tally_model::identity;
use tally_model::messages::StreamDone;

/// Tracks `tally.done` to learn when every byte of a pending file version is done.
pub(super) struct DoneTracker {
    consumer: BaseConsumer,
    topic: String,
    /// Read errors (a broker outage), logged at a bounded rate.
    errors: Throttle,
}

impl DoneTracker {
    pub(super) fn new(kafka: &KafkaArgs, topics: &Topics) -> anyhow::Result<Self> {
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
            errors: Throttle::new(Duration::from_secs(10)),
        })
    }

    /// Reads done records for up to `wait`; returns pending versions (file id → path and
    /// stream) that are done: every byte summed or rejected, or superseded by a later version
    /// of the same stream (a file that grew or was rewritten; its own units all came first).
    pub(super) fn poll(
        &mut self,
        wait: Duration,
        pending: &HashMap<String, (PathBuf, Option<String>)>,
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
                .and_then(|p| serde_json::from_slice::<StreamDone>(p).ok())
            else {
                continue;
            };
            for (id, (_, stream)) in pending {
                if *id == done.file_id && done.finished(done.file_bytes) {
                    complete.push(FileDone {
                        id: id.clone(),
                        file_bytes: done.file_bytes,
                        rejected_bytes: done.rejected.bytes(),
                        superseded: false,
                    });
                } else if *id != done.file_id
                    && stream.as_deref() == Some(&done.stream)
                    && identity::file_id_size(id).is_some_and(|size| done.file_bytes >= size)
                {
                    complete.push(FileDone {
                        id: id.clone(),
                        file_bytes: done.file_bytes,
                        rejected_bytes: 0,
                        superseded: true,
                    });
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        liveness.positions(&self.consumer, &self.topic);
        complete
    }
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
