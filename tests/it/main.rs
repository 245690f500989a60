//! Whole-system tests against a real Kafka broker and a real PostgreSQL server
//! (`scripts/services up`; see tally-testkit for how they are found). Stages run as separate
//! OS processes of the `tally` binary, as in production.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod api;
mod broker;
mod config;
mod consume;
mod crash;
mod current_period;
mod db_batches;
mod doneset;
mod files;
mod hostile;
mod ingest;
mod latency;
mod liveness;
mod network;
mod ops;
mod periods;
mod pipeline;
mod resume;
mod secrets;
mod secure;
mod standalone;
mod status;
mod sum_cli;
mod write_races;

/// The pipeline harness (tally-testkit).
use tally_testkit::pipeline as support;
