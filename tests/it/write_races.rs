//! A db-client batch's statements against other writers of the same keys at the same moment
//! (`tally rollup`, a db-client on the other input topic): every sum is added or the batch
//! fails and is written again.

use std::time::Duration;

use crate::support::Pipeline;

/// A db-client batch's partition locks keep other batches off its keys, but `tally rollup` (or
/// a db-client on the other input topic) can still add the same key, or delete the row the
/// batch adds to, at that very moment. Either way no sum may be lost: the batch's statements
/// add its rows or fail (and the batch is written again), never leave one out. The guard for
/// any other form of the statements (a `MERGE` fails on such a race where `ON CONFLICT`
/// waits it out; docs/benchmarks.md); with `ON CONFLICT DO NOTHING` in their place: red; with
/// the check of the rows the update-then-insert form wrote left out: red.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_meeting_a_concurrent_writer_of_its_keys_adds_everything_or_fails() {
    use tally_db_client::copy;
    let p = Pipeline::new("merge-race").await;
    let start = 1_798_761_600; // 2027-01-01T00:00:00Z, an hour and a day start
    copy::ensure_partitions(&p.pool, &[start]).await.unwrap();
    // One consumer's sum of a `SELECT …::bigint … WHERE consumer_id = $1` (0 without rows).
    let sum_of = |sql: &'static str, id: i64| {
        let pool = p.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<i64>>(sql)
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .flatten()
                .unwrap_or(0)
        }
    };
    let period_total = |id: i64| {
        sum_of(
            "SELECT sum(total)::bigint FROM consumer_period_totals WHERE consumer_id = $1",
            id,
        )
    };
    let running_total = |id: i64| {
        sum_of(
            "SELECT total::bigint FROM consumer_totals WHERE consumer_id = $1",
            id,
        )
    };
    // A batch of consumer `id` adding 7, retried until it commits, as the db-client does,
    // started while `other` holds its uncommitted change, which commits 500 ms later; returns
    // the errors of the attempts that failed.
    let race = |other: sqlx::Transaction<'static, sqlx::Postgres>, id: i64| {
        let pool = p.pool.clone();
        let batch = tokio::spawn(async move {
            let mut failed = Vec::new();
            loop {
                let mut tx = pool.begin().await.unwrap();
                let attempt = async {
                    copy::upsert_totals(&mut tx, &[(id, 7)], false).await?;
                    copy::upsert_period_totals(&mut tx, &[((id, start), 7)], false).await
                }
                .await;
                match attempt {
                    Ok(()) => {
                        tx.commit().await.unwrap();
                        return failed;
                    }
                    Err(error) => failed.push(format!("{error:#}")),
                }
                assert!(failed.len() < 5, "{failed:?}");
            }
        });
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            other.commit().await.unwrap();
            batch.await.unwrap()
        }
    };

    // 1. Another writer inserts the same keys (5) and commits while the batch waits on them.
    let mut other = p.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO consumer_totals (consumer_id, total) VALUES (1, 5)")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO consumer_period_history (consumer_id, period_start, total)
         VALUES (1, to_timestamp($1), 5)",
    )
    .bind(start as f64)
    .execute(&mut *other)
    .await
    .unwrap();
    let failed = race(other, 1).await;
    assert_eq!(
        running_total(1).await,
        12,
        "attempts that failed: {failed:?}"
    );
    assert_eq!(
        period_total(1).await,
        12,
        "attempts that failed: {failed:?}"
    );

    // 2. Another writer deletes the row the batch adds to, moving its 3 to another key (as a
    //    rollup folds a fine row into a coarse one), and commits while the batch waits.
    sqlx::query(
        "INSERT INTO consumer_period_history (consumer_id, period_start, total)
         VALUES (2, to_timestamp($1), 3)",
    )
    .bind(start as f64)
    .execute(&p.pool)
    .await
    .unwrap();
    let mut other = p.pool.begin().await.unwrap();
    sqlx::query(
        "WITH gone AS (DELETE FROM consumer_period_history WHERE consumer_id = 2 RETURNING total)
         INSERT INTO consumer_period_history (consumer_id, period_start, total)
         SELECT 2, to_timestamp($1) + interval '1 day', total FROM gone",
    )
    .bind(start as f64)
    .execute(&mut *other)
    .await
    .unwrap();
    let failed = race(other, 2).await;
    assert_eq!(
        period_total(2).await,
        10,
        "attempts that failed: {failed:?}"
    );
    assert_eq!(
        running_total(2).await,
        7,
        "attempts that failed: {failed:?}"
    );

    // 3. Another writer deletes the totals row the batch adds to, and commits while the batch
    //    waits for its lock: the batch's UPDATE then passes the row by, and the batch must
    //    insert it anew (its statements see the row gone and fail; the batch is written again).
    sqlx::query("INSERT INTO consumer_totals (consumer_id, total) VALUES (3, 4)")
        .execute(&p.pool)
        .await
        .unwrap();
    let mut other = p.pool.begin().await.unwrap();
    sqlx::query("DELETE FROM consumer_totals WHERE consumer_id = 3")
        .execute(&mut *other)
        .await
        .unwrap();
    let failed = race(other, 3).await;
    assert_eq!(
        running_total(3).await,
        7,
        "attempts that failed: {failed:?}"
    );
}
