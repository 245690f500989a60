//! tally-core: the IO machinery every stage shares, and nothing stage-specific. The model
//! (records, identity, ranges, periods, sums) is in tally-model, free of IO clients.
//!
//! - [`args`]: clap argument groups (Kafka, database, telemetry) flattened into every subcommand,
//!   so that an env var means the same thing everywhere;
//! - [`topics`]: topic names and consumer-group ids, derived from one prefix;
//! - [`kafka`]: librdkafka client configuration, topic creation, transaction error classes;
//! - [`consume`]: the one consume loop of every consuming stage, with a pluggable commit;
//!   [`txn`]: Kafka transactions as that commit (parser, aggregator);
//! - [`rebalance`]: rebalance events recorded for a stage loop to act on between polls;
//! - [`liveness`]: the watchdog on progress every long-running stage reports to, and which
//!   client errors are a broker outage rather than a failure;
//! - [`metrics`]: every exported metric, declared once; [`http`]: `/metrics`, `/livez`,
//!   `/readyz` of a long-running process (`--http-addr`);
//! - [`server`]: the public HTTP servers' accept loop with connection bounds, TLS and bearer
//!   tokens (`producer serve`, `api`);
//! - [`backlog`]: what a consumer group has not finished on a topic (lag, in records or bytes);
//! - [`schema`]: the database migrations (`migrations/`), applied by the db-client and
//!   standalone at start-up and by `tally migrate`/`init`;
//! - [`redact`]: secrets redacted at the source and scrubbed from every line written;
//! - [`telemetry`]: tracing set-up; [`shutdown`]: SIGINT/SIGTERM to a cancellation token.
//!
//! Stage crates (`producer`, `parser`, `aggregator`, `db-client`, `api`) depend on this crate and never
//! on each other: Kafka topics are their only coupling.

pub mod args;
pub mod backlog;
pub mod backoff;
pub mod consume;
pub mod http;
pub mod kafka;
pub mod liveness;
pub mod metrics;
pub mod rebalance;
pub mod redact;
pub mod schema;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod topics;
pub mod txn;

pub use args::{DatabaseArgs, KafkaArgs, LivenessArgs, TelemetryArgs};
pub use topics::Topics;
