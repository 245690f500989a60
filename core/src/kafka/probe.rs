//! [`BrokerProbe`]: watermark queries and "does a broker answer", from a client of its own;
//! and whether the brokers refuse this client for a reason that will not heal (credentials,
//! security protocol, certificates), so that a stage fails fast at start instead of retrying
//! for ever, and says why in its readiness after.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{apply_overrides, base_config};
use crate::args::KafkaArgs;

/// A client of its own for watermark queries (log starts, high watermarks), so that they do
/// not wait for a group consumer's fetches. A failed query drops the client and the next one
/// creates a fresh one: a client left idle across a broker restart can keep stale metadata
/// and answer `UnknownPartition` to every query after it.
pub struct BrokerProbe {
    config: ClientConfig,
    client: std::sync::Mutex<Option<rdkafka::consumer::BaseConsumer<Refusals>>>,
    refusals: Refusals,
}

/// A client context that keeps the last error of the kind that will not heal by retrying.
#[derive(Clone, Default)]
pub struct Refusals {
    last: Arc<Mutex<Option<(Instant, String)>>>,
    /// Connections the broker closed at the first request (`ApiVersion`), in a row.
    closed_at_hello: Arc<std::sync::atomic::AtomicU32>,
}

/// A broker that closes this many connections in a row at the first request speaks another
/// protocol on that port (a TLS or SASL listener for a plaintext client): that will not heal.
const CLOSED_AT_HELLO_MAX: u32 = 3;

impl Refusals {
    /// The last refusal seen within `recent`, if any.
    pub fn recent(&self, recent: Duration) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < recent)
            .map(|(_, why)| why.clone())
    }

    fn note(&self, why: &str) {
        use std::sync::atomic::Ordering;
        let found = refusal(why).or_else(|| {
            let hello = why.contains("Disconnected") && why.contains("in state APIVERSION_QUERY");
            if !hello {
                return None;
            }
            let closed = self.closed_at_hello.fetch_add(1, Ordering::Relaxed) + 1;
            (closed >= CLOSED_AT_HELLO_MAX).then(|| {
                format!(
                    "the broker closed {closed} connections at the first request: a TLS or \
                     SASL listener? ({})",
                    crate::redact::scrub(why.trim())
                )
            })
        });
        if let Some(why) = found {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), why));
        }
    }

    /// A broker answered: connections closed before were not a protocol mismatch.
    fn answered(&self) {
        self.closed_at_hello
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The refusal in a librdkafka error or log text, if it is one that will not heal: rejected
/// credentials or mechanism, a security protocol that does not match the listener, a
/// certificate that does not verify.
pub fn refusal(text: &str) -> Option<String> {
    const WILL_NOT_HEAL: &[&str] = &[
        "SASL authentication error",
        "Authentication failed",
        "Unsupported SASL mechanism",
        "incorrect security.protocol",
        "connecting to a PLAINTEXT broker listener",
        "connecting to a SSL listener",
        "SSL handshake failed",
        "certificate verify failed",
    ];
    WILL_NOT_HEAL
        .iter()
        .any(|needle| text.contains(needle))
        .then(|| crate::redact::scrub(text.trim()).into_owned())
}

impl ClientContext for Refusals {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Info as i32) {
            self.note(log_message);
        }
        tracing::debug!(fac, log_message, "librdkafka (probe)");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
            let why = crate::redact::scrub(reason).into_owned();
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), why));
        } else {
            self.note(reason);
        }
    }
}

impl ConsumerContext for Refusals {}

/// How a start-up check of the brokers ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reached {
    /// A broker answered.
    Answered,
    /// None answered in time (down, or not yet up): a stage waits for them.
    NoAnswer,
    /// The brokers refuse this client, for a reason that will not heal.
    Refused(String),
}

impl BrokerProbe {
    /// A probe with the stage's Kafka settings (no client is created yet).
    pub fn new(args: &KafkaArgs) -> Self {
        let mut config = base_config(args);
        config.remove("acks");
        apply_overrides(&mut config, args);
        Self {
            config,
            client: std::sync::Mutex::new(None),
            refusals: Refusals::default(),
        }
    }

    /// A probe that asks for log ends only: its [`BrokerProbe::watermarks`] answer the high
    /// watermark, past every record written, committed or not. A `read_committed` client (a
    /// [`super::reader`]; librdkafka's default) is answered the last stable offset instead,
    /// which stops short of a transaction whose commit has returned but whose markers the
    /// broker has not written yet: a reader that stops there misses what that transaction
    /// wrote. A reader that must see everything committed before it started reads (with
    /// `read_committed`) until its position reaches this probe's answer. Like every probe, a
    /// failed call replaces its client (one stuck on a broker that died stays stuck).
    pub fn log_ends(args: &KafkaArgs) -> Self {
        let mut probe = Self::new(args);
        probe.config.set("isolation.level", "read_uncommitted");
        probe
    }

    /// Tries to reach a broker for up to `within`: answered, no answer, or refused (returned
    /// as soon as a refusal is seen).
    pub fn reach(&self, within: Duration) -> Reached {
        let deadline = Instant::now() + within;
        loop {
            if let Some(why) = self.refusal() {
                return Reached::Refused(why);
            }
            if self.answers(Duration::from_millis(500)) {
                self.refusals.answered();
                return Reached::Answered;
            }
            if Instant::now() >= deadline {
                return self.refusal().map_or(Reached::NoAnswer, Reached::Refused);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Why the brokers refused this client lately (the last 30 s), if they did.
    pub fn refusal(&self) -> Option<String> {
        self.serve_events();
        self.refusals.recent(Duration::from_secs(30))
    }

    /// Serves the client's queued events (errors and logs reach the context only when the
    /// client is polled).
    fn serve_events(&self) {
        let client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = client.as_ref() {
            let _ = client.poll(Duration::ZERO);
        }
    }

    /// The (log start, high watermark) of `topic`/`partition`.
    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        use rdkafka::consumer::Consumer;
        self.call(|c| c.fetch_watermarks(topic, partition, Duration::from_secs(10)))
    }

    /// Number of partitions of `topic` (0: no such topic).
    pub fn partition_count(&self, topic: &str) -> Result<i32, KafkaError> {
        self.call(|c| super::partition_count(c, topic))
    }

    /// The broker's description of consumer group `group`: state, members, assignments.
    pub fn group_list(&self, group: &str) -> Result<rdkafka::groups::GroupList, KafkaError> {
        use rdkafka::consumer::Consumer;
        self.call(|c| c.fetch_group_list(Some(group), Duration::from_secs(10)))
    }

    /// Whether a broker answers a metadata request within `timeout`.
    pub fn answers(&self, timeout: Duration) -> bool {
        use rdkafka::consumer::Consumer;
        self.call(|c| c.fetch_metadata(None, timeout).map(|_| ()))
            .is_ok()
    }

    /// Runs `f` with the client (created if there is none); a failure drops the client, so
    /// the next call starts with a fresh one.
    fn call<T>(
        &self,
        f: impl FnOnce(&rdkafka::consumer::BaseConsumer<Refusals>) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if client.is_none() {
            *client = Some(
                self.config
                    .create_with_context(self.refusals.clone())
                    .map_err(super::quiet)?,
            );
        }
        let result = f(client.as_ref().ok_or(KafkaError::Canceled)?);
        if result.is_err() {
            // Its events first: why it failed may be among them.
            if let Some(failed) = client.take() {
                let _ = failed.poll(Duration::ZERO);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_will_not_heal() {
        for text in [
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
            "Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10",
            "SSL handshake failed: error:0A00010B:SSL routines::wrong version number: connecting to a PLAINTEXT broker listener?",
            "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
        ] {
            assert!(refusal(text).is_some(), "{text}");
        }
        for text in [
            "Connect to ipv4#127.0.0.1:19092 failed: Connection refused",
            "1/1 brokers are down",
            "Receive failed: Disconnected",
        ] {
            assert!(refusal(text).is_none(), "{text}");
        }
    }
}
