//! Once is forever: every file the ingest servers announced, as its name and the XXH3-128 of
//! its whole bytes (computed by the server, whatever checksum the client sent), on the
//! compacted topic `<prefix>.ingested`.
//!
//! A mark is written in the announcement's own Kafka transaction, so it is on the topic
//! exactly when the file's units are on the files topic. [`Ingested::load`] reads the topic to
//! its end before the server takes a request, then a thread tails it, so a replica learns what
//! the others announced within a poll. A push of bytes known under their name is answered
//! "in already", whatever its token, checksum kind or upload id, however long after: the
//! topic is compacted and never deleted (one record per file; a million files hold about
//! 150 MB there and 32 MB in each server's memory).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tally_core::shutdown::CancellationToken;
use tally_core::KafkaArgs;
use tally_core::{kafka, liveness};

/// A file's mark on the ingested topic (its value; its key is [`key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The file's name in the folder.
    pub name: String,
    /// `xxh3:<32 hex digits>` of its whole bytes.
    pub digest: String,
    /// Its size.
    pub bytes: u64,
    /// The name of the token that pushed it.
    pub token: String,
    /// When it was announced, unix seconds.
    pub announced_at: i64,
}

/// The record key of a file: its digest, then its name (`xxh3:<hex>/<name>`).
pub fn key(name: &str, digest: &str) -> String {
    format!("{digest}/{name}")
}

fn hash(key: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

fn name_hash(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// What this server knows was announced (by it or any replica sharing the topic).
#[derive(Debug, Default)]
pub struct Ingested {
    /// The topic.
    pub topic: String,
    files: RwLock<HashSet<u128>>,
    names: RwLock<HashSet<u64>>,
}

impl Ingested {
    /// Whether the bytes with `digest` were announced under `name`.
    pub fn knows(&self, name: &str, digest: &str) -> bool {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&hash(&key(name, digest)))
    }

    /// Whether any bytes were announced under `name`.
    pub fn knows_name(&self, name: &str) -> bool {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&name_hash(name))
    }

    /// Notes a file as announced (its mark committed).
    pub fn note(&self, name: &str, digest: &str) {
        self.note_key(&key(name, digest), name);
    }

    fn note_key(&self, key: &str, name: &str) {
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash(key));
        self.names
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name_hash(name));
    }

    /// How many files it knows.
    pub fn len(&self) -> usize {
        self.files.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether it knows no file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the topic of `kafka`'s pipeline to its end (its high watermarks, with
    /// `read_committed`: an announcement whose commit has returned, or that is still open, is
    /// waited for), then tails it on a thread of its own until `shutdown`.
    pub fn load(kafka_args: &KafkaArgs, shutdown: &CancellationToken) -> anyhow::Result<Arc<Self>> {
        let topic = tally_core::Topics::new(&kafka_args.topic_prefix).ingested;
        let group = format!("{topic}.reader");
        let mut config = kafka::consumer_config(kafka_args, &group);
        // Another replica's mark is seen within about this long.
        config.set("fetch.wait.max.ms", "100");
        let consumer: BaseConsumer = config
            .create()
            .map_err(kafka::quiet)
            .context("cannot create a Kafka client for the ingested topic")?;
        // A broker restarting, or a topic just created whose leaders are not elected yet, is
        // waited for as long as an outage of the read below.
        let patience = Duration::from_secs(120);
        let partitions = liveness::retry_transient(shutdown, patience, "reach Kafka", || {
            kafka::partition_count(&consumer, &topic)
        })?;
        if partitions == 0 {
            bail!("topic {topic} does not exist: run `tally init` (it adds missing topics)");
        }
        let log_ends = kafka::BrokerProbe::log_ends(kafka_args);
        let mut tpl = TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in 0..partitions {
            let what = "read the ingested topic's ends";
            let (_, high) = liveness::retry_transient(shutdown, patience, what, || {
                log_ends.watermarks(&topic, p)
            })?;
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
            ends.push((p, high));
        }
        consumer.assign(&tpl)?;
        let ingested = Arc::new(Self {
            topic: topic.clone(),
            ..Self::default()
        });
        let started = Instant::now();
        let mut last = Instant::now();
        loop {
            let behind = ends.iter().any(|&(p, high)| {
                high > 0 && kafka::position_of(&consumer, &topic, p).map_or(true, |pos| pos < high)
            });
            if !behind {
                break;
            }
            // An open announcement holds the last stable offset for at most its transaction
            // timeout (60 s); nothing at all for longer is an outage.
            if last.elapsed() > Duration::from_secs(120) {
                bail!("the ingested topic {topic} gave nothing for 120 s before its end");
            }
            if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                ingested.take(&message.context("cannot read the ingested topic")?);
                last = Instant::now();
            }
        }
        tracing::info!(files = ingested.len(), took = ?started.elapsed(), %topic, "ingested files known");
        let tail = ingested.clone();
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("ingested-tail".into())
            .spawn(move || {
                while !shutdown.is_cancelled() {
                    match consumer.poll(Duration::from_millis(200)) {
                        Some(Ok(message)) => tail.take(&message),
                        Some(Err(error)) => {
                            tracing::warn!(%error, "reading the ingested topic");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        None => {}
                    }
                }
            })?;
        Ok(ingested)
    }

    fn take(&self, message: &rdkafka::message::BorrowedMessage<'_>) {
        let (Some(key), Some(payload)) = (message.key(), message.payload()) else {
            return;
        };
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        match serde_json::from_slice::<Mark>(payload) {
            Ok(mark) => self.note_key(key, &mark.name),
            Err(error) => tracing::warn!(%error, key, "a record of the ingested topic is no mark"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_a_file_by_name_and_digest_only() {
        let ingested = Ingested::default();
        ingested.note("a.txt", "xxh3:00ff");
        assert!(ingested.knows("a.txt", "xxh3:00ff"));
        assert!(!ingested.knows("a.txt", "xxh3:00fe"));
        assert!(!ingested.knows("b.txt", "xxh3:00ff"));
        assert!(ingested.knows_name("a.txt"));
        assert!(!ingested.knows_name("b.txt"));
        assert_eq!(key("a.txt", "xxh3:00ff"), "xxh3:00ff/a.txt");
    }
}
