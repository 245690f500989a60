//! Usage per period in tests: file times set on purpose, the period totals computed from the
//! files' bytes, and compared with the usage per period (`consumer_period_totals`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::Pipeline;

/// 2026-10-31T22:00:00Z: files from here on cross into November.
pub const OCT_31_22H: i64 = 1_793_484_000;

/// Sets the modification time of `path` to `secs` (Unix seconds).
pub fn set_mtime(path: &Path, secs: i64) {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

/// Per (consumer, period start) sums of `files` (path, file time), computed here from the
/// bytes: each good `<id> <amount>` line counts in the period of its file.
pub fn expected_periods(files: &[(String, i64)], period: i64) -> HashMap<(i64, i64), i128> {
    let mut out: HashMap<(i64, i64), i128> = HashMap::new();
    for (path, time) in files {
        let start = time.div_euclid(period) * period;
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let mut fields = line.split(' ');
            let (Some(id), Some(amount), None) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if let (Ok(id), Ok(amount)) = (id.parse::<i64>(), amount.parse::<i64>()) {
                *out.entry((id, start)).or_default() += i128::from(amount);
            }
        }
    }
    out.retain(|_, v| *v != 0);
    out
}

/// The usage per (consumer, period start in Unix seconds): the period rows and the consumers'
/// current periods (the view `consumer_period_totals`).
pub async fn period_totals(p: &Pipeline) -> HashMap<(i64, i64), i128> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT consumer_id, extract(epoch FROM period_start)::bigint, sum(total)::text
         FROM consumer_period_totals GROUP BY 1, 2",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, start, total)| ((id, start), total.parse().unwrap()))
        .filter(|(_, v): &(_, i128)| *v != 0)
        .collect()
}

/// Asserts the period totals equal `expected`, per consumer the sum over its periods equals its
/// running total, and per period the usage of all consumers equals the sum of its rows.
pub async fn assert_periods(p: &Pipeline, expected: &HashMap<(i64, i64), i128>, after: &str) {
    let got = period_totals(p).await;
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(k) != Some(v))
        .take(5)
        .collect();
    let extra = got.keys().filter(|k| !expected.contains_key(k)).count();
    assert!(
        wrong.is_empty() && extra == 0,
        "period totals after {after}: {} expected rows, {} rows; wrong e.g. {wrong:?} (got {:?}); {extra} unexpected",
        expected.len(),
        got.len(),
        wrong.iter().map(|(k, _)| got.get(k)).collect::<Vec<_>>()
    );
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumer_totals t FULL JOIN
           (SELECT consumer_id, sum(total) AS total FROM consumer_period_totals GROUP BY 1) s
           USING (consumer_id)
         WHERE coalesce(t.total, 0) <> coalesce(s.total, 0)",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert_eq!(
        mismatched, 0,
        "consumers whose periods do not add up to their total"
    );
    let periods_off: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT period_start::text, coalesce(u.total, 0)::text, coalesce(c.total, 0)::text
         FROM (SELECT period_start, sum(total) AS total FROM usage_period_totals GROUP BY 1) u
         FULL JOIN
           (SELECT period_start, sum(total) AS total FROM consumer_period_totals GROUP BY 1) c
         USING (period_start)
         WHERE coalesce(u.total, 0) <> coalesce(c.total, 0)",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert!(
        periods_off.is_empty(),
        "periods whose usage of all consumers (usage_period_totals) is not the sum of their \
         rows (period, usage, rows' sum): {periods_off:?}"
    );
}
