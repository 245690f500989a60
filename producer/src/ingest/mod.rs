//! `tally producer serve`: files pushed over HTTP land in the folder the parsers read and are
//! announced, each exactly once or not at all with a clear status (docs/messages.md, "Ingest
//! over HTTP"; docs/operations.md, "Remote generators").
//!
//! - [`server`]: the routes; [`upload`]: an upload's way from bytes to announcement (its
//!   headers read in `put.rs`, its end in `finish.rs`, refusals answered by `reply.rs`); [`shared`]: what the handlers
//!   share.
//! - [`once`]: every file announced, for ever (the ingested topic): a push of bytes counted
//!   already is answered "in already".
//! - [`store`]: uploads on disk (`<dir>/.tmp`), their records and life.
//! - [`throttle`]: backpressure from the parsers' backlog and the folder's free space.
//! - From tally-core's [`tally_core::server`], shared with `tally api`: [`tokens`] (who may
//!   write), [`listen`] (connections accepted, bounded (a limit under the open-file limit, idle
//!   ones evicted first) and timed in every phase; HTTP/1.1 only), [`tls`] (the certificate
//!   and key, for HTTPS).

mod finish;
pub mod once;
mod put;
mod reply;
pub mod server;
pub mod shared;
pub mod store;
pub mod throttle;
pub mod upload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tally_core::liveness::Liveness;
use tally_core::server::{every, listen, tls, tokens};
use tally_core::shutdown::CancellationToken;
use tally_core::{KafkaArgs, LivenessArgs};

use crate::announce::{Announcer, Split};
use shared::{Ingest, Limits};
use store::{Record, State, Store};

/// Arguments of `tally producer serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TALLY_INGEST_LISTEN", default_value = "127.0.0.1:8470")]
    pub listen: SocketAddr,
    /// The folder uploads land in: the parsers' data root, or a folder under it (the parsers
    /// read files at the path announced). Uploads in progress live in `<dir>/.tmp`.
    #[arg(long, env = "TALLY_INGEST_DIR")]
    pub dir: PathBuf,
    /// Who may upload: one `name token` per line; read again when it changes.
    #[arg(long, env = "TALLY_INGEST_TOKENS_FILE")]
    pub tokens_file: PathBuf,
    /// Serve HTTPS with this certificate chain (PEM); needs `--tls-key-file`.
    #[arg(long, env = "TALLY_INGEST_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM, unencrypted).
    #[arg(long, env = "TALLY_INGEST_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Largest file accepted, in bytes (413 above it).
    #[arg(long, env = "TALLY_INGEST_MAX_FILE_BYTES", default_value_t = 64 << 30, value_parser = tally_core::args::positive_u64)]
    pub max_file_bytes: u64,
    /// Uploads receiving bytes at once (429 above it).
    #[arg(long, env = "TALLY_INGEST_MAX_UPLOADS", default_value_t = 16)]
    pub max_uploads: usize,
    /// Uploads one token may have receiving at once (429 above it), so that one token cannot
    /// hold every slot.
    #[arg(long, env = "TALLY_INGEST_MAX_UPLOADS_PER_TOKEN", default_value_t = 4, value_parser = tally_core::args::positive_usize)]
    pub max_uploads_per_token: usize,
    /// Bytes one token may hold in unfinished uploads (429 past it); a token also gets at most
    /// an even share of the folder's free space among the tokens receiving.
    #[arg(long, env = "TALLY_INGEST_MAX_PARTIAL_BYTES_PER_TOKEN", default_value_t = 16 << 30, value_parser = tally_core::args::positive_u64)]
    pub max_partial_bytes_per_token: u64,
    /// Slowest body accepted, in bytes per second on average once `--idle-timeout-ms` has
    /// passed (408 below it): a trickle cannot hold a slot for ever.
    #[arg(long, env = "TALLY_INGEST_MIN_RATE", default_value_t = 4096)]
    pub min_rate: u64,
    /// Connections open at once; past it, a new one closes the oldest connection that never
    /// completed a request (then the oldest idle one). Default: the open-file limit less 256.
    #[arg(long, env = "TALLY_INGEST_MAX_CONNECTIONS", value_parser = tally_core::args::positive_usize)]
    pub max_connections: Option<usize>,
    /// From a connection's accept to its first complete request head (TLS handshake
    /// included), and for any request's headers.
    #[arg(long, env = "TALLY_INGEST_REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = tally_core::args::positive_u64)]
    pub request_timeout_ms: u64,
    /// A body that sends nothing for this long ends with 408 (a resumable upload keeps its
    /// bytes until `--partial-ttl`); a connection without a request in flight that sends and
    /// receives nothing for this long is closed, and so is one whose client takes nothing of
    /// a response for this long.
    #[arg(long, env = "TALLY_INGEST_IDLE_TIMEOUT_MS", default_value_t = 30_000, value_parser = tally_core::args::positive_u64)]
    pub idle_timeout_ms: u64,
    /// An upload not continued for this long is forgotten, its bytes removed.
    #[arg(long, env = "TALLY_INGEST_PARTIAL_TTL_S", default_value_t = 24 * 3600, value_parser = tally_core::args::positive_u64)]
    pub partial_ttl_s: u64,
    /// How long a finished upload's record is kept: repeating it in this time is answered 200
    /// from the record. After it, the same bytes under the same name still get 200 and
    /// announce nothing (the ingested topic remembers every file for ever).
    #[arg(long, env = "TALLY_INGEST_COMPLETED_TTL_S", default_value_t = 7 * 24 * 3600, value_parser = tally_core::args::positive_u64)]
    pub completed_ttl_s: u64,
    /// Refuse new uploads (503) while the parsers have more than this many records of the
    /// files topic not finished.
    #[arg(
        long,
        env = "TALLY_INGEST_MAX_BACKLOG_RECORDS",
        default_value_t = 10_000
    )]
    pub max_backlog_records: u64,
    /// … or more than this many bytes of announced work units not finished.
    #[arg(long, env = "TALLY_INGEST_MAX_BACKLOG_BYTES", default_value_t = 64 << 30)]
    pub max_backlog_bytes: u64,
    /// … or while the folder has less free space than this.
    #[arg(long, env = "TALLY_INGEST_MIN_FREE_BYTES", default_value_t = 1 << 30)]
    pub min_free_bytes: u64,
    /// How often the backlog and free space are looked at.
    #[arg(long, env = "TALLY_INGEST_THROTTLE_EVERY_MS", default_value_t = 2_000, value_parser = tally_core::args::positive_u64)]
    pub throttle_every_ms: u64,
    /// `Retry-After` of a refusal for load, in seconds.
    #[arg(long, env = "TALLY_INGEST_RETRY_AFTER_S", default_value_t = 5, value_parser = tally_core::args::positive_u64)]
    pub retry_after_s: u64,
    /// Liveness watchdog and `/metrics`, `/livez`, `/readyz` (`--http-addr`).
    #[command(flatten)]
    pub liveness: LivenessArgs,
}

/// How often finished and abandoned uploads are looked after: every 30 s, or more often for a
/// short `--partial-ttl-s`.
fn sweep_every(partial_ttl: Duration) -> Duration {
    (partial_ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Serves until `shutdown` (blocking; call on a blocking thread).
pub fn run(
    kafka: &KafkaArgs,
    split: &Split,
    args: &ServeArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let store = Store::open(&dir).with_context(|| format!("cannot use {}", dir.display()))?;
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let liveness = Liveness::start("producer", kafka, &args.liveness, Duration::from_secs(60))?;
    let tokens = tokens::Tokens::load(&args.tokens_file, Some(liveness.clone()))?;
    let transactional_id = format!(
        "{}.producer.serve.{:016x}",
        kafka.topic_prefix,
        xxhash_rust::xxh3::xxh3_64(format!("{}\0{}", dir.display(), args.listen).as_bytes())
    );
    let announcer = Announcer::new(kafka, &transactional_id)?;
    let ingested = once::Ingested::load(kafka, shutdown)?;
    let bounds = throttle::Bounds {
        max_backlog_records: args.max_backlog_records,
        max_backlog_bytes: args.max_backlog_bytes,
        min_free_bytes: args.min_free_bytes,
    };
    let throttle = throttle::start(
        kafka,
        dir.clone(),
        bounds,
        Duration::from_millis(args.throttle_every_ms),
        liveness.clone(),
        shutdown.clone(),
    );
    let ingest = Arc::new(Ingest {
        store,
        tokens,
        throttle,
        announcer: Mutex::new(announcer),
        split: split.clone(),
        limits: Limits {
            max_file_bytes: args.max_file_bytes,
            idle_timeout: Duration::from_millis(args.idle_timeout_ms),
            retry_after: Duration::from_secs(args.retry_after_s),
            max_uploads_per_token: args.max_uploads_per_token,
            max_partial_bytes_per_token: args.max_partial_bytes_per_token,
            min_rate: args.min_rate,
        },
        slots: tokio::sync::Semaphore::new(args.max_uploads.max(1)),
        busy: Arc::new(Mutex::new(Default::default())),
        receiving: Arc::new(Mutex::new(Default::default())),
        partials: Mutex::new(Default::default()),
        ingested,
        liveness,
    });
    let ttl = (
        Duration::from_secs(args.partial_ttl_s),
        Duration::from_secs(args.completed_ttl_s),
    );
    // Before taking requests: announce what a crash left linked but not announced.
    sweep(&ingest, ttl.0, ttl.1);
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let app = server::router(ingest.clone());
    let bounds = listen::Bounds {
        max_connections: args
            .max_connections
            .unwrap_or_else(listen::default_max_connections),
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
    };
    runtime.block_on(async move {
        let watched = ingest.clone();
        every(tokens::RELOAD_EVERY, shutdown, move || watched.tokens.refresh());
        let swept = ingest.clone();
        every(sweep_every(ttl.0), shutdown, move || sweep(&swept, ttl.0, ttl.1));
        tracing::info!(addr = %bound, tls = tls.is_some(), dir = %dir.display(), max_connections = bounds.max_connections, "serving uploads");
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let counts = Arc::new(listen::Counts::default());
        listen::serve(listener, tls, app, bounds, counts, shutdown.clone()).await;
        Ok::<(), anyhow::Error>(())
    })
    .context("the ingest server stopped")
}

/// Announces linked uploads, forgets abandoned partial ones and expired finished ones.
pub fn sweep(ingest: &Ingest, partial_ttl: Duration, completed_ttl: Duration) {
    let store = &ingest.store;
    let records = match store.records() {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%error, "cannot list uploads");
            return;
        }
    };
    // The unfinished uploads by token, for the quota checks (new ones are added as they
    // begin; one that began during this listing is added again by its own request).
    let mut partials: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    for (record, _) in &records {
        if record.state == State::Receiving {
            partials
                .entry(record.token.clone())
                .or_default()
                .insert(record.id.clone());
        }
    }
    {
        let mut known = ingest.partials.lock().unwrap_or_else(|p| p.into_inner());
        for (token, ids) in partials {
            known.entry(token).or_default().extend(ids);
        }
        // Forget the ones whose bytes are gone (finished, abandoned or refused).
        for ids in known.values_mut() {
            ids.retain(|id| store.part(id).exists());
        }
        known.retain(|_, ids| !ids.is_empty());
    }
    for (mut record, age) in records {
        // Held while it acts: a request for the same upload waits (423) instead of racing it.
        let Some(_busy) = ingest.claim(&record.id) else {
            continue;
        };
        match record.state {
            State::Receiving if store.link_done(&record.id, &record.name) => {
                // A crash between linking and recording it.
                record.state = State::Linked;
                announce_now(ingest, &mut record);
            }
            State::Receiving if age > partial_ttl => {
                tracing::info!(id = %record.id, name = %record.name, held = store.held(&record.id), "abandoned upload removed");
                store.remove(&record.id);
            }
            State::Linked => announce_now(ingest, &mut record),
            State::Announced if age > completed_ttl => store.remove(&record.id),
            _ => {}
        }
    }
    if let Err(error) = store.remove_orphan_parts(partial_ttl) {
        tracing::warn!(%error, "cannot clean orphan parts");
    }
}

fn announce_now(ingest: &Ingest, record: &mut Record) {
    if let Err(error) = ingest
        .store
        .save(record)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            ingest.store.remove_part(&record.id);
            ingest.announce(record).map(|_| ())
        })
    {
        tracing::warn!(name = %record.name, error = format!("{error:#}"), "a received file is not announced yet; retrying later");
    }
}
