//! Argument groups shared by every subcommand (`#[command(flatten)]` them).
//!
//! Every field has a `long` flag, an env var and a default, so the same variable configures the
//! same thing in every stage, in scripts/services, in docker-compose.yml and in `.env.example`.

use clap::{Args, ValueEnum};

/// How to reach Kafka, and which pipeline (topic prefix) to work on.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port, comma-separated).
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092"
    )]
    pub bootstrap_servers: String,

    /// Prefix of every topic name and consumer-group id, so several pipelines share one broker.
    #[arg(long, env = "TALLY_TOPIC_PREFIX", default_value = "tally")]
    pub topic_prefix: String,

    /// Extra librdkafka setting `key=value`, applied last (repeatable), e.g. `-X debug=eos`.
    #[arg(short = 'X', long = "kafka-option", value_parser = parse_key_value)]
    pub options: Vec<(String, String)>,
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL. The password, if any, is never logged.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/tally"
    )]
    pub database_url: String,
}

impl DatabaseArgs {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.database_url)
    }
}

/// The watchdog on progress (see `tally_core::liveness`).
#[derive(Debug, Clone, Args)]
pub struct LivenessArgs {
    /// A stage that has work waiting and completes nothing for this long, or whose call into
    /// Kafka does not return for this long, restarts itself in place while the broker answers.
    #[arg(long, env = "TALLY_STALL_TIMEOUT_MS", default_value_t = 120_000)]
    pub stall_timeout_ms: u64,
}

impl LivenessArgs {
    /// The limit, at least `floor` (a stage's own legitimate waits must fit under it).
    pub fn limit(&self, floor: std::time::Duration) -> std::time::Duration {
        std::time::Duration::from_millis(self.stall_timeout_ms).max(floor)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got `{s}`"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// Replaces the password in `scheme://user:password@host/...` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact_url("postgres://u@h:1/db"), "postgres://u@h:1/db");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn parses_kafka_options() {
        assert_eq!(
            parse_key_value("debug = eos").unwrap(),
            ("debug".to_owned(), "eos".to_owned())
        );
        assert!(parse_key_value("nokey").is_err());
    }
}
