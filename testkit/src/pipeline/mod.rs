//! The pipeline harness of the whole-system tests: tally stages as real OS processes against
//! the real services, and what they did read back (topics, tables); HTTP to their endpoints,
//! usage per period.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;
use tally_core::{KafkaArgs, Topics};

mod data;
mod http;
pub mod periods;
mod script;
pub mod sse;
mod stage;
mod topics;

pub use data::read_expected;
pub use script::{assert_services_of_the_script, services, services_output};

pub use http::{free_port, http_get, http_get_with, sample, wait_http};
pub use stage::Stage;
pub use topics::{group_lag, read_committed, read_records, Record};

/// The `tally` binary the stages run as: `TALLY_BINARY`, else the one cargo built beside the
/// test executable (`target/<profile>/tally`; cargo builds a package's binaries for its
/// integration tests).
pub fn tally_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TALLY_BINARY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/tally
    let profile = exe.parent().and_then(Path::parent).unwrap();
    profile.join("tally")
}

/// A random number generator seeded from the clock; the seed is printed (with `label`) so
/// that a failure can be replayed.
pub fn clock_rng(label: &str) -> impl FnMut() -> u64 {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("{label} seed {seed}");
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// One isolated pipeline: its own topic prefix, database and data directory.
pub struct Pipeline {
    /// The topic prefix (and consumer-group prefix) of this pipeline.
    pub prefix: String,
    /// Its topic and group names.
    pub topics: Topics,
    /// How its stages reach Kafka.
    pub kafka: KafkaArgs,
    /// Its own database.
    pub database_url: String,
    /// Its directory: logs, expected totals.
    pub dir: PathBuf,
    /// The data directory the parsers read (inside `dir`).
    pub data: PathBuf,
    /// A pool on its database.
    pub pool: PgPool,
    /// Extra environment of every command this pipeline runs (secure-connection settings).
    pub envs: Vec<(String, String)>,
    log_seq: u32,
    services: crate::Services,
}

impl Pipeline {
    /// A fresh pipeline named after `what`, its topics created by `tally init`.
    pub async fn new(what: &str) -> Self {
        Self::with_init(what, &[]).await
    }

    /// A pipeline whose `tally init` gets `init_args` too (partition counts).
    pub async fn with_init(what: &str, init_args: &[&str]) -> Self {
        Self::build(what, init_args, None).await
    }

    /// A pipeline on the Kafka cluster at `bootstrap` (PostgreSQL as usual).
    pub async fn on_kafka(what: &str, bootstrap: &str) -> Self {
        Self::build(what, &[], Some(bootstrap)).await
    }

    async fn build(what: &str, init_args: &[&str], bootstrap: Option<&str>) -> Self {
        let mut services = crate::services();
        if let Some(bootstrap) = bootstrap {
            services.kafka_bootstrap = bootstrap.to_owned();
        }
        let prefix = crate::unique(what);
        let database_url = services.fresh_database(what).await;
        let dir = std::env::temp_dir().join(&prefix);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&database_url)
            .await
            .unwrap();
        let kafka = KafkaArgs::plaintext(&services.kafka_bootstrap, &prefix);
        let pipeline = Self {
            topics: Topics::new(&prefix),
            prefix,
            kafka,
            database_url,
            dir,
            data,
            pool,
            envs: Vec::new(),
            log_seq: 0,
            services,
        };
        let mut init = vec!["init"];
        init.extend(init_args);
        pipeline.tally(&init).await;
        pipeline
    }

    fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(tally_binary());
        cmd.args(args);
        self.environment(cmd)
    }

    fn environment(&self, mut cmd: Command) -> Command {
        cmd.env("KAFKA_BOOTSTRAP_SERVERS", &self.kafka.bootstrap_servers)
            .env("DATABASE_URL", &self.database_url)
            .env("TALLY_TOPIC_PREFIX", &self.prefix)
            .env(
                "RUST_LOG",
                std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs a tally command to completion; panics (with its output) if it fails.
    pub async fn tally(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args);
        let output = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "tally {args:?} failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Announces `paths` with `producer publish`, in units of `unit_bytes`.
    pub async fn publish<S: AsRef<str>>(&self, unit_bytes: &str, paths: &[S]) {
        let mut args = vec!["producer", "--unit-bytes", unit_bytes, "publish"];
        args.extend(paths.iter().map(AsRef::as_ref));
        self.tally(&args).await;
    }

    /// Runs `tally` with `args` and extra env vars to completion (at most `within`); its output.
    pub async fn output(
        &self,
        args: &[&str],
        envs: &[(&str, &str)],
        within: Duration,
    ) -> std::process::Output {
        let mut cmd = self.command(args);
        cmd.envs(envs.iter().copied());
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let waited = tokio::time::timeout(
            within,
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await;
        match waited {
            Ok(output) => output.unwrap().unwrap(),
            Err(_) => {
                // SAFETY-free: a plain kill(2) of our own child.
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("tally {args:?} did not exit within {within:?}");
            }
        }
    }

    /// Runs a tally command for at most `run_for`, then stops it (SIGTERM, SIGKILL 10 s later)
    /// if it still runs; its output either way. For commands that may keep retrying.
    pub async fn output_for(
        &self,
        args: &[&str],
        envs: &[(&str, &str)],
        run_for: Duration,
    ) -> std::process::Output {
        let mut cmd = self.command(args);
        cmd.envs(envs.iter().copied());
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
        tokio::pin!(waiting);
        if let Ok(output) = tokio::time::timeout(run_for, &mut waiting).await {
            return output.unwrap().unwrap();
        }
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        if let Ok(output) = tokio::time::timeout(Duration::from_secs(10), &mut waiting).await {
            return output.unwrap().unwrap();
        }
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        waiting.await.unwrap().unwrap()
    }

    /// Runs `tally` with `args`; whether it succeeded.
    pub async fn try_tally(&self, args: &[&str]) -> bool {
        let mut cmd = self.command(args);
        tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .is_ok_and(|o| o.status.success())
    }

    /// Starts a long-running stage; its output goes to a log file in the pipeline's directory.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(&mut self, name: &str, args: &[S]) -> Stage {
        self.log_seq += 1;
        let log = self.dir.join(format!("{:03}-{name}.log", self.log_seq));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .command(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Stage { child, log }
    }

    /// [`Pipeline::spawn`] with the stage's open-file limit at `nofile` (as a small container
    /// or a default systemd unit has it).
    pub fn spawn_with_nofile<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        name: &str,
        nofile: u32,
        args: &[S],
    ) -> Stage {
        self.log_seq += 1;
        let log = self.dir.join(format!("{:03}-{name}.log", self.log_seq));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(tally_binary())
            .args(args);
        let child = self
            .environment(cmd)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Stage { child, log }
    }

    /// `producer watch` on the data directory with `extra` flags, rescanning every 100 ms
    /// unless `extra` sets `--rescan-interval-ms`.
    pub fn watch_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["producer", "watch", "--dir"].map(String::from).to_vec();
        args.push(self.data.to_str().unwrap().to_owned());
        if !extra.contains(&"--rescan-interval-ms") {
            args.extend(["--rescan-interval-ms".to_owned(), "100".to_owned()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// `aggregator` with a stable instance name, flushing every 300 ms.
    pub fn aggregator_args(&self, instance: &str) -> Vec<String> {
        [
            "aggregator",
            "--instance-id",
            instance,
            "--flush-interval-ms",
            "300",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `parser` with a stable instance name, one thread, two units per transaction.
    pub fn parser_args(&self, instance: &str) -> Vec<String> {
        [
            "parser",
            "--data-root",
            self.data.to_str().unwrap(),
            "--instance-id",
            instance,
            "--units-per-txn-max",
            "2",
            "--threads",
            "1",
        ]
        .map(String::from)
        .to_vec()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Logs stay for a failed test, or when asked (TALLY_TEST_KEEP_LOGS=1); a failed
        // test also prints their ends, so that a CI log says what the stages were doing.
        if std::thread::panicking() {
            print_log_ends(&self.dir);
        } else if std::env::var_os("TALLY_TEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
            let topics = self.topics.all().map(|s| s.clone());
            self.services.forget(&self.database_url, &topics);
        }
    }
}

/// Prints the last lines of every stage log in `dir` to stderr.
fn print_log_ends(dir: &Path) {
    const LINES: usize = 25;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        eprintln!("---- the last {} lines of {}", tail.len(), log.display());
        for line in tail {
            eprintln!("{line}");
        }
    }
}

/// The `PARTITION:OFFSET` values of the `--accept-gap` flags a db-client's error names.
pub fn accept_gap_flags(log: &str) -> Vec<String> {
    log.split("--accept-gap ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|s| s.trim_end_matches(|c: char| !c.is_ascii_digit()).to_owned())
        .collect()
}
