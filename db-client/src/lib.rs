//! tally-db-client: the last stage. Reads per-consumer sums from Kafka (`tally.totals`, or
//! `tally.sums` when no aggregator runs) and adds them to `consumer_totals` in PostgreSQL,
//! exactly once: each batch's upserts and the consumed offsets commit in one database
//! transaction.
//!
//! Start reading at [`schema`] (migrations).

pub mod schema;
