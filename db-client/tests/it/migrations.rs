use sqlx::postgres::PgPoolOptions;
use tally_core::schema;

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_are_idempotent() {
    let services = tally_testkit::services();
    let url = services.fresh_database("migrations").await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect");

    schema::migrate(&pool).await.expect("first run");
    schema::migrate(&pool).await.expect("second run is a no-op");

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .expect("count migrations");
    assert_eq!(applied as usize, schema::MIGRATOR.iter().count());

    for table in [
        "consumer_totals",
        "kafka_offsets",
        "ingested_units",
        "ingested_files",
    ] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&pool)
            .await
            .expect("to_regclass");
        assert!(exists, "table {table} missing after migrate");
    }

    // Totals are NUMERIC: adding past the 64-bit range must neither fail nor wrap.
    for _ in 0..3 {
        sqlx::query(
            "INSERT INTO consumer_totals (consumer_id, total) VALUES (1, $1)
             ON CONFLICT (consumer_id) DO UPDATE SET total = consumer_totals.total + EXCLUDED.total",
        )
        .bind(i64::MAX)
        .execute(&pool)
        .await
        .expect("upsert");
    }
    let total: String =
        sqlx::query_scalar("SELECT total::text FROM consumer_totals WHERE consumer_id = 1")
            .fetch_one(&pool)
            .await
            .expect("read total");
    assert_eq!(total, (i64::MAX as i128 * 3).to_string());
}
