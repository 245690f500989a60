//! The monthly partitions of `consumer_period_history`: created on demand (and the next month
//! ahead) by concurrent callers, recreated after a month is dropped, and refused with a clear
//! error while a month is detached.

use sqlx::postgres::PgPoolOptions;
use tally_core::schema;
use tally_db_client::copy;

/// 2026-10-31T23:30:00Z and 2026-12-15T00:00:00Z.
const OCT_31: i64 = 1_793_489_400;
const DEC_15: i64 = 1_797_292_800;

async fn months(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'consumer_period_history'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn months_are_created_on_demand_and_a_detached_one_is_refused() {
    let url = tally_testkit::services().fresh_database("partitions").await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    schema::migrate(&pool).await.unwrap();
    // Eight callers at once, as db-client writers and instances would.
    let calls = (0..8).map(|_| copy::ensure_partitions(&pool, &[OCT_31, DEC_15]));
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    let name = |m: &str| format!("consumer_period_totals_{m}");
    assert_eq!(
        months(&pool).await,
        ["2026_10", "2026_11", "2026_12", "2027_01"].map(name)
    );
    // A row lands in its month.
    sqlx::query(
        "INSERT INTO consumer_period_totals (consumer_id, period_start, total)
         VALUES (1, to_timestamp($1), 5)",
    )
    .bind(OCT_31)
    .execute(&pool)
    .await
    .unwrap();
    let there: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_period_totals_2026_10")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(there, 1);

    // Detached (to archive it): refused, naming the table.
    sqlx::query(
        "ALTER TABLE consumer_period_history DETACH PARTITION consumer_period_totals_2026_10",
    )
    .execute(&pool)
    .await
    .unwrap();
    let error = copy::ensure_partitions(&pool, &[OCT_31]).await.unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains("consumer_period_totals_2026_10") && text.contains("detached"),
        "{text}"
    );
    // Dropped: created again.
    sqlx::query("DROP TABLE consumer_period_totals_2026_10")
        .execute(&pool)
        .await
        .unwrap();
    copy::ensure_partitions(&pool, &[OCT_31]).await.unwrap();
    assert!(months(&pool).await.contains(&name("2026_10")));
}
