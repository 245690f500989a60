//! tally-api, the read side: `tally api` answers usage questions over HTTP from what the
//! db-client committed to PostgreSQL. It holds no state of its own, so any number of replicas
//! can run behind a load balancer.
//!
//! - [`routes`]: the endpoints (`/v1/…`, with their OpenAPI 3 document at `/v1/openapi.json`)
//!   and the process's `/metrics`, `/livez`, `/readyz` on the same listener;
//! - [`usage`]: usage per hour, day or month in any time zone the stored period allows, from
//!   the period totals; [`window`]: such a request checked before it runs (pure);
//! - [`export`]: every consumer's usage per window, paged JSON with stable cursors or a CSV
//!   export streamed in constant memory;
//! - [`files`]: the files ledger, newest first, in pages;
//! - [`dead`]: the dead letters, read from Kafka (they live only there) in pages;
//! - [`changes`]: the totals' changes as Server-Sent Events, from the writers' change log,
//!   resumable with `Last-Event-ID`;
//! - [`value`]: how totals are written in JSON (pure);
//! - [`status`]: the pipeline's health (`tally status`'s report) and the top consumers;
//! - [`alerts`]: threshold alerts to webhooks, sent by one replica at a time;
//! - [`console`]: the web console at `/`, its sign-in (form, single-use links from
//!   `tally api login-link`) and session cookies;
//! - connections, TLS and read tokens come from [`tally_core::server`], shared with
//!   `tally producer serve`: the same bounded accept loop, and a tokens file (`name token`
//!   lines, not the ingest tokens) read again when it changes.
//!
//! Every value taken from a request is bound as a query parameter, never spliced into SQL.

pub mod alerts;
pub mod changes;
pub mod console;
pub mod dead;
pub mod export;
pub mod files;
pub mod routes;
pub mod status;
pub mod usage;
pub mod value;
pub mod window;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use tally_core::args::PeriodArgs;
use tally_core::liveness::Liveness;
use tally_core::server::{every, listen, tls, tokens};
use tally_core::shutdown::CancellationToken;
use tally_core::{DatabaseArgs, KafkaArgs, Topics};

/// Arguments of `tally api`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The database the db-client writes.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The brokers, for what lives only in Kafka (the dead letters).
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The stored period: what the parsers run with (the same env var).
    #[command(flatten)]
    pub period: PeriodArgs,
    /// Address to listen on (the API, `/metrics`, `/livez` and `/readyz`).
    #[arg(long, env = "TALLY_API_LISTEN", default_value = "127.0.0.1:8480")]
    pub listen: SocketAddr,
    /// Who may read: one `name token` per line (`#` comments); read again when it changes.
    /// Keep these apart from the ingest tokens: a read token cannot upload.
    #[arg(long, env = "TALLY_API_TOKENS_FILE", required = true)]
    pub tokens_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); needs `--tls-key-file`.
    #[arg(long, env = "TALLY_API_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM, unencrypted).
    #[arg(long, env = "TALLY_API_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PostgreSQL connections at most (queries wait for a free one). CSV exports, each on a
    /// connection for its whole length, run at most half of them at once.
    #[arg(long, env = "TALLY_API_DATABASE_CONNECTIONS", default_value_t = 8, value_parser = tally_core::args::positive_u64)]
    pub database_connections: u64,
    /// Longest a query may run before the request fails with 503.
    #[arg(long, env = "TALLY_API_QUERY_TIMEOUT_MS", default_value_t = 10_000, value_parser = tally_core::args::positive_u64)]
    pub query_timeout_ms: u64,
    /// Connections open at once; past it, a new one closes the oldest connection that never
    /// completed a request (then the oldest idle one). Default: the open-file limit less 256.
    #[arg(long, env = "TALLY_API_MAX_CONNECTIONS", value_parser = tally_core::args::positive_usize)]
    pub max_connections: Option<usize>,
    /// From a connection's accept to its first complete request head (TLS handshake
    /// included), and for any request's headers.
    #[arg(long, env = "TALLY_API_REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = tally_core::args::positive_u64)]
    pub request_timeout_ms: u64,
    /// A connection without a request in flight that sends and receives nothing for this long
    /// is closed, and so is one whose client takes nothing of a response (an export, a
    /// change stream) for this long.
    #[arg(long, env = "TALLY_API_IDLE_TIMEOUT_MS", default_value_t = 30_000, value_parser = tally_core::args::positive_u64)]
    pub idle_timeout_ms: u64,
    /// `/v1/status` (the console's health page) reads at most this many of the latest records
    /// of the files and dead-letter topics, as `tally status --scan-records`.
    #[arg(long, env = "TALLY_API_STATUS_SCAN_RECORDS", default_value_t = 10_000, value_parser = tally_core::args::positive_u64)]
    pub status_scan_records: u64,
    /// Threshold alerts.
    #[command(flatten)]
    pub alerts: alerts::AlertArgs,
    /// Instead of serving: a tool.
    #[command(subcommand)]
    pub command: Option<ApiCommand>,
}

/// `tally api`'s tools.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ApiCommand {
    /// Print a link that signs a browser in to the console once, within a minute.
    LoginLink(console::link::LoginLinkArgs),
}

/// Serves until `shutdown` (blocking; call on a blocking thread), or runs the tool asked for.
pub fn run(args: &ApiArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    if let Some(ApiCommand::LoginLink(link)) = &args.command {
        println!("{}", console::link::make(link)?);
        return Ok(());
    }
    let tokens_file = args
        .tokens_file
        .as_deref()
        .context("--tokens-file (or TALLY_API_TOKENS_FILE) is needed to serve")?;
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let liveness = Liveness::unwatched("api");
    let tokens = tokens::Tokens::load(tokens_file, Some(liveness.clone()))?;
    alerts::check(&args.alerts)?;
    let metrics =
        tally_core::metrics::install("api").context("cannot install the metrics recorder")?;
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let bounds = listen::Bounds {
        max_connections: args
            .max_connections
            .unwrap_or_else(listen::default_max_connections),
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(async move {
            // Lazy: the API starts, and says it is not ready, while PostgreSQL is down.
            let pool = PgPoolOptions::new()
                .max_connections(u32::try_from(args.database_connections).unwrap_or(u32::MAX))
                .acquire_timeout(Duration::from_millis(args.query_timeout_ms))
                .test_before_acquire(false)
                .before_acquire(|conn, meta| Box::pin(ping_if_idle(conn, meta.idle_for)))
                .connect_lazy_with(args.database.connect_options()?);
            let state = Arc::new(routes::Api {
                pool,
                tokens,
                liveness,
                metrics,
                query_timeout: Duration::from_millis(args.query_timeout_ms),
                period: args.period.period,
                kafka: args.kafka.clone(),
                dead_letter_topic: Topics::new(&args.kafka.topic_prefix).dead_letter,
                zones: tokio::sync::OnceCell::new(),
                shutdown: shutdown.clone(),
                tls: tls.is_some(),
                status: status::StatusSource {
                    kafka: args.kafka.clone(),
                    scan_records: args.status_scan_records,
                    last: tokio::sync::Mutex::new(None),
                },
                top: status::TopSource::default(),
                horizon: changes::Horizon::default(),
                streams: Arc::new(tokio::sync::Semaphore::new(
                    (bounds.max_connections / 2).max(1),
                )),
                exports: Arc::new(tokio::sync::Semaphore::new(
                    (args.database_connections / 2).max(1) as usize,
                )),
            });
            tokio::spawn(alerts::run(
                state.pool.clone(),
                args.database.connect_options()?,
                args.alerts.clone(),
                shutdown.clone(),
            ));
            let watched = state.clone();
            every(tokens::RELOAD_EVERY, shutdown, move || watched.tokens.refresh());
            tracing::info!(addr = %bound, tls = tls.is_some(), database = %args.database.redacted_url(), max_connections = bounds.max_connections, "serving the API");
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let counts = Arc::new(listen::Counts::default());
            listen::serve(listener, tls, routes::router(state), bounds, counts, shutdown.clone())
                .await;
            Ok::<(), anyhow::Error>(())
        })
        .context("the API server stopped")
}

/// A pooled connection idle at least this long is pinged before a request uses it: one that
/// died while idle (PostgreSQL restarted, a proxy cut it) is replaced instead of failing the
/// request. A busy connection is not: sqlx's default pings before every acquire, a second
/// round trip to PostgreSQL on each request, which doubled the wake-ups a request waits for
/// on a loaded host (docs/benchmarks.md, "The api's round trips"). sqlx also pings every
/// connection when it is released, so one a request broke never returns to the pool.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// `before_acquire`: pings a connection idle for [`PING_AFTER_IDLE`] or longer; an error
/// closes it and the pool takes (or opens) another.
async fn ping_if_idle(conn: &mut sqlx::PgConnection, idle_for: Duration) -> sqlx::Result<bool> {
    if idle_for >= PING_AFTER_IDLE {
        sqlx::Connection::ping(conn).await?;
    }
    Ok(true)
}
