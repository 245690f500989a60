//! [`BrokerProbe`]: watermark queries and "does a broker answer", from a client of its own.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

use super::{apply_overrides, base_config};
use crate::args::KafkaArgs;

/// A client of its own for watermark queries (log starts, high watermarks), so that they do
/// not wait for a group consumer's fetches. A failed query drops the client and the next one
/// creates a fresh one: a client left idle across a broker restart can keep stale metadata
/// and answer `UnknownPartition` to every query after it.
pub struct BrokerProbe {
    config: ClientConfig,
    client: std::sync::Mutex<Option<rdkafka::consumer::BaseConsumer>>,
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
        }
    }

    /// The (log start, high watermark) of `topic`/`partition`.
    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        use rdkafka::consumer::Consumer;
        self.call(|c| c.fetch_watermarks(topic, partition, Duration::from_secs(10)))
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
        f: impl FnOnce(&rdkafka::consumer::BaseConsumer) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if client.is_none() {
            *client = Some(self.config.create().map_err(super::quiet)?);
        }
        let result = f(client.as_ref().ok_or(KafkaError::Canceled)?);
        if result.is_err() {
            *client = None;
        }
        result
    }
}
