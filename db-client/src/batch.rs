//! One batch of sums records → one PostgreSQL transaction.
//!
//! Lock the batch's partitions' rows in `kafka_offsets` (in partition order: instances never
//! wait on each other in a cycle), drop records below the stored offsets (a replay after a
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

use crate::copy;
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

/// The next offset per partition after `batch`.
pub fn next_offsets(batch: &[OwnedMessage]) -> BTreeMap<i32, i64> {
    let mut next = BTreeMap::new();
    for m in batch {
        let e = next.entry(m.partition()).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next
}

/// A gap: the stored offset of `partition` is `stored`, but the first record there is
/// `first` and the log starts at `log_start` (> `stored`): records in between are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The partition.
    pub partition: i32,
    /// Its next offset in `kafka_offsets` (what the totals include up to).
    pub stored: i64,
    /// The first record the batch has there.
    pub first: i64,
    /// The partition's log start offset.
    pub log_start: i64,
}

/// Gaps found in a batch; nothing of the batch was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_gaps(topic, gaps))]
pub struct Gaps {
    /// The topic.
    pub topic: String,
    /// The gaps, by partition.
    pub gaps: Vec<Gap>,
}

fn describe_gaps(topic: &str, gaps: &[Gap]) -> String {
    let each: Vec<String> = gaps
        .iter()
        .map(|g| {
            format!(
                "partition {}: totals include offsets below {}, the log now starts at {} \
                 (first record read: {}); records {}..{} are gone",
                g.partition, g.stored, g.log_start, g.first, g.stored, g.log_start
            )
        })
        .collect();
    format!(
        "records of {topic} were deleted before they were applied (retention shorter than an \
         outage, or a recreated topic); their sums are NOT in the totals. {}. Applying stops here; \
         to accept the loss and go on, restart the db-client once with {}",
        each.join("; "),
        accept_flags(gaps.iter().map(|g| (g.partition, g.stored)))
    )
}

/// The `--accept-gap PARTITION:OFFSET` flags that let an operator past these stops.
pub(crate) fn accept_flags(stops: impl Iterator<Item = (i32, i64)>) -> String {
    let flags: Vec<String> = stops
        .map(|(partition, stored)| format!("--accept-gap {partition}:{stored}"))
        .collect();
    flags.join(" ")
}

/// What a batch needs to know of Kafka and the operator.
pub struct Checks<'a> {
    /// The log start offset of a partition (asked only when a batch starts past the stored
    /// offset).
    pub log_start: &'a (dyn Fn(i32) -> anyhow::Result<i64> + Sync),
    /// Gaps the operator accepted, as (partition, stored offset).
    pub accepted: &'a HashSet<(i32, i64)>,
}

/// Writes one batch as up to `writers` database transactions that run at once, each for its
/// own share of the batch's partitions (all records of a partition in one transaction). Each
/// transaction commits its partitions' offsets with their sums, so each is exactly once on its
/// own: after a failure, the whole batch is applied again and the shares already committed
/// skip their records (below the stored offsets). A consumer's records are all in one
/// partition, so concurrent shares never touch the same totals row; they meet only on the
/// ledger's unit rows, which each locks in unit-id order.
pub async fn apply_parallel(
    pool: &PgPool,
    topic: &str,
    batch: &[OwnedMessage],
    checks: &Checks<'_>,
    writers: usize,
) -> anyhow::Result<Applied> {
    let partitions: BTreeSet<i32> = batch.iter().map(|m| m.partition()).collect();
    let writers = writers.clamp(1, partitions.len().max(1));
    if writers == 1 {
        return apply(pool, topic, batch, checks).await;
    }
    let share_of: HashMap<i32, usize> = partitions
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, i % writers))
        .collect();
    let mut shares: Vec<Vec<OwnedMessage>> = vec![Vec::new(); writers];
    for m in batch {
        shares[share_of[&m.partition()]].push(m.clone());
    }
    let results = futures_util::future::join_all(
        shares.iter().map(|share| apply(pool, topic, share, checks)),
    )
    .await;
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
    let mut sums: BTreeMap<i64, i128> = BTreeMap::new();
    let mut period_sums: BTreeMap<(i64, i64), i128> = BTreeMap::new();
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
                for &(id, sum) in &pairs {
                    *sums.entry(id).or_default() += i128::from(sum);
                }
                if let Some(start) = period {
                    for (id, sum) in pairs {
                        *period_sums.entry((id, start)).or_default() += i128::from(sum);
                    }
                }
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
    applied.consumers = sums.len();
    let decoded = started.elapsed();

    if !sums.is_empty() {
        // Sorted keys (BTreeMap): concurrent instances lock rows in the same order.
        let rows: Vec<(i64, i128)> = sums.into_iter().collect();
        copy::upsert_totals(&mut tx, &rows).await?;
    }
    if !period_sums.is_empty() {
        let rows: Vec<((i64, i64), i128)> = period_sums.into_iter().collect();
        copy::upsert_period_totals(&mut tx, &rows).await?;
    }
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

/// Fails with [`Gaps`] when a partition's first new record lies past its stored offset and
/// the records in between are gone from the log (and the operator did not accept that gap).
fn check_gaps(
    topic: &str,
    batch: &[OwnedMessage],
    stored: &HashMap<i32, i64>,
    created: &BTreeSet<i32>,
    checks: &Checks<'_>,
) -> anyhow::Result<()> {
    let mut first: BTreeMap<i32, i64> = BTreeMap::new();
    for m in batch {
        let at = stored.get(&m.partition()).copied().unwrap_or(0);
        if m.offset() >= at {
            let f = first.entry(m.partition()).or_insert(m.offset());
            *f = (*f).min(m.offset());
        }
    }
    let mut gaps = Vec::new();
    for (partition, first) in first {
        let stored = stored.get(&partition).copied().unwrap_or(0);
        if first <= stored || created.contains(&partition) {
            continue;
        }
        let log_start = (checks.log_start)(partition)
            .with_context(|| format!("cannot read the log start of partition {partition}"))?;
        if log_start <= stored {
            continue; // markers or aborted records in between, all still in the log
        }
        if checks.accepted.contains(&(partition, stored)) {
            tracing::warn!(
                topic,
                partition,
                stored,
                log_start,
                "accepted gap: records {stored}..{log_start} are gone and not in the totals"
            );
            continue;
        }
        gaps.push(Gap {
            partition,
            stored,
            first,
            log_start,
        });
    }
    if gaps.is_empty() {
        Ok(())
    } else {
        Err(Gaps {
            topic: topic.to_owned(),
            gaps,
        }
        .into())
    }
}

/// The ingested-files ledger: counts each unit's end markers (in unit-id order: rows are
/// locked in the same order by every instance); a unit whose last marker lands here is
/// rolled up into its file.
pub async fn record_units(
    tx: &mut sqlx::PgConnection,
    units: &BTreeMap<String, (UnitDone, i32, i32)>,
) -> anyhow::Result<()> {
    let unit_ids: Vec<&str> = units.keys().map(String::as_str).collect();
    let file_ids: Vec<&str> = units.values().map(|u| u.0.file_id.as_str()).collect();
    let paths: Vec<&str> = units.values().map(|u| u.0.path.as_str()).collect();
    let sizes: Vec<i64> = units.values().map(|u| u.0.file_bytes as i64).collect();
    let completes: Vec<bool> = units.values().map(|u| u.0.completes_file).collect();
    let partitions: Vec<i32> = units.values().map(|u| u.1).collect();
    let seen: Vec<i32> = units.values().map(|u| u.2).collect();
    let lines: Vec<i64> = units.values().map(|u| u.0.lines as i64).collect();
    let bad: Vec<i64> = units.values().map(|u| u.0.bad_lines as i64).collect();
    let bytes: Vec<i64> = units.values().map(|u| u.0.bytes as i64).collect();
    sqlx::query(
        "WITH u AS (
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::int[],
                                $7::bigint[], $8::bigint[], $9::bigint[], $10::bool[])
             AS u(unit_id, file_id, path, file_bytes, partitions, seen, lines, bad_lines, bytes, completes)
         ), counted AS (
           INSERT INTO ingested_units
             (unit_id, file_id, partitions_total, partitions_seen, lines, bad_lines, bytes)
           SELECT unit_id, file_id, partitions, seen, lines, bad_lines, bytes FROM u ORDER BY unit_id
           ON CONFLICT (unit_id) DO UPDATE
             SET partitions_seen = ingested_units.partitions_seen + EXCLUDED.partitions_seen,
                 ingested_at = now()
           RETURNING unit_id, partitions_seen >= partitions_total AS complete
         )
         INSERT INTO ingested_files
           (file_id, path, file_bytes, units_ingested, lines, bad_lines, bytes, complete)
         SELECT u.file_id, max(u.path), max(u.file_bytes), count(*), sum(u.lines), sum(u.bad_lines),
                sum(u.bytes), bool_or(u.completes)
         FROM u JOIN counted USING (unit_id) WHERE counted.complete GROUP BY u.file_id
         ON CONFLICT (file_id) DO UPDATE SET
           units_ingested = ingested_files.units_ingested + EXCLUDED.units_ingested,
           complete = ingested_files.complete OR EXCLUDED.complete,
           lines = ingested_files.lines + EXCLUDED.lines,
           bad_lines = ingested_files.bad_lines + EXCLUDED.bad_lines,
           bytes = ingested_files.bytes + EXCLUDED.bytes,
           last_ingested_at = now()",
    )
    .bind(&unit_ids)
    .bind(&file_ids)
    .bind(&paths)
    .bind(&sizes)
    .bind(&partitions)
    .bind(&seen)
    .bind(&lines)
    .bind(&bad)
    .bind(&bytes)
    .bind(&completes)
    .execute(&mut *tx)
    .await
    .context("record ingested units")?;
    Ok(())
}
