//! The parser's output into the open Kafka transaction: the engine's sums, split by sums
//! partition (the consumer id decides) and merged across the transaction's units
//! ([`Merger`]) before they are sent, and bad lines to the dead-letter topic.

use std::sync::Mutex;

use rdkafka::error::KafkaError;
use tally_core::txn::producer::{send_json, send_leaving};
use tally_core::txn::TxnProducer;
use tally_core::Topics;
use tally_model::messages::{consumer_partition, DeadLetter, WorkUnit};

use tally_engine::{BadLine, EngineConfig, Merger, Sink, Stopped};

/// The engine's output, into the open transaction: sums into the transaction's merger (what
/// must leave early is sent at once), bad lines to the dead-letter topic.
pub struct KafkaSink<'a> {
    producer: &'a TxnProducer,
    topics: &'a Topics,
    sums_partitions: i32,
    merger: &'a Merger,
    unit: &'a WorkUnit,
    /// The unit's period (start), or `None` with periods off.
    period: Option<i64>,
    /// The first send error; the engine is stopped and the transaction aborted.
    error: Mutex<Option<KafkaError>>,
}

impl<'a> KafkaSink<'a> {
    /// The output of `unit`, through `producer` (inside its open transaction), its sums merged
    /// in `merger` (one per sums partition) under `period` (its start; `None` when off).
    pub fn new(
        producer: &'a TxnProducer,
        topics: &'a Topics,
        sums_partitions: i32,
        merger: &'a Merger,
        unit: &'a WorkUnit,
        period: Option<i64>,
    ) -> Self {
        Self {
            producer,
            topics,
            sums_partitions,
            merger,
            unit,
            period,
            error: Mutex::new(None),
        }
    }

    /// Why the engine was stopped: the first send error.
    pub fn into_error(self) -> Option<KafkaError> {
        self.error.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, error: KafkaError) -> Stopped {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
        Stopped
    }
}

impl Sink for KafkaSink<'_> {
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        let mut by_partition: Vec<Vec<(i64, i64)>> =
            vec![Vec::new(); self.sums_partitions as usize];
        for (id, sum) in batch {
            by_partition[consumer_partition(id, self.sums_partitions) as usize].push((id, sum));
        }
        for (partition, sums) in by_partition.into_iter().enumerate() {
            let leave = self.merger.add(partition, self.period, &sums);
            send_leaving(self.producer, &self.topics.sums, partition as i32, leave)
                .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        // Per bad line, not per line: good lines cost nothing here.
        use tally_core::metrics as m;
        metrics::counter!(m::PARSER_BAD_LINES, "reason" => bad.reason.as_str()).increment(1);
        metrics::counter!(m::PARSER_DEAD_LETTERS, "kind" => "line").increment(1);
        let record = DeadLetter::BadLine {
            unit_id: self.unit.unit_id.clone(),
            path: self.unit.path.clone(),
            offset: bad.offset,
            reason: bad.reason.as_str().to_owned(),
            raw: lossy(&bad.raw),
        };
        send_json(
            self.producer,
            &self.topics.dead_letter,
            Some(&self.unit.unit_id),
            &record,
        )
        .map_err(|e| self.fail(e))
    }
}

/// The first bytes of a bad line or notification, as text.
pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(EngineConfig::RAW_BYTES_MAX)]).into_owned()
}
