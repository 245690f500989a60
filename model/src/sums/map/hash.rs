//! The slot hash a new [`super::SumMap`] draws: a random seed and a random odd multiplier
//! that spreads sequential ids evenly under multiply-shift.

/// A new table's slot hash `(seed, multiplier)`: random, and different for every table.
///
/// A table drains in slot order, which is the order of its hash. Had every table the same
/// hash, the sums of one table added to another, smaller one (a parser's batch in the
/// aggregator's merge) would arrive sorted by their home slots: while the receiving table is
/// small, they all land in one stretch of it, and linear probing turns that into a cluster
/// whose cost grows with the square of the keys (a 1M-consumer merge took 1.8 s instead of
/// 0.2 s). So every table draws a random seed, XORed in, and a random odd multiplier that
/// spreads sequential ids evenly ([`spreads_evenly`]); when two tables' hashes still order
/// keys alike, the receiving one notices and draws another ([`super::SumMap::home`]).
pub(super) fn slot_hash() -> (u64, u64) {
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
pub(super) fn spreads_evenly(multiplier: u64) -> bool {
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
