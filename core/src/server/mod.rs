//! The public HTTP servers' shared machinery (`tally producer serve`, `tally api`): an accept
//! loop that bounds and times every connection before a request reaches a handler
//! ([`listen`]), TLS from PEM files ([`tls`]), and bearer tokens from a file that is reloaded
//! as it changes ([`tokens`]).
//!
//! The internal `/metrics`, `/livez`, `/readyz` server of every stage is [`crate::http`].

pub mod listen;
pub mod tls;
pub mod tokens;

use std::time::Duration;

use crate::shutdown::CancellationToken;

/// Runs `work` on a blocking thread every `period` until `shutdown`, one run at a time (file
/// reloads, sweeps).
pub fn every(
    period: Duration,
    shutdown: &CancellationToken,
    work: impl Fn() + Clone + Send + 'static,
) {
    let token = shutdown.clone();
    tokio::spawn(async move {
        while !token.is_cancelled() {
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
            let _ = tokio::task::spawn_blocking(work.clone()).await;
        }
    });
}
