//! Kafka and PostgreSQL in containers, through testcontainers, from the repository's own images
//! (`scripts/images` builds `tally-kafka` and `tally-postgres` from docker/kafka and
//! docker/postgres: the versions and settings of scripts/services).
//!
//! - Host networking, each service on a free loopback port: the broker is reachable at the
//!   address it advertises after a restart too (a random port mapping would change), and
//!   nothing listens beyond 127.0.0.1.
//! - Every container carries the label `tally.testkit.owner=<pid of this process>`. A `static`
//!   is never dropped, so removal cannot rely on `Drop`: a reaper process, detached from this
//!   one, waits for this process to end (however it ends: passed, failed, killed) and removes
//!   the containers with that label and their volumes. Containers of owners that are gone are
//!   removed at the next start too; scripts/test-containers sweeps the label at its end.

use std::process::Stdio;

use crate::docker_api::docker;
use crate::pipeline::free_port;

use testcontainers::core::WaitFor;
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

/// The label every container started here carries; its value is the owning process id.
pub const OWNER_LABEL: &str = "tally.testkit.owner";

/// The images, as scripts/images tags them.
fn kafka_image() -> (String, String) {
    let version = std::env::var("TALLY_KAFKA_VERSION").unwrap_or_else(|_| "4.1.1".to_owned());
    ("tally-kafka".to_owned(), version)
}
const POSTGRES_IMAGE: (&str, &str) = ("tally-postgres", "15");

/// The running containers of this process.
pub struct Containers {
    kafka: Container<GenericImage>,
    _postgres: Container<GenericImage>,
    /// `host:port` of the broker.
    pub kafka_bootstrap: String,
    /// A URL of the server's `postgres` database.
    pub database_url: String,
}

impl Containers {
    /// Starts a broker and a PostgreSQL server for this process.
    pub fn start() -> Result<Self, String> {
        // testcontainers' blocking API runs a runtime of its own: never inside the caller's.
        outside_runtime(Self::start_here)
    }

    fn start_here() -> Result<Self, String> {
        if let Some(host) = crate::docker_api::adapt()? {
            // Before the first testcontainers call reads it; nothing else reads it concurrently.
            std::env::set_var("DOCKER_HOST", host);
        }
        remove_orphans();
        spawn_reaper()?;
        let owner = std::process::id().to_string();

        let (name, tag) = kafka_image();
        require_image(&name, &tag)?;
        let (port, controller) = (free_port(), free_port());
        let kafka = GenericImage::new(name.as_str(), tag.as_str())
            .with_wait_for(WaitFor::healthcheck())
            .with_network("host")
            .with_label(OWNER_LABEL, owner.as_str())
            .with_env_var(
                "TALLY_KAFKA_LISTENERS",
                format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}"),
            )
            .with_env_var(
                "TALLY_KAFKA_ADVERTISED_LISTENERS",
                format!("PLAINTEXT://127.0.0.1:{port}"),
            )
            .with_env_var("TALLY_KAFKA_VOTERS", format!("1@127.0.0.1:{controller}"))
            .with_startup_timeout(std::time::Duration::from_secs(180))
            .start()
            .map_err(|e| format!("cannot start {name}:{tag}: {e}"))?;

        let (name, tag) = POSTGRES_IMAGE;
        require_image(name, tag)?;
        let pg_port = free_port();
        let postgres = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::healthcheck())
            .with_network("host")
            .with_label(OWNER_LABEL, owner.as_str())
            .with_env_var("TALLY_PG_PORT", pg_port.to_string())
            .with_env_var("TALLY_PG_LISTEN", "127.0.0.1")
            .with_startup_timeout(std::time::Duration::from_secs(120))
            .start()
            .map_err(|e| format!("cannot start {name}:{tag}: {e}"))?;

        Ok(Self {
            kafka,
            _postgres: postgres,
            kafka_bootstrap: format!("127.0.0.1:{port}"),
            database_url: format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"),
        })
    }

    /// Stops the broker's container (SIGTERM, SIGKILL after 10 s), leaves it stopped for
    /// `down_for`, and starts it again with its data; returns once its health check passes.
    pub fn restart_kafka(&self, down_for: std::time::Duration) -> Result<(), String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.restart_kafka_here(down_for))
                .join()
                .unwrap_or_else(|_| Err("the restart panicked".to_owned()))
        })
    }

    fn restart_kafka_here(&self, down_for: std::time::Duration) -> Result<(), String> {
        self.kafka
            .stop_with_timeout(Some(10))
            .map_err(|e| format!("cannot stop the Kafka container: {e}"))?;
        std::thread::sleep(down_for);
        self.kafka
            .start()
            .map_err(|e| format!("cannot start the Kafka container again: {e}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let health = docker()
                .args(["inspect", "-f", "{{.State.Health.Status}}", self.kafka.id()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            if health == "healthy" {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "the Kafka container is {health:?} 180 s after its start"
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// Runs `work` on a thread of its own, outside any async runtime of the caller's thread.
fn outside_runtime<T: Send>(work: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(work)
            .join()
            .unwrap_or_else(|_| Err("starting the containers panicked".to_owned()))
    })
}

/// Fails with what to do when an image is missing (testcontainers would try to pull it).
fn require_image(name: &str, tag: &str) -> Result<(), String> {
    let found = docker()
        .args(["image", "inspect", &format!("{name}:{tag}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        Ok(())
    } else {
        Err(format!(
            "no image {name}:{tag}: build the images with `scripts/images` first"
        ))
    }
}

/// A process of its own (own process group, so a signal to the test's group spares it) that
/// removes this process's containers once this process is gone.
fn spawn_reaper() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let owner = std::process::id();
    let script = format!(
        "while kill -0 {owner} 2>/dev/null; do sleep 1; done; \
         ids=$(docker ps -aq --filter label={OWNER_LABEL}={owner}); \
         [ -z \"$ids\" ] || docker rm -f -v $ids >/dev/null 2>&1"
    );
    let mut reaper = std::process::Command::new("sh");
    crate::docker_api::to_engine(&mut reaper)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|e| format!("cannot start the container reaper: {e}"))
}

/// Removes containers whose owning process is gone (its reaper did not run: a machine restart).
fn remove_orphans() {
    let Ok(out) = docker()
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label={OWNER_LABEL}"),
            "--format",
            &format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}"),
        ])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((id, owner)) = line.split_once(' ') else {
            continue;
        };
        let alive = owner
            .parse::<i32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = docker()
                .args(["rm", "-f", "-v", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
