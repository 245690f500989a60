//! Threshold alerts: when a consumer's usage in a window first reaches a rule's threshold, the
//! rule's webhook gets a POST, signed, with an idempotency key, retried until a 2xx.
//!
//! - Who sends: of the replicas started with `--alert-rules`, the one holding a PostgreSQL
//!   advisory lock (on a connection of its own: a replica that dies loses it with its
//!   connection, and another takes over within `--alert-interval-ms`).
//! - Every interval it evaluates each rule ([`rules`]) over the current and the previous
//!   window (usage committed late still counts) from the period totals, and records each new
//!   crossing in `alert_crossings` (one row per rule, consumer and window: a crossing happens
//!   once). New crossings are grouped into deliveries (`alert_deliveries`, at most
//!   [`PER_DELIVERY`] consumers each: a rule for all consumers sends one request per window and
//!   thousand consumers, not one per consumer), each with its body and a random idempotency
//!   key fixed before the first attempt.
//! - Deliveries are posted in order, at most [`SENDS_PER_SECOND`] requests a second, each
//!   within [`SEND_TIMEOUT`]; a 2xx records the delivery, anything else is retried with
//!   backoff (1 s doubling to 5 min). A request the receiver took whose answer was lost (or a
//!   sender that died before recording it) is sent again with the same key: receivers
//!   deduplicate on `Idempotency-Key`.
//! - Headers: `Idempotency-Key`, `X-Tally-Signature: t=UNIX,v1=HMAC_SHA256_HEX(secret,
//!   "UNIX.BODY")`, `X-Tally-Rule`.

pub mod rules;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tally_core::shutdown::CancellationToken;

use rules::Rule;

/// Most consumers in one webhook request.
pub const PER_DELIVERY: i64 = 1000;
/// Requests per second at most, over all rules.
pub const SENDS_PER_SECOND: u64 = 10;
/// Longest one request may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The advisory lock the sending replica holds.
pub const SENDER_LOCK: i64 = 0x7461_6c6c_7961_6c74; // "tallyalt"

/// Arguments of the alerts (part of `tally api`).
#[derive(Debug, Clone, clap::Args)]
pub struct AlertArgs {
    /// Threshold alert rules (a JSON array; docs/operations.md "Threshold alerts"), read again
    /// when the file changes. Without it this replica sends no alert.
    #[arg(long, env = "TALLY_API_ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,
    /// How often the sending replica evaluates the rules (and a standby checks whether it
    /// should take over).
    #[arg(long, env = "TALLY_API_ALERT_INTERVAL_MS", default_value_t = 5_000, value_parser = tally_core::args::positive_u64)]
    pub alert_interval_ms: u64,
}

/// The rules file, read again when it changes; a file that goes bad keeps the last good rules.
struct RulesFile {
    path: PathBuf,
    stamp: Option<SystemTime>,
    rules: Vec<Rule>,
}

impl RulesFile {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let mut file = Self {
            path: path.to_owned(),
            stamp: None,
            rules: Vec::new(),
        };
        file.rules = read(path)?;
        file.stamp = modified(path);
        Ok(file)
    }

    fn refresh(&mut self) {
        let now = modified(&self.path);
        if now == self.stamp {
            return;
        }
        self.stamp = now;
        match read(&self.path) {
            Ok(rules) => {
                tracing::info!(rules = rules.len(), "alert rules reloaded");
                self.rules = rules;
            }
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "the alert rules file is bad: the last good rules stay in force"
            ),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read(path: &Path) -> anyhow::Result<Vec<Rule>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    rules::parse(&text).with_context(|| format!("in {}", path.display()))
}

/// Checks the rules file at start (a bad one stops `tally api`).
pub fn check(args: &AlertArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.alert_rules {
        RulesFile::load(path)?;
    }
    Ok(())
}

/// Takes part in sending until `shutdown`: waits to hold the lock, then evaluates and sends.
pub async fn run(
    pool: PgPool,
    options: sqlx::postgres::PgConnectOptions,
    args: AlertArgs,
    shutdown: CancellationToken,
) {
    let Some(path) = args.alert_rules.clone() else {
        return;
    };
    let interval = Duration::from_millis(args.alert_interval_ms);
    let client = match reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(5))
        .timeout(SEND_TIMEOUT)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "no HTTP client: alerts are off");
            return;
        }
    };
    let mut file = match RulesFile::load(&path) {
        Ok(file) => file,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "alerts are off");
            return;
        }
    };
    while !shutdown.is_cancelled() {
        if let Some(mut lock) = leadership(&options).await {
            tracing::info!("this replica sends the alerts");
            while !shutdown.is_cancelled() {
                // Still holding it? A lost connection has dropped the lock.
                if sqlx::query("SELECT 1").execute(&mut lock).await.is_err() {
                    tracing::warn!("lost the alert lock's connection; standing by");
                    break;
                }
                file.refresh();
                if let Err(error) = tick(&pool, &client, &file.rules, &shutdown).await {
                    tracing::warn!(error = format!("{error:#}"), "alerts: retrying");
                }
                pause(interval, &shutdown).await;
            }
            let _ = lock.close().await;
        } else {
            pause(interval, &shutdown).await;
        }
    }
}

async fn pause(interval: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(interval) => {}
    }
}

/// A connection holding the sender lock, if this replica got it.
async fn leadership(options: &sqlx::postgres::PgConnectOptions) -> Option<PgConnection> {
    let mut conn = PgConnection::connect_with(options).await.ok()?;
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SENDER_LOCK)
        .fetch_one(&mut conn)
        .await
        .ok()?;
    held.then_some(conn)
}

/// One round: evaluate, group, send what is due.
async fn tick(
    pool: &PgPool,
    client: &reqwest::Client,
    rules: &[Rule],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    for rule in rules {
        for windows_back in [1, 0] {
            evaluate(pool, rule, windows_back)
                .await
                .with_context(|| format!("rule {}", rule.name))?;
        }
        group(pool, rule).await?;
    }
    send_due(pool, client, rules, shutdown).await
}

/// Records the new crossings of `rule` in the window `back` windows before the current one.
async fn evaluate(pool: &PgPool, rule: &Rule, back: i32) -> anyhow::Result<()> {
    let (low, high) = rule.consumer.map_or((0, i64::MAX), |id| (id, id));
    sqlx::query(
        "WITH w AS (
           SELECT (date_trunc($2, now(), $3) AT TIME ZONE $3 - $4::interval * $8) AT TIME ZONE $3
                    AS ws,
                  (date_trunc($2, now(), $3) AT TIME ZONE $3 - $4::interval * ($8 - 1))
                    AT TIME ZONE $3 AS we
         ), u AS (
           SELECT c.consumer_id, sum(c.total) AS usage
           FROM consumer_period_totals c, w
           WHERE c.period_start >= w.ws AND c.period_start < w.we
             AND c.consumer_id BETWEEN $5 AND $6
           GROUP BY c.consumer_id
           HAVING sum(c.total) >= $7::numeric
         )
         INSERT INTO alert_crossings (rule, consumer_id, window_start, usage, threshold)
         SELECT $1, u.consumer_id, w.ws, u.usage, $7::numeric FROM u, w
         ON CONFLICT DO NOTHING",
    )
    .bind(&rule.name)
    .bind(rule.window.name())
    .bind(&rule.tz)
    .bind(rule.window.step())
    .bind(low)
    .bind(high)
    .bind(rule.threshold.to_string())
    .bind(back)
    .execute(pool)
    .await
    .context("evaluate")?;
    Ok(())
}

/// Groups `rule`'s crossings that no delivery carries yet into deliveries, per window.
async fn group(pool: &PgPool, rule: &Rule) -> anyhow::Result<()> {
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(i64, String, String, f64, String)> = sqlx::query_as(
            "WITH first AS (
               SELECT window_start FROM alert_crossings
               WHERE rule = $1 AND delivery IS NULL ORDER BY window_start LIMIT 1
             )
             SELECT c.consumer_id, c.usage::text,
                    to_char(c.crossed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    extract(epoch FROM c.window_start)::float8, c.window_start::text
             FROM alert_crossings c JOIN first USING (window_start)
             WHERE c.rule = $1 AND c.delivery IS NULL
             ORDER BY c.consumer_id LIMIT $2 FOR UPDATE OF c",
        )
        .bind(&rule.name)
        .bind(PER_DELIVERY)
        .fetch_all(&mut *tx)
        .await?;
        let Some((_, _, _, start, exact_start)) = rows.first().cloned() else {
            return Ok(());
        };
        let start = start.floor() as i64;
        let crossings: Vec<_> = rows
            .iter()
            .map(|(id, usage, at, _, _)| {
                json!({"consumer_id": id, "usage": crate::value::total(usage), "crossed_at": at})
            })
            .collect();
        let body = json!({
            "rule": rule.name,
            "consumer": rule.consumer.map_or(json!("all"), |id| json!(id)),
            "window": rule.window.name(),
            "tz": rule.tz,
            "window_start": crate::window::rfc3339(start, 0),
            "threshold": crate::value::total(&rule.threshold.to_string()),
            "crossings": crossings,
        })
        .to_string();
        let mut key = [0u8; 16];
        getrandom::getrandom(&mut key).context("no randomness for a key")?;
        let key = crate::console::session::hex(&key);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO alert_deliveries (rule, window_start, idempotency_key, body)
             VALUES ($1, $2::timestamptz, $3, $4) RETURNING id",
        )
        .bind(&rule.name)
        .bind(&exact_start)
        .bind(&key)
        .bind(&body)
        .fetch_one(&mut *tx)
        .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let marked = sqlx::query(
            "UPDATE alert_crossings SET delivery = $1
             WHERE rule = $2 AND window_start = $3::timestamptz AND consumer_id = ANY($4)",
        )
        .bind(id)
        .bind(&rule.name)
        .bind(&exact_start)
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        anyhow::ensure!(
            marked == ids.len() as u64,
            "grouping marked {marked} of {} crossings",
            ids.len()
        );
        tx.commit().await?;
    }
}

/// Posts the deliveries that are due, in order, at a bounded rate.
async fn send_due(
    pool: &PgPool,
    client: &reqwest::Client,
    rules: &[Rule],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let due: Vec<(i64, String, String, String, i32)> = sqlx::query_as(
        "SELECT id, rule, idempotency_key, body, attempts FROM alert_deliveries
         WHERE delivered_at IS NULL AND next_attempt_at <= now()
         ORDER BY id LIMIT 50",
    )
    .fetch_all(pool)
    .await?;
    for (id, name, key, body, attempts) in due {
        if shutdown.is_cancelled() {
            break;
        }
        let Some(rule) = rules.iter().find(|r| r.name == name) else {
            // Its rule was removed: kept, sent if the rule comes back.
            continue;
        };
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sent = client
            .post(&rule.url)
            .header("content-type", "application/json")
            .header("idempotency-key", &key)
            .header("x-tally-rule", &rule.name)
            .header(
                "x-tally-signature",
                rules::signature(&rule.secret, at, &body),
            )
            .body(body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("HTTP {}", response.status().as_u16())),
            Err(error) => Some(error.without_url().to_string()),
        };
        match failure {
            None => {
                sqlx::query(
                    "UPDATE alert_deliveries
                     SET delivered_at = now(), attempts = attempts + 1, last_error = NULL
                     WHERE id = $1",
                )
                .bind(id)
                .execute(pool)
                .await?;
                tracing::info!(rule = name, delivery = id, "alert delivered");
            }
            Some(error) => {
                let delay = 2f64.powi(attempts.min(9)).min(300.0);
                sqlx::query(
                    "UPDATE alert_deliveries
                     SET attempts = attempts + 1, last_error = $2,
                         next_attempt_at = now() + make_interval(secs => $3)
                     WHERE id = $1",
                )
                .bind(id)
                .bind(&error)
                .bind(delay)
                .execute(pool)
                .await?;
                tracing::warn!(
                    rule = name,
                    delivery = id,
                    error,
                    retry_in_s = delay,
                    "alert not delivered"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(1000 / SENDS_PER_SECOND)).await;
    }
    Ok(())
}
