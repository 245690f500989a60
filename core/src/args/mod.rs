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

/// A positive size in bytes: a plain number, or one with a unit, binary (`KiB`, `MiB`, `GiB`,
/// `TiB`, or Kubernetes' `Ki` … `Ti`) or decimal (`kB`/`K`, `MB`/`M`, `GB`/`G`, `TB`/`T`), as
/// in `--memory-max 2GiB` or `TALLY_MEMORY_MAX=1536Mi`.
pub fn bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is no size (e.g. 2GiB, 512MiB, 1073741824)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "ki" => 1 << 10,
        "mib" | "mi" => 1 << 20,
        "gib" | "gi" => 1 << 30,
        "tib" | "ti" => 1 << 40,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ))
        }
    };
    match number.checked_mul(scale) {
        Some(0) => Err("must be at least 1 byte".to_owned()),
        Some(n) => Ok(n),
        None => Err(format!("{s:?} is too large")),
    }
}

/// A stage's memory budget: `given` (`--memory-max`), else `default`, lowered to three
/// quarters of the memory limit of the container (cgroup v2 `memory.max`, or v1's
/// `memory.limit_in_bytes`) when there is one: a default never outgrows a pod's limit.
pub fn memory_budget(given: Option<u64>, default: u64) -> u64 {
    given.unwrap_or_else(|| match container_memory_limit() {
        Some(limit) => default.min(limit / 4 * 3).max(1),
        None => default,
    })
}

/// What a stage's own machinery takes whatever its budget (code, librdkafka's threads and
/// queues, stacks): [`usable_memory`] keeps it out of the shares given to tables and batches.
pub const PROCESS_BASE_BYTES: u64 = 32 << 20;

/// The part of a memory budget that tables and batches share: the budget less
/// [`PROCESS_BASE_BYTES`] (at least 1 MiB), so the process as a whole stays within it.
pub fn usable_memory(budget: u64) -> u64 {
    budget.saturating_sub(PROCESS_BASE_BYTES).max(1 << 20)
}

/// The memory limit of this process's cgroup, if one is set.
fn container_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    // "max" (v2) and a huge page-rounded number (v1) mean no limit.
    .find_map(|text| text.trim().parse::<u64>().ok())
    .filter(|&limit| limit < 1 << 60)
}

#[cfg(test)]
mod tests {
    use super::bytes;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(bytes("1073741824"), Ok(1 << 30));
        assert_eq!(bytes("2GiB"), Ok(2 << 30));
        assert_eq!(bytes("1536Mi"), Ok(1536 << 20));
        assert_eq!(bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(bytes("3G"), Ok(3_000_000_000));
        assert_eq!(bytes("64kB"), Ok(64_000));
        assert!(bytes("0").is_err());
        assert!(bytes("2 parsecs").is_err());
        assert!(bytes("-1").is_err());
        assert!(bytes("99999999999TiB").is_err());
    }
}
