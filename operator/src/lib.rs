//! tally-operator: the commands an operator runs beside the pipeline, apart from the stages.
//!
//! - [`status`]: `tally status`, the pipeline at a glance from Kafka and PostgreSQL (files by
//!   state, lag per stage and partition, dead letters, what needs an operator);
//! - [`report`]: `tally report`, usage per consumer and period, as text or CSV;
//! - [`rollup`]: `tally rollup`, old fine periods folded into coarse ones;
//! - [`verify`]: `tally verify`, totals against an expected-totals file;
//! - [`inspect`]: `tally inspect`, any pipeline topic as text or JSON lines.

pub mod inspect;
pub mod report;
pub mod rollup;
pub mod status;
pub mod verify;
