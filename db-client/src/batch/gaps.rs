//! Gaps: a partition's first new record lies past its stored offset, and the records in
//! between are gone from the log. The batch fails with [`Gaps`] (nothing written) unless the
//! operator accepted that very gap; the error names the `--accept-gap` flags.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Context;

use rdkafka::message::{Message, OwnedMessage};

use super::Checks;

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

/// Fails with [`Gaps`] when a partition's first new record lies past its stored offset and
/// the records in between are gone from the log (and the operator did not accept that gap).
pub(super) fn check_gaps(
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
