//! One batch against a real PostgreSQL: a record delivered twice in the same batch (a replay
//! after a revoke and re-assign inside one collection window) is applied once, and so is one
//! below the stored offset; a partition whose first new record lies past the stored offset
//! with the records in between gone from the log is a gap, and nothing is written. A batch's
//! period deltas reach the change log as events of at most 1,000 consumers, exactly.

use std::collections::HashSet;

use rdkafka::message::{OwnedHeaders, OwnedMessage, Timestamp};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tally_core::schema;
use tally_db_client::batch::{self, Checks, Gaps};
use tally_model::messages::SumsRecord;

const TOPIC: &str = "t.sums";

fn record(partition: i32, offset: i64, sums: Vec<(i64, i64)>) -> OwnedMessage {
    period_record(partition, offset, None, sums)
}

/// A sums record of `period` (its start, Unix seconds; `None`: running totals only).
fn period_record(
    partition: i32,
    offset: i64,
    period: Option<i64>,
    sums: Vec<(i64, i64)>,
) -> OwnedMessage {
    OwnedMessage::new(
        Some(serde_json::to_vec(&SumsRecord::Sums { period, sums }).unwrap()),
        None,
        TOPIC.to_owned(),
        Timestamp::NotAvailable,
        partition,
        offset,
        Some(OwnedHeaders::new()),
    )
}

/// No gap anywhere: every partition's log starts at 0.
fn no_gap(_partition: i32) -> anyhow::Result<i64> {
    Ok(0)
}

/// The checks of a batch with no gap and none accepted, the change log on.
fn plain_checks(accepted: &HashSet<(i32, i64)>) -> Checks<'_> {
    Checks {
        log_start: &no_gap,
        accepted,
        log_changes: true,
    }
}

async fn database(what: &str) -> PgPool {
    let url = tally_testkit::services().fresh_database(what).await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    schema::migrate(&pool).await.unwrap();
    pool
}

async fn total(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT total::text FROM consumer_totals WHERE consumer_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_record_delivered_twice_in_one_batch_counts_once() {
    let pool = database("batch_dedupe").await;
    let accepted = HashSet::new();
    let checks = plain_checks(&accepted);
    let first = [record(0, 0, vec![(1, 10)]), record(0, 1, vec![(1, 5)])];
    batch::apply(&pool, TOPIC, &first, &checks).await.unwrap();
    // Offsets 2 and 3 are new; the consumer then replays from 1 (below the stored offset)
    // and delivers 2 and 3 again within the same batch.
    let second = [
        record(0, 2, vec![(1, 100)]),
        record(0, 3, vec![(1, 1000)]),
        record(0, 1, vec![(1, 5)]),
        record(0, 2, vec![(1, 100)]),
        record(0, 3, vec![(1, 1000)]),
    ];
    let applied = batch::apply(&pool, TOPIC, &second, &checks).await.unwrap();
    assert_eq!((applied.records, applied.skipped), (2, 3));
    assert_eq!(total(&pool, 1).await, "1115");
}

#[tokio::test]
async fn a_gap_writes_nothing_unless_that_gap_is_accepted() {
    let pool = database("batch_gap").await;
    let none = HashSet::new();
    // Markers and aborted records in between (the log still starts at 0): no gap.
    let log_start = |_| Ok(0);
    let checks = Checks {
        log_start: &log_start,
        accepted: &none,
        log_changes: true,
    };
    batch::apply(&pool, TOPIC, &[record(3, 0, vec![(7, 1)])], &checks)
        .await
        .unwrap();
    batch::apply(&pool, TOPIC, &[record(3, 5, vec![(7, 2)])], &checks)
        .await
        .unwrap();
    assert_eq!(total(&pool, 7).await, "3");

    // Offsets 6..40 were deleted: the log starts at 40.
    let log_start = |_| Ok(40);
    let checks = Checks {
        log_start: &log_start,
        accepted: &none,
        log_changes: true,
    };
    let error = batch::apply(&pool, TOPIC, &[record(3, 40, vec![(7, 4)])], &checks)
        .await
        .unwrap_err();
    let gaps = error.downcast_ref::<Gaps>().expect("a gap");
    assert_eq!(
        (
            gaps.gaps[0].partition,
            gaps.gaps[0].stored,
            gaps.gaps[0].log_start
        ),
        (3, 6, 40)
    );
    assert!(error.to_string().contains("--accept-gap 3:6"), "{error}");
    assert_eq!(total(&pool, 7).await, "3", "nothing written past a gap");

    // Another gap than the accepted one still stops; that one goes on.
    let other = HashSet::from([(3, 5)]);
    let checks = Checks {
        log_start: &log_start,
        accepted: &other,
        log_changes: true,
    };
    assert!(
        batch::apply(&pool, TOPIC, &[record(3, 40, vec![(7, 4)])], &checks)
            .await
            .is_err()
    );
    let this = HashSet::from([(3, 6)]);
    let checks = Checks {
        log_start: &log_start,
        accepted: &this,
        log_changes: true,
    };
    batch::apply(&pool, TOPIC, &[record(3, 40, vec![(7, 4)])], &checks)
        .await
        .unwrap();
    assert_eq!(total(&pool, 7).await, "7");
}

#[tokio::test]
async fn totals_of_any_size_and_sign_go_through_copy_exactly() {
    let pool = database("batch_copy").await;
    let accepted = HashSet::new();
    let checks = plain_checks(&accepted);
    let values: Vec<i64> = vec![
        0,
        1,
        -1,
        9_999,
        10_000,
        -10_000,
        100_000_000,
        123_456_789,
        i64::MAX,
        i64::MIN + 1,
    ];
    // Each value as its own consumer; consumer 99 gets i64::MAX three times (an i128 total).
    let mut sums: Vec<(i64, i64)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (i as i64, *v))
        .collect();
    sums.extend([(99, i64::MAX), (99, i64::MAX), (99, i64::MAX)]);
    batch::apply(&pool, TOPIC, &[record(0, 0, sums)], &checks)
        .await
        .unwrap();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(total(&pool, i as i64).await, v.to_string(), "consumer {i}");
    }
    assert_eq!(
        total(&pool, 99).await,
        (3 * i128::from(i64::MAX)).to_string()
    );
    // Added to what is there, in a second batch.
    batch::apply(
        &pool,
        TOPIC,
        &[record(0, 1, vec![(5, 10_000), (99, 1)])],
        &checks,
    )
    .await
    .unwrap();
    assert_eq!(total(&pool, 5).await, "0");
    assert_eq!(
        total(&pool, 99).await,
        (3 * i128::from(i64::MAX) + 1).to_string()
    );
}

/// A batch written by concurrent transactions, one per share of its partitions (each on a
/// thread of its own, as the db-client's loop calls it): a share that fails (here: a gap)
/// leaves the others committed, and applying the whole batch again adds only what is missing.
#[test]
fn a_batch_split_over_writers_is_applied_once_after_a_partial_failure() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handle = runtime.handle();
    let timeout = std::time::Duration::from_secs(60);
    let pool = runtime.block_on(database("batch_writers"));
    let mut accepted = HashSet::new();
    // Partition 3's records before offset 5 are gone from the log.
    let log_start = |partition| Ok(if partition == 3 { 5 } else { 0 });
    let first: Vec<_> = (0..4).map(|p| record(p, 0, vec![(p as i64, 1)])).collect();
    let checks = Checks {
        log_start: &log_start,
        accepted: &accepted,
        log_changes: true,
    };
    batch::apply_parallel(handle, timeout, &pool, TOPIC, &first, &checks, 3).unwrap();
    let second: Vec<_> = (0..4)
        .flat_map(|p| {
            [
                record(p, 5, vec![(p as i64, 10)]),
                record(p, 6, vec![(p as i64, 100)]),
            ]
        })
        .collect();
    let error =
        batch::apply_parallel(handle, timeout, &pool, TOPIC, &second, &checks, 3).unwrap_err();
    assert!(error.is::<Gaps>(), "{error:#}");
    // Three writers over partitions 0..4: shares {0, 3}, {1}, {2}. The two shares without
    // partition 3 committed; the one with it wrote nothing.
    for (p, expected) in [(0, "1"), (1, "111"), (2, "111"), (3, "1")] {
        assert_eq!(runtime.block_on(total(&pool, p)), expected, "partition {p}");
    }
    accepted.insert((3, 1));
    let checks = Checks {
        log_start: &log_start,
        accepted: &accepted,
        log_changes: true,
    };
    let applied =
        batch::apply_parallel(handle, timeout, &pool, TOPIC, &second, &checks, 3).unwrap();
    assert_eq!((applied.records, applied.skipped), (4, 4));
    for p in 0..4 {
        assert_eq!(runtime.block_on(total(&pool, p)), "111");
    }
}

#[tokio::test]
async fn a_batch_logs_its_period_deltas_in_events_of_at_most_a_thousand() {
    let pool = database("batch_period_events").await;
    let accepted = HashSet::new();
    let checks = plain_checks(&accepted);
    // 2,500 consumers in 2027-01-01 00:00 UTC, one of them twice and one at i64's edge.
    let start = 1_798_761_600;
    let mut sums: Vec<(i64, i64)> = (1..=2500).map(|id| (id, id * 3)).collect();
    sums.push((7, -1));
    sums[99].1 = i64::MAX;
    let batch = [period_record(0, 0, Some(start), sums)];
    batch::apply(&pool, TOPIC, &batch, &checks).await.unwrap();
    // (size, consumer ids, period starts, deltas)
    type Event = (i32, Vec<i64>, Vec<String>, Vec<String>);
    let events: Vec<Event> = sqlx::query_as(
        "SELECT cardinality(consumer_ids), consumer_ids,
                ARRAY(SELECT to_char(s AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM unnest(period_starts) s),
                deltas::text[]
         FROM tally_changes WHERE deltas IS NOT NULL ORDER BY tx, seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let sizes: Vec<i32> = events.iter().map(|e| e.0).collect();
    assert_eq!(sizes, [1000, 1000, 500]);
    let ids: Vec<i64> = events.iter().flat_map(|e| e.1.clone()).collect();
    assert_eq!(
        ids,
        (1..=2500).collect::<Vec<_>>(),
        "every consumer once, in order"
    );
    assert!(events
        .iter()
        .all(|e| e.2.iter().all(|s| s == "2027-01-01 00:00")));
    let deltas: Vec<String> = events.iter().flat_map(|e| e.3.clone()).collect();
    assert_eq!(deltas[6], "20", "7 × 3 − 1");
    assert_eq!(deltas[99], i64::MAX.to_string());
    assert_eq!(deltas[2499], "7500");
}
