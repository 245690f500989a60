//! How the db-client cuts its input into batches: by the memory a batch takes once decoded
//! (`--memory-max`, `--batch-bytes-max`), counted from each record's first bytes before it is
//! decoded, never past the share (a record heavier alone is a batch of its own).

use std::time::Duration;

use tally_db_client::batch::PAIR_BYTES;

use crate::support::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Consumers per database transaction of the totals, from their rows' `xmin` (each consumer of
/// the test's one file is written once, so its row's `xmin` is its batch's transaction).
async fn consumers_per_transaction(p: &Pipeline) -> Vec<i64> {
    sqlx::query_scalar("SELECT count(*) FROM consumer_totals GROUP BY xmin::text ORDER BY 1")
        .fetch_all(&p.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_db_client_batch_holds_no_more_consumers_than_its_memory_share() {
    let mut p = Pipeline::new("dbbatch").await;
    // One unit of about 90k consumers: the parser sends them as one record of at most 20,000
    // pairs per partition and part (six partitions).
    let (files, expected) = p.generate(1, 3_000_000, 100_000, 71).await;
    let mut parser = p.spawn("parser", &p.parser_args("a"));
    p.publish("100000000", &files).await;
    p.wait_files_consumed(TIMEOUT).await;
    assert!(parser.terminate(Duration::from_secs(20)), "parser stops");

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
