//! A worker's aggregation: one [`SumMap`] while its table fits in the last-level cache, then
//! radix-partitioned.
//!
//! A worker prefetches a line's slot when it parses the line and adds the pair a few lines
//! later, so a table in the last-level cache costs little more than one in L2. Past that, with
//! millions of distinct consumers, almost every line would cost a cache miss and a TLB miss:
//! past [`DIRECT_KEYS_MAX`] keys the worker switches to [`PARTITIONS`] small tables chosen by
//! a hash of the id, and buffers pairs per partition; a full buffer is applied to its table in
//! one burst, while that table is hot in cache. The key cap is split across the partitions,
//! and a full partition is flushed on its own.

use super::map::{Added, SumMap};

/// Keys held in the single table before switching to partitions: a table of at most 8 MiB
/// (512k slots), two workers' together within a 32 MiB L3. docs/benchmarks.md has the figures
/// that chose it.
pub const DIRECT_KEYS_MAX: usize = 256 * 1024;
/// Number of partitions once partitioned.
pub const PARTITIONS: usize = 1024;
/// Pairs buffered per partition before they are applied.
const BUFFER_PAIRS: usize = 64;

/// Where a worker's sums accumulate. Emitted sums go to `out` (the caller sends them on).
pub enum Aggregator {
    /// One table.
    Direct(SumMap),
    /// Radix-partitioned tables with per-partition pair buffers.
    Partitioned(Box<Partitioned>),
}

/// The partitioned state.
pub struct Partitioned {
    maps: Vec<SumMap>,
    /// `PARTITIONS × BUFFER_PAIRS` pairs; `lens[p]` of partition p's slice are in use.
    buffer: Vec<(i64, i64)>,
    lens: Vec<u8>,
}

/// The partition of `id`, in `0..PARTITIONS`. A worker's flush drains its sums partition by
/// partition, so a sink that shards by the same function receives each batch as a few long
/// runs of one shard each.
#[inline(always)]
pub fn partition_of(id: i64) -> usize {
    // A different multiplier from SumMap's slot hash, so ids of one partition still spread
    // over their table's slots.
    ((id as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93) >> (64 - PARTITIONS.trailing_zeros())) as usize
}

impl Aggregator {
    /// Starts direct, with room for `keys_max` keys in all.
    pub fn new(keys_max: usize) -> Self {
        Aggregator::Direct(SumMap::new(keys_max.min(DIRECT_KEYS_MAX)))
    }

    /// Adds one pair. `keys_max` is this worker's key cap. Sums that must leave (a flushed
    /// table or partition, an overflow split) are appended to `out`; the caller sends `out` on
    /// when it is large enough, which bounds memory at `keys_max` plus that threshold.
    #[inline(always)]
    pub fn add(&mut self, id: i64, amount: i64, keys_max: usize, out: &mut Vec<(i64, i64)>) {
        match self {
            Aggregator::Direct(map) => match map.add(id, amount) {
                Added::Ok => {}
                Added::Overflow(old) => out.push((id, old)),
                Added::Full if keys_max > map.len() => {
                    // Out of cache-friendly room but not of key budget: partition.
                    self.partition(keys_max, out);
                    self.add(id, amount, keys_max, out);
                }
                Added::Full => {
                    map.drain_into(out);
                    let again = map.add(id, amount);
                    debug_assert_eq!(again, Added::Ok);
                }
            },
            Aggregator::Partitioned(parts) => {
                let p = partition_of(id);
                let len = parts.lens[p] as usize;
                parts.buffer[p * BUFFER_PAIRS + len] = (id, amount);
                if len + 1 < BUFFER_PAIRS {
                    parts.lens[p] += 1;
                } else {
                    parts.apply(p, BUFFER_PAIRS, out);
                }
            }
        }
    }

    /// Adds every pair of `pairs` ([`Aggregator::add`]), each slot prefetched a few pairs
    /// ahead: a batch from elsewhere (another process's sums) meets a table that is mostly
    /// out of cache, and its misses overlap instead of coming one by one.
    pub fn add_all(&mut self, pairs: &[(i64, i64)], keys_max: usize, out: &mut Vec<(i64, i64)>) {
        const AHEAD: usize = 16;
        for (i, &(id, amount)) in pairs.iter().enumerate() {
            if let Some(&(ahead, _)) = pairs.get(i + AHEAD) {
                self.prefetch(ahead);
            }
            self.add(id, amount, keys_max, out);
        }
    }

    /// Prefetches where [`Aggregator::add`] of `id` will look first (one table only: the
    /// partitioned state buffers its pairs instead).
    #[inline(always)]
    pub fn prefetch(&self, id: i64) {
        if let Aggregator::Direct(map) = self {
            map.prefetch(id);
        }
    }

    fn partition(&mut self, keys_max: usize, out: &mut Vec<(i64, i64)>) {
        let per_partition = (keys_max / PARTITIONS).max(1);
        let parts = Box::new(Partitioned {
            maps: (0..PARTITIONS)
                .map(|_| SumMap::new(per_partition))
                .collect(),
            buffer: vec![(0, 0); PARTITIONS * BUFFER_PAIRS],
            lens: vec![0; PARTITIONS],
        });
        if let Aggregator::Direct(mut map) = std::mem::replace(self, Aggregator::Partitioned(parts))
        {
            let Aggregator::Partitioned(parts) = self else {
                unreachable!("just replaced")
            };
            map.drain_each(|id, sum| {
                if parts.maps[partition_of(id)].add(id, sum) != Added::Ok {
                    // The partition's share of the cap is smaller than what landed in it.
                    out.push((id, sum));
                }
            });
        }
    }

    /// Number of pieces [`Aggregator::drain_piece`] drains, one at a time.
    pub fn pieces(&self) -> usize {
        match self {
            Aggregator::Direct(map) => map.pieces(),
            Aggregator::Partitioned(_) => PARTITIONS,
        }
    }

    /// Moves the sums of one piece (a stretch of the table's slots, or one partition with its
    /// buffer) out, so that a caller can send them on in bounded batches. Drain every piece
    /// before the next [`Aggregator::add`] (see [`SumMap::drain_piece`]).
    pub fn drain_piece(&mut self, piece: usize, out: &mut Vec<(i64, i64)>) {
        match self {
            Aggregator::Direct(map) => map.drain_piece(piece, out),
            Aggregator::Partitioned(parts) => {
                let len = parts.lens[piece] as usize;
                parts.apply(piece, len, out);
                parts.maps[piece].drain_into(out);
            }
        }
    }

    /// Number of keys held in the tables (pairs still buffered not counted).
    pub fn len(&self) -> usize {
        match self {
            Aggregator::Direct(map) => map.len(),
            Aggregator::Partitioned(parts) => parts.maps.iter().map(SumMap::len).sum(),
        }
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        match self {
            Aggregator::Direct(map) => map.is_empty(),
            Aggregator::Partitioned(parts) => {
                parts.lens.iter().all(|&l| l == 0) && parts.maps.iter().all(SumMap::is_empty)
            }
        }
    }
}

impl Partitioned {
    /// Applies the first `len` buffered pairs of partition `p` to its table.
    fn apply(&mut self, p: usize, len: usize, out: &mut Vec<(i64, i64)>) {
        let map = &mut self.maps[p];
        let pairs = &self.buffer[p * BUFFER_PAIRS..p * BUFFER_PAIRS + len];
        // The table was last touched ~PARTITIONS bursts ago and is mostly out of cache: ask for
        // all the burst's slots at once, so their misses overlap instead of coming one by one.
        for &(id, _) in pairs {
            map.prefetch(id);
        }
        for &(id, amount) in pairs {
            match map.add(id, amount) {
                Added::Ok => {}
                Added::Overflow(old) => out.push((id, old)),
                Added::Full => {
                    map.drain_into(out);
                    let again = map.add(id, amount);
                    debug_assert_eq!(again, Added::Ok);
                }
            }
        }
        self.lens[p] = 0;
    }
}
