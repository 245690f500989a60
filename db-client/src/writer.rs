//! The db-client's commit on the shared consume loop ([`tally_core::consume`]): a batch is
//! written as PostgreSQL transactions that carry its consumed offsets ([`crate::batch`]), so
//! the database is the checkpoint.
//!
//! - An assigned partition resumes at the offset stored with the totals ([`crate::resume`]),
//!   never where Kafka's committed offsets point.
//! - A database outage is retried with the batch in hand, never skipped and never re-read; the
//!   watchdog is told the stage waits on PostgreSQL (no restart would help).
//! - A gap, or a recreated input topic, stops the stage: an operator must decide.
//! - The applied offsets are also committed to Kafka every `--kafka-commit-interval-ms`, for
//!   lag tools only: Kafka's committed offsets always trail the database's.
//!
//! The loop runs on a thread of its own; the database calls run on the process's tokio runtime
//! (`handle`), a batch's writer shares at once.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::message::{Message, OwnedMessage};
use sqlx::PgPool;
use tally_core::consume::{Commit, Failure, Group, Loaded, PartitionState, Recovery, Stop};
use tally_core::kafka::BrokerProbe;
use tally_core::liveness::{Liveness, Waiting};

use crate::batch::{self, Applied, Checks, Gaps};
use crate::resume::{self, TopicReset};

/// Longest a batch transaction may take before it counts as failed (and is rolled back), for
/// a batch of at most `pairs` consumers: 120 s, plus 25 µs a pair (this project's 2-core
/// machine writes a pair in 8 to 16 µs; docs/benchmarks.md), so the largest batch the memory
/// budget allows is not cut on a slow day and written again for ever, while a small batch on a
/// hung connection is given up after two minutes.
pub fn batch_timeout(pairs: u64) -> Duration {
    let pairs = u32::try_from(pairs).unwrap_or(u32::MAX);
    Duration::from_secs(120) + Duration::from_micros(25).saturating_mul(pairs)
}

/// The db-client's commit: its database, input topic, operator decisions and counts.
pub struct Writer {
    /// The runtime the database calls run on.
    pub handle: tokio::runtime::Handle,
    /// The database.
    pub pool: PgPool,
    /// The input topic.
    pub topic: String,
    /// Log starts and watermarks, from a client of their own (the group consumer answers
    /// such calls only between its fetches).
    pub probe: BrokerProbe,
    /// Gaps (and recreated topics) the operator accepted, as (partition, stored offset).
    pub accepted: HashSet<(i32, i64)>,
    /// Database transactions per batch.
    pub writers: usize,
    /// Whether batches write the change log.
    pub log_changes: bool,
    /// How often applied offsets go to Kafka too.
    pub commit_every: Duration,
    /// The watchdog.
    pub liveness: Liveness,
    /// What was applied since start.
    pub totals: Applied,
    /// Applied but not yet committed to Kafka: partition → next offset.
    uncommitted: BTreeMap<i32, i64>,
    last_commit: Instant,
    /// Held while PostgreSQL does not answer.
    database_down: Option<Waiting>,
}

impl Writer {
    /// A writer of `topic` into `pool`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handle: tokio::runtime::Handle,
        pool: PgPool,
        topic: String,
        probe: BrokerProbe,
        accepted: HashSet<(i32, i64)>,
        writers: usize,
        log_changes: bool,
        commit_every: Duration,
        liveness: Liveness,
    ) -> Self {
        Self {
            handle,
            pool,
            topic,
            probe,
            accepted,
            writers,
            log_changes,
            commit_every,
            liveness,
            totals: Applied::default(),
            uncommitted: BTreeMap::new(),
            last_commit: Instant::now(),
            database_down: None,
        }
    }

    /// Commits the applied offsets to Kafka (for lag tools).
    pub fn commit_to_kafka(&mut self, group: &Group) {
        if !self.uncommitted.is_empty() {
            group.commit_async(&std::mem::take(&mut self.uncommitted));
        }
        self.last_commit = Instant::now();
    }

    fn waiting_on_database(&mut self) {
        if self.database_down.is_none() {
            self.database_down = Some(self.liveness.waiting_on("PostgreSQL"));
        }
    }
}

impl PartitionState for Writer {
    /// Moves the partition to the offset stored with the totals.
    fn load(
        &mut self,
        partition: i32,
        _keep_alive: &mut dyn FnMut() -> bool,
    ) -> anyhow::Result<Loaded> {
        let resumed = self.handle.block_on(resume::resume_at(
            &self.pool,
            &self.probe,
            &self.topic,
            partition,
            &self.accepted,
        ));
        match resumed {
            Ok(offset) => {
                self.database_down = None;
                tracing::info!(partition, ?offset, "resuming at the stored offset");
                Ok(Loaded::ReadyAt(offset))
            }
            Err(error) if error.is::<TopicReset>() => {
                tracing::error!(error = %error, "recreated input topic: stopping");
                Err(Stop(error).into())
            }
            Err(error) => {
                self.waiting_on_database();
                Err(error.context("cannot resume the partition yet"))
            }
        }
    }

    /// Revoked partitions are not this member's any more: their applied offsets are not
    /// committed to Kafka by it (the next owner commits its own), and a wait on PostgreSQL
    /// begun for their load ends with them (a later failure starts it again).
    fn revoked(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.uncommitted.remove(partition);
        }
        self.database_down = None;
    }

    /// A record weighs what it takes in memory while its batch is written.
    fn weight(&self, message: &OwnedMessage) -> u64 {
        message.payload().map_or(0, batch::weight)
    }
}

impl Commit<Group> for Writer {
    /// What the batch applied, and its next offsets.
    type Output = (Applied, BTreeMap<i32, i64>);

    fn what(&self) -> &'static str {
        "a database transaction"
    }

    /// The batch's timeout and half a minute (the shares' connections, the Kafka commit).
    fn allowance(&self, batch: &[OwnedMessage]) -> Duration {
        batch_timeout(batch::pairs_at_most(batch)) + Duration::from_secs(30)
    }

    fn write(&mut self, _group: &Group, batch: &[OwnedMessage]) -> Result<Self::Output, Failure> {
        let probe = &self.probe;
        let topic = &self.topic;
        let log_start =
            |partition: i32| -> anyhow::Result<i64> { Ok(probe.watermarks(topic, partition)?.0) };
        let checks = Checks {
            log_start: &log_start,
            accepted: &self.accepted,
            log_changes: self.log_changes,
        };
        // Bounded: a connection that hangs (a half-open socket after a server crash) counts
        // as a failure; dropping the transaction rolls it back.
        let attempt = batch::apply_parallel(
            &self.handle,
            batch_timeout(batch::pairs_at_most(batch)),
            &self.pool,
            topic,
            batch,
            &checks,
            self.writers,
        );
        match attempt {
            Ok(applied) => Ok((applied, batch::next_offsets(batch))),
            Err(error) if error.is::<Gaps>() => {
                tracing::error!(error = %error, "gap in the input: stopping");
                Err(Failure::Stop(error))
            }
            Err(error) => Err(Failure::Other(error)),
        }
    }

    fn committed(&mut self, group: &Group, (applied, next): Self::Output) {
        self.database_down = None;
        metrics::counter!(tally_core::metrics::DB_CLIENT_RECORDS).increment(applied.records as u64);
        metrics::counter!(tally_core::metrics::DB_CLIENT_ROWS_UPSERTED)
            .increment(applied.consumers as u64);
        self.totals.records += applied.records;
        self.totals.skipped += applied.skipped;
        tracing::debug!(?applied, "batch committed");
        self.uncommitted.extend(next);
        if self.last_commit.elapsed() >= self.commit_every {
            self.commit_to_kafka(group);
        }
    }

    /// A batch that did not land is written again: PostgreSQL is what holds the stage up.
    fn recover(&mut self, failure: Failure) -> anyhow::Result<Recovery> {
        let error = match failure {
            Failure::Other(error) | Failure::Stop(error) => format!("{error:#}"),
            Failure::Kafka(error) => error.to_string(),
            Failure::Abort(reason) => reason,
            Failure::NotInGroup => "not in the group".to_owned(),
            Failure::Stuck(reason) => reason,
        };
        self.waiting_on_database();
        tracing::warn!(error, "batch not written, retrying");
        Ok(Recovery::Retry)
    }

    fn between(&mut self, group: &Group) {
        if self.last_commit.elapsed() >= self.commit_every {
            self.commit_to_kafka(group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::batch_timeout;
    use std::time::Duration;

    #[test]
    fn a_larger_batch_gets_longer() {
        assert_eq!(batch_timeout(0), Duration::from_secs(120));
        assert_eq!(batch_timeout(4_000_000), Duration::from_secs(220));
        assert!(batch_timeout(u64::MAX) > batch_timeout(13_000_000));
    }
}
