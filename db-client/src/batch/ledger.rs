//! The ingested-files ledger (`ingested_files`, `ingested_units`): which units of which file
//! versions are in the totals, written in the same transaction as their sums.

use std::collections::BTreeMap;

use anyhow::Context;
use tally_model::messages::UnitDone;

/// The ingested-files ledger: counts each unit's end markers (in unit-id order: rows are
/// locked in the same order by every instance); a unit whose last marker lands here is
/// rolled up into its file.
pub async fn record_units(
    tx: &mut sqlx::PgConnection,
    units: &BTreeMap<String, (UnitDone, i32, i32)>,
) -> anyhow::Result<()> {
    let unit_ids: Vec<&str> = units.keys().map(String::as_str).collect();
    let file_ids: Vec<&str> = units.values().map(|u| u.0.file_id.as_str()).collect();
    let paths: Vec<&str> = units.values().map(|u| u.0.path.as_str()).collect();
    let sizes: Vec<i64> = units.values().map(|u| u.0.file_bytes as i64).collect();
    let completes: Vec<bool> = units.values().map(|u| u.0.completes_file).collect();
    let partitions: Vec<i32> = units.values().map(|u| u.1).collect();
    let seen: Vec<i32> = units.values().map(|u| u.2).collect();
    let lines: Vec<i64> = units.values().map(|u| u.0.lines as i64).collect();
    let bad: Vec<i64> = units.values().map(|u| u.0.bad_lines as i64).collect();
    let bytes: Vec<i64> = units.values().map(|u| u.0.bytes as i64).collect();
    sqlx::query(
        "WITH u AS (
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::int[],
                                $7::bigint[], $8::bigint[], $9::bigint[], $10::bool[])
             AS u(unit_id, file_id, path, file_bytes, partitions, seen, lines, bad_lines, bytes, completes)
         ), counted AS (
           INSERT INTO ingested_units
             (unit_id, file_id, partitions_total, partitions_seen, lines, bad_lines, bytes)
           SELECT unit_id, file_id, partitions, seen, lines, bad_lines, bytes FROM u ORDER BY unit_id
           ON CONFLICT (unit_id) DO UPDATE
             SET partitions_seen = ingested_units.partitions_seen + EXCLUDED.partitions_seen,
                 ingested_at = now()
           RETURNING unit_id, partitions_seen >= partitions_total AS complete
         )
         INSERT INTO ingested_files
           (file_id, path, file_bytes, units_ingested, lines, bad_lines, bytes, complete)
         SELECT u.file_id, max(u.path), max(u.file_bytes), count(*), sum(u.lines), sum(u.bad_lines),
                sum(u.bytes), bool_or(u.completes)
         FROM u JOIN counted USING (unit_id) WHERE counted.complete GROUP BY u.file_id
         ON CONFLICT (file_id) DO UPDATE SET
           units_ingested = ingested_files.units_ingested + EXCLUDED.units_ingested,
           complete = ingested_files.complete OR EXCLUDED.complete,
           lines = ingested_files.lines + EXCLUDED.lines,
           bad_lines = ingested_files.bad_lines + EXCLUDED.bad_lines,
           bytes = ingested_files.bytes + EXCLUDED.bytes,
           last_ingested_at = now()",
    )
    .bind(&unit_ids)
    .bind(&file_ids)
    .bind(&paths)
    .bind(&sizes)
    .bind(&partitions)
    .bind(&seen)
    .bind(&lines)
    .bind(&bad)
    .bind(&bytes)
    .bind(&completes)
    .execute(&mut *tx)
    .await
    .context("record ingested units")?;
    Ok(())
}
