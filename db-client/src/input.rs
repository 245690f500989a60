//! Which topic the totals follow: `tally.sums` (no aggregator) or `tally.totals`
//! (`--from-totals`). Both carry the same sums, so the totals can follow only one of them: a
//! db-client started on the other one would add again what is already in (or miss what is
//! not), because each topic has its own offsets in `kafka_offsets` and the aggregator reads the
//! sums from offsets of its own. So at start the input asked for must be the one applied last
//! (by `kafka_offsets.updated_at`); switching is an operator's decision (`--switch-input`,
//! after the procedure in docs/operations.md "Adding or removing the aggregator").

use anyhow::{bail, Context};
use sqlx::PgPool;

/// Fails when the totals follow `other`, not `input`, unless `switch` (then warns).
pub async fn check(pool: &PgPool, input: &str, other: &str, switch: bool) -> anyhow::Result<()> {
    let last: Vec<(String, i64)> = sqlx::query_as(
        "SELECT topic, (extract(epoch FROM max(updated_at)) * 1000000)::bigint
         FROM kafka_offsets WHERE topic IN ($1, $2) AND next_offset > 0 GROUP BY topic",
    )
    .bind(input)
    .bind(other)
    .fetch_all(pool)
    .await
    .context("read the applied inputs")?;
    let at = |topic: &str| last.iter().find(|(t, _)| t == topic).map(|(_, at)| *at);
    let Some(other_at) = at(other) else {
        return Ok(());
    };
    if at(input).is_some_and(|input_at| input_at >= other_at) {
        return Ok(());
    }
    if switch {
        tracing::warn!(
            input,
            previous = other,
            "--switch-input: the totals follow {input} from now on"
        );
        return Ok(());
    }
    bail!(
        "the totals were last applied from {other}, and this db-client reads {input}: the two \
         topics carry the same sums with separate offsets, so switching now would count sums \
         twice or miss some. Run it as before ({}), or switch on purpose: follow \
         docs/operations.md \"Adding or removing the aggregator\", then start it once with \
         --switch-input",
        if other.ends_with(".totals") {
            "with --from-totals"
        } else {
            "without --from-totals"
        }
    )
}
