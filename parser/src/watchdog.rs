//! A watchdog for wedged transactions.
//!
//! librdkafka's transactional calls can block for good after broker failures (known cases:
//! `begin_transaction` after a fatal error, `send_offsets_to_transaction` with a stale
//! coordinator; some of these take no timeout at all). A parser whose transaction stays open
//! longer than the broker would keep it is wedged: the watchdog then restarts the process in
//! place (`exec` of the same binary and arguments, same pid). That is exactly as safe as a
//! kill -9 and a restart, which the pipeline is built and tested to survive: the open
//! transaction is aborted by the broker, and the new process resumes from the committed
//! offsets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Marks when the current transaction began (0: none open).
#[derive(Debug, Clone, Default)]
pub struct Watchdog {
    started_ms: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Watchdog {
    /// Starts the watching thread: a transaction open longer than `limit` restarts the process.
    pub fn start(limit: Duration) -> Self {
        let watchdog = Self::default();
        let started = watchdog.started_ms.clone();
        std::thread::Builder::new()
            .name("tally-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let since = started.load(Ordering::Relaxed);
                if since != 0 && now_ms().saturating_sub(since) > limit.as_millis() as u64 {
                    tracing::error!(
                        limit_ms = limit.as_millis() as u64,
                        "a Kafka transaction is wedged; restarting this process in place"
                    );
                    restart_in_place();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|error| tracing::warn!(%error, "cannot start the watchdog"));
        watchdog
    }

    /// A transaction (or its recovery) begins.
    pub fn busy(&self) {
        self.started_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// No transaction is open.
    pub fn idle(&self) {
        self.started_ms.store(0, Ordering::Relaxed);
    }
}

fn restart_in_place() -> ! {
    use std::os::unix::process::CommandExt;
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(error) => error,
    };
    // exec only returns on failure: exit, and let the supervisor restart us.
    tracing::error!(%error, "cannot restart in place, exiting");
    std::process::exit(75);
}
