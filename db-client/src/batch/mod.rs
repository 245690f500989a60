//! One batch of sums records → one PostgreSQL transaction.
//!
//! Lock the batch's partitions (an advisory lock each, taken before the transaction writes
//! anything: see [`crate::changes`] on the log's order) and their rows in `kafka_offsets` (in
//! partition order: instances never wait on each other in a cycle), drop records below the stored offsets (a replay after a
//! crash, a stale instance after a rebalance) and records delivered twice within the batch (a
//! revoke and re-assign inside one collection window replays from Kafka's committed offsets),
//! refuse a gap, pre-aggregate per consumer and per (consumer, period) (one statement may not
//! touch a key twice), upsert both in key order, record the ledger, advance the offsets,
//! commit. The monthly partitions of the periods are created before, in a transaction of their
//! own. A connection lost during COMMIT is
//! harmless: the retry finds the offsets already advanced (or not) and adds accordingly.
//!
//! A gap: the first record of a partition lies past its stored offset, and the records in
//! between are no longer in Kafka (the log start offset is past the stored offset: retention
//! shorter than an outage, a recreated topic). Writing past it would lose their sums silently,
//! so the batch fails with [`Gaps`] and nothing is written, unless the operator accepted that
//! very gap (`--accept-gap PARTITION:OFFSET`). A first record past the stored offset whose
//! predecessors are still in the log is no gap: commit and abort markers and aborted records
//! take offsets too.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::Context;
use rdkafka::message::{Message, OwnedMessage};
use sqlx::PgPool;

use crate::{changes, copy};

mod gaps;
mod ledger;

pub(crate) use gaps::accept_flags;
use gaps::check_gaps;
pub use gaps::{Gap, Gaps};
pub use ledger::record_units;
use tally_model::codec;
use tally_model::messages::{SumsRecord, UnitDone};

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Records applied.
    pub records: usize,
    /// Records skipped: below the stored offsets, or delivered twice in the batch.
    pub skipped: usize,
    /// Distinct consumers upserted.
    pub consumers: usize,
    /// Records that could not be decoded (logged, skipped).
    pub undecodable: usize,
}

/// Bytes of memory a batch takes per pair of its records while it is written, beyond the
/// records themselves: the pairs as read (16 bytes, 24 with a period), summed per key (32
/// and 32), the consumers' rows with their newest period (48, in place of the 32 per key),
/// and the binary COPY rows and change-log events built from them (about 58 and 42; sent in
/// pieces of 1 MiB, so the connection's buffer stays small). Measured: a batch of 9.8M
/// consumers with periods peaked at 1.0–1.4 GiB of resident memory (docs/benchmarks.md).
pub const PAIR_BYTES: u64 = 160;

/// What a record weighs against the batch's share of the memory budget (`--batch-bytes-max`):
/// its payload twice (the batch, and its copy in a writer's share) and the pairs it decodes
/// into, counted from its first bytes before it is decoded.
pub fn weight(payload: &[u8]) -> u64 {
    2 * payload.len() as u64 + codec::pairs_at_most(payload) * PAIR_BYTES
}

/// The most pairs `batch` decodes into, from its records' first bytes.
pub fn pairs_at_most(batch: &[OwnedMessage]) -> u64 {
    batch
        .iter()
        .map(|m| m.payload().map_or(0, codec::pairs_at_most))
        .sum()
}

/// The next offset per partition after `batch`.
pub fn next_offsets(batch: &[OwnedMessage]) -> BTreeMap<i32, i64> {
    let mut next = BTreeMap::new();
    for m in batch {
        let e = next.entry(m.partition()).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next
}

/// What a batch needs to know of Kafka and the operator.
pub struct Checks<'a> {
    /// The log start offset of a partition (asked only when a batch starts past the stored
    /// offset).
    pub log_start: &'a (dyn Fn(i32) -> anyhow::Result<i64> + Sync),
    /// Gaps the operator accepted, as (partition, stored offset).
    pub accepted: &'a HashSet<(i32, i64)>,
    /// Whether what the batch changes goes to the change log ([`crate::changes`]).
    pub log_changes: bool,
}

/// Writes one batch as up to `writers` database transactions that run at once, each for its
/// own share of the batch's partitions (all records of a partition in one transaction; shares
/// balanced by payload bytes). Each
/// transaction commits its partitions' offsets with their sums, so each is exactly once on its
/// own: after a failure, the whole batch is applied again and the shares already committed
/// skip their records (below the stored offsets). A consumer's records are all in one
/// partition, so concurrent shares never touch the same totals row; they meet only on the
/// ledger's unit rows, which each locks in unit-id order.
///
/// Each share runs on a thread of its own (its decode and pre-aggregation are CPU work that
/// would otherwise hold the other shares' statements back), driving its transaction on
/// `handle`'s runtime, within `timeout` (a share past it is rolled back and counts as
/// failed). Blocking: call it from a thread that is no runtime worker.
pub fn apply_parallel(
    handle: &tokio::runtime::Handle,
    timeout: std::time::Duration,
    pool: &PgPool,
    topic: &str,
    batch: &[OwnedMessage],
    checks: &Checks<'_>,
    writers: usize,
) -> anyhow::Result<Applied> {
    let bounded = |share: &[OwnedMessage]| {
        handle.block_on(async {
            tokio::time::timeout(timeout, apply(pool, topic, share, checks))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("batch transaction timed out")))
        })
    };
    let partitions: BTreeSet<i32> = batch.iter().map(|m| m.partition()).collect();
    let writers = writers.clamp(1, partitions.len().max(1));
    if writers == 1 {
        return bounded(batch);
    }
    // Partitions to shares by payload bytes, largest first onto the lightest share: the
    // shares end together instead of waiting for the one with the most consumers.
    let mut bytes: BTreeMap<i32, usize> = BTreeMap::new();
    for m in batch {
        *bytes.entry(m.partition()).or_default() += m.payload().map_or(0, <[u8]>::len);
    }
    let mut order: Vec<(i32, usize)> = bytes.into_iter().collect();
    order.sort_by_key(|&(p, b)| (std::cmp::Reverse(b), p));
    let mut load = vec![0usize; writers];
    let share_of: HashMap<i32, usize> = order
        .into_iter()
        .map(|(p, b)| {
            let share = (0..writers).min_by_key(|&s| (load[s], s)).unwrap_or(0);
            load[share] += b;
            (p, share)
        })
        .collect();
    let mut shares: Vec<Vec<OwnedMessage>> = vec![Vec::new(); writers];
    for m in batch {
        shares[share_of[&m.partition()]].push(m.clone());
    }
    let results: Vec<anyhow::Result<Applied>> = std::thread::scope(|scope| {
        let running: Vec<_> = shares
            .iter()
            .map(|share| scope.spawn(|| bounded(share)))
            .collect();
        running
            .into_iter()
            .map(|writer| {
                writer
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a database writer panicked")))
            })
            .collect()
    });
    // A gap anywhere stops the stage, whatever else failed.
    if let Some(gaps) = results
        .iter()
        .find_map(|r| r.as_ref().err().and_then(|e| e.downcast_ref::<Gaps>()))
    {
        return Err(gaps.clone().into());
    }
    let mut total = Applied::default();
    for result in results {
        let a = result?;
        total.records += a.records;
        total.skipped += a.skipped;
        total.consumers += a.consumers;
        total.undecodable += a.undecodable;
    }
    Ok(total)
}

/// Writes one batch in one database transaction; see the module docs for the steps.
pub async fn apply(
    pool: &PgPool,
    topic: &str,
    batch: &[OwnedMessage],
    checks: &Checks<'_>,
) -> anyhow::Result<Applied> {
    let started = std::time::Instant::now();
    let next = next_offsets(batch);
    let partitions: Vec<i32> = next.keys().copied().collect();
    // The period partitions first, in a transaction of their own.
    let starts: BTreeSet<i64> = batch
        .iter()
        .filter_map(|m| m.payload().and_then(codec::period_of))
        .collect();
    copy::ensure_partitions(pool, &starts.into_iter().collect::<Vec<_>>()).await?;
    let mut tx = pool.begin().await.context("begin")?;
    if checks.log_changes {
        changes::writing(&mut tx).await?;
    }
    // The partitions first, before anything that writes: a transaction takes its id at its
    // first write, so one that waited here for another writer of the same partitions (and so
    // of the same consumers) takes a later id than that one, and the change log's order (by
    // transaction id) is the order in which the two changed the totals.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || p, 0))
         FROM UNNEST($2::int[]) WITH ORDINALITY AS u(p, n) ORDER BY n",
    )
    .bind(topic)
    .bind(&partitions)
    .execute(&mut *tx)
    .await
    .context("lock partitions")?;
    // Rows created now have no history: nothing can be missing before them.
    let created: BTreeSet<i32> = sqlx::query_scalar(
        "INSERT INTO kafka_offsets (topic, partition, next_offset)
         SELECT $1, p, 0 FROM UNNEST($2::int[]) AS p ON CONFLICT DO NOTHING RETURNING partition",
    )
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut *tx)
    .await
    .context("create offset rows")?
    .into_iter()
    .collect();
    // Locked in partition order: two instances never wait on each other in a cycle.
    let stored: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
        "SELECT partition, next_offset FROM kafka_offsets
         WHERE topic = $1 AND partition = ANY($2) ORDER BY partition FOR UPDATE",
    )
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut *tx)
    .await
    .context("lock offsets")?
    .into_iter()
    .collect();

    let locked = started.elapsed();
    check_gaps(topic, batch, &stored, &created, checks)?;
    let checked = started.elapsed();

    let mut applied = Applied::default();
    // Every pair as it comes, summed per key below (a sort and one pass: several times
    // faster than a tree insert per pair, and the batch waits for it before it writes).
    // Sized once from the records' first bytes: no doubling past what the budget counted.
    let (mut pairs, mut period_pairs) = (0, 0);
    for payload in batch.iter().filter_map(Message::payload) {
        let n = codec::pairs_at_most(payload) as usize;
        pairs += n;
        if codec::period_of(payload).is_some() {
            period_pairs += n;
        }
    }
    let mut sums: Vec<(i64, i64)> = Vec::with_capacity(pairs);
    let mut period_sums: Vec<((i64, i64), i64)> = Vec::with_capacity(period_pairs);
    // Unit end markers in this batch: unit id → (counts, partitions total, markers seen).
    let mut units: BTreeMap<String, (UnitDone, i32, i32)> = BTreeMap::new();
    // The next offset each partition may apply: from the stored one, rising through the batch,
    // so a record delivered twice (a replay within one collection window) counts once.
    let mut expected = stored.clone();
    for m in batch {
        let next = expected.entry(m.partition()).or_insert(0);
        if m.offset() < *next {
            applied.skipped += 1;
            continue;
        }
        *next = m.offset() + 1;
        match m.payload().map(codec::decode) {
            Some(Ok(SumsRecord::Sums {
                period,
                sums: pairs,
            })) => {
                if let Some(start) = period {
                    period_sums.extend(pairs.iter().map(|&(id, sum)| ((id, start), sum)));
                }
                sums.extend(pairs);
            }
            Some(Ok(SumsRecord::UnitEnd { unit, partitions })) => {
                units
                    .entry(unit.unit_id.clone())
                    .or_insert((unit, partitions, 0))
                    .2 += 1;
            }
            _ => {
                applied.undecodable += 1;
                tracing::error!(
                    topic,
                    partition = m.partition(),
                    offset = m.offset(),
                    "undecodable sums record skipped"
                );
            }
        }
        applied.records += 1;
    }
    // Sorted keys, each once: rows are written in key order, and the staged id range is the
    // first key to the last.
    let sums = sum_by_key(sums);
    let period_sums = sum_by_key(period_sums);
    applied.consumers = sums.len();
    let decoded = started.elapsed();

    copy::upsert_sums(&mut tx, sums, &period_sums, checks.log_changes).await?;
    let upserted = started.elapsed();
    if !units.is_empty() {
        record_units(&mut tx, &units).await?;
    }
    let (parts, offsets): (Vec<i32>, Vec<i64>) = next.into_iter().unzip();
    sqlx::query(
        "UPDATE kafka_offsets o SET next_offset = GREATEST(o.next_offset, u.next), updated_at = now()
         FROM UNNEST($2::int[], $3::bigint[]) AS u(partition, next)
         WHERE o.topic = $1 AND o.partition = u.partition",
    )
    .bind(topic)
    .bind(&parts)
    .bind(&offsets)
    .execute(&mut *tx)
    .await
    .context("advance offsets")?;
    tx.commit().await.context("commit")?;
    tracing::debug!(
        ?partitions,
        consumers = applied.consumers,
        locked_ms = locked.as_millis() as u64,
        checked_ms = checked.as_millis() as u64,
        decoded_ms = decoded.as_millis() as u64,
        upserted_ms = upserted.as_millis() as u64,
        committed_ms = started.elapsed().as_millis() as u64,
        "batch transaction"
    );
    Ok(applied)
}

/// `pairs` summed per key, in key order, each key once (sums in `i128`: no overflow).
fn sum_by_key<K: Ord + Copy>(mut pairs: Vec<(K, i64)>) -> Vec<(K, i128)> {
    pairs.sort_unstable_by_key(|&(key, _)| key);
    let mut out: Vec<(K, i128)> = Vec::with_capacity(pairs.len());
    for (key, sum) in pairs {
        match out.last_mut() {
            Some((last, total)) if *last == key => *total += i128::from(sum),
            _ => out.push((key, i128::from(sum))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{sum_by_key, weight, PAIR_BYTES};
    use tally_model::codec;

    #[test]
    fn a_record_weighs_its_payload_twice_and_its_pairs_decoded() {
        let pairs: Vec<(i64, i64)> = (0..20_000).map(|id| (id * 7, id)).collect();
        let record = codec::encode_sums(Some(3600), &pairs);
        assert_eq!(
            weight(&record),
            2 * record.len() as u64 + 20_000 * PAIR_BYTES
        );
        assert_eq!(weight(&[]), 0);
    }

    #[test]
    fn pairs_are_summed_per_key_in_key_order() {
        let pairs = vec![(3, 1), (1, i64::MAX), (3, -4), (2, 0), (1, i64::MAX)];
        assert_eq!(
            sum_by_key(pairs),
            vec![(1, 2 * i128::from(i64::MAX)), (2, 0), (3, -3)]
        );
        assert!(sum_by_key::<i64>(Vec::new()).is_empty());
        let periods = vec![((5, 60), 1), ((5, 0), 2), ((4, 60), 3), ((5, 60), 4)];
        assert_eq!(
            sum_by_key(periods),
            vec![((4, 60), 3), ((5, 0), 2), ((5, 60), 5)]
        );
    }
}
