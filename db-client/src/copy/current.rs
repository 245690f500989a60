//! The current period on a consumer's totals row (migration
//! `20261206000001_current_period.sql`): the statements that add a batch to the running totals
//! and to each consumer's newest period in one row write, and move a period out to
//! `consumer_period_history` only when a newer one replaces it or a batch is for an older one.
//!
//! Staged rows are added in one of two forms, the same rows either way (rows the db-client
//! holds whose key range has no row are copied straight in instead: `super::totals`):
//! - [`insert`]: a plain `INSERT`, when no row of the batch's key range exists (`tally
//!   standalone`, whose sums are summed in the server): no index probe and speculative insert
//!   before each row as with `ON CONFLICT`, about half the server time (docs/benchmarks.md);
//! - [`update_then_insert`]: an `UPDATE … FROM` of the rows present, then a plain `INSERT` of
//!   the others, each in key order and pinned to index probes.
//!
//! Both decide "present" by a snapshot, so a writer of the same keys at the same moment (an
//! insert, a delete) makes them fail or miss rows: their caller checks, and fails the
//! transaction so that it is written again (`super::totals`). Writers of one deployment never
//! meet so: a db-client batch holds its partitions' locks, `tally standalone` its writer lock.
//! Rows are locked present ones first, then new ones, each in key order; writers that do meet
//! (another topic's db-client, a hand correction) may deadlock, and PostgreSQL then fails one.
//!
//! Pure: statement text and the split of a batch's sums; the I/O is in [`super`].

/// The batch's rows as staged, in id order.
const STAGED: &str = "SELECT consumer_id, total, period_start, period_total FROM tally_staging
         ORDER BY consumer_id";

/// The SET list shared by both forms: a row `t` (as it was) plus the batch's row `e`.
///
/// Per row, under its lock:
/// - no period in `e`: the current period stays;
/// - no current period, or an older one: `e`'s becomes current, the old one is moved;
/// - the same period: `e`'s amount is added to it;
/// - a newer current period (`e` is late): the current one stays, `e`'s amount is moved.
///
/// Moved means returned in `moved_start`/`moved_total` for the caller to add to
/// `consumer_period_history` in the same transaction; SET expressions read the row before the
/// update, so the values are exact whatever ran before.
fn set_list(e: &str) -> String {
    format!(
        "total = t.total + {e}.total,
           period_start = greatest(t.period_start, {e}.period_start),
           period_total = CASE
             WHEN {e}.period_start IS NULL OR t.period_start > {e}.period_start
               THEN t.period_total
             WHEN t.period_start = {e}.period_start
               THEN t.period_total + {e}.period_total
             ELSE {e}.period_total END,
           moved_start = CASE WHEN t.period_start <> {e}.period_start
             THEN least(t.period_start, {e}.period_start) END,
           moved_total = CASE
             WHEN t.period_start < {e}.period_start THEN t.period_total
             WHEN t.period_start > {e}.period_start THEN {e}.period_total END,
           updated_at = now()"
    )
}

/// Common table expressions that insert the rows of `tally_staging` into `consumer_totals`,
/// ending in `up`: `(consumer_id, total, moved_start, moved_total)` per row, its new total and
/// the period it moved off (none here). For a batch none of whose ids is present: a row
/// inserted by another transaction meanwhile makes it fail (unique violation).
pub fn insert() -> String {
    format!(
        "up AS (
         INSERT INTO consumer_totals (consumer_id, total, period_start, period_total)
         {STAGED}
         RETURNING consumer_id, total, NULL::timestamptz AS moved_start,
                   NULL::numeric AS moved_total)"
    )
}

/// Common table expressions that add the rows of `tally_staging` (each id once) to
/// `consumer_totals`, ending in the same `up` as [`insert`], by an `UPDATE` of the rows the
/// statement's snapshot holds and an `INSERT` of the others. Run it with hash and merge joins
/// off: the `UPDATE` then probes the index row by row in key order (a hash join would read the whole table). A row inserted by
/// another transaction after the snapshot makes the `INSERT` fail (unique violation); a row
/// deleted by one while the `UPDATE` waited for it is in neither: `up` then has fewer rows
/// than staged. Either way the caller fails the transaction.
pub fn update_then_insert() -> String {
    format!(
        "present AS (
         UPDATE consumer_totals AS t SET {}
         FROM ({STAGED}) AS s
         WHERE t.consumer_id = s.consumer_id
         RETURNING t.consumer_id, t.total, t.moved_start, t.moved_total),
       absent AS (
         INSERT INTO consumer_totals (consumer_id, total, period_start, period_total)
         SELECT consumer_id, total, period_start, period_total FROM tally_staging AS s
         WHERE NOT EXISTS (SELECT FROM consumer_totals AS t WHERE t.consumer_id = s.consumer_id)
         ORDER BY consumer_id
         RETURNING consumer_id, total),
       up AS (
         SELECT consumer_id, total, moved_start, moved_total FROM present
         UNION ALL
         SELECT consumer_id, total, NULL::timestamptz, NULL::numeric FROM absent)",
        set_list("s")
    )
}

/// One consumer's row of a batch: its total, and its newest period with its amount there.
/// 48 bytes: a batch of 10M consumers holds one per consumer while it is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The consumer.
    pub id: i64,
    /// Its newest period's start (Unix seconds), or [`Head::NO_PERIOD`].
    pub period_start: i64,
    /// What the batch adds to its running total.
    pub total: i128,
    /// What the batch adds to that period.
    pub period_total: i128,
}

impl Head {
    /// `period_start` of a row without a period.
    pub const NO_PERIOD: i64 = i64::MIN;

    /// The newest period and its amount, if any.
    pub fn period(&self) -> Option<(i64, i128)> {
        (self.period_start != Self::NO_PERIOD).then_some((self.period_start, self.period_total))
    }
}

/// A sum of one (consumer, period start in Unix seconds).
pub type PeriodSum = ((i64, i64), i128);

/// Splits a batch into its rows for `consumer_totals` ([`Head`]s, one per id of `sums`, each
/// with its newest period of `period_sums`) and the period sums that go straight to
/// `consumer_period_history` (a consumer's older periods in the same batch). Both inputs are
/// sorted by key with each key once, and every id of `period_sums` is in `sums` (its total
/// includes them); a period sum whose id is not goes straight to the period rows. `sums` is
/// consumed: its memory is freed as the heads are made.
pub fn split(sums: Vec<(i64, i128)>, period_sums: &[PeriodSum]) -> (Vec<Head>, Vec<PeriodSum>) {
    let mut heads = Vec::with_capacity(sums.len());
    let mut older = Vec::new();
    let mut rest = period_sums;
    for (id, total) in sums {
        // Period sums of ids before this one have no totals row: straight to the periods.
        let before = rest.partition_point(|&((pid, _), _)| pid < id);
        older.extend_from_slice(&rest[..before]);
        rest = &rest[before..];
        let mine = rest.partition_point(|&((pid, _), _)| pid == id);
        let (own, next) = rest.split_at(mine);
        rest = next;
        let (period_start, period_total) = own
            .last()
            .map_or((Head::NO_PERIOD, 0), |&((_, start), amount)| {
                (start, amount)
            });
        if let Some((_, earlier)) = own.split_last() {
            older.extend_from_slice(earlier);
        }
        heads.push(Head {
            id,
            period_start,
            total,
            period_total,
        });
    }
    older.extend_from_slice(rest);
    (heads, older)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer, its total, and its newest period with the amount there.
    type Row = (i64, i128, Option<(i64, i128)>);

    fn heads(rows: &[Row]) -> Vec<Head> {
        rows.iter()
            .map(|&(id, total, period)| {
                let (period_start, period_total) = period.unwrap_or((Head::NO_PERIOD, 0));
                Head {
                    id,
                    period_start,
                    total,
                    period_total,
                }
            })
            .collect()
    }

    #[test]
    fn the_newest_period_of_a_consumer_rides_on_its_row_and_older_ones_go_apart() {
        let sums = vec![(1, 10), (2, 5), (3, 7)];
        let periods = [((1, 100), 4), ((1, 200), 6), ((3, 100), 7)];
        let (got, older) = split(sums, &periods);
        assert_eq!(
            got,
            heads(&[
                (1, 10, Some((200, 6))),
                (2, 5, None),
                (3, 7, Some((100, 7)))
            ])
        );
        assert_eq!(got[1].period(), None);
        assert_eq!(got[0].period(), Some((200, 6)));
        assert_eq!(older, vec![((1, 100), 4)]);
    }

    #[test]
    fn period_sums_without_a_total_are_kept_as_period_rows() {
        let (got, older) = split(vec![(5, 1)], &[((2, 100), 3), ((5, 100), 1), ((9, 300), 2)]);
        assert_eq!(got, heads(&[(5, 1, Some((100, 1)))]));
        assert_eq!(older, vec![((2, 100), 3), ((9, 300), 2)]);
        let (got, older) = split(Vec::new(), &[((2, 100), 3)]);
        assert!(got.is_empty());
        assert_eq!(older, vec![((2, 100), 3)]);
    }

    #[test]
    fn a_head_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Head>(), 48);
    }
}
