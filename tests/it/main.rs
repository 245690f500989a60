//! Whole-system tests against a real Kafka broker and a real PostgreSQL server
//! (`scripts/services up`; see tally-testkit for how they are found).

mod broker;
