//! `tally producer push FILE… --to URL`: the client of `producer serve`. Each file is pushed
//! by [`upload`]; the exit status says whether all are in, and one line per file says which.
//! With `--watch DIR` it keeps pushing the complete files of a local folder (the completion
//! rules of `producer watch`) and deletes or archives each local copy only after the server
//! confirmed it.

pub mod upload;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tally_core::args::SettleArgs;
use tally_core::shutdown::CancellationToken;

use crate::announce;
use crate::protocol::Algorithm;
use crate::watch::{self, AfterDone};
use upload::{In, Target};

/// Arguments of `tally producer push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// Files to push.
    #[arg(required_unless_present = "watch")]
    pub files: Vec<PathBuf>,
    /// The server (`producer serve`), e.g. `https://ingest.example:8470`.
    #[arg(long, env = "TALLY_INGEST_URL", value_parser = tally_core::args::Quiet(ingest_url))]
    pub to: reqwest::Url,
    /// File holding the bearer token (first line). Default: the `TALLY_INGEST_TOKEN`
    /// environment variable (never a command-line argument: it would show in `ps`).
    #[arg(long, env = "TALLY_INGEST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an HTTPS server with, besides the system's.
    #[arg(long, env = "TALLY_INGEST_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The checksum each upload carries, verified by the server before it announces.
    #[arg(
        long,
        value_enum,
        env = "TALLY_INGEST_CHECKSUM",
        default_value = "xxh3"
    )]
    pub checksum: Algorithm,
    /// Keep trying one file for this long (network errors, a busy or throttling server).
    #[arg(long, env = "TALLY_PUSH_GIVE_UP_AFTER_S", default_value_t = 3600)]
    pub give_up_after_s: u64,
    /// Push the complete files appearing in this folder, until stopped.
    #[arg(long, conflicts_with = "files")]
    pub watch: Option<PathBuf>,
    /// With `--watch`: what happens to a local file once the server confirmed it: delete,
    /// archive:DIR or keep.
    #[arg(long, env = "TALLY_PUSH_AFTER", default_value = "delete")]
    pub after_push: AfterDone,
    /// With `--watch`: push what is complete (waiting for files still settling), then exit.
    #[arg(long, requires = "watch")]
    pub once: bool,
    /// With `--watch`: when a file is complete (as in `producer watch`).
    #[command(flatten)]
    pub settle: SettleArgs,
}

/// How long `--watch` waits before it tries a failed file again.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);

/// Runs `push` (blocking; call on a blocking thread).
pub fn run(args: &PushArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        None => std::env::var("TALLY_INGEST_TOKEN").unwrap_or_default(),
    };
    if token.is_empty() {
        bail!("no token: set TALLY_INGEST_TOKEN or --token-file");
    }
    let mut client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .use_rustls_tls();
    if let Some(ca) = &args.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let target = Target {
        client: client.build()?,
        base: args.to.clone(),
        token,
        algorithm: args.checksum,
        give_up_after: Duration::from_secs(args.give_up_after_s),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match &args.watch {
            Some(dir) => watch_dir(&target, dir, args, shutdown).await,
            None => push_all(&target, &args.files, shutdown).await,
        }
    })
}

fn bar() -> indicatif::ProgressBar {
    // Drawn only on a terminal (indicatif hides it otherwise).
    indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    )
}

async fn push_all(
    target: &Target,
    files: &[PathBuf],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut failed = 0;
    for path in files {
        let progress = bar().with_message(path.display().to_string());
        let outcome = tokio::select! {
            r = upload::push(target, path, &progress) => r,
            () = shutdown.cancelled() => Err(anyhow::anyhow!("stopped")),
        };
        progress.finish_and_clear();
        failed += usize::from(report(path, &outcome));
    }
    if failed > 0 {
        bail!("{failed} of {} files are not in", files.len());
    }
    Ok(())
}

/// Prints one line for `path`; whether it failed.
fn report(path: &Path, outcome: &anyhow::Result<In>) -> bool {
    match outcome {
        Ok(In::Announced) => println!("in\t{}", path.display()),
        Ok(In::Already) => println!("in already\t{}", path.display()),
        Err(error) => {
            println!("NOT in\t{}\t{error:#}", path.display());
            return true;
        }
    }
    false
}

async fn watch_dir(
    target: &Target,
    dir: &Path,
    args: &PushArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let settle = Duration::from_millis(args.settle.settle_ms);
    // Files pushed and kept (`--after-push keep`), by identity: not again. Files that failed,
    // with when: tried again a minute later (a server down, a token not yet allowed, …).
    let mut done: HashSet<String> = HashSet::new();
    let mut failed: HashMap<String, Instant> = HashMap::new();
    let mut failures = 0usize;
    loop {
        let mut waiting = false;
        for watch::Candidate { path, meta, wait } in watch::candidates(dir, settle)? {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let id = announce::file_id(&meta);
            if done.contains(&id)
                || failed
                    .get(&id)
                    .is_some_and(|at| at.elapsed() < RETRY_FAILED_AFTER || args.once)
            {
                continue;
            }
            if !wait.is_zero() {
                waiting = true;
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let progress = bar().with_message(name.unwrap_or_default());
            let outcome = tokio::select! {
                r = upload::push(target, &path, &progress) => r,
                () = shutdown.cancelled() => return Ok(()),
            };
            progress.finish_and_clear();
            if report(&path, &outcome) {
                failures += 1;
                failed.insert(id, Instant::now());
                continue;
            }
            failed.remove(&id);
            // Only now, with the server's word that the file is in.
            if let Err(error) = watch::apply_after_done(&args.after_push, &id, &path) {
                tracing::error!(error = format!("{error:#}"), "cannot clear a pushed file");
            }
            done.insert(id);
        }
        if args.once && !waiting {
            if failures > 0 {
                bail!("{failures} files are not in");
            }
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The server's URL; a password in it is registered for scrubbing, and an error never echoes
/// it.
fn ingest_url(s: &str) -> Result<reqwest::Url, String> {
    tally_core::redact::register_url(s);
    let url = reqwest::Url::parse(s)
        .map_err(|e| format!("`{}` is not a URL: {e}", tally_core::redact::redact_url(s)))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!("scheme `{other}`: http or https expected")),
    }
}
