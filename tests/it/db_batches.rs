//! How the db-client cuts its input into batches: by the memory a batch takes once decoded
//! (`--memory-max`, `--batch-bytes-max`), counted from each record's first bytes before it is
//! decoded, never past the share (a record heavier alone is a batch of its own). And the
//! sessions a batch is written with: open and ready before the first batch.

use std::time::Duration;

use tally_db_client::batch::PAIR_BYTES;

use crate::support::Pipeline;
use tally_testkit::{eventually, holds};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Consumers per database transaction of the totals, from their rows' `xmin` (each consumer of
/// the test's one file is written once, so its row's `xmin` is its batch's transaction).
async fn consumers_per_transaction(p: &Pipeline) -> Vec<i64> {
    sqlx::query_scalar("SELECT count(*) FROM consumer_totals GROUP BY xmin::text ORDER BY 1")
        .fetch_all(&p.pool)
        .await
        .unwrap()
}

/// The sums of `files` files of about 90k consumers each (one unit each), parsed by a parser
/// that is stopped once they are all in Kafka; their expected totals.
async fn parsed(p: &mut Pipeline, files: u32, seed: u64) -> std::collections::HashMap<i64, i128> {
    let (files, expected) = p.generate(files, 3_000_000, 100_000, seed).await;
    let mut parser = p.spawn("parser", &p.parser_args("a"));
    p.publish("100000000", &files).await;
    p.wait_files_consumed(TIMEOUT).await;
    assert!(parser.terminate(Duration::from_secs(20)), "parser stops");
    expected
}

#[tokio::test(flavor = "multi_thread")]
async fn a_db_client_batch_holds_no_more_consumers_than_its_memory_share() {
    let mut p = Pipeline::new("dbbatch").await;
    // One unit of about 90k consumers: the parser sends them as one record of at most 20,000
    // pairs per partition and part (six partitions).
    let expected = parsed(&mut p, 1, 71).await;

    // Two records' pairs fit the share, three do not.
    let share = 40_000 * PAIR_BYTES;
    let _db = p.spawn(
        "db-client",
        &[
            "db-client",
            "--writers",
            "1",
            "--batch-bytes-max",
            &share.to_string(),
        ],
    );
    p.wait_ingested(1, TIMEOUT).await;
    p.assert_totals(&expected, "batches cut by memory").await;
    let batches = consumers_per_transaction(&p).await;
    assert!(
        batches.len() >= 3,
        "{} consumers in {batches:?} transactions: the share did not cut the input",
        expected.len()
    );
    let largest = *batches.last().unwrap() as u64;
    assert!(
        largest * PAIR_BYTES <= share,
        "a batch of {largest} consumers outgrew its share of {share} bytes: {batches:?}"
    );
}

/// The db-client's interval (`--batch-wait-ms`) bounds its wait for more, not its reading of
/// what is there: a transaction upstream whose records come one small fetch at a time, for
/// longer than the interval, is written in one database transaction, not cut into several
/// (each but the first waiting for the one before to be written).
#[tokio::test(flavor = "multi_thread")]
async fn a_db_client_batch_reads_past_its_interval_to_the_end_of_its_input() {
    let mut p = Pipeline::new("dbthrough").await;
    // Two units of about 90k consumers: six sums records and six end markers each, all of the
    // same moment (the parser is done before the db-client starts).
    let expected = parsed(&mut p, 2, 73).await;

    // One record batch per fetch, and an interval of 1 ms: the input takes many intervals to
    // read.
    let _db = p.spawn(
        "db-client",
        &[
            "db-client",
            "--writers",
            "1",
            "--batch-wait-ms",
            "1",
            "-X",
            "message.max.bytes=1000",
            "-X",
            "fetch.max.bytes=1000",
            "-X",
            "max.partition.fetch.bytes=1",
        ],
    );
    p.wait_ingested(2, TIMEOUT).await;
    p.assert_totals(&expected, "batches read to the end").await;
    let batches = consumers_per_transaction(&p).await;
    assert_eq!(
        batches.len(),
        1,
        "{} consumers in {batches:?} transactions: the interval cut the batch",
        expected.len()
    );
}

/// The db-client opens every session it writes with at its start, each with its staging
/// tables and with this month's and the next month's period partitions made: its first batch
/// after a start waits for none of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_db_client_readies_its_sessions_before_its_first_batch() {
    let mut p = Pipeline::new("dbready").await;
    let _db = p.spawn("db-client", &["db-client", "--writers", "3"]);
    let pool = p.pool.clone();
    eventually(
        TIMEOUT,
        "3 writers' sessions and one more, each with its staging tables, and the partitions",
        || async {
            // Each session's temporary tables live in a schema of its own.
            let sessions: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT relnamespace) FROM pg_class
                 WHERE relname = 'tally_staging' AND relpersistence = 't'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let months: Vec<Option<String>> = sqlx::query_scalar(
                "SELECT to_regclass('consumer_period_totals_'
                     || to_char(date_trunc('month', now() AT TIME ZONE 'UTC') + m, 'YYYY_MM'))::text
                 FROM (VALUES (interval '0'), (interval '1 month')) AS v(m)",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            holds(sessions == 4 && months.iter().all(Option::is_some), || {
                format!("{sessions} sessions ready, partitions {months:?}")
            })
        },
    )
    .await;
    let batches = consumers_per_transaction(&p).await;
    assert!(batches.is_empty(), "nothing written yet: {batches:?}");
}
