//! One unit inside the open transaction: check it against its stream's done-state, sum the
//! bytes no earlier unit summed, and write its end markers and the stream's new state; or
//! reject it with a reason.

use std::fs::File;
use std::time::Instant;

use rdkafka::error::KafkaError;
use tally_core::txn::producer::{send, send_sums};
use tally_core::txn::{Failure, TxnProducer};
use tally_model::messages::{DeadLetter, StreamDone, SumsRecord, UnitDone, WorkUnit};

use super::Parser;
use crate::sink::KafkaSink;
use crate::streams::{self, Step};
use tally_engine::source::FileSource;
use tally_engine::{self as engine, EngineError, Held, Merger, Stats};

/// What one transaction gathers until it ends: its units' sums, and their end markers.
///
/// A unit's sums stay in the engine workers' maps ([`Held`]) and merge there with the next
/// unit's, while the units have the same period; they go into the merger (split by sums
/// partition) when the period changes and when the transaction ends. So a consumer met in
/// every unit of a transaction is merged once per worker, not once per unit.
pub(super) struct Txn<'p> {
    /// The producer of the open transaction.
    pub(super) producer: &'p TxnProducer,
    /// The sums of every unit so far, per sums partition.
    pub(super) merger: Merger,
    /// Sums still in the workers' maps, of `held_as`'s period.
    pub(super) held: Held,
    /// The last unit summed into `held`, and its period.
    pub(super) held_as: Option<(WorkUnit, Option<i64>)>,
    /// The units that summed something.
    pub(super) ends: Vec<UnitDone>,
}

impl<'p> Txn<'p> {
    /// A transaction of `producer`, merging into `merger`.
    pub(super) fn new(producer: &'p TxnProducer, merger: Merger) -> Self {
        Self {
            producer,
            merger,
            held: Held::new(),
            held_as: None,
            ends: Vec::new(),
        }
    }
}

impl Parser<'_> {
    /// Counts `unit` against its stream's done-state `state`. Returns the stream's new state
    /// when the unit changed it (its sums, end markers and dead letters are in the
    /// transaction; the state goes out with the transaction's last, [`Parser::send_states`]).
    pub(super) fn count_unit(
        &mut self,
        txn: &mut Txn<'_>,
        unit: &WorkUnit,
        state: Option<&StreamDone>,
    ) -> Result<Option<StreamDone>, Failure> {
        let _span = tracing::info_span!("unit", unit = %unit.unit_id).entered();
        let step = match self.forced_reject.get(&unit.unit_id).cloned() {
            Some(reason) if !streams::done_already(state, unit) => Step::Reject(reason),
            _ => streams::prepare(state, unit, &self.data_root),
        };
        let (file, plan) = match step {
            Step::Skip => return Ok(self.skip(unit)),
            Step::Reject(reason) => return self.reject(txn.producer, unit, state, &reason),
            Step::Count { file, plan } => (file, plan),
        };
        let stats = self.sum_ranges(txn, unit, file, &plan.missing)?;
        let (state, done) = streams::counted(plan, unit, &stats);
        // Its end markers follow the transaction's merged sums (see `end_transaction`), and the
        // stream's new state goes out once, with the transaction's last ([`Parser::send_states`]).
        txn.ends.push(done);
        self.counters.units_summed += 1;
        self.pending.summed += 1;
        self.pending.lines += stats.lines;
        self.pending.bytes += stats.bytes;
        Ok(Some(state))
    }

    fn skip(&mut self, unit: &WorkUnit) -> Option<StreamDone> {
        self.counters.units_skipped += 1;
        self.pending.skipped += 1;
        tracing::debug!(unit = unit.unit_id, "bytes already done, skipping");
        None
    }

    /// Sums the lines starting in `ranges` of the unit's file, read as announced (its first
    /// `file_bytes`, even if it grew since).
    fn sum_ranges(
        &mut self,
        txn: &mut Txn<'_>,
        unit: &WorkUnit,
        file: File,
        ranges: &[(u64, u64)],
    ) -> Result<Stats, Failure> {
        let source = FileSource::with_len(file, unit.file_bytes);
        let period = match (self.args.period.period.length(), unit.time()) {
            (None, _) => None,
            (Some(_), Some(time)) => self.args.period.period.start_of(time),
            (Some(_), None) => {
                tracing::warn!(
                    unit = unit.unit_id,
                    "the unit names no file time: its sums count in the running totals only"
                );
                None
            }
        };
        if txn
            .held_as
            .as_ref()
            .is_some_and(|(_, held)| *held != period)
        {
            self.flush_held(txn).map_err(Failure::Kafka)?;
        }
        let sink = self.sink(txn, unit, period);
        let started = Instant::now();
        let mut stats = Stats::default();
        for &(start, end) in ranges {
            let result = engine::sum_range_held(
                &source,
                start..end,
                &self.config,
                &self.pool,
                &sink,
                &txn.held,
            );
            match result {
                Ok(range) => stats.merge(&range),
                Err(EngineError::Stopped) => {
                    let error = sink.into_error().unwrap_or(KafkaError::Canceled);
                    return Err(Failure::Kafka(error));
                }
                Err(EngineError::BadLine(bad)) => {
                    return Err(self.reject_later(
                        unit,
                        format!(
                            "bad line at byte {} ({}) under --bad-lines=fail",
                            bad.offset, bad.reason
                        ),
                    ))
                }
                Err(EngineError::Io(e)) => {
                    return Err(self.reject_later(unit, format!("read error: {e}")))
                }
            }
        }
        sink.finish().map_err(Failure::Kafka)?;
        txn.held_as = Some((unit.clone(), period));
        tracing::info!(
            lines = stats.lines,
            bad_lines = stats.bad_lines,
            bytes = stats.bytes,
            ranges = ranges.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "unit summed"
        );
        Ok(stats)
    }

    /// The transaction's output before its offsets: the merged sums of all its units, then
    /// one end marker per unit and sums partition, each after every sum of the unit there, so
    /// the db-client knows a unit is in the totals once it applied all of its markers.
    pub(super) fn end_transaction(&mut self, mut txn: Txn<'_>) -> Result<(), KafkaError> {
        self.flush_held(&mut txn)?;
        let producer = txn.producer;
        let mut records = 0;
        txn.merger.drain(|partition, period, sums| {
            records +=
                sums.len()
                    .div_ceil(tally_core::txn::producer::PAIRS_PER_RECORD) as u64;
            send_sums(producer, &self.topics.sums, partition as i32, period, &sums)
        })?;
        self.pending.sums_records += records;
        for unit in txn.ends {
            let key = unit.unit_id.clone();
            let end = serde_json::to_vec(&SumsRecord::UnitEnd {
                unit,
                partitions: self.sums_partitions,
            })
            .expect("serialisable");
            for sums_partition in 0..self.sums_partitions {
                send(
                    producer,
                    &self.topics.sums,
                    Some(sums_partition),
                    Some(&key),
                    &end,
                )?;
            }
        }
        Ok(())
    }

    /// Moves the sums held in the workers' maps into the transaction's merger, under the
    /// period they were summed in (what must leave at once is sent).
    fn flush_held(&self, txn: &mut Txn<'_>) -> Result<(), KafkaError> {
        let Some((unit, period)) = txn.held_as.take() else {
            return Ok(());
        };
        let sink = self.sink(txn, &unit, period);
        match txn.held.flush(&self.pool, &sink) {
            Ok(()) => Ok(()),
            Err(_) => Err(sink.into_error().unwrap_or(KafkaError::Canceled)),
        }
    }

    /// The output of `unit`'s sums (of `period`) and bad lines into the open transaction.
    fn sink<'s>(
        &'s self,
        txn: &'s Txn<'_>,
        unit: &'s WorkUnit,
        period: Option<i64>,
    ) -> KafkaSink<'s> {
        KafkaSink::new(
            txn.producer,
            &self.topics,
            self.sums_partitions,
            &txn.merger,
            unit,
            period,
            self.args.dead_letter_lines,
        )
    }

    /// Rejects `unit`: a dead letter with the reason; returns the stream's state with the
    /// rejected range when that state is the unit's version ([`streams::rejected`]).
    pub(super) fn reject(
        &mut self,
        producer: &TxnProducer,
        unit: &WorkUnit,
        state: Option<&StreamDone>,
        reason: &str,
    ) -> Result<Option<StreamDone>, Failure> {
        tracing::warn!(
            unit = unit.unit_id,
            path = unit.path,
            reason,
            "unit rejected"
        );
        self.dead_letter(
            producer,
            Some(&unit.unit_id),
            &DeadLetter::RejectedUnit {
                unit_id: unit.unit_id.clone(),
                path: unit.path.clone(),
                reason: reason.to_owned(),
            },
        )?;
        self.counters.units_rejected += 1;
        self.pending.rejected += 1;
        self.pending.unit_dead_letters += 1;
        Ok(streams::rejected(state, unit))
    }

    /// The streams' states the transaction changed, on `tally.done`, each in its unit's
    /// partition number and keyed by stream: one record per stream and transaction, its state
    /// after the transaction's last unit of it. The states in between would never be read (a
    /// reader sees the transaction whole, and the latest record per stream counts), and a
    /// record per unit was a produce request per unit, each the dearest a broker served here
    /// (docs/benchmarks.md, "A parser transaction's requests, and the aggregator's end at the
    /// watermark").
    pub(super) fn send_states(
        &self,
        producer: &TxnProducer,
        states: &super::States,
    ) -> Result<(), KafkaError> {
        for ((partition, _), state) in states {
            let payload = serde_json::to_vec(state).expect("serialisable");
            send(
                producer,
                &self.topics.done,
                Some(*partition),
                Some(&state.stream),
                &payload,
            )?;
        }
        Ok(())
    }

    /// A unit that must be rejected after its transaction has some of its output: abort, and
    /// reject it when it comes again.
    fn reject_later(&mut self, unit: &WorkUnit, reason: String) -> Failure {
        self.forced_reject
            .insert(unit.unit_id.clone(), reason.clone());
        Failure::Abort(format!("unit {} to be rejected: {reason}", unit.unit_id))
    }
}
