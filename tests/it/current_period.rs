//! A consumer's current period on its totals row (migration
//! `20261206000001_current_period.sql`): batches of the same period add to it, a newer period
//! moves the old one to `consumer_period_history`, a late batch goes there directly, a
//! consumer's older periods of one batch too, `tally standalone`'s staged sums the same way,
//! and `tally rollup` moves current periods past its cutoff before it folds; through it all,
//! `consumer_period_totals` holds every (consumer, period) sum, each consumer's periods add up to its
//! total, and `usage_period_totals` to its periods.

use std::collections::BTreeMap;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tally_core::schema;
use tally_db_client::copy;

const H: i64 = 3600;
/// 2026-11-30T22:00:00Z: the last hours of November, then December.
const T0: i64 = 1_796_076_000;

type Usage = BTreeMap<(i64, i64), i128>;

async fn pool(name: &str) -> PgPool {
    let url = tally_testkit::services().fresh_database(name).await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    schema::migrate(&pool).await.unwrap();
    pool
}

/// One db-client batch: its sums per (consumer, period), written as the db-client does.
async fn batch(pool: &PgPool, rows: &[(i64, i64, i128)], expected: &mut Usage) {
    let mut period_sums: Usage = BTreeMap::new();
    let mut sums: BTreeMap<i64, i128> = BTreeMap::new();
    for &(id, start, amount) in rows {
        *period_sums.entry((id, start)).or_default() += amount;
        *sums.entry(id).or_default() += amount;
        *expected.entry((id, start)).or_default() += amount;
    }
    let starts: Vec<i64> = rows.iter().map(|r| r.1).collect();
    copy::ensure_partitions(pool, &starts).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    copy::upsert_sums(
        &mut tx,
        sums.into_iter().collect(),
        &period_sums.into_iter().collect::<Vec<_>>(),
        true,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// The usage per (consumer, period) that readers see (the view `consumer_period_totals`).
async fn usage(pool: &PgPool) -> Usage {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT consumer_id, extract(epoch FROM period_start)::bigint, sum(total)::text
         FROM consumer_period_totals GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, start, total)| ((id, start), total.parse().unwrap()))
        .collect()
}

/// Checks the usage per (consumer, period) and the invariants between the tables.
async fn check(pool: &PgPool, expected: &Usage, after: &str) {
    let got = usage(pool).await;
    assert_eq!(&got, expected, "usage per (consumer, period) after {after}");
    let totals: Vec<(i64, String)> =
        sqlx::query_as("SELECT consumer_id, total::text FROM consumer_totals ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut want: BTreeMap<i64, i128> = BTreeMap::new();
    for (&(id, _), &v) in expected {
        *want.entry(id).or_default() += v;
    }
    let totals: BTreeMap<i64, i128> = totals
        .into_iter()
        .map(|(id, t)| (id, t.parse().unwrap()))
        .collect();
    assert_eq!(totals, want, "running totals after {after}");
    let per_period: Vec<(i64, String)> = sqlx::query_as(
        "SELECT extract(epoch FROM period_start)::bigint, sum(total)::text
         FROM usage_period_totals GROUP BY 1 HAVING sum(total) <> 0 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut want: BTreeMap<i64, i128> = BTreeMap::new();
    for (&(_, start), &v) in expected {
        *want.entry(start).or_default() += v;
    }
    want.retain(|_, v| *v != 0);
    let per_period: BTreeMap<i64, i128> = per_period
        .into_iter()
        .map(|(s, t)| (s, t.parse().unwrap()))
        .collect();
    assert_eq!(
        per_period, want,
        "usage of all consumers per period after {after}"
    );
}

/// How many (consumer, period) rows sit in `consumer_period_history`, and how many consumers
/// carry a current period.
async fn places(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM consumer_period_history),
                (SELECT count(*) FROM consumer_totals WHERE period_start IS NOT NULL)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn periods_ride_on_the_totals_row_until_a_newer_one_moves_them() {
    let pool = pool("current-period").await;
    let mut expected = Usage::new();

    // Same period, twice: one row per consumer, no period rows.
    batch(&pool, &[(1, T0, 5), (2, T0, 7)], &mut expected).await;
    batch(&pool, &[(1, T0, 3), (3, T0, -2)], &mut expected).await;
    check(&pool, &expected, "two batches of one period").await;
    assert_eq!(places(&pool).await, (0, 3), "nothing moved yet");

    // A newer period: consumer 1's old one moves; consumer 2 keeps its own.
    batch(&pool, &[(1, T0 + H, 11)], &mut expected).await;
    check(&pool, &expected, "a newer period").await;
    assert_eq!(places(&pool).await, (1, 3));

    // A late batch (older than the current period) goes to the period rows, and adds to a
    // period row already there.
    batch(&pool, &[(1, T0, 100), (1, T0 - H, 1)], &mut expected).await;
    check(&pool, &expected, "a late batch").await;

    // One batch with several periods of one consumer, the newest across a month boundary
    // (December's partition is made by the batch): the newest on the row, the rest apart.
    batch(
        &pool,
        &[
            (2, T0 + H, 1),
            (2, T0 + 2 * H, 2),
            (2, T0 + 3 * H, 4),
            (4, T0, 9),
        ],
        &mut expected,
    )
    .await;
    check(&pool, &expected, "several periods in one batch").await;

    // Sums without a period (periods off) add to the totals and leave the periods alone.
    let mut tx = pool.begin().await.unwrap();
    copy::upsert_totals(&mut tx, &[(2, 1000)], true)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let none = 1000;
    let got: String = sqlx::query_scalar(
        "SELECT (total - (SELECT sum(total) FROM consumer_period_totals WHERE consumer_id = 2))::text
         FROM consumer_totals WHERE consumer_id = 2",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(got.parse::<i128>().unwrap(), none, "a sum without a period");
    sqlx::query("UPDATE consumer_totals SET total = total - 1000 WHERE consumer_id = 2")
        .execute(&pool)
        .await
        .unwrap();
    check(&pool, &expected, "a batch without periods").await;

    // `tally standalone`'s staged sums, in pieces, two periods for consumer 5 and a late one
    // for consumer 2.
    let mut tx = pool.begin().await.unwrap();
    copy::stage_sums(&mut tx, Some(T0 + 3 * H), &[(5, 4), (2, 6)])
        .await
        .unwrap();
    copy::stage_sums(&mut tx, Some(T0 + 2 * H), &[(5, 1), (2, 1)])
        .await
        .unwrap();
    copy::stage_sums(&mut tx, Some(T0 + 3 * H), &[(5, 2)])
        .await
        .unwrap();
    copy::upsert_staged(&mut tx, true).await.unwrap();
    tx.commit().await.unwrap();
    for (key, v) in [
        ((5, T0 + 3 * H), 6),
        ((2, T0 + 3 * H), 6),
        ((5, T0 + 2 * H), 1),
        ((2, T0 + 2 * H), 1),
    ] {
        *expected.entry(key).or_default() += v;
    }
    check(&pool, &expected, "standalone's staged sums").await;

    // The rollup moves current periods past its cutoff, then folds hours into days.
    let rolled = tally_operator::rollup::rollup(&pool, 0, 86_400, T0 + 30 * H)
        .await
        .unwrap();
    assert_eq!(rolled.cutoff, T0 + 26 * H, "the cutoff is the day's start");
    let mut folded = Usage::new();
    for (&(id, start), &v) in &expected {
        let start = if start < rolled.cutoff {
            start.div_euclid(86_400) * 86_400
        } else {
            start
        };
        *folded.entry((id, start)).or_default() += v;
    }
    check(&pool, &folded, "a rollup").await;
    let current: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumer_totals WHERE period_start < to_timestamp($1)",
    )
    .bind(rolled.cutoff as f64)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(current, 0, "no current period before the cutoff is left");

    // After it, the consumers' next batches start new current periods.
    batch(
        &pool,
        &[(1, T0 + 27 * H, 1), (5, T0 + 27 * H, 2)],
        &mut folded,
    )
    .await;
    check(&pool, &folded, "batches after the rollup").await;

    // The view takes rows and deletions by hand (a correction), wherever a period is kept;
    // usage_period_totals is the correction's own business (here: kept in step by hand).
    let (start, fix) = (T0 + 27 * H, 5);
    sqlx::query(
        "INSERT INTO consumer_period_totals (consumer_id, period_start, total)
         VALUES (5, to_timestamp($1), $2)",
    )
    .bind(start as f64)
    .bind(fix)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE consumer_totals SET total = total + $1 WHERE consumer_id = 5")
        .bind(fix)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO usage_period_totals (period_start, slot, total)
         VALUES (to_timestamp($1), 63, $2)
         ON CONFLICT (period_start, slot) DO UPDATE
           SET total = usage_period_totals.total + EXCLUDED.total",
    )
    .bind(start as f64)
    .bind(fix)
    .execute(&pool)
    .await
    .unwrap();
    *folded.entry((5, start)).or_default() += i128::from(fix);
    check(&pool, &folded, "a row inserted into the view").await;
    let (rows, current) = places(&pool).await;
    let deleted = sqlx::query(
        "DELETE FROM consumer_period_totals WHERE consumer_id = 5 AND period_start = to_timestamp($1)",
    )
    .bind(start as f64)
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(deleted, 2, "the period row and the current period");
    assert_eq!(places(&pool).await, (rows - 1, current - 1));
}

/// A month dropped (retention) while a consumer's current period is in it: that consumer's
/// next batch moves the period into a month made again, rather than failing for good.
#[tokio::test]
async fn a_current_period_in_a_dropped_month_moves_into_the_month_made_again() {
    let pool = pool("current-period-dropped").await;
    let mut expected = Usage::new();
    batch(&pool, &[(1, T0, 5)], &mut expected).await;
    sqlx::query("DROP TABLE consumer_period_totals_2026_11")
        .execute(&pool)
        .await
        .unwrap();
    batch(&pool, &[(1, T0 + 3 * H, 2)], &mut expected).await;
    check(&pool, &expected, "a move into a dropped month").await;
}

/// The retention recipe of docs/operations.md: an idle consumer's current period in the month
/// archived is settled into it first, so the archive holds it and the consumer's next batch
/// moves nothing into the detached month (which would stop the batches).
#[tokio::test]
async fn a_month_archived_after_settling_keeps_its_current_periods() {
    let pool = pool("current-period-archived").await;
    let mut expected = Usage::new();
    batch(&pool, &[(1, T0, 5), (2, T0, 3)], &mut expected).await;
    batch(&pool, &[(2, T0 + 3 * H, 4)], &mut expected).await;
    let mut tx = pool.begin().await.unwrap();
    let settled: i64 = sqlx::query_scalar("SELECT tally_settle_periods('2026-12-01T00:00:00Z')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(settled, 1, "consumer 1's November hour (2's moved already)");
    sqlx::query(
        "ALTER TABLE consumer_period_history DETACH PARTITION consumer_period_totals_2026_11",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("DELETE FROM usage_period_totals WHERE period_start < '2026-12-01T00:00:00Z'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let archived: Vec<(i64, String)> = sqlx::query_as(
        "SELECT consumer_id, total::text FROM consumer_period_totals_2026_11 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(archived, [(1, "5".to_owned()), (2, "3".to_owned())]);
    // Consumer 1 comes back: nothing of it is left in November to move.
    batch(&pool, &[(1, T0 + 4 * H, 2)], &mut expected).await;
    expected.retain(|&(_, start), _| start >= T0 + 2 * H);
    assert_eq!(
        usage(&pool).await,
        expected,
        "December's usage, November archived"
    );
}

/// Two writes in one transaction (the staging tables live as long as it): each adds its own
/// rows once, not the first's again.
#[tokio::test]
async fn two_writes_in_one_transaction_add_each_once() {
    let pool = pool("current-period-twice").await;
    let mut tx = pool.begin().await.unwrap();
    copy::upsert_sums(&mut tx, vec![(1, 5)], &[((1, T0), 5)], false)
        .await
        .unwrap();
    copy::upsert_sums(&mut tx, vec![(1, 2)], &[((1, T0 + H), 2)], false)
        .await
        .unwrap();
    copy::upsert_totals(&mut tx, &[(2, 7)], false)
        .await
        .unwrap();
    copy::upsert_totals(&mut tx, &[(3, 1)], false)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let totals: Vec<(i64, String)> =
        sqlx::query_as("SELECT consumer_id, total::text FROM consumer_totals ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let want = [(1, "7"), (2, "7"), (3, "1")].map(|(id, t)| (id, t.to_owned()));
    assert_eq!(totals, want);
    assert_eq!(places(&pool).await, (1, 1), "one hour moved, one current");
}

/// A batch whose id range holds rows already is added by the statement, one whose range holds
/// none is copied straight in (`tally_db_client::copy`, `add_rows`): wherever a batch's new ids
/// lie among its present ones, and with new ids between present ones, every sum is added once,
/// on the first attempt, and the batches with no row in their range are the ones copied.
/// Deciding on part of the range (the lowest id, say) sends a mixed batch to the copy, which
/// then fails on the present rows for good.
#[tokio::test]
async fn batches_of_new_present_and_mixed_consumers_add_every_sum_once() {
    let pool = pool("current-period-forms").await;
    let batches: [&[(i64, i128)]; 6] = [
        &[(5, 1), (10, 1)],                  // all new: copied
        &[(1, 2), (5, 2), (10, 2), (20, 2)], // new at both ends, present inside
        &[(5, 3), (7, 3)],                   // present first, new last
        &[(3, 4), (10, 4)],                  // new first, present last
        &[(11, 5), (15, 5)],                 // new, between present rows: copied
        &[(1, 6), (3, 6), (11, 6), (20, 6)], // all present
    ];
    let mut want: std::collections::BTreeMap<i64, i128> = Default::default();
    for (n, rows) in batches.iter().enumerate() {
        let mut tx = pool.begin().await.unwrap();
        let sums: Vec<(i64, i128)> = rows.to_vec();
        let periods: Vec<((i64, i64), i128)> = rows.iter().map(|&(id, t)| ((id, T0), t)).collect();
        copy::upsert_sums(&mut tx, sums, &periods, true)
            .await
            .unwrap_or_else(|e| panic!("batch {n}: {e:#}"));
        // Copied straight in: nothing staged in this transaction (its staging table, if the
        // session has one, is emptied at every commit).
        let staging: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('pg_temp.tally_staging')::text")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        let staged: i64 = match staging {
            None => 0,
            Some(_) => sqlx::query_scalar("SELECT count(*) FROM pg_temp.tally_staging")
                .fetch_one(&mut *tx)
                .await
                .unwrap(),
        };
        let copied = n == 0 || n == 4;
        let want_staged = if copied { 0 } else { rows.len() as i64 };
        assert_eq!(
            staged, want_staged,
            "batch {n}: rows staged (copied: {copied})"
        );
        tx.commit().await.unwrap();
        for &(id, t) in rows.iter() {
            *want.entry(id).or_default() += t;
        }
    }
    let totals: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT consumer_id, total::text, period_total::text FROM consumer_totals ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let want: Vec<(i64, String, String)> = want
        .into_iter()
        .map(|(id, t)| (id, t.to_string(), t.to_string()))
        .collect();
    assert_eq!(totals, want, "running totals and the current period's");
    // The change log's last totals event of each consumer is its total.
    let logged: Vec<(i64, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (id) id, total::text
         FROM tally_changes, UNNEST(consumer_ids, totals) AS u (id, total)
         WHERE totals IS NOT NULL ORDER BY id, tx DESC, seq DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let totals: Vec<(i64, String)> = totals.into_iter().map(|(id, t, _)| (id, t)).collect();
    assert_eq!(logged, totals, "the change log's totals");
}
