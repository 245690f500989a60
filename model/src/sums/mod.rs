//! Per-consumer sums held in bounded memory: the open-addressing [`SumMap`], the
//! cache-friendly radix-partitioned [`agg::Aggregator`] built on it, and the [`Merger`] that
//! merges sums per output partition under one key cap. Shared by the parse engine (each
//! worker's sums, each transaction's units) and the aggregator stage (sums across units and
//! files): what does not fit leaves early, so memory stays bounded whatever the number of
//! distinct consumers.

pub mod agg;
mod map;
mod merge;

pub use map::{keys_within, Added, SumMap, BYTES_PER_KEY};
pub use merge::{Leaving, Merger, LANES_MAX};
