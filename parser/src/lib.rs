//! tally-parser: the parser stage (`tally.files` → `tally.sums`) and its engine.
//!
//! - [`engine`]: pure bytes → per-consumer sums, bounded memory, every bad line accounted for.
//!   Start reading here.
//! - [`source`]: files as byte windows (mmap, with a read() fallback); the crate's only `unsafe`.
//! - [`offline`]: `tally sum`, the engine on local files or stdin, without Kafka.
//! - [`service`]: `tally parser`, the consumer group on `tally.files` (KIP-447 transactions);
//!   [`doneset`]: which units are already done; [`watchdog`]: restarts a wedged instance.

pub mod doneset;
pub mod engine;
pub mod offline;
pub mod service;
pub mod source;
pub mod watchdog;
