//! Whether the parsers have units left: announced on `tally.files` and not in a committed
//! parser transaction. The aggregator ends a batch drained at the watermark only when none is
//! left ([`tally_core::consume::PartitionState::upstream_drained`]); otherwise a parser's next
//! transaction may be about to open, and the batch waits for the partitions' end to be told,
//! by when that transaction shows as open and is merged into the same batch (the sums of a
//! million consumers written once, not twice).
//!
//! Exact, not a guess: a parser commits its consumed offsets in the transaction of the units'
//! sums, so once the parser group's committed offsets reach the end of `tally.files`, every
//! unit's sums are readable, and a batch read up to the watermark holds them all.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tally_core::{kafka, KafkaArgs, Topics};

/// The parser group's progress on `tally.files`, asked of the broker.
pub struct Parsers {
    /// A `read_committed` client named after the parser group (it reads that group's
    /// committed offsets; it never joins it).
    reader: BaseConsumer,
    topic: String,
    partitions: i32,
}

/// How long one question to the broker may take; past it, units count as left.
const TIMEOUT: Duration = Duration::from_secs(2);

impl Parsers {
    /// A reader of the parser group's offsets on `topics.files`.
    pub fn new(args: &KafkaArgs, topics: &Topics) -> anyhow::Result<Self> {
        let reader = kafka::reader(args, &topics.parser_group, kafka::Ends::Silent)?;
        let partitions = kafka::partition_count(&reader, &topics.files)?;
        Ok(Self {
            reader,
            topic: topics.files.clone(),
            partitions,
        })
    }

    /// Whether any unit announced is not in a committed parser transaction (or the broker did
    /// not say: then units count as left, and the batch waits as it would without this).
    ///
    /// Per partition, between the group's committed offset and the last stable offset lie
    /// the units left and the transaction markers: a parser that consumed a transaction's last
    /// unit commits the marker's offset, one short of the end. Two or more offsets short is a
    /// unit left (or an aborted announcement not yet passed by a later one: a wait, no harm).
    pub fn units_left(&self) -> bool {
        self.ask().unwrap_or_else(|error| {
            tracing::debug!(%error, "the parsers' progress is unknown");
            true
        })
    }

    fn ask(&self) -> anyhow::Result<bool> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self.reader.committed_offsets(tpl, TIMEOUT)?;
        for e in committed.elements() {
            // With `read_committed`, the high mark asked for is the last stable offset.
            let (low, stable) =
                self.reader
                    .fetch_watermarks(&self.topic, e.partition(), TIMEOUT)?;
            let from = match e.offset() {
                Offset::Offset(at) => at.max(low),
                _ => low,
            };
            if stable - from >= 2 {
                tracing::debug!(partition = e.partition(), from, stable, "units left");
                return Ok(true);
            }
        }
        Ok(false)
    }
}
