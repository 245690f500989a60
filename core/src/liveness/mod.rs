//! Liveness: a watchdog on progress, shared by every long-running stage.
//!
//! Exactly-once survives anything that stops a stage; liveness needs more: a stage that has
//! work and does not move must notice and get itself going again. A stage reports to its
//! [`Liveness`]:
//! - [`Liveness::progress`] whenever it completes something (a unit, a batch, an announcement);
//! - [`Liveness::step`] around every call that may block on the broker (a done-set load,
//!   `init_transactions`, a transaction, a commit, a rewind, a watermark query, a retry loop
//!   of any of these); the returned guard ends the step when dropped;
//! - [`Liveness::positions`] after every poll: the input partitions it holds and its position in
//!   each, so that the watchdog can tell "idle" from "stuck";
//! - [`Liveness::set_member`] once, for a stage in a consumer group: its group, input topic and
//!   client id;
//! - [`Liveness::waiting_on`] while it waits for something other than Kafka (PostgreSQL) that is
//!   known to be down: restarting cannot help then.
//!
//! The watchdog thread calls a stage *stalled* when a step has been open longer than the
//! limit, or when nothing was completed for longer than the limit while records wait in its
//! partitions (their high watermarks, asked of the broker by a probe client of its own, are
//! past the stage's positions), or while this member holds no partition and records wait in
//! partitions that no other member of its group holds (the broker's view of the group). A
//! stalled stage whose broker answers is restarted in place
//! (`exec` of the same binary and arguments, same pid): exactly as safe as a kill -9 and a
//! restart, which every stage is built and tested to survive, and it replaces every Kafka
//! client whatever state librdkafka is in. A stalled stage whose broker does not answer waits
//! for it and says so, at a bounded rate; once the broker answers again, the stage gets a
//! quarter of the limit to get going by itself before the restart.

mod group;
mod outage;
mod watchdog;

pub use outage::{is_transient, restart_if_fatal, retry, retry_transient, Throttle};
pub use watchdog::restart_in_place;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::Offset;

use crate::args::{KafkaArgs, LivenessArgs};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The input a stage holds: topic and (partition, next offset to process).
#[derive(Debug, Clone, Default)]
struct Input {
    topic: String,
    positions: Vec<(i32, i64)>,
}

#[derive(Debug, Default)]
struct Shared {
    last_progress_ms: AtomicU64,
    /// Open steps; several: steps nest (a retry loop around a load).
    steps: Mutex<Vec<OpenStep>>,
    next_step: AtomicU64,
    input: Mutex<Input>,
    /// Something other than Kafka the stage waits for, if any.
    waiting_on: Mutex<Option<&'static str>>,
    /// Why the stage is not ready, per condition (`/readyz`); absent: ready on that count.
    not_ready: Mutex<std::collections::BTreeMap<&'static str, String>>,
    /// The stage's consumer group membership, if it has one.
    member: Mutex<Option<group::Member>>,
}

/// A step in progress.
#[derive(Debug, Clone, Copy)]
struct OpenStep {
    id: u64,
    what: &'static str,
    since_ms: u64,
    /// How long this step may take, when longer than the stage's limit (a large batch).
    allowance_ms: u64,
}

impl OpenStep {
    /// Whether the step has been open past `limit` and past its own allowance.
    fn overdue(&self, now: u64, limit: Duration) -> bool {
        now.saturating_sub(self.since_ms) > (limit.as_millis() as u64).max(self.allowance_ms)
    }

    /// Whether the step is allowed longer than `limit` and still within that: the stage is
    /// busy, and the steps opened before it wait for it.
    fn sheltering(&self, now: u64, limit: Duration) -> bool {
        self.allowance_ms > limit.as_millis() as u64 && !self.overdue(now, limit)
    }
}

/// A stage's liveness handle; cheap to clone, shared with the watchdog thread.
#[derive(Debug, Clone)]
pub struct Liveness {
    stage: &'static str,
    shared: Arc<Shared>,
}

/// Ends its step when dropped.
#[must_use = "the step ends when the guard is dropped"]
#[derive(Debug)]
pub struct Step {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Step {
    fn drop(&mut self) {
        self.shared
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.id != self.id);
    }
}

/// Ends its wait when dropped.
#[must_use = "the wait ends when the guard is dropped"]
#[derive(Debug)]
pub struct Waiting {
    shared: Arc<Shared>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        *self
            .shared
            .waiting_on
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        // The wait was not the stage's fault: the quiet clock starts again.
        self.shared
            .last_progress_ms
            .store(now_ms(), Ordering::Relaxed);
    }
}

impl Liveness {
    /// A handle that watches nothing (for in-process use and tests).
    pub fn unwatched(stage: &'static str) -> Self {
        let shared = Arc::new(Shared::default());
        shared.last_progress_ms.store(now_ms(), Ordering::Relaxed);
        Self { stage, shared }
    }

    /// Starts the watchdog thread of `stage`: stalled longer than its limit (`args`, never
    /// below `floor`) while the broker answers means a restart in place. With `--http-addr`,
    /// also serves the stage's metrics and health there (an address that cannot be bound is
    /// an error: it will not heal).
    pub fn start(
        stage: &'static str,
        kafka: &KafkaArgs,
        args: &LivenessArgs,
        floor: Duration,
    ) -> anyhow::Result<Self> {
        kafka.security_settings()?;
        // Credentials, protocol or certificates the brokers refuse will not heal: fail now,
        // in one line, rather than retry for ever (a broker that is down is waited for).
        if let crate::kafka::Reached::Refused(why) =
            crate::kafka::BrokerProbe::new(kafka).reach(Duration::from_secs(10))
        {
            anyhow::bail!("Kafka refuses this client (check the credentials, --kafka-security-protocol and certificates): {why}");
        }
        let limit = args.limit(floor);
        let liveness = Self::start_with(stage, kafka, limit, |_| restart_in_place());
        if let Some(addr) = args.http_addr {
            crate::http::serve(stage, addr, liveness.clone(), kafka, limit)?;
        }
        Ok(liveness)
    }

    /// [`Liveness::start`] with another action than the restart (called with the reason, again
    /// at every check while the stage stays stalled): for tests.
    pub fn start_with(
        stage: &'static str,
        kafka: &KafkaArgs,
        limit: Duration,
        on_stall: impl Fn(&str) + Send + 'static,
    ) -> Self {
        let liveness = Self::unwatched(stage);
        let watched = liveness.clone();
        let kafka = kafka.clone();
        std::thread::Builder::new()
            .name("tally-liveness".into())
            .spawn(move || watchdog::watch(&watched, &kafka, limit, &on_stall))
            .map(|_| ())
            .unwrap_or_else(|error| tracing::warn!(%error, "cannot start the liveness watchdog"));
        liveness
    }

    /// Something was completed.
    pub fn progress(&self) {
        self.shared
            .last_progress_ms
            .store(now_ms(), Ordering::Relaxed);
    }

    /// A call that may block on the broker begins; it ends when the guard is dropped.
    pub fn step(&self, what: &'static str) -> Step {
        self.step_within(what, Duration::ZERO)
    }

    /// A step that may legitimately take up to `allowance`, longer than the stage's limit (a
    /// database transaction whose timeout grows with its batch): it is stalled only past both,
    /// and the stage does not count as quiet while it is within its allowance. The limit for
    /// everything else stays as it is.
    pub fn step_within(&self, what: &'static str, allowance: Duration) -> Step {
        let id = self.shared.next_step.fetch_add(1, Ordering::Relaxed);
        self.shared
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(OpenStep {
                id,
                what,
                since_ms: now_ms(),
                allowance_ms: u64::try_from(allowance.as_millis()).unwrap_or(u64::MAX),
            });
        Step {
            shared: self.shared.clone(),
            id,
        }
    }

    /// The stage waits for `what` (not Kafka), known to be unavailable, until the guard drops.
    pub fn waiting_on(&self, what: &'static str) -> Waiting {
        *self
            .shared
            .waiting_on
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(what);
        Waiting {
            shared: self.shared.clone(),
        }
    }

    /// The stage is not ready on account of `condition` (e.g. `assignment`), for `reason`,
    /// until [`Liveness::ready`] of the same condition.
    pub fn not_ready(&self, condition: &'static str, reason: impl Into<String>) {
        self.shared
            .not_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(condition, reason.into());
    }

    /// `condition` is met.
    pub fn ready(&self, condition: &'static str) {
        self.shared
            .not_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(condition);
    }

    /// Why the stage is not ready (the first unmet condition, or what it waits for), if it is
    /// not; the broker's reachability is the HTTP server's own check.
    pub fn unready_reason(&self) -> Option<String> {
        if let Some(what) = *self
            .shared
            .waiting_on
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            return Some(format!("{what} is not reachable"));
        }
        self.shared
            .not_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .next()
            .cloned()
    }

    /// Why the stage is not alive (a call into a service open longer than `limit`), if it is not.
    pub fn dead_reason(&self, limit: Duration) -> Option<String> {
        self.stalled_step(limit)
    }

    /// The stage's name.
    pub fn stage(&self) -> &'static str {
        self.stage
    }

    /// The stage consumes `topic` in consumer group `group` as `client_id`: a member that holds
    /// no partition while records wait in partitions no other member holds is stalled too.
    pub fn set_member(&self, group: &str, topic: &str, client_id: &str) {
        *self.shared.member.lock().unwrap_or_else(|p| p.into_inner()) = Some(group::Member {
            group: group.to_owned(),
            topic: topic.to_owned(),
            client_id: client_id.to_owned(),
        });
    }

    /// Records the input the stage holds: its assigned partitions of `topic` and its position
    /// in each (partitions without a position yet are left out).
    pub fn positions<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str) {
        self.set_positions(topic, consumer.position().ok());
    }

    /// Records the input the stage holds as (partition, next offset to process) pairs.
    pub fn set_input(&self, topic: &str, positions: Vec<(i32, i64)>) {
        *self.shared.input.lock().unwrap_or_else(|p| p.into_inner()) = Input {
            topic: topic.to_owned(),
            positions,
        };
    }

    fn set_positions(&self, topic: &str, tpl: Option<rdkafka::TopicPartitionList>) {
        let positions = tpl
            .map(|tpl| {
                tpl.elements_for_topic(topic)
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.set_input(topic, positions);
    }

    /// Why the stage is stalled, if it is, judged without the broker: the oldest open step
    /// past `limit` (and the newest one within it, where it waits now).
    fn stalled_step(&self, limit: Duration) -> Option<String> {
        let now = now_ms();
        let steps = self.shared.steps.lock().unwrap_or_else(|p| p.into_inner());
        // A long step within its allowance shelters the steps opened before it: they cannot
        // end while it runs (a wait for a partition's first record needs a poll, and the loop
        // polls between its writes), and they are judged again once it ends.
        let sheltered_below = steps
            .iter()
            .filter(|s| s.sheltering(now, limit))
            .map(|s| s.id)
            .max();
        let oldest = steps
            .iter()
            .filter(|s| s.overdue(now, limit) && sheltered_below.is_none_or(|id| s.id >= id))
            .min_by_key(|s| s.since_ms)?;
        let mut reason = format!(
            "`{}` has not finished for {} s",
            oldest.what,
            now.saturating_sub(oldest.since_ms) / 1000
        );
        if let Some(newest) = steps
            .iter()
            .max_by_key(|s| s.since_ms)
            .filter(|s| s.id != oldest.id)
        {
            reason.push_str(&format!(
                " (in `{}` for {} s)",
                newest.what,
                now.saturating_sub(newest.since_ms) / 1000
            ));
        }
        Some(reason)
    }

    /// Whether a step with an allowance beyond `limit` is open and within it: the stage is
    /// busy, not quiet.
    fn in_long_step(&self, limit: Duration) -> bool {
        let now = now_ms();
        self.shared
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|s| s.sheltering(now, limit))
    }

    pub(crate) fn has_open_step(&self) -> bool {
        !self
            .shared
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_millis(
            now_ms().saturating_sub(self.shared.last_progress_ms.load(Ordering::Relaxed)),
        )
    }
}

impl crate::http::Health for Liveness {
    fn dead_reason(&self, limit: Duration) -> Option<String> {
        Liveness::dead_reason(self, limit)
    }

    fn unready_reason(&self) -> Option<String> {
        Liveness::unready_reason(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_nest_and_end_on_drop() {
        let l = Liveness::unwatched("test");
        let outer = l.step("outer");
        {
            let _inner = l.step("inner");
            assert_eq!(l.shared.steps.lock().unwrap().len(), 2);
        }
        assert_eq!(l.shared.steps.lock().unwrap().len(), 1);
        assert!(l.stalled_step(Duration::from_secs(60)).is_none());
        // Backdate the outer step: it is now past the limit.
        l.shared.steps.lock().unwrap()[0].since_ms -= 61_000;
        let reason = l.stalled_step(Duration::from_secs(60)).unwrap();
        assert!(reason.contains("outer"), "{reason}");
        drop(outer);
        assert!(l.stalled_step(Duration::from_secs(60)).is_none());
    }

    #[test]
    fn a_step_with_an_allowance_is_stalled_past_it_and_busy_within_it() {
        let limit = Duration::from_secs(60);
        let l = Liveness::unwatched("test");
        let _long = l.step_within("write a large batch", Duration::from_secs(300));
        assert!(l.in_long_step(limit));
        l.shared.steps.lock().unwrap()[0].since_ms -= 200_000;
        // Past the limit, within its allowance: neither stalled nor quiet.
        assert!(l.stalled_step(limit).is_none());
        assert!(l.in_long_step(limit));
        l.shared.steps.lock().unwrap()[0].since_ms -= 101_000;
        let reason = l.stalled_step(limit).unwrap();
        assert!(reason.contains("large batch"), "{reason}");
        assert!(!l.in_long_step(limit));
        // A step opened before a long one waits for it; one opened inside it does not.
        let nested = Liveness::unwatched("test");
        let _before = nested.step("a first record of every assigned partition");
        let long = nested.step_within("write a large batch", Duration::from_secs(300));
        let inner = nested.step("read the log start");
        for s in nested.shared.steps.lock().unwrap().iter_mut() {
            s.since_ms -= 100_000;
        }
        let reason = nested.stalled_step(limit).unwrap();
        assert!(reason.starts_with("`read the log start`"), "{reason}");
        drop(inner);
        assert!(nested.stalled_step(limit).is_none());
        drop(long);
        let reason = nested.stalled_step(limit).unwrap();
        assert!(reason.starts_with("`a first record"), "{reason}");
        // A plain step beside it is held to the limit alone.
        let short = Liveness::unwatched("test");
        let _step = short.step_within("a small batch", Duration::from_secs(30));
        short.shared.steps.lock().unwrap()[0].since_ms -= 61_000;
        assert!(short.stalled_step(limit).is_some());
        assert!(!short.in_long_step(limit));
    }
}
