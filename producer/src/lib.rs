//! tally-producer: the first stage. Finds finished data files and announces them, as work units,
//! on `tally.files`.
//!
//! - [`cli`]: the `tally producer` subcommands. Start reading here.
//! - [`announce`]: files → work units → one transaction per file; file identity.
//! - [`watch`]: announce complete files of a directory; apply the life-cycle action when done.
//! - [`ingest`]: `producer serve`, files pushed over HTTP into the folder and announced;
//!   [`push`]: `producer push`, its client; [`protocol`]: what they agree on.
//! - [`generate`]: the synthetic, deterministic generator (also writes expected totals).

pub mod announce;
pub mod cli;
pub mod generate;
pub mod ingest;
pub mod protocol;
pub mod push;
pub mod watch;
