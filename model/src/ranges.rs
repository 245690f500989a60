//! Sets of byte ranges of a file: what of a stream is counted (or rejected), kept as sorted,
//! disjoint, non-adjacent `[start, end)` pairs, so a file's done-state stays one pair once it
//! is whole, however it was split.

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, non-adjacent half-open byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// No bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pairs, in order.
    pub fn pairs(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of bytes held.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Adds `start..end`, merging what touches it.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        let mut merged = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.0 {
            if e < start {
                merged.push((s, e));
            } else if s > end {
                if !placed {
                    merged.push((start, end));
                    placed = true;
                }
                merged.push((s, e));
            } else {
                start = start.min(s);
                end = end.max(e);
            }
        }
        if !placed {
            merged.push((start, end));
        }
        self.0 = merged;
    }

    /// Adds every range of `other`.
    pub fn extend(&mut self, other: &Ranges) {
        for &(s, e) in &other.0 {
            self.insert(s, e);
        }
    }

    /// The parts of `start..end` this set does not hold, in order.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for &(s, e) in &self.0 {
            if e <= at {
                continue;
            }
            if s >= end {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Whether every byte of `start..end` is held (an empty range always is).
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.missing(start, end).is_empty()
    }

    /// Whether some byte of `start..end` is held.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.0.iter().any(|&(s, e)| s < end && start < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_subtract() {
        let mut r = Ranges::new();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(0, 0);
        assert_eq!(r.pairs(), &[(10, 20), (30, 40)]);
        assert_eq!(r.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(r.missing(12, 18), vec![]);
        assert_eq!(r.missing(15, 35), vec![(20, 30)]);
        r.insert(20, 30);
        assert_eq!(r.pairs(), &[(10, 40)]);
        r.insert(5, 12);
        r.insert(39, 45);
        assert_eq!(r.pairs(), &[(5, 45)]);
        assert!(r.covers(5, 45) && !r.covers(4, 45) && r.covers(7, 7));
        assert_eq!(r.bytes(), 40);
        assert!(r.overlaps(44, 50) && !r.overlaps(45, 50));
        r.insert(50, 60);
        r.insert(0, 2);
        assert_eq!(r.pairs(), &[(0, 2), (5, 45), (50, 60)]);
        assert_eq!(serde_json::to_string(&r).unwrap(), "[[0,2],[5,45],[50,60]]");
    }

    #[test]
    fn any_two_splits_count_each_byte_once() {
        // Units of 7 bytes, then of 3, of a 50-byte file: the second split adds nothing.
        let mut done = Ranges::new();
        let mut counted = 0;
        for size in [7u64, 3, 11] {
            let mut start = 0;
            while start < 50 {
                let end = (start + size).min(50);
                for (s, e) in done.missing(start, end) {
                    counted += e - s;
                    done.insert(s, e);
                }
                start = end;
            }
        }
        assert_eq!(counted, 50);
        assert_eq!(done.pairs(), &[(0, 50)]);
    }
}
