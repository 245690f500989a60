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

    /// How to talk to the brokers.
    #[arg(long, env = "TALLY_KAFKA_SECURITY_PROTOCOL", value_enum, default_value_t = SecurityProtocol::Plaintext)]
    pub kafka_security_protocol: SecurityProtocol,

    /// CA certificate (PEM) that signed the brokers' certificates (TLS); default: the system's.
    #[arg(long, env = "TALLY_KAFKA_SSL_CA_FILE")]
    pub kafka_ssl_ca_file: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for brokers that ask for one (TLS client authentication).
    #[arg(
        long,
        env = "TALLY_KAFKA_SSL_CERT_FILE",
        requires = "kafka_ssl_key_file"
    )]
    pub kafka_ssl_cert_file: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM, unencrypted).
    #[arg(
        long,
        env = "TALLY_KAFKA_SSL_KEY_FILE",
        requires = "kafka_ssl_cert_file"
    )]
    pub kafka_ssl_key_file: Option<std::path::PathBuf>,

    /// SASL mechanism (with `sasl_plaintext` or `sasl_ssl`).
    #[arg(long, env = "TALLY_KAFKA_SASL_MECHANISM", value_enum, default_value_t = SaslMechanism::ScramSha512)]
    pub kafka_sasl_mechanism: SaslMechanism,

    /// SASL user name.
    #[arg(long, env = "TALLY_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password: from this env var (there is no flag, so it never shows in a process
    /// list), or from `--kafka-sasl-password-file`.
    #[arg(skip = Secret::from_env("TALLY_KAFKA_SASL_PASSWORD"))]
    pub kafka_sasl_password: Option<Secret>,

    /// File holding the SASL password (first line); wins over `TALLY_KAFKA_SASL_PASSWORD`.
    #[arg(long, env = "TALLY_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,
}

/// `security.protocol` of every Kafka client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS.
    #[value(name = "ssl")]
    Ssl,
    /// SASL authentication without TLS (the password travels in clear with PLAIN).
    #[value(name = "sasl_plaintext", alias = "sasl-plaintext")]
    SaslPlaintext,
    /// SASL authentication over TLS.
    #[value(name = "sasl_ssl", alias = "sasl-ssl")]
    SaslSsl,
}

/// `sasl.mechanisms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanism {
    /// PLAIN (only over TLS in production).
    #[value(name = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaArgs {
    /// Plaintext access to `bootstrap_servers` for pipeline `topic_prefix`, nothing else set
    /// (tests, tools).
    pub fn plaintext(bootstrap_servers: &str, topic_prefix: &str) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            topic_prefix: topic_prefix.to_owned(),
            options: Vec::new(),
            kafka_security_protocol: SecurityProtocol::Plaintext,
            kafka_ssl_ca_file: None,
            kafka_ssl_cert_file: None,
            kafka_ssl_key_file: None,
            kafka_sasl_mechanism: SaslMechanism::ScramSha512,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_sasl_password_file: None,
        }
    }

    /// The librdkafka settings for TLS and SASL (password included: never log them).
    pub fn security_settings(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut out = Vec::new();
        let (tls, sasl) = match self.kafka_security_protocol {
            SecurityProtocol::Plaintext => (false, false),
            SecurityProtocol::Ssl => (true, false),
            SecurityProtocol::SaslPlaintext => (false, true),
            SecurityProtocol::SaslSsl => (true, true),
        };
        let protocol = self
            .kafka_security_protocol
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        out.push(("security.protocol", protocol));
        if tls {
            let files = [
                ("ssl.ca.location", &self.kafka_ssl_ca_file),
                ("ssl.certificate.location", &self.kafka_ssl_cert_file),
                ("ssl.key.location", &self.kafka_ssl_key_file),
            ];
            for (key, file) in files {
                if let Some(path) = file {
                    readable(path)?;
                    out.push((key, path.display().to_string()));
                }
            }
        }
        if sasl {
            let mechanism = self
                .kafka_sasl_mechanism
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default();
            out.push(("sasl.mechanisms", mechanism));
            let user = self
                .kafka_sasl_username
                .clone()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--kafka-sasl-username (TALLY_KAFKA_SASL_USERNAME) is required with SASL"
                    )
                })?;
            out.push(("sasl.username", user));
            let password = match &self.kafka_sasl_password_file {
                Some(path) => Secret::from_file(path)?,
                None => self.kafka_sasl_password.clone().ok_or_else(|| {
                    anyhow::anyhow!("TALLY_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file is required with SASL")
                })?,
            };
            out.push(("sasl.password", password.expose().to_owned()));
        }
        Ok(out)
    }
}

/// A secret (a password): never shown by `Debug` or in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value of env var `name`, if set and not empty.
    pub fn from_env(name: &str) -> Option<Secret> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
    }

    /// The first line of `path` (a mounted secret).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Secret> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read secret file {}: {e}", path.display()))?;
        Ok(Secret(text.lines().next().unwrap_or_default().to_owned()))
    }

    /// The secret itself, for the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

fn readable(path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL. The password, if any, is never logged.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/tally",
        value_parser = parse_database_url,
        hide_env_values = true
    )]
    pub database_url: String,

    /// File holding the database password (first line); wins over a password in the URL and
    /// over `PGPASSWORD`.
    #[arg(long, env = "TALLY_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<std::path::PathBuf>,

    /// TLS to PostgreSQL: disable, allow, prefer, require, verify-ca or verify-full (as
    /// libpq's `sslmode`). Default: the URL's `sslmode`, else `prefer`.
    #[arg(long, env = "TALLY_DATABASE_SSL_MODE")]
    pub database_ssl_mode: Option<String>,

    /// CA certificate (PEM) to verify the server with (`verify-ca`, `verify-full`).
    #[arg(long, env = "TALLY_DATABASE_SSL_ROOT_CERT")]
    pub database_ssl_root_cert: Option<std::path::PathBuf>,
}

impl DatabaseArgs {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.database_url)
    }

    /// The connection options: the URL, then the password file and TLS settings.
    pub fn connect_options(&self) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
        use std::str::FromStr;
        let mut options = sqlx::postgres::PgConnectOptions::from_str(&self.database_url)
            .map_err(|e| anyhow::anyhow!("bad database URL {}: {e}", self.redacted_url()))?
            // No NOTICEs ("relation … already exists, skipping" for every batch's staging).
            .options([("client_min_messages", "warning")]);
        if let Some(path) = &self.database_password_file {
            options = options.password(Secret::from_file(path)?.expose());
        }
        if let Some(mode) = &self.database_ssl_mode {
            let mode = sqlx::postgres::PgSslMode::from_str(mode)
                .map_err(|_| anyhow::anyhow!("bad --database-ssl-mode `{mode}`"))?;
            options = options.ssl_mode(mode);
        }
        if let Some(path) = &self.database_ssl_root_cert {
            readable(path)?;
            options = options.ssl_root_cert(path);
        }
        Ok(options)
    }
}

fn parse_database_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{}` is not a PostgreSQL URL (postgres://user@host:port/database)",
            redact_url(s)
        ))
    }
}

/// The watchdog on progress (see `tally_core::liveness`).
#[derive(Debug, Clone, Args)]
pub struct LivenessArgs {
    /// A stage that has work waiting and completes nothing for this long, or whose call into
    /// Kafka does not return for this long, restarts itself in place while the broker answers.
    #[arg(long, env = "TALLY_STALL_TIMEOUT_MS", default_value_t = 120_000, value_parser = crate::args::positive_u64)]
    pub stall_timeout_ms: u64,

    /// Serve `/metrics` (Prometheus), `/livez` and `/readyz` on this address (e.g.
    /// `0.0.0.0:9100`). Default: no HTTP server, no metrics recorded.
    #[arg(long, env = "TALLY_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
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

/// A count or size that must be positive (`--threads 0` would never do anything): zero is
/// refused at start with a one-line error.
pub fn positive_usize(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// [`positive_usize`] for `u64`.
pub fn positive_u64(s: &str) -> Result<u64, String> {
    positive_usize(s).and_then(|n| u64::try_from(n).map_err(|e| e.to_string()))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got `{s}`"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// Replaces the passwords in `scheme://user:password@host/...?password=…` with `***`.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_owned(),
            },
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
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
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=s3cret"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db?sslpassword=x"),
            "postgres://u:***@h/db?sslpassword=***"
        );
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
