//! tally-aggregator: the optional stage `tally.sums` → `tally.totals`, which merges the sums
//! of many units and files per consumer before the database, so that PostgreSQL updates each
//! consumer's row once per flush instead of once per parser transaction.
//!
//! - [`service`]: `tally aggregator`, a handler of tally-core's consume-transform-produce loop
//!   (`tally_core::txn`): one Kafka transaction per batch of sums records, merged in a
//!   key-capped map, written to the same partition of `tally.totals` with the unit-end
//!   markers after them.
//! - [`upstream`]: whether the parsers have units left, so that a batch drained at the
//!   watermark ends at once when nothing is coming.

pub mod service;
pub mod upstream;
