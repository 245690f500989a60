//! Rebalance events, recorded by a consumer context while librdkafka runs its callbacks
//! (inside `poll`), for a stage loop to act on between polls: the parser loads done-sets of
//! the partitions it gets, the db-client seeks them to the offsets stored with the totals.

use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::ClientContext;

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
}

impl RebalanceLog {
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

impl ClientContext for RebalanceLog {}

impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.record(RebalanceEvent::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.record(RebalanceEvent::Assigned(partitions(tpl)));
        }
    }
}
