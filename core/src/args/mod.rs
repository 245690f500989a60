//! Argument groups shared by every subcommand (`#[command(flatten)]` them).
//!
//! Every field has a `long` flag, an env var and a default, so the same variable configures the
//! same thing in every stage, in scripts/services, in docker-compose.yml and in `.env.example`.

use clap::{Args, ValueEnum};

mod database;
mod kafka;
mod secret;
mod stage;

pub use crate::redact::redact_url;
pub use database::DatabaseArgs;
pub use kafka::{KafkaArgs, SaslMechanism, SecurityProtocol};
pub use secret::{Quiet, Secret};
pub use stage::*;

/// The watchdog on progress (see `tally_core::liveness`).
#[derive(Debug, Clone, Args)]
pub struct LivenessArgs {
    /// A stage that has work waiting and completes nothing for this long, or whose call into
    /// Kafka does not return for this long, restarts itself in place while the broker answers.
    #[arg(long, env = "TALLY_STALL_TIMEOUT_MS", default_value_t = 120_000, value_parser = crate::args::positive_u64)]
    pub stall_timeout_ms: u64,

    /// Serve `/metrics` (Prometheus), `/livez` and `/readyz` on this address (e.g.
    /// `0.0.0.0:9100`). Default: no HTTP server, no metrics recorded.
    #[arg(long, env = "TALLY_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
}

impl LivenessArgs {
    /// The limit, at least `floor` (a stage's own legitimate waits must fit under it).
    pub fn limit(&self, floor: std::time::Duration) -> std::time::Duration {
        std::time::Duration::from_millis(self.stall_timeout_ms).max(floor)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// A count or size that must be positive (`--threads 0` would never do anything): zero is
/// refused at start with a one-line error.
pub fn positive_usize(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// [`positive_usize`] for `u64`.
pub fn positive_u64(s: &str) -> Result<u64, String> {
    positive_usize(s).and_then(|n| u64::try_from(n).map_err(|e| e.to_string()))
}
