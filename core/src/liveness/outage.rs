//! Broker outages as seen by a stage: which client errors are an outage (wait) rather than a
//! failure, the one retry loop for blocking steps, bounded-rate logging, and what to do with a
//! consumer that librdkafka declared unusable.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::restart_in_place;
use crate::backoff::Backoff;
use crate::shutdown::CancellationToken;

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

/// Retries `op` with capped exponential backoff ([`Backoff::stage`]: 200 ms doubling to 10 s,
/// with jitter, so failures are logged at a bounded rate) until it succeeds; fails only once `shutdown` is cancelled.
/// Waits longer than the stall limit are the watchdog's business: call it inside a step.
pub fn retry<T>(
    shutdown: &CancellationToken,
    what: &str,
    mut op: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut backoff = Backoff::stage();
    loop {
        let error = match op() {
            Ok(v) => return Ok(v),
            Err(error) => error,
        };
        if will_not_heal(&error) {
            return Err(error.context(format!("cannot {what}")));
        }
        if shutdown.is_cancelled() {
            return Err(error.context(format!("cannot {what}")));
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            error = format!("{error:#}"),
            retry_in_ms = delay.as_millis() as u64,
            "cannot {what}, retrying"
        );
        let until = Instant::now() + delay;
        while Instant::now() < until && !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Retries `op` while it fails with a [transient](is_transient) client error (a topic just
/// created whose leader is not elected yet, a broker restarting), with [`Backoff::stage`],
/// for up to `within` or until `shutdown`; any other error, or the last one at the deadline,
/// returns at once.
pub fn retry_transient<T>(
    shutdown: &CancellationToken,
    within: Duration,
    what: &str,
    mut op: impl FnMut() -> Result<T, KafkaError>,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let deadline = Instant::now() + within;
    let mut backoff = Backoff::stage();
    let mut log = Throttle::new(Duration::from_secs(10));
    loop {
        let error = match op() {
            Ok(v) => return Ok(v),
            Err(error) => error,
        };
        let delay = backoff.next_delay();
        if !is_transient(&error) || shutdown.is_cancelled() || Instant::now() + delay > deadline {
            return Err(error).with_context(|| format!("cannot {what}"));
        }
        if let Some(skipped) = log.allow() {
            tracing::warn!(%error, skipped, retry_in_ms = delay.as_millis() as u64, "cannot {what}, retrying");
        }
        let until = Instant::now() + delay;
        while Instant::now() < until && !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether `error` is a configuration that no retry can fix: librdkafka refused to create a
/// client (an unknown or invalid setting, a feature it was built without).
pub fn will_not_heal(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        matches!(
            e.downcast_ref::<KafkaError>(),
            Some(KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..))
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn transient_errors_are_retried_and_others_are_not() {
        let shutdown = CancellationToken::new();
        let within = Duration::from_secs(30);
        let mut calls = 0;
        let got = retry_transient(&shutdown, within, "elect", || {
            calls += 1;
            if calls < 3 {
                Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::NotLeaderForPartition,
                ))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(got.unwrap(), 3);
        let mut calls = 0;
        let got: anyhow::Result<()> = retry_transient(&shutdown, within, "read", || {
            calls += 1;
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::TopicAuthorizationFailed,
            ))
        });
        assert!(format!("{:#}", got.unwrap_err()).starts_with("cannot read"));
        assert_eq!(calls, 1);
        let started = Instant::now();
        let got: anyhow::Result<()> = retry_transient(&shutdown, Duration::ZERO, "wait", || {
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown))
        });
        assert!(got.is_err() && started.elapsed() < Duration::from_secs(1));
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
