//! The operator's window into a long-running process (`--http-addr`): `GET /metrics`
//! (Prometheus text format, see [`crate::metrics`]), `GET /livez` and `GET /readyz`.
//!
//! - `/livez`: 200 while the stage's loop moves; 503 once a call into Kafka or PostgreSQL has
//!   been open longer than the stall limit (the watchdog restarts such a process).
//! - `/readyz`: 200 only while a broker answers, what else the stage needs is reachable
//!   (PostgreSQL for the db-client) and the instance holds its assignment; otherwise 503 with a
//!   one-line reason.
//!
//! The server runs on a thread and runtime of its own, so a stage that blocks its own threads
//! (the parse engine uses every core) still answers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::args::KafkaArgs;
use crate::kafka::BrokerProbe;

/// What the endpoints report on: the stage's health, as its watchdog sees it
/// ([`crate::liveness::Liveness`]).
pub trait Health: Send + Sync + 'static {
    /// Why the stage counts as dead (a call open longer than `limit`), if it does.
    fn dead_reason(&self, limit: Duration) -> Option<String>;
    /// Why the stage is not ready, if it is not (Kafka's reachability is checked here).
    fn unready_reason(&self) -> Option<String>;
}

/// How long one broker check is reused (a scrape every second must not flood the broker).
const BROKER_CHECK_TTL: Duration = Duration::from_secs(2);

struct Served {
    health: Box<dyn Health>,
    limit: Duration,
    metrics: PrometheusHandle,
    probe: BrokerProbe,
    /// The last broker check: when, and whether it answered.
    broker: Mutex<Option<(Instant, bool)>>,
}

impl Served {
    fn broker_answers(&self) -> bool {
        let mut last = self.broker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, answered)) = *last {
            if at.elapsed() < BROKER_CHECK_TTL {
                return answered;
            }
        }
        let answered = self.probe.answers(Duration::from_secs(2));
        *last = Some((Instant::now(), answered));
        answered
    }
}

/// Binds `addr` now (an error if it cannot be bound) and serves the endpoints of a stage whose
/// health is `health` on a thread of their own, for the life of the process.
pub fn serve(
    stage: &str,
    addr: SocketAddr,
    health: impl Health,
    kafka: &KafkaArgs,
    limit: Duration,
) -> anyhow::Result<SocketAddr> {
    let metrics = crate::metrics::install(stage).context("cannot install the metrics recorder")?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on --http-addr {addr}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let served = Arc::new(Served {
        health: Box::new(health),
        limit,
        metrics,
        probe: BrokerProbe::new(kafka),
        broker: Mutex::new(None),
    });
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(served);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("tally-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(error) => {
                        tracing::error!(%error, "cannot serve HTTP");
                        return;
                    }
                };
                if let Err(error) = axum::serve(listener, app).await {
                    tracing::error!(%error, "the HTTP server stopped");
                }
            });
        })?;
    tracing::info!(addr = %bound, "serving /metrics, /livez and /readyz");
    Ok(bound)
}

async fn metrics_text(State(served): State<Arc<Served>>) -> impl IntoResponse {
    served.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        served.metrics.render(),
    )
}

async fn livez(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    match served.health.dead_reason(served.limit) {
        None => (StatusCode::OK, "ok\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn readyz(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    let check = served.clone();
    let answers = tokio::task::spawn_blocking(move || check.broker_answers())
        .await
        .unwrap_or(false);
    let reason = if answers {
        served.health.unready_reason()
    } else {
        Some(match served.probe.refusal() {
            Some(why) => format!("Kafka refuses this client: {why}"),
            None => "Kafka is not reachable".to_owned(),
        })
    };
    match reason {
        None => (StatusCode::OK, "ready\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}
