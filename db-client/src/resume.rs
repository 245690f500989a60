//! Where a db-client resumes a partition it was just assigned: at the offset stored in
//! PostgreSQL with the totals (the checkpoint), or at the log's start when the database holds
//! nothing of that partition. Kafka's committed offsets only trail the database for lag tools:
//! after an operator reset the group's offsets, or the database was restored from a backup or
//! replaced, they point anywhere, and starting there would skip records (or rely on the batch
//! check alone to skip what was applied).
//!
//! Until a partition is sought, its records are dropped from batches (they are read again
//! from the stored offset). A stored offset past the end of the log means the topic was
//! recreated or truncated: the records it counts are not these. The stage stops with an error,
//! like at a gap, until an operator accepts it (`--accept-gap PARTITION:OFFSET`), which moves
//! the stored offset to the new log's start.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Offset;
use sqlx::PgPool;
use tally_core::rebalance::{RebalanceEvent, RebalanceLog};

/// A stored offset past the end of its partition's log: the topic was recreated (or
/// truncated) under the db-client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    /// The partition.
    pub partition: i32,
    /// Its next offset in `kafka_offsets`.
    pub stored: i64,
    /// Its log start now.
    pub low: i64,
    /// Its log end now.
    pub high: i64,
}

/// Partitions whose stored offsets lie past their logs' ends; nothing was sought.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(topic, resets))]
pub struct TopicReset {
    /// The topic.
    pub topic: String,
    /// The partitions.
    pub resets: Vec<Reset>,
}

fn describe(topic: &str, resets: &[Reset]) -> String {
    let each: Vec<String> = resets
        .iter()
        .map(|r| {
            format!(
                "partition {}: totals include offsets below {}, the log ends at {}",
                r.partition, r.stored, r.high
            )
        })
        .collect();
    format!(
        "{topic} was recreated or truncated: its records are not the ones the totals counted. \
         {}. Applying stops here; to read the new log from its start, restart the db-client \
         once with {}",
        each.join("; "),
        crate::batch::accept_flags(resets.iter().map(|r| (r.partition, r.stored)))
    )
}

/// Assigned partitions not yet sought to their stored offsets.
#[derive(Debug, Default)]
pub struct Resume {
    waiting: BTreeSet<i32>,
}

impl Resume {
    /// Takes the rebalance events recorded so far: assigned partitions wait for their seek.
    pub fn update(&mut self, log: &RebalanceLog) {
        for event in log.take() {
            match event {
                RebalanceEvent::Assigned(parts) => self.waiting.extend(parts),
                RebalanceEvent::Revoked(parts) => {
                    for p in parts {
                        self.waiting.remove(&p);
                    }
                }
            }
        }
    }

    /// Whether records of `partition` must wait for its seek (and are to be dropped).
    pub fn waits(&self, partition: i32) -> bool {
        self.waiting.contains(&partition)
    }

    /// Seeks every waiting partition to its stored offset (the log's start without one). A
    /// partition whose seek fails keeps waiting (retried at the next turn); a recreated topic
    /// fails with [`TopicReset`] unless `accepted`.
    pub async fn seek(
        &mut self,
        consumer: &StreamConsumer<RebalanceLog>,
        pool: &PgPool,
        topic: &str,
        accepted: &HashSet<(i32, i64)>,
    ) -> anyhow::Result<()> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = self.waiting.iter().copied().collect();
        let stored: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, next_offset FROM kafka_offsets WHERE topic = $1 AND partition = ANY($2)",
        )
        .bind(topic)
        .bind(&partitions)
        .fetch_all(pool)
        .await
        .context("read the stored offsets")?
        .into_iter()
        .collect();
        let mut seeks = Vec::new();
        let mut resets = Vec::new();
        for partition in partitions {
            let offset = match stored.get(&partition) {
                None => Offset::Beginning,
                Some(&stored) => {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, partition, Duration::from_secs(10))
                        .context("read the watermarks")?;
                    if stored <= high {
                        Offset::Offset(stored)
                    } else if accepted.contains(&(partition, stored)) {
                        reset_stored(pool, topic, partition, low).await?;
                        tracing::warn!(
                            topic,
                            partition,
                            stored,
                            low,
                            high,
                            "accepted a recreated topic: reading it from its start"
                        );
                        Offset::Offset(low)
                    } else {
                        resets.push(Reset {
                            partition,
                            stored,
                            low,
                            high,
                        });
                        continue;
                    }
                }
            };
            seeks.push((partition, offset));
        }
        if !resets.is_empty() {
            let topic = topic.to_owned();
            return Err(TopicReset { topic, resets }.into());
        }
        for (partition, offset) in seeks {
            match consumer.seek(topic, partition, offset, Duration::from_secs(5)) {
                Ok(()) => {
                    tracing::info!(partition, ?offset, "resuming at the stored offset");
                    self.waiting.remove(&partition);
                }
                Err(error) => {
                    tracing::debug!(%error, partition, "seek not possible yet, retrying");
                }
            }
        }
        Ok(())
    }
}

async fn reset_stored(pool: &PgPool, topic: &str, partition: i32, to: i64) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE kafka_offsets SET next_offset = $3, updated_at = now()
         WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .bind(to)
    .execute(pool)
    .await
    .context("reset the stored offset")?;
    Ok(())
}
