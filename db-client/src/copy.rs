//! The totals of one batch into PostgreSQL at COPY speed: the pre-aggregated `(consumer_id,
//! total)` rows go into a session-local staging table with binary COPY, then one
//! `INSERT … SELECT … ORDER BY consumer_id ON CONFLICT DO UPDATE` adds them to
//! `consumer_totals`, inside the batch's transaction (with its offsets and ledger). Rows are
//! upserted in key order, so concurrent instances lock rows in the same order and never
//! deadlock. The staging table is `ON COMMIT DELETE ROWS`: a rolled-back or committed batch
//! leaves it empty.

use anyhow::Context;
use sqlx::PgConnection;

/// Creates the session's staging table (once per connection; harmless when it exists).
pub const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS tally_staging \
     (consumer_id BIGINT NOT NULL, total NUMERIC NOT NULL) ON COMMIT DELETE ROWS";

/// Adds `rows` (sorted by id, each id once) to `consumer_totals` in the open transaction.
pub async fn upsert_totals(tx: &mut PgConnection, rows: &[(i64, i128)]) -> anyhow::Result<()> {
    sqlx::query(CREATE_STAGING)
        .execute(&mut *tx)
        .await
        .context("staging table")?;
    let mut copy = tx
        .copy_in_raw("COPY tally_staging (consumer_id, total) FROM STDIN (FORMAT binary)")
        .await
        .context("start COPY")?;
    copy.send(encode(rows)).await.context("COPY data")?;
    copy.finish().await.context("finish COPY")?;
    let copied = std::time::Instant::now();
    sqlx::query(
        "INSERT INTO consumer_totals (consumer_id, total)
         SELECT consumer_id, total FROM tally_staging ORDER BY consumer_id
         ON CONFLICT (consumer_id) DO UPDATE
           SET total = consumer_totals.total + EXCLUDED.total, updated_at = now()",
    )
    .execute(&mut *tx)
    .await
    .context("upsert totals")?;
    tracing::debug!(
        rows = rows.len(),
        statement_ms = copied.elapsed().as_millis() as u64,
        "upsert statement"
    );
    Ok(())
}

/// PostgreSQL's binary COPY stream of `(BIGINT, NUMERIC)` rows.
pub fn encode(rows: &[(i64, i128)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + rows.len() * 34 + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension
    let mut digits = Vec::with_capacity(10);
    for &(id, total) in rows {
        out.extend_from_slice(&2i16.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        numeric(total, &mut digits);
        // ndigits, weight, sign, dscale, then the base-10000 digits.
        let len = 8 + 2 * digits.len();
        out.extend_from_slice(&(len as i32).to_be_bytes());
        out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        let weight = digits.len() as i16 - 1;
        out.extend_from_slice(&weight.max(0).to_be_bytes());
        let sign: u16 = if total < 0 { 0x4000 } else { 0 };
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&0i16.to_be_bytes());
        for d in &digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// The base-10000 digits of |v|, most significant first (none for zero). Trailing zero
/// groups are kept: the weight is the number of groups minus one.
fn numeric(v: i128, digits: &mut Vec<i16>) {
    digits.clear();
    let mut n = v.unsigned_abs();
    while n > 0 {
        digits.push((n % 10_000) as i16);
        n /= 10_000;
    }
    digits.reverse();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numerics_are_base_10000_groups() {
        let mut d = Vec::new();
        numeric(0, &mut d);
        assert!(d.is_empty());
        numeric(123_456_789, &mut d);
        assert_eq!(d, vec![1, 2345, 6789]);
        numeric(-10_000, &mut d);
        assert_eq!(d, vec![1, 0]);
        let bytes = encode(&[(5, -10_000)]);
        // header 19, field count 2, id 4+8, numeric 4+8+4, trailer 2
        assert_eq!(bytes.len(), 19 + 2 + 12 + 16 + 2);
    }
}
