//! Flags that several stages share, each declared once (its name, env var, default and
//! help) and flattened where it applies.

use std::time::Duration;

use clap::Args;
use tally_model::period::{FileTimeFrom, Period};

use super::{positive_u64, positive_usize};

/// A stable instance name.
#[derive(Debug, Clone, Args)]
pub struct InstanceArgs {
    /// Stable instance name: the consumer's static group membership (`group.instance.id`), so
    /// that a restarted instance takes its partitions back without a rebalance, and for the
    /// parser and the aggregator also the `transactional.id` suffix, so that a restarted
    /// instance aborts its predecessor's open transaction at once instead of waiting for the
    /// transaction timeout. Two running instances must not share it. Default: a random name
    /// (dynamic membership).
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// Kafka transactions of a stage.
#[derive(Debug, Clone, Args)]
pub struct TransactionArgs {
    /// Kafka transaction timeout; a transaction must end well inside it.
    #[arg(long, env = "TALLY_TRANSACTION_TIMEOUT_MS", default_value_t = 60_000, value_parser = positive_u64)]
    pub transaction_timeout_ms: u64,
}

impl TransactionArgs {
    /// The timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.transaction_timeout_ms)
    }
}

/// How many work units one transaction counts (parser: a Kafka transaction; standalone: a
/// database transaction).
#[derive(Debug, Clone, Args)]
pub struct UnitBatchArgs {
    /// Most units per transaction. Each transaction costs the broker about 30 requests (its
    /// partitions added and verified, its records per partition, its offsets, its commit and
    /// markers), whatever its size: 16 units of the default 64 MiB fill `--txn-bytes-max`.
    #[arg(long, env = "TALLY_UNITS_PER_TXN_MAX", default_value_t = 16, value_parser = positive_usize)]
    pub units_per_txn_max: usize,
    /// Most unit bytes per transaction: bounds the time a transaction stays open.
    #[arg(long, env = "TALLY_TXN_BYTES_MAX", default_value_t = 1 << 30, value_parser = positive_u64)]
    pub txn_bytes_max: u64,
}

/// The usage period sums are kept apart by.
#[derive(Debug, Clone, Args)]
pub struct PeriodArgs {
    /// Usage period the sums are kept apart by (`consumer_period_totals`): a file's lines
    /// count in the period holding its time (`--file-time-from`), epoch-aligned in UTC. A whole
    /// number of m, h or d, or `off` for running totals only.
    #[arg(long, env = "TALLY_PERIOD", default_value = "1h", value_parser = tally_model::period::parse_period)]
    pub period: Period,
}

/// How files are cut into work units, and where a file's time comes from.
#[derive(Debug, Clone, Args)]
pub struct UnitArgs {
    /// Largest work unit, in bytes. 64 MiB parses in about 25 ms on two cores (docs/benchmarks.md),
    /// short next to a transaction commit, while a 1 GB file still spreads over 16 units.
    #[arg(long, env = "TALLY_UNIT_BYTES", default_value_t = 64 << 20, value_parser = positive_u64)]
    pub unit_bytes: u64,
    /// Where a file's time (the usage period its lines count in) comes from: `mtime` (its
    /// modification time at announcement), or `name:<regex>`: the named group `epoch_s`,
    /// `epoch_min` or `epoch_ms`, or else the first group (or the match) as a UTC date-time
    /// (`2026-11-26T10:15:00Z`, `20261126T1015`, …). A name without a time falls back to the
    /// mtime, with a warning and `tally_producer_file_time_fallbacks_total`.
    #[arg(long, env = "TALLY_FILE_TIME_FROM", default_value = "mtime", value_parser = tally_model::period::parse_file_time_from)]
    pub file_time_from: FileTimeFrom,
    /// The oldest file time accepted, back from now: a time from a file's name (or a pushed
    /// `Tally-File-Time`) older than this is refused with a reason, never booked (it would
    /// count into a closed period). A number with s, m, h or d, or `off`.
    #[arg(long, env = "TALLY_FILE_TIME_MAX_AGE", default_value = "35d")]
    pub file_time_max_age: tally_model::period::Span,
    /// The latest file time accepted, ahead of now (clock skew between hosts); as
    /// `--file-time-max-age`.
    #[arg(long, env = "TALLY_FILE_TIME_MAX_AHEAD", default_value = "1h")]
    pub file_time_max_ahead: tally_model::period::Span,
}

impl UnitArgs {
    /// The file times accepted.
    pub fn window(&self) -> tally_model::period::TimeWindow {
        tally_model::period::TimeWindow {
            back: self.file_time_max_age.0,
            ahead: self.file_time_max_ahead.0,
        }
    }
}

/// When a file written into a folder counts as complete.
#[derive(Debug, Clone, Args)]
pub struct SettleArgs {
    /// For writers that use neither a rename nor a `.lock` file: a file is complete only once
    /// it was not modified (size and mtime stable) for this long. A renamed-in file whose last
    /// write is older than this is complete at once.
    #[arg(long, env = "TALLY_SETTLE_MS", default_value_t = 2_000)]
    pub settle_ms: u64,
}

/// How often a watched folder is scanned whole.
#[derive(Debug, Clone, Args)]
pub struct RescanArgs {
    /// Full rescan interval, the fallback when inotify misses events (e.g. on NFS).
    #[arg(long, env = "TALLY_RESCAN_INTERVAL_MS", default_value_t = 5_000)]
    pub rescan_interval_ms: u64,
}
