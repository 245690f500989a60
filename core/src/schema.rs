//! The schema, from `migrations/` (embedded at build time), applied by `tally migrate` and at
//! db-client start-up. Applying is idempotent: sqlx records applied migrations and checksums.

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::PgPool;

/// The migrations in `migrations/` at the workspace root.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Applies the migrations that are not applied yet. Safe to run from several instances at once
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether a connection error will not go away by retrying: a bad URL or settings, a database
/// that does not exist, a rejected password or TLS set-up. A server that is down or restarting
/// heals.
pub fn will_not_heal(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => true,
        // invalid_catalog_name (no such database), invalid_authorization_specification,
        // invalid_password.
        sqlx::Error::Database(e) => {
            matches!(e.code().as_deref(), Some("3D000" | "28000" | "28P01"))
        }
        _ => false,
    }
}

/// A pool of at most `connections` on the configured database, its migrations applied.
pub async fn connect_migrated(
    database: &crate::DatabaseArgs,
    connections: u32,
) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(database.connect_options()?)
        .await
        .with_context(|| format!("cannot connect to {}", database.redacted_url()))?;
    migrate(&pool).await.context("cannot apply migrations")?;
    Ok(pool)
}

/// Connects to the configured database and applies the migrations.
pub async fn migrate_url(database: &crate::DatabaseArgs) -> anyhow::Result<()> {
    connect_migrated(database, 1).await?;
    tracing::info!(database = %database.redacted_url(), "migrations applied");
    Ok(())
}
