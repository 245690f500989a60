//! Test support: where the real Kafka broker and PostgreSQL server are, and per-test isolation.
//!
//! Services come from, in this order:
//! 1. `KAFKA_BOOTSTRAP_SERVERS` and `DATABASE_URL` (set by `scripts/test` from
//!    `scripts/services env`);
//! 2. testcontainers, when a Docker engine answers: the repository's own Kafka and PostgreSQL
//!    images (`scripts/images`), started once per test binary ([`mod@containers`]);
//! 3. otherwise the test fails and says how to start the services. A test that silently skips
//!    proves nothing.
//!
//! Each test then gets its own names ([`unique`]) for topics and groups, and its own database
//! ([`Services::fresh_database`]).

use std::sync::OnceLock;

use sqlx::{Connection, Executor, PgConnection};

pub mod browser;
pub mod containers;
mod docker_api;
pub mod pipeline;
pub mod proxy;

/// Where the services of this test run are.
#[derive(Debug, Clone)]
pub struct Services {
    /// Kafka bootstrap servers.
    pub kafka_bootstrap: String,
    /// URL of a database the tests may create databases from (e.g. `.../postgres`).
    pub database_url: String,
}

static SERVICES: OnceLock<Result<(Services, Option<containers::Containers>), String>> =
    OnceLock::new();

const HOW_TO: &str =
    "tests need a real Kafka broker and PostgreSQL: run `scripts/services up` and \
export the variables printed by `scripts/services env` (scripts/test does both), or make a \
Docker engine available (`scripts/docker up`) with the images of `scripts/images` for \
testcontainers (scripts/test-containers does all of it)";

/// The services for this test run. Panics with instructions when there are none.
pub fn services() -> Services {
    match SERVICES.get_or_init(locate) {
        Ok((services, _)) => services.clone(),
        Err(message) => panic!("{message}"),
    }
}

/// The containers of this test run, when the services are containers started here.
pub fn containers() -> Option<&'static containers::Containers> {
    match SERVICES.get_or_init(locate) {
        Ok((_, containers)) => containers.as_ref(),
        Err(message) => panic!("{message}"),
    }
}

fn locate() -> Result<(Services, Option<containers::Containers>), String> {
    let kafka = std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok();
    let database = std::env::var("DATABASE_URL").ok();
    if let (Some(kafka_bootstrap), Some(database_url)) = (kafka, database) {
        return Ok((
            Services {
                kafka_bootstrap,
                database_url,
            },
            None,
        ));
    }
    if !docker_available() {
        return Err(format!(
            "KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are not set and no Docker engine answers; {HOW_TO}"
        ));
    }
    let started = containers::Containers::start()
        .map_err(|e| format!("testcontainers failed: {e}; {HOW_TO}"))?;
    Ok((
        Services {
            kafka_bootstrap: started.kafka_bootstrap.clone(),
            database_url: started.database_url.clone(),
        },
        Some(started),
    ))
}

fn docker_available() -> bool {
    std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A name nobody else uses: `<what>-<random>`, valid as a topic prefix, group id and database
/// name.
pub fn unique(what: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{what}_{}", &id[..12])
}

impl Services {
    /// Creates an empty database for one test and returns its URL.
    pub async fn fresh_database(&self, what: &str) -> String {
        let name = unique(what).to_lowercase();
        let mut admin = PgConnection::connect(&self.database_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}; {HOW_TO}", self.database_url));
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        with_database(&self.database_url, &name)
    }

    /// Drops what a passed test made: its database (connections closed by force) and its
    /// Kafka topics. Blocking, for `Drop`; errors are ignored (what stays is cleaned with the
    /// services). Keeps a CI run's disk use to what the running tests hold.
    pub fn forget(&self, database_url: &str, topics: &[String]) {
        let admin_url = self.database_url.clone();
        let bootstrap = self.kafka_bootstrap.clone();
        let database = database_url
            .split('?')
            .next()
            .and_then(|u| u.rsplit('/').next())
            .map(str::to_owned);
        let topics = topics.to_vec();
        let work = move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Some(database) = database {
                    if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                        let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                        let _ = admin.execute(drop.as_str()).await;
                    }
                }
                if !topics.is_empty() {
                    delete_topics(&bootstrap, &topics).await;
                }
            });
        };
        // Its own thread: `Drop` may run inside a runtime, where blocking on another is refused.
        let _ = std::thread::spawn(work).join();
    }
}

async fn delete_topics(bootstrap: &str, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: Result<AdminClient<DefaultClientContext>, _> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create();
    if let Ok(admin) = admin {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options =
            AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10)));
        let _ = admin.delete_topics(&names, &options).await;
    }
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Polls `check` every 300 ms until it gives `Ok`, and returns that; panics with `what` and
/// the last `Err` (what was seen instead) once `within` has passed. The one deadline loop of
/// the tests.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                std::time::Instant::now() < deadline,
                "not within {within:?}: {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// `Ok(())` when `holds`, else `Err(seen)`: a check for [`eventually`].
pub fn holds(holds: bool, seen: impl FnOnce() -> String) -> Result<(), String> {
    if holds {
        Ok(())
    } else {
        Err(seen())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_name() {
        assert_eq!(
            with_database("postgres://u@h:1/tally", "t1"),
            "postgres://u@h:1/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:1", "t1"),
            "postgres://u@h:1/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:1/x?sslmode=disable", "t1"),
            "postgres://u@h:1/t1?sslmode=disable"
        );
    }
}
