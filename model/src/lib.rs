//! tally-model: what the stages agree on, with no Kafka, SQL or HTTP client in it, so that the
//! parse engine, the fuzz target and unit tests build without librdkafka, OpenSSL or sqlx.
//!
//! - [`messages`]: the records on every topic (the contract between stages); [`codec`]: the
//!   compact binary form of sums records;
//! - [`identity`]: file identity, computed alike where files are announced and where they are read;
//! - [`period`]: usage periods (`--period`) and where a file's time comes from;
//! - [`ranges`]: sets of byte ranges, the done-state of a file however it was split;
//! - [`sums`]: per-consumer sums in bounded memory (the engine's, the parser's and the
//!   aggregator's maps).

pub mod codec;
pub mod identity;
pub mod messages;
pub mod period;
pub mod ranges;
pub mod sums;
