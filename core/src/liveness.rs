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
//! - [`Liveness::waiting_on`] while it waits for something other than Kafka (PostgreSQL) that is
//!   known to be down: restarting cannot help then.
//!
//! The watchdog thread calls a stage *stalled* when a step has been open longer than the
//! limit, or when nothing was completed for longer than the limit while records wait in its
//! partitions (their high watermarks, asked of the broker by a probe client of its own, are
//! past the stage's positions). A stalled stage whose broker answers is restarted in place
//! (`exec` of the same binary and arguments, same pid): exactly as safe as a kill -9 and a
//! restart, which every stage is built and tested to survive, and it replaces every Kafka
//! client whatever state librdkafka is in. A stalled stage whose broker does not answer waits
//! for it and says so, at a bounded rate; once the broker answers again, the stage gets a
//! quarter of the limit to get going by itself before the restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::Offset;

use crate::args::KafkaArgs;
use crate::shutdown::CancellationToken;

/// How often the watchdog looks.
const TICK: Duration = Duration::from_secs(1);
/// Least time between two lag probes of a quiet stage.
const PROBE_EVERY: Duration = Duration::from_secs(10);

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
    /// Open steps as (id, what, since ms); several: steps nest (a retry loop around a load).
    steps: Mutex<Vec<(u64, &'static str, u64)>>,
    next_step: AtomicU64,
    input: Mutex<Input>,
    /// Something other than Kafka the stage waits for, if any.
    waiting_on: Mutex<Option<&'static str>>,
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
            .retain(|s| s.0 != self.id);
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

    /// Starts the watchdog thread of `stage`: stalled longer than `limit` while the broker
    /// answers means a restart in place.
    pub fn start(stage: &'static str, kafka: &KafkaArgs, limit: Duration) -> Self {
        Self::start_with(stage, kafka, limit, |_| restart_in_place())
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
            .spawn(move || watch(&watched, &kafka, limit, &on_stall))
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
        let id = self.shared.next_step.fetch_add(1, Ordering::Relaxed);
        self.shared
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, what, now_ms()));
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

    /// Records the input the stage holds: its assigned partitions of `topic` and its position
    /// in each (partitions without a position yet are left out).
    pub fn positions<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str) {
        self.set_positions(topic, consumer.position().ok());
    }

    /// [`Liveness::positions`] for a stream consumer.
    pub fn stream_positions<C>(&self, consumer: &rdkafka::consumer::StreamConsumer<C>, topic: &str)
    where
        C: ConsumerContext + 'static,
    {
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
    /// past `limit`.
    fn stalled_step(&self, limit: Duration) -> Option<String> {
        let now = now_ms();
        let steps = self.shared.steps.lock().unwrap_or_else(|p| p.into_inner());
        steps
            .iter()
            .min_by_key(|s| s.2)
            .filter(|s| now.saturating_sub(s.2) > limit.as_millis() as u64)
            .map(|s| {
                format!(
                    "`{}` has not finished for {} s",
                    s.1,
                    now.saturating_sub(s.2) / 1000
                )
            })
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_millis(
            now_ms().saturating_sub(self.shared.last_progress_ms.load(Ordering::Relaxed)),
        )
    }
}

/// A bounded-rate logger: says a thing at most once per interval, counting what it swallowed.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    swallowed: u64,
}

impl Throttle {
    /// At most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            swallowed: 0,
        }
    }

    /// Whether to log now; if so, also how many were not logged since the last time.
    pub fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.swallowed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.swallowed))
    }
}

/// Retries `op` with capped exponential backoff (200 ms doubling to 10 s, so failures are
/// logged at a bounded rate) until it succeeds; fails only once `shutdown` is cancelled.
/// Waits longer than the stall limit are the watchdog's business: call it inside a step.
pub fn retry<T>(
    shutdown: &CancellationToken,
    what: &str,
    mut op: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let error = match op() {
            Ok(v) => return Ok(v),
            Err(error) => error,
        };
        if shutdown.is_cancelled() {
            return Err(error.context(format!("cannot {what}")));
        }
        tracing::warn!(
            error = format!("{error:#}"),
            retry_in_ms = backoff.as_millis() as u64,
            "cannot {what}, retrying"
        );
        let until = Instant::now() + backoff;
        while Instant::now() < until && !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Handles a consumer error that librdkafka marks fatal (the consumer is unusable from then on,
/// e.g. a static member fenced after a broker restart): the process restarts in place, as safe
/// as a crash, with fresh clients. Other errors return.
pub fn restart_if_fatal(stage: &'static str, error: &KafkaError) {
    if matches!(error, KafkaError::MessageConsumptionFatal(_)) {
        tracing::error!(
            stage,
            %error,
            "fatal consumer error: the client is unusable; restarting this process in place"
        );
        restart_in_place();
    }
}

/// Whether a client error is the broker (or the network) being away for a while: the step
/// that met it goes on until its own deadline instead of failing.
pub fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::Seek(_) | KafkaError::Canceled | KafkaError::NoMessageReceived => true,
        _ => matches!(
            error.rdkafka_error_code(),
            Some(
                C::AllBrokersDown
                    | C::BrokerTransportFailure
                    | C::BrokerDestroy
                    | C::Resolve
                    | C::OperationTimedOut
                    | C::TimedOutQueue
                    | C::RequestTimedOut
                    | C::NetworkException
                    | C::BrokerNotAvailable
                    | C::LeaderNotAvailable
                    | C::NotLeaderForPartition
                    | C::CoordinatorLoadInProgress
                    | C::CoordinatorNotAvailable
                    | C::NotCoordinator
                    | C::UnknownLeaderEpoch
                    | C::FencedLeaderEpoch
                    | C::OffsetNotAvailable
                    | C::PollExceeded
            )
        ),
    }
}

/// The watchdog loop.
fn watch(liveness: &Liveness, kafka: &KafkaArgs, limit: Duration, on_stall: &dyn Fn(&str)) {
    let mut probe: Option<BaseConsumer> = None;
    // The last lag probe of a quiet stage: when, and the stall it found.
    let mut lag: Option<(Instant, Option<String>)> = None;
    // Since when the broker answers while the stage is stalled.
    let mut answering_since: Option<Instant> = None;
    // Once the broker is back, the stage gets this long to get going by itself.
    let grace = limit / 4;
    let mut waiting_log = Throttle::new(Duration::from_secs(30));
    loop {
        std::thread::sleep(TICK);
        let waiting_on = *liveness
            .shared
            .waiting_on
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if waiting_on.is_some() {
            // Not the broker's business, and a restart would not bring it back.
            answering_since = None;
            continue;
        }
        let reason = match liveness.stalled_step(limit) {
            Some(reason) => Some(reason),
            None if liveness.quiet_for() > limit => {
                if lag
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= PROBE_EVERY)
                {
                    let input = liveness
                        .shared
                        .input
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let found = match waiting_records(&mut probe, kafka, &input) {
                        Ok(0) => {
                            // Idle, not stuck: nothing waits for this stage.
                            liveness.progress();
                            None
                        }
                        Ok(waiting) => Some(format!(
                            "{waiting} records wait in {} and nothing was completed for {} s",
                            input.topic,
                            liveness.quiet_for().as_secs()
                        )),
                        // The broker does not answer: said below, when it is asked again.
                        Err(_) => Some("no progress".to_owned()),
                    };
                    lag = Some((Instant::now(), found));
                }
                lag.as_ref().and_then(|(_, found)| found.clone())
            }
            None => {
                lag = None;
                None
            }
        };
        let Some(reason) = reason else {
            answering_since = None;
            continue;
        };
        if !broker_answers(&mut probe, kafka) {
            answering_since = None;
            if let Some(skipped) = waiting_log.allow() {
                tracing::warn!(
                    stage = liveness.stage,
                    reason,
                    skipped,
                    "stalled, and the broker does not answer: waiting for it"
                );
            }
            continue;
        }
        if answering_since.get_or_insert_with(Instant::now).elapsed() < grace {
            continue;
        }
        tracing::error!(
            stage = liveness.stage,
            reason,
            limit_s = limit.as_secs(),
            "stalled while the broker answers; restarting this process in place"
        );
        on_stall(&reason);
    }
}

fn probe_client<'a>(
    probe: &'a mut Option<BaseConsumer>,
    kafka: &KafkaArgs,
) -> Result<&'a BaseConsumer, KafkaError> {
    if probe.is_none() {
        let mut config = crate::kafka::base_config(kafka);
        config.remove("acks");
        config.set("client.id", "tally-liveness-probe");
        crate::kafka::apply_overrides(&mut config, kafka);
        *probe = Some(config.create()?);
    }
    probe.as_ref().ok_or(KafkaError::Canceled)
}

fn broker_answers(probe: &mut Option<BaseConsumer>, kafka: &KafkaArgs) -> bool {
    probe_client(probe, kafka)
        .and_then(|c| c.fetch_metadata(None, Duration::from_secs(10)))
        .is_ok()
}

/// Records past the stage's positions, from the broker's high watermarks.
fn waiting_records(
    probe: &mut Option<BaseConsumer>,
    kafka: &KafkaArgs,
    input: &Input,
) -> Result<i64, KafkaError> {
    let client = probe_client(probe, kafka)?;
    let mut waiting = 0;
    for &(partition, position) in &input.positions {
        let (_, high) =
            client.fetch_watermarks(&input.topic, partition, Duration::from_secs(10))?;
        waiting += (high - position).max(0);
    }
    Ok(waiting)
}

/// Replaces this process by a fresh copy of itself (same binary, same arguments, same pid).
pub fn restart_in_place() -> ! {
    use std::os::unix::process::CommandExt;
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(error) => error,
    };
    // exec only returns on failure: exit, and let the supervisor restart us.
    tracing::error!(%error, "cannot restart in place, exiting");
    std::process::exit(75);
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
        l.shared.steps.lock().unwrap()[0].2 -= 61_000;
        let reason = l.stalled_step(Duration::from_secs(60)).unwrap();
        assert!(reason.contains("outer"), "{reason}");
        drop(outer);
        assert!(l.stalled_step(Duration::from_secs(60)).is_none());
    }

    #[test]
    fn throttle_counts_what_it_swallows() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(t.allow(), Some(2));
    }

    #[test]
    fn broker_outage_errors_are_transient() {
        assert!(is_transient(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown
        )));
        assert!(is_transient(&KafkaError::MetadataFetch(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_transient(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        assert!(!is_transient(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
    }
}
