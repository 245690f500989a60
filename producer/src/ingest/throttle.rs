//! Backpressure: whether the server takes new uploads now. A thread looks every
//! `--throttle-every` at what the parsers have not finished (the parser group's backlog on the
//! files topic, in records and in bytes of work units) and at the folder's free space; past a
//! bound, new uploads get 503 with `Retry-After` until it is back under, and `/readyz` says
//! not ready. `GET /v1/throttle` shows the state.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tally_core::backlog;
use tally_core::liveness::Liveness;
use tally_core::shutdown::CancellationToken;
use tally_core::{kafka, KafkaArgs, Topics};
use tally_model::messages::WorkUnit;

/// The bounds past which new uploads wait.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Records the parsers have not finished.
    pub max_backlog_records: u64,
    /// Bytes of announced work units the parsers have not finished.
    pub max_backlog_bytes: u64,
    /// Free space the folder keeps.
    pub min_free_bytes: u64,
}

/// What the last look found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Throttle {
    /// Whether new uploads are refused now.
    pub throttled: bool,
    /// Why (empty when not throttled).
    pub reasons: Vec<String>,
    /// The parser group's backlog in records (`None` before the first look, or without Kafka).
    pub backlog_records: Option<u64>,
    /// The parser group's backlog in bytes of work units (`None`: not read, or too long).
    pub backlog_bytes: Option<u64>,
    /// Free bytes in the folder.
    pub free_bytes: Option<u64>,
}

impl Throttle {
    /// The state for these readings.
    pub fn judge(
        bounds: &Bounds,
        backlog: Result<backlog::Backlog, String>,
        free_bytes: Option<u64>,
    ) -> Self {
        let mut reasons = Vec::new();
        let (backlog_records, backlog_bytes) = match &backlog {
            Ok(b) => (Some(b.records), b.measured),
            Err(error) => {
                reasons.push(format!("cannot read the parsers' backlog: {error}"));
                (None, None)
            }
        };
        if let Some(records) = backlog_records.filter(|r| *r > bounds.max_backlog_records) {
            reasons.push(format!(
                "the parsers' backlog is {records} records (bound {})",
                bounds.max_backlog_records
            ));
        }
        if let Some(bytes) = backlog_bytes.filter(|b| *b > bounds.max_backlog_bytes) {
            reasons.push(format!(
                "the parsers' backlog is {bytes} bytes (bound {})",
                bounds.max_backlog_bytes
            ));
        }
        if let Some(free) = free_bytes.filter(|f| *f < bounds.min_free_bytes) {
            reasons.push(format!(
                "the folder has {free} bytes free (bound {})",
                bounds.min_free_bytes
            ));
        }
        Self {
            throttled: !reasons.is_empty(),
            reasons,
            backlog_records,
            backlog_bytes,
            free_bytes,
        }
    }
}

/// The last look, and what this server announced since it began: between two looks the
/// backlog counts this server's own announcements too, so a burst of uploads cannot slip
/// past a bound between looks.
pub struct Gate {
    bounds: Bounds,
    last: RwLock<Look>,
    /// Work units announced by this server, ever.
    announced_records: AtomicU64,
    /// Bytes of work units announced by this server, ever.
    announced_bytes: AtomicU64,
}

#[derive(Clone)]
struct Look {
    reading: Result<backlog::Backlog, String>,
    free_bytes: Option<u64>,
    /// `announced_*` when the look began.
    records_before: u64,
    bytes_before: u64,
}

impl Gate {
    fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            last: RwLock::new(Look {
                reading: Ok(backlog::Backlog::default()),
                free_bytes: None,
                records_before: 0,
                bytes_before: 0,
            }),
            announced_records: AtomicU64::new(0),
            announced_bytes: AtomicU64::new(0),
        }
    }

    /// This server announced a file of `units` work units and `bytes` bytes.
    pub fn announced(&self, units: usize, bytes: u64) {
        self.announced_records
            .fetch_add(units as u64, Ordering::Relaxed);
        self.announced_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The state now: the last look plus this server's announcements since it began.
    pub fn now(&self) -> Throttle {
        let look = self.last.read().unwrap_or_else(|p| p.into_inner()).clone();
        let records = self.announced_records.load(Ordering::Relaxed) - look.records_before;
        let bytes = self.announced_bytes.load(Ordering::Relaxed) - look.bytes_before;
        let reading = look.reading.map(|b| backlog::Backlog {
            records: b.records + records,
            measured: b.measured.map(|m| m + bytes),
        });
        Throttle::judge(&self.bounds, reading, look.free_bytes)
    }
}

/// The shared gate.
pub type Shared = Arc<Gate>;

/// Free bytes for an unprivileged writer of the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Starts the thread that keeps `shared` current until `shutdown`.
pub fn start(
    kafka: &KafkaArgs,
    dir: PathBuf,
    bounds: Bounds,
    every: Duration,
    liveness: Liveness,
    shutdown: CancellationToken,
) -> Shared {
    let shared: Shared = Arc::new(Gate::new(bounds));
    let gate = shared.clone();
    let kafka = kafka.clone();
    let topics = Topics::new(&kafka.topic_prefix);
    std::thread::Builder::new()
        .name("tally-throttle".into())
        .spawn(move || {
            let mut consumer: Option<rdkafka::consumer::BaseConsumer> = None;
            let mut was = false;
            while !shutdown.is_cancelled() {
                let records_before = gate.announced_records.load(Ordering::Relaxed);
                let bytes_before = gate.announced_bytes.load(Ordering::Relaxed);
                let reading = look(&kafka, &topics, &mut consumer);
                if reading.is_err() {
                    consumer = None; // a fresh client next time (stale metadata after outages)
                }
                *gate.last.write().unwrap_or_else(|p| p.into_inner()) = Look {
                    reading,
                    free_bytes: free_bytes(&dir),
                    records_before,
                    bytes_before,
                };
                let state = gate.now();
                if state.throttled != was {
                    was = state.throttled;
                    if was {
                        tracing::warn!(reasons = ?state.reasons, "refusing new uploads");
                        // `/readyz` says so too: a load balancer can send pushers elsewhere.
                        liveness.not_ready("throttle", state.reasons.join("; "));
                    } else {
                        tracing::info!("taking new uploads again");
                        liveness.ready("throttle");
                    }
                }
                tally_core::shutdown::sleep(&shutdown, every);
            }
        })
        .expect("cannot start the throttle thread");
    shared
}

/// The parser group's backlog on the files topic, in records and bytes of work units.
fn look(
    kafka: &KafkaArgs,
    topics: &Topics,
    consumer: &mut Option<rdkafka::consumer::BaseConsumer>,
) -> Result<backlog::Backlog, String> {
    let consumer = match consumer {
        Some(c) => c,
        None => consumer.insert(
            kafka::reader(kafka, "tally-throttle", kafka::Ends::Reported)
                .map_err(|e| format!("{e:#}"))?,
        ),
    };
    backlog::backlog(kafka, consumer, &topics.parser_group, &topics.files, |p| {
        serde_json::from_slice::<WorkUnit>(p).map_or(0, |u| u.end.saturating_sub(u.start))
    })
    .map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_each_bound() {
        let bounds = Bounds {
            max_backlog_records: 10,
            max_backlog_bytes: 100,
            min_free_bytes: 1000,
        };
        let ok = backlog::Backlog {
            records: 3,
            measured: Some(50),
        };
        assert!(!Throttle::judge(&bounds, Ok(ok), Some(5000)).throttled);
        let long = backlog::Backlog {
            records: 11,
            measured: None,
        };
        assert!(Throttle::judge(&bounds, Ok(long), Some(5000)).throttled);
        let heavy = backlog::Backlog {
            records: 2,
            measured: Some(101),
        };
        assert!(Throttle::judge(&bounds, Ok(heavy), Some(5000)).throttled);
        assert!(Throttle::judge(&bounds, Ok(ok), Some(999)).throttled);
        assert!(Throttle::judge(&bounds, Err("down".into()), Some(5000)).throttled);
    }

    #[test]
    fn own_announcements_count_until_the_next_look() {
        let gate = Gate::new(Bounds {
            max_backlog_records: 3,
            max_backlog_bytes: 1000,
            min_free_bytes: 0,
        });
        assert!(!gate.now().throttled);
        gate.announced(2, 10);
        assert!(!gate.now().throttled, "2 records, bound 3");
        gate.announced(2, 10);
        assert!(gate.now().throttled, "4 records, bound 3");
        assert_eq!(gate.now().backlog_records, Some(4));
    }

    #[test]
    fn free_space_is_read() {
        assert!(free_bytes(&std::env::temp_dir()).is_some_and(|f| f > 0));
    }
}
