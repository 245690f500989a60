//! Every metric tally exports, declared and described here and nowhere else.
//!
//! Names follow `tally_<stage>_<noun>_<unit>[_total]`. Labels are small closed sets (a reason,
//! an outcome, a partition number): never a consumer id, a path or a file name. Stages record
//! per batch or per unit, never per line, so the parse loop pays nothing. Without
//! `--http-addr` no recorder is installed and every call is a no-op.
//!
//! Metrics shared by the stages that consume a topic (transaction or batch durations,
//! rebalances, retries, consumer lag) exist once per stage, looked up with [`stage`].

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Lines parsed (good and bad).
pub const PARSER_LINES: &str = "tally_parser_lines_total";
/// Bad lines, by `reason`.
pub const PARSER_BAD_LINES: &str = "tally_parser_bad_lines_total";
/// Work units finished, by `outcome` (`summed`, `rejected`, `skipped`).
pub const PARSER_UNITS: &str = "tally_parser_units_total";
/// Bytes of work units summed.
pub const PARSER_BYTES: &str = "tally_parser_bytes_total";
/// Sums records written to the sums topic.
pub const PARSER_SUMS_RECORDS: &str = "tally_parser_sums_records_total";
/// Dead letters written, by `kind` (`line`, `summary`, `unit`).
pub const PARSER_DEAD_LETTERS: &str = "tally_parser_dead_letters_total";
/// Sums records read by the aggregator.
pub const AGGREGATOR_RECORDS_IN: &str = "tally_aggregator_records_in_total";
/// Totals records written by the aggregator.
pub const AGGREGATOR_RECORDS_OUT: &str = "tally_aggregator_records_out_total";
/// Kafka records applied to PostgreSQL by the db-client.
pub const DB_CLIENT_RECORDS: &str = "tally_db_client_records_total";
/// Rows upserted into `consumer_totals`.
pub const DB_CLIENT_ROWS_UPSERTED: &str = "tally_db_client_rows_upserted_total";
/// Files announced by `producer watch`.
pub const PRODUCER_FILES: &str = "tally_producer_files_announced_total";
/// Work units announced.
pub const PRODUCER_UNITS: &str = "tally_producer_units_announced_total";
/// Bytes announced.
pub const PRODUCER_BYTES: &str = "tally_producer_bytes_announced_total";
/// Files whose name held no time under `--file-time-from name:…` (their mtime counted).
pub const PRODUCER_FILE_TIME_FALLBACKS: &str = "tally_producer_file_time_fallbacks_total";
/// Files refused for a time outside `--file-time-max-age`/`--file-time-max-ahead` (never counted).
pub const PRODUCER_FILES_REFUSED: &str = "tally_producer_files_refused_total";
/// Uploads finished by `producer serve`, by `token` name and `outcome` (announced, repeated).
pub const PRODUCER_INGEST_UPLOADS: &str = "tally_producer_ingest_uploads_total";
/// Bytes received by `producer serve`, by `token` name.
pub const PRODUCER_INGEST_BYTES: &str = "tally_producer_ingest_bytes_total";
/// Requests `producer serve` refused, by `status` code.
pub const PRODUCER_INGEST_REFUSED: &str = "tally_producer_ingest_refused_total";
/// Change events `tally api` sent to `/v1/changes` followers.
pub const API_CHANGE_EVENTS: &str = "tally_api_change_events_total";
/// Reads of the top consumers from PostgreSQL by `tally api` (`/v1/top`; concurrent requests
/// share one).
pub const API_TOP_READS: &str = "tally_api_top_reads_total";

/// The metrics every long-running stage has, under its own prefix.
#[derive(Debug)]
pub struct StageMetrics {
    /// Duration of one batch's transaction (Kafka or PostgreSQL), a histogram in seconds.
    pub batch_seconds: &'static str,
    /// Rebalances that assigned or revoked partitions.
    pub rebalances: &'static str,
    /// Retries of a failed batch or step (transaction aborts, database retries).
    pub retries: &'static str,
    /// Consumer lag per input `partition`, from librdkafka's statistics.
    pub lag: &'static str,
}

const PARSER: StageMetrics = StageMetrics {
    batch_seconds: "tally_parser_transaction_duration_seconds",
    rebalances: "tally_parser_rebalances_total",
    retries: "tally_parser_retries_total",
    lag: "tally_parser_consumer_lag_records",
};
const AGGREGATOR: StageMetrics = StageMetrics {
    batch_seconds: "tally_aggregator_transaction_duration_seconds",
    rebalances: "tally_aggregator_rebalances_total",
    retries: "tally_aggregator_retries_total",
    lag: "tally_aggregator_consumer_lag_records",
};
const DB_CLIENT: StageMetrics = StageMetrics {
    batch_seconds: "tally_db_client_batch_duration_seconds",
    rebalances: "tally_db_client_rebalances_total",
    retries: "tally_db_client_retries_total",
    lag: "tally_db_client_consumer_lag_records",
};
const PRODUCER: StageMetrics = StageMetrics {
    batch_seconds: "tally_producer_announce_duration_seconds",
    rebalances: "tally_producer_rebalances_total",
    retries: "tally_producer_retries_total",
    lag: "tally_producer_consumer_lag_records",
};
const ALL: [&StageMetrics; 4] = [&PARSER, &AGGREGATOR, &DB_CLIENT, &PRODUCER];

/// The shared metrics of `stage` (a stage name as the stages log it).
pub fn stage(stage: &str) -> &'static StageMetrics {
    match stage {
        "parser" => &PARSER,
        "aggregator" => &AGGREGATOR,
        "db-client" => &DB_CLIENT,
        _ => &PRODUCER,
    }
}

/// The unlabelled counters of `stage` (a stage name as the stages log it).
pub fn counters(stage: &str) -> Vec<&'static str> {
    if stage == "api" {
        // No consumer group, no Kafka transactions: no rebalances or retries.
        return vec![API_CHANGE_EVENTS, API_TOP_READS];
    }
    let own: &[&'static str] = match stage {
        "parser" => &[PARSER_LINES, PARSER_BYTES, PARSER_SUMS_RECORDS],
        "aggregator" => &[AGGREGATOR_RECORDS_IN, AGGREGATOR_RECORDS_OUT],
        "db-client" => &[DB_CLIENT_RECORDS, DB_CLIENT_ROWS_UPSERTED],
        _ => &[PRODUCER_FILES, PRODUCER_UNITS, PRODUCER_BYTES],
    };
    let shared = self::stage(stage);
    own.iter()
        .copied()
        .chain([shared.rebalances, shared.retries])
        .collect()
}

/// Installs the Prometheus recorder (once per process) and returns its handle. The unlabelled
/// counters of `stage` are exported at zero from the start: a scrape of a stage that has not
/// worked yet (just started, or restarted after a crash) sees its series, not an empty page.
pub fn install(stage: &str) -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ],
        )?
        // A partition that moved to another instance stops being reported here.
        .idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(std::time::Duration::from_secs(60)),
        )
        .install_recorder()?;
    describe();
    for name in counters(stage) {
        metrics::counter!(name).increment(0);
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    describe_counter!(PARSER_LINES, "Lines parsed, good and bad.");
    describe_counter!(PARSER_BAD_LINES, "Bad lines, by reason.");
    describe_counter!(
        PARSER_UNITS,
        "Work units finished, by outcome (summed, rejected, skipped)."
    );
    describe_counter!(PARSER_BYTES, Unit::Bytes, "Bytes of work units summed.");
    describe_counter!(PARSER_SUMS_RECORDS, "Sums records written.");
    describe_counter!(
        PARSER_DEAD_LETTERS,
        "Dead letters written, by kind (line, summary, unit)."
    );
    describe_counter!(AGGREGATOR_RECORDS_IN, "Sums records read.");
    describe_counter!(AGGREGATOR_RECORDS_OUT, "Totals records written.");
    describe_counter!(DB_CLIENT_RECORDS, "Kafka records applied to PostgreSQL.");
    describe_counter!(
        DB_CLIENT_ROWS_UPSERTED,
        "Rows upserted into consumer_totals."
    );
    describe_counter!(PRODUCER_FILES, "Files announced.");
    describe_counter!(PRODUCER_UNITS, "Work units announced.");
    describe_counter!(PRODUCER_BYTES, Unit::Bytes, "Bytes announced.");
    describe_counter!(
        PRODUCER_FILE_TIME_FALLBACKS,
        "Files whose name held no time under --file-time-from name:…; their mtime counted."
    );
    describe_counter!(
        PRODUCER_FILES_REFUSED,
        "Files refused for a time outside the accepted window; never counted."
    );
    describe_counter!(
        PRODUCER_INGEST_UPLOADS,
        "Uploads finished by producer serve, by token name and outcome."
    );
    describe_counter!(
        PRODUCER_INGEST_BYTES,
        Unit::Bytes,
        "Bytes received by producer serve, by token name."
    );
    describe_counter!(
        PRODUCER_INGEST_REFUSED,
        "Requests producer serve refused, by status code."
    );
    describe_counter!(
        API_CHANGE_EVENTS,
        "Change events sent to /v1/changes followers."
    );
    describe_counter!(
        API_TOP_READS,
        "Reads of the top consumers from PostgreSQL (/v1/top); concurrent requests share one."
    );
    for m in ALL {
        describe_histogram!(
            m.batch_seconds,
            Unit::Seconds,
            "Duration of one batch's transaction."
        );
        describe_counter!(m.rebalances, "Partition assignments and revocations.");
        describe_counter!(m.retries, "Retries of a failed batch or step.");
        describe_gauge!(
            m.lag,
            "Records not yet consumed, per input partition (librdkafka statistics)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric name in this file: the test reads the source, so a metric added here
    /// is checked whether or not anyone remembers to list it.
    fn declared() -> Vec<&'static str> {
        let source = include_str!("metrics.rs");
        let mut names: Vec<&str> = source
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("tally_") && !s.contains(' '))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    #[test]
    fn names_follow_the_convention() {
        let names = declared();
        assert!(names.len() >= 30, "{names:?}");
        for m in ALL {
            for name in [m.batch_seconds, m.rebalances, m.retries, m.lag] {
                assert!(names.contains(&name), "{name}");
            }
        }
        for name in names {
            let rest = name.strip_prefix("tally_").expect(name);
            let stage = ["parser_", "aggregator_", "db_client_", "producer_", "api_"]
                .iter()
                .find(|s| rest.starts_with(**s));
            assert!(stage.is_some(), "{name}: no stage");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                "{name}"
            );
            let counter = name.ends_with("_total");
            let unit = ["_seconds", "_records", "_bytes_total"]
                .iter()
                .any(|u| name.ends_with(u));
            assert!(counter || unit, "{name}: no unit or _total");
        }
    }

    #[test]
    fn every_metric_is_in_the_operations_guide() {
        let guide = include_str!("../../docs/operations.md");
        for name in declared() {
            let shared = ALL
                .iter()
                .flat_map(|m| [m.batch_seconds, m.rebalances, m.retries, m.lag])
                .any(|n| n == name);
            let generic = ["parser_", "aggregator_", "db_client_", "producer_"]
                .iter()
                .find_map(|stage| name.strip_prefix("tally_")?.strip_prefix(stage))
                .map(|rest| format!("`tally_<stage>_{rest}`"));
            let listed = guide.contains(&format!("`{name}`"))
                || (shared && generic.is_some_and(|g| guide.contains(&g)));
            assert!(listed, "{name} is not in docs/operations.md");
        }
    }
}
