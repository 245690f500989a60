//! Pruning the done-set, so that it holds the files that may still be announced, not every
//! file ever parsed: a stream's state is forgotten (a tombstone on the compacted done topic)
//! once all of its bytes are done, its last record is older than `--done-retention`, and its
//! file is gone from its path (deleted or archived after it was done, or replaced by another
//! file). Such a file cannot be announced again: announcing reads the file. Re-announcing an
//! archived copy later would count it again; docs/operations.md says so.
//!
//! The tombstones commit in a transaction together with the partitions' committed offsets
//! (unchanged), so a parser that lost the partitions meanwhile is fenced instead of deleting
//! state its successor may have just written.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tally_core::kafka;
use tally_core::txn::{Group, TxnProducer};
use tally_model::identity::stream_id;
use tally_model::messages::StreamDone;

use super::Parser;
use crate::doneset::now_ms;

/// `--done-retention`: a duration, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

impl FromStr for Retention {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        tally_model::period::parse_span(s).map(Retention)
    }
}

/// Whether the file of `done` is still at its path (then it may be announced again).
fn still_there(done: &StreamDone) -> bool {
    std::fs::metadata(&done.path).is_ok_and(|m| stream_id(&m) == done.stream)
}

impl Parser<'_> {
    /// Prunes the done-set when the last pruning is older than the retention (at most a
    /// minute). A failure is logged and retried at the next turn: pruning is never urgent.
    pub(super) fn prune_if_due(&mut self, group: &Group, producer: &TxnProducer) {
        let Retention(Some(retention)) = self.args.done_retention else {
            return;
        };
        if self.last_prune.elapsed() < retention.min(Duration::from_secs(60)) {
            return;
        }
        self.last_prune = Instant::now();
        if let Err(error) = self.prune(retention, group, producer) {
            tracing::warn!(
                error = format!("{error:#}"),
                "done-set pruning failed; retried later"
            );
        }
    }

    fn prune(
        &mut self,
        retention: Duration,
        group: &Group,
        producer: &TxnProducer,
    ) -> anyhow::Result<()> {
        let cutoff = now_ms() - retention.as_millis() as i64;
        let mut gone: Vec<(i32, String)> = Vec::new();
        for partition in group.loaded() {
            for entry in self.done.entries(partition) {
                let done = &entry.done;
                if entry.at_ms <= cutoff && done.finished(done.file_bytes) && !still_there(done) {
                    gone.push((partition, done.stream.clone()));
                }
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        let _step = self.liveness.step("prune the done-set");
        let mut partitions: Vec<i32> = gone.iter().map(|(p, _)| *p).collect();
        partitions.dedup();
        let mut offsets = TopicPartitionList::new();
        for element in group.committed(&partitions)?.elements() {
            if let Offset::Offset(o) = element.offset() {
                offsets.add_partition_offset(
                    element.topic(),
                    element.partition(),
                    Offset::Offset(o),
                )?;
            }
        }
        anyhow::ensure!(
            offsets.count() == partitions.len(),
            "no committed offsets yet"
        );
        let metadata = group.group_metadata().context("not in the group")?;
        producer.begin_transaction()?;
        let written = (|| {
            for (partition, stream) in &gone {
                kafka::send_waiting(
                    producer,
                    BaseRecord::<str, [u8]>::to(&self.topics.done)
                        .key(stream)
                        .partition(*partition),
                )?;
            }
            producer.send_offsets_to_transaction(&offsets, &metadata, Duration::from_secs(30))?;
            tally_core::txn::commit(producer)
        })();
        if let Err(error) = written {
            let _ = producer.abort_transaction(Timeout::Never);
            return Err(error).context("tombstone transaction");
        }
        for (partition, stream) in &gone {
            self.done.remove(*partition, stream);
        }
        tracing::info!(streams = gone.len(), "done-set pruned: files done and gone");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_parse() {
        assert_eq!("off".parse(), Ok(Retention(None)));
        assert_eq!(
            "7d".parse(),
            Ok(Retention(Some(Duration::from_secs(604_800))))
        );
        assert_eq!("90s".parse(), Ok(Retention(Some(Duration::from_secs(90)))));
        assert!("7".parse::<Retention>().is_err());
        assert!("d".parse::<Retention>().is_err());
        assert!("7w".parse::<Retention>().is_err());
    }
}
