//! SIGINT/SIGTERM → a [`CancellationToken`] that every stage loop watches.
//!
//! A stage that sees the token cancelled finishes or aborts its open transaction, commits what
//! it may, leaves its group and returns; `main` then exits 0.

pub use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT or SIGTERM. Must be called inside a runtime.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested, draining");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM, only SIGINT");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Sleeps `d` on this thread, or less if `shutdown` comes first; whether it came.
pub fn sleep(shutdown: &CancellationToken, d: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + d;
    while !shutdown.is_cancelled() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
    true
}
