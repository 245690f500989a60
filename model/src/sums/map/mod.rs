//! A bounded open-addressing map from consumer id to partial sum.
//!
//! Keys are non-negative `i64`, so `u64::MAX` marks an empty slot; a multiplicative hash (a
//! random multiplier per table that spreads sequential ids, [`hash`], drawn again should the
//! table's inserts cluster) and linear probing keep one probe to one cache line in the common
//! case. The table starts small and doubles while it is at most half full, up to twice
//! the key cap rounded up to a power of two: probes stay short, and memory follows the keys
//! held, never past [`BYTES_PER_KEY`] per key of the cap.

mod hash;

use hash::slot_hash;

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
    /// With a multiplier that [`hash::spreads_evenly`], multiply-shift places sequential and strided
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
mod tests;
