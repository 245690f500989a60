//! `DatabaseArgs`: how to reach PostgreSQL, and URLs with their passwords redacted.

use clap::Args;

use super::secret::{readable, Secret};
use crate::redact::redact_url;

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL. The password, if any, is never logged.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:15432/tally",
        value_parser = super::Quiet(parse_database_url),
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

/// A PostgreSQL URL; its password is registered for scrubbing, and an error never echoes it.
fn parse_database_url(s: &str) -> Result<String, String> {
    crate::redact::register_url(s);
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{}` is not a PostgreSQL URL (postgres://user@host:port/database)",
            redact_url(s)
        ))
    }
}
