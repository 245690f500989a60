//! Topics: the pipeline's topics and their layout, created when missing (`tally init`).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{apply_overrides, base_config, quiet};
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
    /// A topic was created but did not show in the brokers' metadata in time.
    #[error("topic {0} was created but is not in the brokers' metadata after 30 s")]
    NotVisible(String),
    /// One topic could not be created.
    #[error("cannot create topic {topic}: {code}")]
    Topic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
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

/// Creates the topics that do not exist yet, and returns once every topic shows in the
/// brokers' metadata with a leader for each partition. Existing topics are left as they are.
pub async fn ensure_topics(args: &KafkaArgs, topics: &[TopicSpec]) -> Result<(), AdminError> {
    let mut config = base_config(args);
    config.remove("acks");
    apply_overrides(&mut config, args);
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|e| AdminError::Client(quiet(e)))?;
    let retention: Vec<Option<String>> = topics
        .iter()
        .map(|t| t.retention.map(|r| r.as_millis().to_string()))
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&retention)
        .map(|(t, retention)| {
            let mut topic = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1))
                .set("segment.index.bytes", SEGMENT_INDEX_BYTES);
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
    // A created topic reaches the brokers' metadata a moment later, and its partitions' leaders
    // are elected after that: a client started right after `tally init` (a script's next
    // line) must find it and be able to read its ends.
    let deadline = std::time::Instant::now() + VISIBLE_WITHIN;
    loop {
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(5))
            .map_err(AdminError::Request)?;
        let missing = topics.iter().find(|t| {
            !metadata
                .topics()
                .iter()
                .any(|m| m.name() == t.name && m.error().is_none() && usable(m.partitions()))
        });
        match missing {
            None => return Ok(()),
            Some(t) if std::time::Instant::now() >= deadline => {
                return Err(AdminError::NotVisible(t.name.clone()))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether a topic's partitions are all there with a leader.
fn usable(partitions: &[rdkafka::metadata::MetadataPartition]) -> bool {
    !partitions.is_empty()
        && partitions
            .iter()
            .all(|p| p.error().is_none() && p.leader() >= 0)
}

/// `segment.index.bytes` of every topic tally creates (the broker's default is 10 MiB). A
/// segment's offset and time indexes are files of this size, sparse until written, that the
/// broker maps into memory. The first write to such a map reads ahead from the file as far as
/// the block device allows, and where that is far (8 MiB on the machines docs/benchmarks.md
/// was measured on) the kernel fills megabytes of zeroes first: 2.4 ms for a 10 MiB index
/// file, 0.3 ms for 1 MiB, on an idle machine. A partition's first index entry is written by
/// whatever appends to it next, often a transaction marker; on a busy machine the
/// aggregator's commit markers took 40 to 300 ms. A 1 MiB index still holds 131,072 offset
/// entries or 87,381 time entries, one per 4 KiB of log at most (`index.interval.bytes`), so
/// a segment holds at least about 340 MiB before a full index rolls it.
pub const SEGMENT_INDEX_BYTES: &str = "1048576";

/// How long a created topic may take to show in the brokers' metadata.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

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
/// done-state, until the parsers prune it; the compacted ingested topic keeps a record per
/// pushed file for ever).
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
        // Read whole by every ingest server: one partition (a record per file).
        spec(&topics.ingested, 1, true),
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

/// Default partition count of `tally.files` and `tally.done` (they must match; `tally init
/// --files-partitions`).
pub const FILES_PARTITIONS: i32 = 6;
/// Default partition count of `tally.sums` and `tally.totals` (they must match; `tally init
/// --sums-partitions`).
pub const SUMS_PARTITIONS: i32 = 6;
