//! Where a db-client resumes a partition it was just assigned: at the offset stored in
//! PostgreSQL with the totals (the checkpoint), or at the log's start when the database holds
//! nothing of that partition. Kafka's committed offsets only trail the database for lag tools:
//! after an operator reset the group's offsets, or the database was restored from a backup or
//! replaced, they point anywhere, and starting there would skip records (or rely on the batch
//! check alone to skip what was applied).
//!
//! The consume loop moves the partition there before any of its records is written, and drops
//! what it polled of it before ([`tally_core::consume::Loaded::ReadyAt`]). A stored offset past
//! the end of the log means the topic was
//! recreated or truncated: the records it counts are not these. The stage stops with an error,
//! like at a gap, until an operator accepts it (`--accept-gap PARTITION:OFFSET`), which moves
//! the stored offset to the new log's start.

use std::collections::HashSet;

use anyhow::Context;
use rdkafka::Offset;
use sqlx::PgPool;
use tally_core::kafka::BrokerProbe;

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

/// Where `partition` of `topic` resumes: its stored offset (the log's start without one). A
/// stored offset past the log's end fails with [`TopicReset`], unless `accepted`: then the
/// stored offset moves to the new log's start, and reading starts there.
pub async fn resume_at(
    pool: &PgPool,
    probe: &BrokerProbe,
    topic: &str,
    partition: i32,
    accepted: &HashSet<(i32, i64)>,
) -> anyhow::Result<Offset> {
    let stored: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM kafka_offsets WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await
    .context("read the stored offsets")?;
    let Some(stored) = stored else {
        return Ok(Offset::Beginning);
    };
    let (low, high) = probe
        .watermarks(topic, partition)
        .context("read the watermarks")?;
    if stored <= high {
        return Ok(Offset::Offset(stored));
    }
    if accepted.contains(&(partition, stored)) {
        reset_stored(pool, topic, partition, low).await?;
        tracing::warn!(
            topic,
            partition,
            stored,
            low,
            high,
            "accepted a recreated topic: reading it from its start"
        );
        return Ok(Offset::Offset(low));
    }
    // Name every partition the operator must accept, not only this one: one restart then
    // takes them all.
    let mut resets = vec![Reset {
        partition,
        stored,
        low,
        high,
    }];
    let others: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM kafka_offsets WHERE topic = $1 AND partition <> $2
         ORDER BY partition",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await
    .context("read the stored offsets")?;
    for (other, stored) in others {
        if accepted.contains(&(other, stored)) {
            continue;
        }
        if let Ok((low, high)) = probe.watermarks(topic, other) {
            if stored > high {
                resets.push(Reset {
                    partition: other,
                    stored,
                    low,
                    high,
                });
            }
        }
    }
    Err(TopicReset {
        topic: topic.to_owned(),
        resets,
    }
    .into())
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
