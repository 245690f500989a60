//! Sums of several ranges merged before they leave: the parser sums every unit of one
//! transaction into one [`Merger`], so a consumer seen in eight units is sent once, not eight
//! times. One [`Aggregator`] per output partition, each behind its own lock (workers of one
//! range add concurrently), the key cap split across them: memory stays bounded whatever the
//! number of distinct consumers, and what does not fit leaves early, as in the engine.

use std::sync::Mutex;

use super::agg::Aggregator;

/// Pairs collected before [`Merger::add`] hands them out (a full table, overflow splits).
const EMIT_AT: usize = 20_000;

/// Periods merged at once per partition; a further one first sends the oldest one's sums.
/// Files of one period usually arrive together, so two are common (around a period's end)
/// and more are a backfill, which merges less but stays bounded.
pub const LANES_MAX: usize = 4;

/// Sums that leave, with their period (start; `None` with periods off).
pub type Leaving = Vec<(Option<i64>, Vec<(i64, i64)>)>;

/// The sums of one period in one partition.
struct Lane {
    period: Option<i64>,
    agg: Aggregator,
    out: Vec<(i64, i64)>,
}

impl Lane {
    /// Moves everything held into `leave`, in batches of about [`EMIT_AT`] sums.
    fn drain_into(&mut self, leave: &mut Leaving) {
        if !self.agg.is_empty() {
            for piece in 0..self.agg.pieces() {
                self.agg.drain_piece(piece, &mut self.out);
                if self.out.len() >= EMIT_AT {
                    leave.push((self.period, std::mem::take(&mut self.out)));
                }
            }
        }
        if !self.out.is_empty() {
            leave.push((self.period, std::mem::take(&mut self.out)));
        }
    }
}

/// Per-partition, per-period merged sums, at most `keys_max` keys in all (plus a small
/// table's worth per extra period): a period's keys count against what the others leave, and
/// when the periods together hold more, the others leave early.
pub struct Merger {
    parts: Vec<Mutex<Vec<Lane>>>,
    keys_each: usize,
}

impl Merger {
    /// A merger for `partitions` output partitions holding at most `keys_max` keys in all.
    pub fn new(partitions: usize, keys_max: usize) -> Self {
        let keys_each = (keys_max / partitions.max(1)).max(1);
        Self {
            parts: (0..partitions.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            keys_each,
        }
    }

    /// Adds `pairs` (all of `partition`) of `period`. Returns the sums that must leave now (a
    /// table that was full, overflow splits, the oldest period when too many are open) once
    /// there are enough of them; usually nothing.
    pub fn add(&self, partition: usize, period: Option<i64>, pairs: &[(i64, i64)]) -> Leaving {
        let mut leave = Vec::new();
        let mut lanes = self.parts[partition]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let at = match lanes.iter().position(|l| l.period == period) {
            Some(at) => at,
            None => {
                if lanes.len() >= LANES_MAX {
                    lanes.remove(0).drain_into(&mut leave);
                }
                lanes.push(Lane {
                    period,
                    agg: Aggregator::new(self.keys_each),
                    out: Vec::new(),
                });
                lanes.len() - 1
            }
        };
        // The other periods' keys count against this one's share.
        let others: usize = match lanes.len() {
            1 => 0,
            _ => lanes
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != at)
                .map(|(_, l)| l.agg.len())
                .sum(),
        };
        let budget = self.keys_each.saturating_sub(others).max(1);
        let lane = &mut lanes[at];
        lane.agg.add_all(pairs, budget, &mut lane.out);
        if lane.out.len() >= EMIT_AT {
            leave.push((period, std::mem::take(&mut lane.out)));
        }
        // One cap for all periods: past it, the other periods leave (the oldest first) and
        // their tables are freed.
        if lanes.len() > 1 {
            let mut at = at;
            let mut held: usize = lanes.iter().map(|l| l.agg.len()).sum();
            while held > self.keys_each && lanes.len() > 1 {
                let victim = usize::from(at == 0);
                let mut gone = lanes.remove(victim);
                held -= gone.agg.len();
                gone.drain_into(&mut leave);
                if victim < at {
                    at -= 1;
                }
            }
        }
        leave
    }

    /// Takes everything held, partition by partition and period by period, in batches of
    /// about 20,000 sums, and hands each to `emit(partition, period, sums)`; stops at the
    /// first error.
    pub fn drain<E>(
        &self,
        mut emit: impl FnMut(usize, Option<i64>, Vec<(i64, i64)>) -> Result<(), E>,
    ) -> Result<(), E> {
        for (partition, part) in self.parts.iter().enumerate() {
            let lanes = std::mem::take(&mut *part.lock().unwrap_or_else(|p| p.into_inner()));
            for mut lane in lanes {
                let mut leave = Vec::new();
                lane.drain_into(&mut leave);
                for (period, sums) in leave {
                    emit(partition, period, sums)?;
                }
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

    fn flat(leave: Leaving) -> Pairs {
        leave.into_iter().flat_map(|(_, s)| s).collect()
    }

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
                sent.extend(flat(merger.add(p as usize, None, &mine)));
            }
        }
        merger
            .drain(|_, _, s| {
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
        let out = merger.add(0, None, &[(7, i64::MAX), (7, i64::MAX), (8, 1), (8, 2)]);
        let mut all = flat(out);
        merger
            .drain(|_, _, s| {
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

    #[test]
    fn periods_merge_apart_within_the_key_cap() {
        // Interleaved periods, more of them than lanes: every (period, id) sum is exact and
        // no sent batch mixes periods.
        let merger = Merger::new(1, 1_000);
        let mut sent: HashMap<(Option<i64>, i64), i128> = HashMap::new();
        let mut added: HashMap<(Option<i64>, i64), i128> = HashMap::new();
        for round in 0..50i64 {
            let period = Some((round % 7) * 3600);
            let pairs: Vec<(i64, i64)> = (0..400).map(|i| ((i * 7 + round) % 900, i)).collect();
            for &(id, sum) in &pairs {
                *added.entry((period, id)).or_default() += i128::from(sum);
            }
            for (p, sums) in merger.add(0, period, &pairs) {
                for (id, sum) in sums {
                    *sent.entry((p, id)).or_default() += i128::from(sum);
                }
            }
        }
        merger
            .drain(|_, p, sums| {
                for (id, sum) in sums {
                    *sent.entry((p, id)).or_default() += i128::from(sum);
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        sent.retain(|_, v| *v != 0);
        added.retain(|_, v| *v != 0);
        assert_eq!(sent, added);

        // Periods that each outgrow their small table while the others are still small, then
        // all grow: never more than the cap held at once (plus a small table per extra lane).
        let merger = Merger::new(1, 200_000);
        let held = || -> usize {
            merger.parts[0]
                .lock()
                .unwrap()
                .iter()
                .map(|l| l.agg.len())
                .sum()
        };
        for (round, count) in [(0i64, 33_000i64), (1, 150_000)] {
            for period in 0..3 {
                let base = round * 1_000_000 + period * 10_000_000;
                let pairs: Vec<(i64, i64)> = (base..base + count).map(|id| (id, 1)).collect();
                let _ = merger.add(0, Some(period), &pairs);
                assert!(held() <= 200_000 + 3 * 32 * 1024, "{} keys held", held());
            }
        }
    }
}
