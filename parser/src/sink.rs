//! The parser's output into the open Kafka transaction: the engine's sums, split by sums
//! partition (the consumer id decides) and merged across the transaction's units
//! ([`Merger`]) before they are sent, and bad lines to the dead-letter topic: the first
//! `--dead-letter-lines` of a unit in full, then one summary at its end with every bad line
//! counted by reason, so a file of garbage costs a bounded number of records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rdkafka::error::KafkaError;
use tally_core::txn::producer::{send_json, send_leaving};
use tally_core::txn::TxnProducer;
use tally_core::Topics;
use tally_model::messages::{consumer_partition, DeadLetter, WorkUnit};

use tally_engine::{BadLine, EngineConfig, Merger, Reason, Sink, Stopped};

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
    /// Bad lines written in full at most.
    written_max: u64,
    /// Bad lines so far, by reason (in [`Reason::ALL`] order).
    bad: [AtomicU64; Reason::ALL.len()],
    /// Bad lines offered for writing in full (those past `written_max` were not).
    written: AtomicU64,
    /// The first send error; the engine is stopped and the transaction aborted.
    error: Mutex<Option<KafkaError>>,
}

impl<'a> KafkaSink<'a> {
    /// The output of `unit`, through `producer` (inside its open transaction), its sums merged
    /// in `merger` (one per sums partition) under `period` (its start; `None` when off); at
    /// most `written_max` of its bad lines in full.
    pub fn new(
        producer: &'a TxnProducer,
        topics: &'a Topics,
        sums_partitions: i32,
        merger: &'a Merger,
        unit: &'a WorkUnit,
        period: Option<i64>,
        written_max: u64,
    ) -> Self {
        Self {
            producer,
            topics,
            sums_partitions,
            merger,
            unit,
            period,
            written_max,
            bad: Default::default(),
            written: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }

    /// The unit is summed: its bad lines counted into the metrics, and past the ones written
    /// in full, one summary record of them all by reason.
    pub fn finish(&self) -> Result<(), KafkaError> {
        use tally_core::metrics as m;
        let counts: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .zip(&self.bad)
            .map(|(reason, n)| (*reason, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        for (reason, n) in &counts {
            metrics::counter!(m::PARSER_BAD_LINES, "reason" => reason.as_str()).increment(*n);
        }
        if total <= self.written_max {
            return Ok(());
        }
        metrics::counter!(m::PARSER_DEAD_LETTERS, "kind" => "summary").increment(1);
        let record = DeadLetter::BadLinesSummary {
            unit_id: self.unit.unit_id.clone(),
            path: self.unit.path.clone(),
            bad_lines: total,
            written: self.written_max,
            by_reason: counts
                .iter()
                .map(|(reason, n)| (reason.as_str().to_owned(), *n))
                .collect(),
        };
        send_json(
            self.producer,
            &self.topics.dead_letter,
            Some(&self.unit.unit_id),
            &record,
        )
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
        // Per bad line, not per line: good lines cost nothing here. Counted always; written
        // in full only up to the bound (the summary at the unit's end counts the rest).
        use tally_core::metrics as m;
        let slot = Reason::ALL
            .iter()
            .position(|r| *r == bad.reason)
            .unwrap_or_default();
        self.bad[slot].fetch_add(1, Ordering::Relaxed);
        if self.written.fetch_add(1, Ordering::Relaxed) >= self.written_max {
            return Ok(());
        }
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
