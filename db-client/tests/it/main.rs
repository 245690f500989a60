//! db-client integration tests against a real PostgreSQL (see tally-testkit).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod batch;
mod migrations;
mod partitions;
