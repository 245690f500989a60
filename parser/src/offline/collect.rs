//! The totals of `tally sum`: every file's sums gathered in a sharded map, bad lines reported
//! on stderr.

use std::collections::HashMap;
use std::sync::Mutex;

use rayon::slice::ParallelSliceMut;
use tally_engine::{BadLine, Reason, Sink, Stopped};
use tally_model::sums::agg;

/// Bad lines printed in detail on stderr; the rest are counted.
const BAD_LINES_SHOWN: u64 = 100;

/// Collects the sums of all files, and reports bad lines on stderr.
///
/// The result holds one entry per distinct consumer (it is the output). With millions of
/// consumers one map behind one lock would make every added pair a cache miss under
/// contention, so it is sharded by the engine's own partition function
/// ([`agg::partition_of`]): a worker drains its sums partition by partition, so a batch is a
/// few long runs of one shard each, and each run is applied in one burst, under its shard's
/// lock, to a table that stays in cache for the run.
pub(super) struct Collect {
    shards: Vec<Mutex<HashMap<i64, i128, BuildIdHasher>>>,
    pub(super) bad: Mutex<BadCounts>,
}

const SHARDS: usize = agg::PARTITIONS;

impl Collect {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            bad: Mutex::new(BadCounts::default()),
        }
    }

    /// Every total, sorted by consumer id on `pool`'s threads.
    pub(super) fn into_sorted(self, pool: &rayon::ThreadPool) -> Vec<(i64, i128)> {
        let shards: Vec<_> = self
            .shards
            .into_iter()
            .map(|shard| shard.into_inner().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let mut all = Vec::with_capacity(shards.iter().map(HashMap::len).sum());
        for shard in shards {
            all.extend(shard);
        }
        pool.install(|| all.par_sort_unstable_by_key(|&(id, _)| id));
        all
    }
}

fn shard_of(id: i64) -> usize {
    agg::partition_of(id)
}

/// A multiplicative hash for integer keys: SipHash's DoS resistance buys nothing for data
/// files and costs several times the map update.
#[derive(Default, Clone, Copy)]
struct BuildIdHasher;

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        }
    }
    fn write_i64(&mut self, i: i64) {
        // Mix, then fold the high bits down: hashbrown takes its bucket from the low bits and
        // its tag from the top 7. The multiplier differs from the shard's (whose top bits are
        // the same for every id of a shard), so both vary within a shard.
        let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

#[derive(Default)]
pub(super) struct BadCounts {
    /// Name of the input being read, for reports.
    pub(super) input: String,
    shown: u64,
    pub(super) by_reason: HashMap<Reason, u64>,
}

impl Sink for Collect {
    fn sums(&self, mut batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        batch.sort_unstable_by_key(|&(id, _)| shard_of(id));
        for run in batch.chunk_by(|a, b| shard_of(a.0) == shard_of(b.0)) {
            let mut shard = self.shards[shard_of(run[0].0)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for &(id, sum) in run {
                *shard.entry(id).or_default() += i128::from(sum);
            }
        }
        Ok(())
    }

    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        let mut counts = self.bad.lock().unwrap_or_else(|p| p.into_inner());
        *counts.by_reason.entry(bad.reason).or_default() += 1;
        if counts.shown < BAD_LINES_SHOWN {
            counts.shown += 1;
            eprintln!(
                "bad line: {}: byte {}: {}: {:?}",
                counts.input,
                bad.offset,
                bad.reason,
                String::from_utf8_lossy(&bad.raw)
            );
        }
        Ok(())
    }
}
