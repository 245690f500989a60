//! Rebalance events, recorded by a consumer context while librdkafka runs its callbacks
//! (inside `poll`), for a stage loop to act on between polls: the parser loads done-sets of
//! the partitions it gets, the db-client seeks them to the offsets stored with the totals.
//!
//! A stage's log ([`RebalanceLog::for_stage`]) also tells the stage's [`Liveness`] whether it
//! holds an assignment (`/readyz`), counts rebalances, and turns librdkafka's statistics
//! (`statistics.interval.ms`, see [`STATISTICS_INTERVAL_MS`]) into the consumer-lag gauges.

use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::liveness::Liveness;

/// How often librdkafka reports statistics to a stage's consumer (the lag gauges' period).
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// The readiness condition a stage's log keeps.
const ASSIGNMENT: &str = "assignment";

/// A change of the partitions a consumer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// Partitions added (after the assignment took effect).
    Assigned(Vec<i32>),
    /// Partitions taken away (before the revocation takes effect).
    Revoked(Vec<i32>),
}

/// A consumer context that records rebalance events; clones share one log.
#[derive(Debug, Clone, Default)]
pub struct RebalanceLog {
    events: Arc<Mutex<Vec<RebalanceEvent>>>,
    stage: Option<Liveness>,
}

impl RebalanceLog {
    /// The log of a stage's group consumer: readiness and metrics too. Set
    /// `statistics.interval.ms` to [`STATISTICS_INTERVAL_MS`] on the consumer for the lag.
    pub fn for_stage(liveness: &Liveness) -> Self {
        liveness.not_ready(ASSIGNMENT, "no partition assignment yet");
        Self {
            events: Arc::default(),
            stage: Some(liveness.clone()),
        }
    }

    /// The events recorded since the last call, in order.
    pub fn take(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.lock())
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RebalanceEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, event: RebalanceEvent) {
        self.lock().push(event);
    }
}

fn partitions(tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for RebalanceLog {
    /// As rdkafka's own, but a partition's end (told because stages ask for it, see
    /// `enable.partition.eof` in `consume::group`) is no error. It also comes as a client-wide
    /// event (`Global(PartitionEOF)`, "Fetch from broker … reached end of partition"), which
    /// rdkafka logged at ERROR level once per partition and fetch.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
    }

    fn stats(&self, statistics: Statistics) {
        let Some(stage) = &self.stage else { return };
        let lag = crate::metrics::stage(stage.stage()).lag;
        for topic in statistics.topics.values() {
            for (&partition, p) in &topic.partitions {
                // Partition -1 is librdkafka's own; undesired ones belong to other instances.
                if partition < 0 || !p.desired {
                    continue;
                }
                if let Some(records) = consumer_lag(p) {
                    metrics::gauge!(lag, "partition" => partition.to_string()).set(records as f64);
                }
            }
        }
    }
}

/// Records between a partition's position and its end, from librdkafka's statistics.
/// librdkafka's own `consumer_lag` counts from the committed offset, which tally never
/// commits through the consumer (offsets go with the transactions). The end is the last
/// stable offset (read_committed); the position is the fetcher's next offset once everything
/// fetched was handed to the stage (it skips transaction markers, so a caught-up partition
/// reads 0), else the offset after the last record handed over.
fn consumer_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    let position = if p.fetchq_cnt == 0 && p.next_offset >= 0 {
        p.next_offset
    } else if p.app_offset >= 0 {
        p.app_offset
    } else {
        p.next_offset
    };
    (end >= 0 && position >= 0).then(|| (end - position).max(0))
}

impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.record(RebalanceEvent::Revoked(partitions(tpl)));
            if let Some(stage) = &self.stage {
                // A partition the stage paused (`consume::intake`: only ones that fetch) would
                // stay paused past its revocation, into a later assignment. Resuming one that
                // is not paused does nothing (librdkafka numbers no new version for it).
                if let Err(error) = consumer.resume(tpl) {
                    tracing::warn!(%error, "cannot resume the partitions revoked");
                }
                metrics::counter!(crate::metrics::stage(stage.stage()).rebalances).increment(1);
                let left = consumer.assignment().map_or(0, |a| a.count());
                if left <= tpl.count() {
                    stage.not_ready(ASSIGNMENT, "partitions revoked, waiting for an assignment");
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.record(RebalanceEvent::Assigned(partitions(tpl)));
            if let Some(stage) = &self.stage {
                metrics::counter!(crate::metrics::stage(stage.stage()).rebalances).increment(1);
                stage.ready(ASSIGNMENT);
            }
        }
    }
}
