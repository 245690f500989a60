//! A bounded open-addressing map from consumer id to partial sum.
//!
//! Keys are non-negative `i64`, so `u64::MAX` marks an empty slot; a multiplicative hash (a
//! random multiplier per table) and linear probing keep one probe to one cache line in the
//! common case. The table starts small and doubles while it is at most half full, up to twice
//! the key cap rounded up to a power of two: probes stay short, and memory follows the keys
//! held, never past [`BYTES_PER_KEY`] per key of the cap.

const EMPTY: u64 = u64::MAX;

/// Probes past their home slot an insert may take on average before its table counts it as
/// clustering ([`SumMap::home`]). At most half full, a well spread table's inserts take about
/// one.
const PROBES_PER_INSERT: usize = 2;

/// Probes past [`PROBES_PER_INSERT`] per insert a table may run up before it draws a new slot
/// hash. Well spread tables stay far below it: random keys, whose longest probe is 51
/// slots among 10M, never come near it (the tests).
const PROBE_DEBT_MAX: usize = 4096;

/// Slots a new table starts with (4 KiB), unless its cap needs fewer.
const INITIAL_SLOTS: usize = 256;

/// Slots of one piece of [`SumMap::drain_piece`] (512 KiB): a piece holds at most this many
/// keys, so a drain in pieces hands out bounded batches.
pub const PIECE_SLOTS: usize = 32 * 1024;

/// Most bytes a table takes per key of its cap: 16-byte slots, at most four per key (twice the
/// cap, rounded up to a power of two). A memory budget of `B` bytes holds `B / BYTES_PER_KEY`
/// keys ([`keys_within`]).
pub const BYTES_PER_KEY: usize = 64;

/// The key cap whose tables stay within `bytes` ([`BYTES_PER_KEY`]), at least 1.
pub fn keys_within(bytes: u64) -> usize {
    usize::try_from(bytes / BYTES_PER_KEY as u64)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// What [`SumMap::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The amount is in the map.
    Ok,
    /// The key is new and the map holds `keys_max` keys: flush, then add again.
    Full,
    /// The key's sum would leave `i64`: the returned old sum must be emitted on its own; the
    /// map now holds the amount as the key's new partial sum.
    Overflow(i64),
}

/// A new table's slot hash `(seed, multiplier)`: random, and different for every table.
///
/// A table drains in slot order, which is the order of its hash. Had every table the same
/// hash, the sums of one table added to another, smaller one (a parser's batch in the
/// aggregator's merge) would arrive sorted by their home slots: while the receiving table is
/// small, they all land in one stretch of it, and linear probing turns that into a cluster
/// whose cost grows with the square of the keys (a 1M-consumer merge took 1.8 s instead of
/// 0.2 s). So every table draws a random seed, XORed in, and a random odd multiplier that
/// spreads sequential ids evenly ([`spreads_evenly`]); when two tables' hashes still order
/// keys alike, the receiving one notices and draws another ([`SumMap::home`]).
fn slot_hash() -> (u64, u64) {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static TABLES: AtomicU64 = AtomicU64::new(0);
    let state = std::collections::hash_map::RandomState::new();
    let mut hasher = state.build_hasher();
    hasher.write_u64(TABLES.fetch_add(1, Ordering::Relaxed));
    let seed = hasher.finish();
    // About one draw in thirty spreads evenly; a thousand draws without one would take a
    // broken random source, and then the last draw serves (a slower table, never a wrong one).
    let mut multiplier = 1;
    for _ in 0..1000 {
        hasher.write_u64(seed);
        multiplier = hasher.finish() | 1;
        if spreads_evenly(multiplier) {
            break;
        }
    }
    (seed, multiplier)
}

/// Whether multiply-shift with `multiplier` places any run of up to 2^24 sequential keys
/// almost evenly in a table of any size: the continued fraction of `multiplier / 2^64` has no
/// partial quotient above 8 until its denominators pass 2^24.
///
/// The hash's top bits walk the unit circle in steps of `multiplier / 2^64`, and the gaps
/// between the first n points take at most three lengths, in a ratio set by those partial
/// quotients. A large one means a step close to a fraction p/q: the keys line up in q
/// clumps, and linear probing turns each clump into a cluster. Random multipliers do that
/// often: half of them made 1M sequential inserts probe past 10 slots per insert at some table
/// size.
fn spreads_evenly(multiplier: u64) -> bool {
    const QUOTIENT_MAX: u128 = 8;
    const DENOMINATOR_MAX: u128 = 1 << 24;
    // Euclid on (2^64, multiplier); (q, q_prev) are the convergents' denominators.
    let (mut num, mut den) = (1u128 << 64, u128::from(multiplier));
    let (mut q, mut q_prev) = (1u128, 0u128);
    while den != 0 && q <= DENOMINATOR_MAX {
        let a = num / den;
        if a > QUOTIENT_MAX {
            return false;
        }
        (num, den) = (den, num % den);
        (q, q_prev) = (a * q + q_prev, q);
    }
    true
}

/// Per-consumer partial sums, at most `keys_max` keys.
#[derive(Debug)]
pub struct SumMap {
    slots: Vec<(u64, i64)>,
    /// This table's slot hash: `(seed, multiplier)` ([`slot_hash`]).
    hash: (u64, u64),
    /// Slot hashes this table drew past its first ([`SumMap::home`]).
    redrawn: u32,
    /// Probes of inserts past [`PROBES_PER_INSERT`] each, since none was owed.
    probe_debt: usize,
    /// `64 - log2(slots.len())`: the hash's top bits pick the slot.
    shift: u32,
    len: usize,
    keys_max: usize,
    /// The size the table may grow to.
    slots_max: usize,
    /// Slots looked at by adds, for the tests.
    #[cfg(test)]
    probes: u64,
}

impl SumMap {
    /// An empty map that holds at most `keys_max` (≥ 1) keys.
    pub fn new(keys_max: usize) -> Self {
        Self::with_hash(keys_max, slot_hash())
    }

    /// An empty map with the slot hash `hash` (`(seed, odd multiplier)`, see [`slot_hash`]).
    fn with_hash(keys_max: usize, hash: (u64, u64)) -> Self {
        let keys_max = keys_max.max(1);
        let slots_max = keys_max.saturating_mul(2).next_power_of_two().max(16);
        let slots = slots_max.min(INITIAL_SLOTS);
        Self {
            slots: vec![(EMPTY, 0); slots],
            hash,
            redrawn: 0,
            probe_debt: 0,
            shift: 64 - slots.trailing_zeros(),
            len: 0,
            keys_max,
            slots_max,
            #[cfg(test)]
            probes: 0,
        }
    }

    /// Bytes the table takes now.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<(u64, i64)>()
    }

    /// Places every key again in a table of `size` slots (after the table grew, or its hash
    /// changed).
    #[cold]
    fn place_again(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.slots, vec![(EMPTY, 0); size]);
        self.shift = 64 - size.trailing_zeros();
        for (key, sum) in old {
            if key != EMPTY {
                let i = self.free_slot_for(key);
                self.slots[i] = (key, sum);
            }
        }
    }

    /// The slot `key`'s probe starts at: the top bits of `key` XOR the seed, times the
    /// multiplier (multiply-shift).
    ///
    /// With a multiplier that [`spreads_evenly`], multiply-shift places sequential and strided
    /// ids, the common case, almost evenly: at 10k sequential ids a present key takes 1.0 to
    /// 1.15 probes on average (1.0 for most tables), against 1.22 for a hash that spreads like
    /// a random one (an xor-shift and a second multiply on top), whose second probes' missed
    /// branches and longer arithmetic cost `tally sum` about 20% on one thread at 10k
    /// consumers. But it is linear in its multiplier: two tables whose multipliers are near a
    /// small ratio (one about three times the other) order any key set alike, and one drained
    /// into the other clusters as if both had the same hash. Random multipliers are that close
    /// often enough: 1 to 7 of 100 random table pairs took 3 to 780 probes per key. A table
    /// whose inserts keep probing far past their home ([`PROBE_DEBT_MAX`]) therefore draws a
    /// new seed and multiplier and places its keys again: a fresh draw is as unlikely to
    /// follow the other table's order as the first one was.
    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        ((key ^ self.hash.0).wrapping_mul(self.hash.1) >> self.shift) as usize
    }

    /// Asks the CPU to bring `key`'s first slot into cache, so that an [`SumMap::add`] of it a
    /// few lines later does not wait on memory. Only a hint: it changes nothing.
    #[inline(always)]
    pub fn prefetch(&self, key: i64) {
        let slot = self.slots.as_ptr().wrapping_add(self.home(key as u64));
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        // SAFETY: a prefetch reads nothing the program sees and never faults; SSE is part of
        // every x86_64 target.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    /// The first empty slot on `key`'s probe (`key` not in the table).
    fn free_slot_for(&self, key: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        while self.slots[i].0 != EMPTY {
            i = (i + 1) & mask;
        }
        i
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `amount` to `key`'s sum. `key` must be non-negative.
    ///
    /// The hot path (the key is present) is inlined into the caller's loop; a new key goes to
    /// `SumMap::insert`, out of line, so that growing never blocks the inlining.
    #[inline(always)]
    pub fn add(&mut self, key: i64, amount: i64) -> Added {
        debug_assert!(key >= 0);
        let key = key as u64;
        let mask = self.slots.len() - 1;
        let start = self.home(key);
        let mut i = start;
        loop {
            #[cfg(test)]
            {
                self.probes += 1;
            }
            let slot = &mut self.slots[i & mask];
            if slot.0 == key {
                return match slot.1.checked_add(amount) {
                    Some(sum) => {
                        slot.1 = sum;
                        Added::Ok
                    }
                    None => Added::Overflow(std::mem::replace(&mut slot.1, amount)),
                };
            }
            if slot.0 == EMPTY {
                return self.insert(i & mask, i - start, key, amount);
            }
            i += 1;
        }
    }

    /// Places a new `key` whose probe ended at the empty slot `i`, `probed` slots past its
    /// home: grows the table first when it would pass half full, and draws a new slot hash
    /// first when its inserts keep probing far ([`SumMap::home`]).
    #[inline(never)]
    fn insert(&mut self, mut i: usize, probed: usize, key: u64, amount: i64) -> Added {
        if self.len == self.keys_max {
            return Added::Full;
        }
        self.probe_debt = (self.probe_debt + probed).saturating_sub(PROBES_PER_INSERT);
        let grow = (self.len + 1) * 2 > self.slots.len() && self.slots.len() < self.slots_max;
        let redraw = self.probe_debt > PROBE_DEBT_MAX;
        if grow || redraw {
            if redraw {
                self.hash = slot_hash();
                self.redrawn += 1;
                self.probe_debt = 0;
            }
            self.place_again(self.slots.len() << usize::from(grow));
            i = self.free_slot_for(key);
        }
        self.slots[i] = (key, amount);
        self.len += 1;
        Added::Ok
    }

    /// Moves every `(key, sum)` out, leaving the map empty.
    pub fn drain_into(&mut self, out: &mut Vec<(i64, i64)>) {
        out.reserve(self.len);
        self.drain_each(|key, sum| out.push((key, sum)));
    }

    /// Hands every `(key, sum)` to `f`, leaving the map empty.
    pub fn drain_each(&mut self, mut f: impl FnMut(i64, i64)) {
        if self.len == 0 {
            return;
        }
        for slot in &mut self.slots {
            if slot.0 != EMPTY {
                f(slot.0 as i64, slot.1);
                *slot = (EMPTY, 0);
            }
        }
        self.len = 0;
    }

    /// Number of pieces [`SumMap::drain_piece`] drains (each at most `PIECE_SLOTS` slots).
    pub fn pieces(&self) -> usize {
        self.slots.len().div_ceil(PIECE_SLOTS)
    }

    /// Moves the `(key, sum)` of one piece of the slots out. Drain all pieces before adding
    /// again: a key whose probe crosses a drained piece would be found no more. Even then sums
    /// stay right (the key gets a second slot, and both partial sums leave in time), which is
    /// what happens when a drain stops half way.
    pub fn drain_piece(&mut self, piece: usize, out: &mut Vec<(i64, i64)>) {
        let start = (piece * PIECE_SLOTS).min(self.slots.len());
        let end = (start + PIECE_SLOTS).min(self.slots.len());
        for slot in &mut self.slots[start..end] {
            if slot.0 != EMPTY {
                out.push((slot.0 as i64, slot.1));
                *slot = (EMPTY, 0);
                self.len -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_until_full_then_reports_full() {
        let mut map = SumMap::new(2);
        assert_eq!(map.add(1, 5), Added::Ok);
        assert_eq!(map.add(1, 5), Added::Ok);
        assert_eq!(map.add(2, 1), Added::Ok);
        assert_eq!(map.add(3, 1), Added::Full);
        assert_eq!(map.add(2, 1), Added::Ok);
        let mut out = Vec::new();
        map.drain_into(&mut out);
        out.sort_unstable();
        assert_eq!(out, vec![(1, 10), (2, 2)]);
        assert!(map.is_empty());
        assert_eq!(map.add(3, 1), Added::Ok);
    }

    #[test]
    fn overflow_hands_back_the_old_sum() {
        let mut map = SumMap::new(4);
        assert_eq!(map.add(0, i64::MAX), Added::Ok);
        assert_eq!(map.add(0, 1), Added::Overflow(i64::MAX));
        let mut out = Vec::new();
        map.drain_into(&mut out);
        assert_eq!(out, vec![(0, 1)]);
    }

    #[test]
    fn the_table_grows_with_its_keys_and_stays_within_its_budget() {
        let keys_max = keys_within(64 << 20);
        let mut map = SumMap::new(keys_max);
        assert_eq!(map.bytes(), INITIAL_SLOTS * 16);
        for k in 0..100_000 {
            assert_eq!(map.add(k, 1), Added::Ok);
        }
        assert!(map.bytes() <= 4 * 100_000 * 16, "{} bytes", map.bytes());
        for k in 100_000..keys_max as i64 {
            assert_eq!(map.add(k, 1), Added::Ok);
        }
        assert_eq!(map.add(keys_max as i64, 1), Added::Full);
        assert!(map.bytes() <= 64 << 20, "{} bytes", map.bytes());
        let mut out = Vec::new();
        map.drain_into(&mut out);
        assert_eq!(out.len(), keys_max);
        assert!(out.iter().all(|&(_, sum)| sum == 1));
    }

    #[test]
    fn a_drain_in_pieces_hands_out_every_key_once_in_bounded_pieces() {
        let mut map = SumMap::new(100_000);
        for k in 0..100_000 {
            assert_eq!(map.add(k * 7, k), Added::Ok);
        }
        assert!(map.pieces() > 1);
        let mut out = Vec::new();
        for piece in 0..map.pieces() {
            let before = out.len();
            map.drain_piece(piece, &mut out);
            assert!(out.len() - before <= PIECE_SLOTS);
        }
        assert!(map.is_empty());
        out.sort_unstable();
        assert_eq!(out, (0..100_000).map(|k| (k * 7, k)).collect::<Vec<_>>());
    }

    #[test]
    fn adds_after_a_drain_stopped_half_way_keep_every_sum() {
        let mut map = SumMap::new(100_000);
        for k in 0..100_000 {
            map.add(k, 1);
        }
        let mut out = Vec::new();
        map.drain_piece(0, &mut out);
        for k in 0..100_000 {
            map.add(k, 1);
        }
        map.drain_into(&mut out);
        let mut totals = std::collections::HashMap::new();
        for (k, sum) in out {
            *totals.entry(k).or_insert(0) += sum;
        }
        assert_eq!(totals.len(), 100_000);
        assert!(totals.values().all(|&t| t == 2));
    }

    /// Probes per key of `keys` added to a table of `target` hash in the slot order of a
    /// table of `source` hash (an aggregator merging a parser's batch), and whether the
    /// receiving table drew a new slot hash.
    fn merge(keys: &[i64], source: (u64, u64), target: (u64, u64)) -> (f64, bool) {
        let mut from = SumMap::with_hash(1 << 20, source);
        for &k in keys {
            from.add(k, 1);
        }
        let mut drained = Vec::new();
        from.drain_into(&mut drained);
        let mut to = SumMap::with_hash(1 << 20, target);
        for &(k, sum) in &drained {
            assert_eq!(to.add(k, sum), Added::Ok);
        }
        let mut merged = Vec::new();
        to.drain_into(&mut merged);
        merged.sort_unstable();
        let mut expected: Vec<(i64, i64)> = keys.iter().map(|&k| (k, 1)).collect();
        expected.sort_unstable();
        assert_eq!(merged, expected);
        (to.probes as f64 / keys.len() as f64, to.redrawn > 0)
    }

    #[test]
    fn sums_added_in_another_tables_order_probe_little() {
        // A table drains in slot order; a growing table that receives them in that order
        // must not pile them into one cluster (quadratic probes), whatever the two tables'
        // hashes and the keys.
        let strided: Vec<i64> = (0..100_000).map(|k| k * 3).collect();
        let high: Vec<i64> = (0..100_000).map(|k| k << 32).collect();
        for _ in 0..4 {
            for keys in [&strided, &high] {
                let (probes, _) = merge(keys, slot_hash(), slot_hash());
                assert!(probes < 3.0, "{probes} probes per key");
            }
        }
    }

    #[test]
    fn a_table_that_receives_another_tables_order_draws_a_new_hash() {
        // Multipliers one about a small multiple of the other order keys alike under
        // multiply-shift (hundreds of probes per key for these pairs): the receiving table
        // notices its inserts probing far and draws a new slot hash.
        let keys: Vec<i64> = (0..100_000).map(|k| k * 3).collect();
        let (seed, m): (u64, u64) = (0x2545_f491_4f6c_dd1d, 0x5851_f42d_4c95_7f2d);
        for ratio in [2u64, 3, 5] {
            let near = m.wrapping_mul(ratio) | 1;
            let (probes, redrawn) = merge(&keys, (seed, m), (seed, near));
            assert!(redrawn, "ratio {ratio}: no new hash was drawn");
            assert!(probes < 3.0, "ratio {ratio}: {probes} probes per key");
        }
    }

    #[test]
    fn well_spread_tables_keep_their_hash_and_find_keys_at_once() {
        // Sequential ids (the common case) and random ones, 1M each: no table draws a new
        // hash, and a sequential id is found within 1.0 to 1.3 probes on average, where a
        // random-like hash takes 1.45 (what keeps `tally sum` fast).
        let mut sequential = SumMap::new(1 << 20);
        for k in 0..1_000_000 {
            sequential.add(k, 1);
        }
        let mut random = SumMap::new(1 << 20);
        let mut x = 99u64;
        for _ in 0..1_000_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            random.add((x >> 1) as i64, 1);
        }
        assert_eq!(sequential.redrawn, 0, "sequential ids drew a new hash");
        assert_eq!(random.redrawn, 0, "random ids drew a new hash");
        let before = sequential.probes;
        for k in (0..1_000_000).step_by(7) {
            sequential.add(k, 1);
        }
        let hits = (0..1_000_000).step_by(7).count() as f64;
        let per_hit = (sequential.probes - before) as f64 / hits;
        assert!(per_hit < 1.35, "{per_hit} probes per hit");
    }

    #[test]
    fn multipliers_that_clump_sequential_ids_are_not_drawn() {
        // 2^64 / golden ratio: partial quotients all 1, the most even spread there is.
        assert!(spreads_evenly(0x9e37_79b9_7f4a_7c15));
        // About 4/5 of 2^64 (a partial quotient of 100 early on), and a random draw that made
        // 1M sequential inserts probe past 10 slots each while its table was small.
        let four_fifths = (u64::MAX / 5 * 4 + u64::MAX / 500) | 1;
        assert!(!spreads_evenly(four_fifths));
        assert!(!spreads_evenly(0xcf3c_8c0d_5506_76cd));
        for _ in 0..100 {
            assert!(spreads_evenly(slot_hash().1));
        }
        // Should such a multiplier serve anyway, its table notices and draws another.
        let mut map = SumMap::with_hash(1 << 20, (0, 0xcf3c_8c0d_5506_76cd));
        for k in 0..100_000 {
            map.add(k, 1);
        }
        assert!(map.redrawn > 0);
        assert!(spreads_evenly(map.hash.1));
    }

    #[test]
    fn many_keys_survive_collisions() {
        let mut map = SumMap::new(10_000);
        for k in 0..10_000 {
            assert_eq!(map.add(k * 1024, k), Added::Ok);
        }
        let mut out = Vec::new();
        map.drain_into(&mut out);
        out.sort_unstable();
        assert_eq!(out, (0..10_000).map(|k| (k * 1024, k)).collect::<Vec<_>>());
    }
}
