//! tally-db-client: the last stage. Reads per-consumer sums from Kafka (`tally.totals`, or
//! `tally.sums` when no aggregator runs) and adds them to `consumer_totals` (and per usage
//! period to `consumer_period_history`) in PostgreSQL,
//! exactly once: each batch's upserts and the consumed offsets commit in one database
//! transaction.
//!
//! - [`service`]: the stage's start and its loop (tally-core's consume loop). Start reading
//!   here; [`writer`]: its commit, PostgreSQL transactions that carry the offsets.
//! - [`batch`]: one batch → one database transaction (offsets, gaps, upserts, ledger).
//! - [`copy`]: a batch's totals written with binary COPY, straight into the totals where its
//!   consumers are new, else through a staging table and one statement.
//! - [`changes`]: the change log, what each transaction changed, for `tally api`'s readers.
//! - [`input`]: the totals follow one input topic; switching is on purpose only.
//! - [`resume`]: where an assigned partition resumes: the offset stored with the totals.

pub mod batch;
pub mod changes;
pub mod copy;
pub mod input;
pub mod resume;
pub mod service;
pub mod writer;
