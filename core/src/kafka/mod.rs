//! librdkafka client set-up: every option tally relies on is set explicitly here, then the
//! user's `-X key=value` overrides are applied last.

use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::args::KafkaArgs;

mod admin;
mod probe;

pub use admin::*;
pub use probe::{BrokerProbe, Reached};

/// Settings common to every client.
pub fn base_config(args: &KafkaArgs) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("client.id", "tally")
        // librdkafka's default (all) is right for tally too, but say it: lost records are lost money.
        .set("acks", "all")
        // After its bootstrap connection, a client opens its own to the broker the metadata
        // names, but librdkafka lets it pick a broker to connect to only once every
        // `reconnect.backoff.ms / 2` (at least 11 ms): with the default (100 ms), a client's
        // first request to a real broker, such as a one-shot `producer publish`'s first
        // announcement, waited 50 ms for nothing. A broker that is down is retried after
        // 20 ms, doubling up to `reconnect.backoff.max.ms` (10 s), as before.
        .set("reconnect.backoff.ms", "20");
    config
}

/// Applies the TLS/SASL settings and the user's `-X` overrides; call last. Unreadable
/// certificate files or a missing SASL password were refused at start (see
/// [`KafkaArgs::security_settings`]); here they are skipped.
pub fn apply_overrides(config: &mut ClientConfig, args: &KafkaArgs) {
    for (key, value) in args.security_settings().unwrap_or_default() {
        config.set(key, value);
    }
    for (key, value) in &args.options {
        config.set(key, value);
    }
}

/// A client-creation error without the configuration value it names: librdkafka's error
/// carries the value of a property it refused, and a `-X` value may be a secret (a mistyped
/// `sasl.pasword=…` is refused as an unknown property, value and all). Every `create()` of a
/// client maps its error through here.
pub fn quiet(error: KafkaError) -> KafkaError {
    match error {
        KafkaError::ClientConfig(code, desc, key, value) => {
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(&value, "***")
            };
            KafkaError::ClientConfig(code, desc, key, "***".to_owned())
        }
        other => other,
    }
}

/// Why librdkafka refuses the setting `key=value` (an unknown key, an invalid value), without
/// the value; `None` if it takes it.
pub fn refused_option(key: &str, value: &str) -> Option<String> {
    let mut config = ClientConfig::new();
    config.set(key, value);
    match config.create_native_config().map_err(quiet) {
        Ok(_) => None,
        Err(KafkaError::ClientConfig(_, desc, _, _)) => Some(desc),
        Err(other) => Some(other.to_string()),
    }
}

/// A consumer in `group` that reads only committed transactional data and never commits on its
/// own: every stage commits offsets together with its output (Kafka transaction or PostgreSQL).
pub fn consumer_config(args: &KafkaArgs, group: &str) -> ClientConfig {
    let mut config = base_config(args);
    config
        .remove("acks")
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // How long the broker may hold a fetch that finds nothing new. A producer's commit
        // does not always end that wait for a read_committed consumer (not when the batch's
        // last partition to turn readable was held by an open transaction): the records then
        // arrive when the wait runs out. librdkafka's default, 500 ms, was half a second per
        // stage between a parser's commit and the aggregator's, and again to the db-client;
        // at 50 ms an idle consumer fetches 20 times a second, which a broker does not feel.
        .set("fetch.wait.max.ms", "50");
    apply_overrides(&mut config, args);
    config
}

/// What a topic reader needs to know of the end of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// Polls return nothing at the end (the reader compares positions with watermarks).
    Silent,
    /// Polls return a `PartitionEOF` at the end, past any trailing transaction marker.
    Reported,
}

/// A reader of topics that is no consume loop (done-set loads, watch's done tracker, the
/// ingest throttle, the aggregator's view of the parsers' progress, `status`, `inspect`,
/// probes): it assigns partitions itself and never joins or commits for `group` (which names
/// it to the broker, and whose committed offsets it may read). The one place such a client is built; consume loops get theirs from
/// [`crate::consume::Group::open`].
pub fn reader(
    args: &KafkaArgs,
    group: &str,
    ends: Ends,
) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    let mut config = consumer_config(args, group);
    if ends == Ends::Reported {
        config.set("enable.partition.eof", "true");
    }
    config
        .create()
        .map_err(quiet)
        .with_context(|| format!("cannot create a Kafka client ({group})"))
}

/// Static group membership (KIP-345) for an instance with a stable name: a restarted instance
/// rejoins as the same member and gets its partitions back at once, instead of a rebalance
/// that first waits out the dead member's session (`session.timeout.ms`, 45 s). The price: an
/// instance that stops for good keeps its partitions until its session times out.
pub fn static_membership(config: &mut ClientConfig, instance_id: Option<&str>) {
    if let Some(id) = instance_id {
        config.set("group.instance.id", id);
    }
}

/// A transactional (hence idempotent) producer with this `transactional.id`.
pub fn transactional_producer_config(
    args: &KafkaArgs,
    transactional_id: &str,
    transaction_timeout: Duration,
) -> ClientConfig {
    let mut config = base_config(args);
    config
        .set("transactional.id", transactional_id)
        .set("enable.idempotence", "true")
        .set(
            "transaction.timeout.ms",
            transaction_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    apply_overrides(&mut config, args);
    config
}

/// What to do after a failed transactional call (see SERVICES.md: classify every error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnErrorKind {
    /// Retry the same call (same offsets, same group metadata).
    Retriable,
    /// Abort the transaction, rewind the input to the committed offsets, start over.
    Abortable,
    /// The producer is unusable (fenced, or an unknown error): recreate it.
    Fatal,
}

/// Classifies an error from a transactional producer call. Unknown kinds count as fatal.
pub fn classify_txn_error(error: &KafkaError) -> TxnErrorKind {
    match error {
        KafkaError::Transaction(e) if e.is_fatal() => TxnErrorKind::Fatal,
        KafkaError::Transaction(e) if e.txn_requires_abort() => TxnErrorKind::Abortable,
        KafkaError::Transaction(e) if e.is_retriable() => TxnErrorKind::Retriable,
        // commit_transaction flushes first; a flush timeout is worth another try.
        KafkaError::Flush(_) => TxnErrorKind::Retriable,
        _ => TxnErrorKind::Fatal,
    }
}

/// Sends `record`, waiting while librdkafka's queue is full (the queue's size bound is the
/// back-pressure that keeps a stage's memory flat). Other errors are returned.
pub fn send_waiting<C, K, P>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    mut record: rdkafka::producer::BaseRecord<'_, K, P>,
) -> Result<(), KafkaError>
where
    C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()> + 'static,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Commits the open transaction of a [`ThreadedProducer`](rdkafka::producer::ThreadedProducer),
/// first waiting here until every record sent in it is delivered.
///
/// rust-rdkafka's `commit_transaction` flushes first, and its flush polls the event queue in
/// steps of 100 ms; the threaded producer's own thread polls the same queue, so when that
/// thread takes the last delivery report the flush sleeps out its step: every commit cost up
/// to 100 ms of idle time (seen as ~110 ms gaps between a parser's units, and 100 ms per file
/// announced). The producer's thread serves delivery reports as they come, so the count of
/// records in flight reaches zero on its own; polled here in short naps, the flush inside the
/// commit then has nothing to wait for. `timeout` bounds the wait and the commit together.
pub fn commit_transaction<C>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    timeout: rdkafka::util::Timeout,
) -> Result<(), KafkaError>
where
    C: rdkafka::producer::ProducerContext + 'static,
{
    use rdkafka::producer::Producer;
    let deadline = match timeout {
        rdkafka::util::Timeout::After(after) => Some(std::time::Instant::now() + after),
        rdkafka::util::Timeout::Never => None,
    };
    let mut nap = Duration::from_micros(50);
    while producer.in_flight_count() > 0 {
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            break; // the commit's own flush reports the timeout
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(2));
    }
    let left = match deadline {
        Some(d) => {
            rdkafka::util::Timeout::After(d.saturating_duration_since(std::time::Instant::now()))
        }
        None => rdkafka::util::Timeout::Never,
    };
    producer.commit_transaction(left)
}

/// Number of partitions of `topic`, from a metadata request.
pub fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
) -> Result<i32, KafkaError> {
    use rdkafka::consumer::Consumer;
    client_partition_count(consumer.client(), topic)
}

/// [`partition_count`] on any client (a producer's: the answer also fills its metadata cache).
pub fn client_partition_count<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<i32, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32))
}

/// The consumer's position in `topic`/`partition` (the next offset it will read; 0 before the
/// first fetch).
pub fn position_of<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<i64, KafkaError> {
    use rdkafka::consumer::Consumer;
    Ok(consumer
        .position()?
        .find_partition(topic, partition)
        .and_then(|p| match p.offset() {
            rdkafka::Offset::Offset(o) => Some(o),
            _ => None,
        })
        .unwrap_or(0))
}

/// The low and high watermarks of `topic` / `partition` as `client` last saw them (from its
/// fetches: no request), or `None` when it has none yet. rdkafka has no safe wrapper for
/// librdkafka's `rd_kafka_get_watermark_offsets`.
pub fn cached_watermarks<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is alive for `client`'s lifetime, the topic is a
    // NUL-terminated string that outlives the call, and librdkafka only writes the two i64s.
    #[allow(unsafe_code)]
    let error = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (error == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low, high))
}
