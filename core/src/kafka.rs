//! librdkafka client set-up: every option tally relies on is set explicitly here, then the
//! user's `-X key=value` overrides are applied last.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::args::KafkaArgs;

/// Errors from Kafka administration.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin client could not be created.
    #[error("cannot create the Kafka admin client")]
    Client(#[source] KafkaError),
    /// The create-topics request failed as a whole (broker unreachable, timeout).
    #[error("create-topics request failed")]
    Request(#[source] KafkaError),
    /// One topic could not be created.
    #[error("cannot create topic {topic}: {code}")]
    Topic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

/// Settings common to every client.
pub fn base_config(args: &KafkaArgs) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("client.id", "tally")
        // librdkafka's default (all) is right for tally too, but say it: lost records are lost money.
        .set("acks", "all");
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
        .set("enable.partition.eof", "false");
    apply_overrides(&mut config, args);
    config
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

/// A topic tally needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// Partition count (fixed at creation; co-partitioned topics must agree).
    pub partitions: i32,
    /// Log compaction instead of deletion (the done-set).
    pub compacted: bool,
    /// How long records are kept (`retention.ms`); `None`: the broker's default.
    pub retention: Option<Duration>,
}

/// Creates the topics that do not exist yet. Existing topics are left as they are.
pub async fn ensure_topics(args: &KafkaArgs, topics: &[TopicSpec]) -> Result<(), AdminError> {
    let mut config = base_config(args);
    config.remove("acks");
    apply_overrides(&mut config, args);
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(AdminError::Client)?;
    let retention: Vec<Option<String>> = topics
        .iter()
        .map(|t| t.retention.map(|r| r.as_millis().to_string()))
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&retention)
        .map(|(t, retention)| {
            let mut topic = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1));
            if t.compacted {
                // Segments roll hourly (the broker's default is a week): only closed segments
                // are compacted, so a done topic holds about one record per file within hours.
                topic = topic
                    .set("cleanup.policy", "compact")
                    .set("segment.ms", "3600000");
            }
            if let Some(ms) = retention {
                topic = topic.set("retention.ms", ms);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &options)
        .await
        .map_err(AdminError::Request)?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(AdminError::Topic { topic, code }),
        }
    }
    Ok(())
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

/// Default partition count of `tally.files` and `tally.done` (they must match; `tally init
/// --files-partitions`).
pub const FILES_PARTITIONS: i32 = 6;
/// Default partition count of `tally.sums` and `tally.totals` (they must match; `tally init
/// --sums-partitions`).
pub const SUMS_PARTITIONS: i32 = 6;

/// How long `tally init` keeps the records of the deleting topics by default: much longer
/// than the broker's 7 days, so that a stage can be down for weeks before records it has not
/// read are deleted. The db-client stops at such a gap rather than skip it.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(30 * 24 * 3600);

/// How a new pipeline's topics are made: partition counts and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineLayout {
    /// Partitions of `tally.files` and `tally.done` (co-partitioned): at least the number of
    /// parser instances.
    pub files_partitions: i32,
    /// Partitions of `tally.sums` and `tally.totals` (a consumer's partition number is the
    /// same on both): at least the number of aggregator or db-client instances.
    pub sums_partitions: i32,
    /// `retention.ms` of every deleting topic.
    pub retention: Duration,
}

impl Default for PipelineLayout {
    fn default() -> Self {
        Self {
            files_partitions: FILES_PARTITIONS,
            sums_partitions: SUMS_PARTITIONS,
            retention: RETENTION_DEFAULT,
        }
    }
}

/// The topics of one pipeline with their partition counts, cleanup policies and retention
/// (`retention` for every deleting topic; the compacted done topic keeps each file's latest
/// done-state, until the parsers prune it).
pub fn topic_specs(topics: &crate::Topics, layout: &PipelineLayout) -> Vec<TopicSpec> {
    let spec = |name: &str, partitions, compacted| TopicSpec {
        name: name.to_owned(),
        partitions,
        compacted,
        retention: (!compacted).then_some(layout.retention),
    };
    vec![
        spec(&topics.files, layout.files_partitions, false),
        // Co-partitioned with files: the owner of a files partition needs only its done partition.
        spec(&topics.done, layout.files_partitions, true),
        spec(&topics.sums, layout.sums_partitions, false),
        spec(&topics.totals, layout.sums_partitions, false),
        spec(&topics.dead_letter, 1, false),
    ]
}

/// Creates every topic of the pipeline that does not exist yet.
pub async fn ensure_pipeline_topics(
    args: &KafkaArgs,
    layout: &PipelineLayout,
) -> Result<(), AdminError> {
    ensure_topics(
        args,
        &topic_specs(&crate::Topics::new(&args.topic_prefix), layout),
    )
    .await
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

/// Number of partitions of `topic`, from a metadata request.
pub fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
) -> Result<i32, KafkaError> {
    use rdkafka::consumer::Consumer;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
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
            *client = Some(self.config.create()?);
        }
        let result = f(client.as_ref().ok_or(KafkaError::Canceled)?);
        if result.is_err() {
            *client = None;
        }
        result
    }
}
