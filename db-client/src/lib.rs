//! tally-db-client: the last stage. Reads per-consumer sums from Kafka (`tally.totals`, or
//! `tally.sums` when no aggregator runs) and adds them to `consumer_totals` (and per usage
//! period to `consumer_period_totals`) in PostgreSQL,
//! exactly once: each batch's upserts and the consumed offsets commit in one database
//! transaction.
//!
//! - [`service`]: the consumer loop. Start reading here.
//! - [`batch`]: one batch → one database transaction (offsets, gaps, upserts, ledger).
//! - [`copy`]: a batch's totals upserted through binary COPY into a staging table.
//! - [`input`]: the totals follow one input topic; switching is on purpose only.
//! - [`rollup`]: `tally rollup`, old fine periods folded into coarse ones.
//! - [`report`]: `tally report`, usage per consumer and period.
//! - [`resume`]: where an assigned partition resumes: the offset stored with the totals.
//! - [`schema`]: migrations (`migrations/`), applied at start-up and by `tally migrate`.
//! - [`status`]: `tally status`, the pipeline at a glance from Kafka and PostgreSQL.
//! - [`verify`]: `tally verify`, totals against an expected-totals file.

pub mod batch;
pub mod copy;
pub mod input;
pub mod report;
pub mod resume;
pub mod rollup;
pub mod schema;
pub mod service;
pub mod status;
pub mod verify;
