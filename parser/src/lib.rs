//! tally-parser: the parser stage (`tally.files` → `tally.sums`) on the parse engine
//! (tally-engine: bytes → per-consumer sums, bounded memory, every bad line accounted for).
//!
//! - [`offline`]: `tally sum`, the engine on local files or stdin, without Kafka.
//! - [`service`]: `tally parser`, the handler of tally-core's consume-transform-produce loop
//!   (`tally_core::txn`) on `tally.files`; [`sink`]: its output into the open transaction; [`open`]: a unit's file, only if it is the
//!   announced one;
//!   [`doneset`]: the done-state of every file (stream) of its partitions; [`streams`]: which
//!   bytes of a unit that state still leaves to sum. A stalled instance restarts itself through
//!   `tally_core::liveness`.

pub mod doneset;
pub mod offline;
pub mod open;
pub mod service;
pub mod sink;
pub mod streams;
