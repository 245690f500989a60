//! Sums of several ranges merged before they leave: the parser sums every unit of one
//! transaction into one [`Merger`], so a consumer seen in eight units is sent once, not eight
//! times. One [`Aggregator`] per output partition, each behind its own lock (workers of one
//! range add concurrently), the key cap split across them: memory stays bounded whatever the
//! number of distinct consumers, and what does not fit leaves early, as in the engine.

use std::sync::Mutex;

use super::agg::Aggregator;

/// Pairs collected before [`Merger::add`] hands them out (a full table, overflow splits).
const EMIT_AT: usize = 20_000;

struct Part {
    agg: Aggregator,
    out: Vec<(i64, i64)>,
}

/// Per-partition merged sums, at most `keys_max` keys in all.
pub struct Merger {
    parts: Vec<Mutex<Part>>,
    keys_each: usize,
}

impl Merger {
    /// A merger for `partitions` output partitions holding at most `keys_max` keys in all.
    pub fn new(partitions: usize, keys_max: usize) -> Self {
        let keys_each = (keys_max / partitions.max(1)).max(1);
        Self {
            parts: (0..partitions.max(1))
                .map(|_| {
                    Mutex::new(Part {
                        agg: Aggregator::new(keys_each),
                        out: Vec::new(),
                    })
                })
                .collect(),
            keys_each,
        }
    }

    /// Adds `pairs` (all of `partition`). Returns the sums that must leave now (a table that
    /// was full, overflow splits) once there are enough of them; usually nothing.
    pub fn add(&self, partition: usize, pairs: &[(i64, i64)]) -> Vec<(i64, i64)> {
        let mut part = self.parts[partition]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Part { agg, out } = &mut *part;
        for &(id, sum) in pairs {
            agg.add(id, sum, self.keys_each, out);
        }
        if out.len() >= EMIT_AT {
            std::mem::take(out)
        } else {
            Vec::new()
        }
    }

    /// Takes everything held, partition by partition, in batches of about 20,000 sums, and
    /// hands each to `emit(partition, sums)`; stops at the first error.
    pub fn drain<E>(
        &self,
        mut emit: impl FnMut(usize, Vec<(i64, i64)>) -> Result<(), E>,
    ) -> Result<(), E> {
        for (partition, part) in self.parts.iter().enumerate() {
            let mut part = part.lock().unwrap_or_else(|p| p.into_inner());
            let Part { agg, out } = &mut *part;
            if !agg.is_empty() {
                for piece in 0..agg.pieces() {
                    agg.drain_piece(piece, out);
                    if out.len() >= EMIT_AT {
                        emit(partition, std::mem::take(out))?;
                    }
                }
            }
            if !out.is_empty() {
                emit(partition, std::mem::take(out))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn totals(pairs: impl IntoIterator<Item = (i64, i64)>) -> HashMap<i64, i128> {
        let mut t = HashMap::new();
        for (id, sum) in pairs {
            *t.entry(id).or_default() += i128::from(sum);
        }
        t
    }

    type Pairs = Vec<(i64, i64)>;

    /// Feeds `distinct` ids, each seen 40 times, in batches; returns (sent, added).
    fn run(keys_max: usize, distinct: i64) -> (Pairs, Pairs) {
        let merger = Merger::new(2, keys_max);
        let (mut sent, mut added) = (Vec::new(), Vec::new());
        let pairs: Vec<(i64, i64)> = (0..distinct * 40).map(|i| (i % distinct, i)).collect();
        for batch in pairs.chunks(3_000) {
            for p in 0..2 {
                let mine: Vec<_> = batch
                    .iter()
                    .copied()
                    .filter(|(id, _)| id % 2 == p)
                    .collect();
                added.extend(&mine);
                sent.extend(merger.add(p as usize, &mine));
            }
        }
        merger
            .drain(|_, s| {
                sent.extend(s);
                Ok::<(), ()>(())
            })
            .unwrap();
        (sent, added)
    }

    #[test]
    fn merges_across_batches_within_the_key_cap() {
        // Fits: each id leaves once.
        let (sent, added) = run(1_000, 500);
        assert_eq!(totals(sent.clone()), totals(added));
        assert_eq!(sent.len(), 500);
        // Does not fit: sums leave early, none is lost, nothing is held past the cap.
        let (sent, added) = run(100, 5_000);
        assert_eq!(totals(sent), totals(added));

        // Small key sets merge completely; sums that would leave i64 are split, not lost.
        let merger = Merger::new(1, 100);
        let out = merger.add(0, &[(7, i64::MAX), (7, i64::MAX), (8, 1), (8, 2)]);
        let mut all = out;
        merger
            .drain(|_, s| {
                all.extend(s);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(
            totals(all.clone()),
            totals([(7, i64::MAX), (7, i64::MAX), (8, 3)])
        );
        assert_eq!(all.iter().filter(|(id, _)| *id == 8).count(), 1);
    }
}
