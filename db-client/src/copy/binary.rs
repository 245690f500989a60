//! PostgreSQL's binary COPY format for the rows and change log events a batch copies in:
//! `BIGINT`, `TIMESTAMPTZ` (from Unix seconds), `NUMERIC` (from `i128`, base-10000 digits)
//! and one-dimensional arrays of them.

/// PostgreSQL's binary COPY stream of `(BIGINT, NUMERIC)` rows.
pub fn encode(rows: &[(i64, i128)]) -> Vec<u8> {
    let mut out = header(rows.len() * 34);
    let mut digits = Vec::with_capacity(10);
    for &(id, total) in rows {
        out.extend_from_slice(&2i16.to_be_bytes());
        put_bigint(&mut out, id);
        put_numeric(&mut out, total, &mut digits);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// PostgreSQL's binary COPY stream of `(BIGINT, NUMERIC, TIMESTAMPTZ, NUMERIC)` rows: a
/// consumer's total and its newest period with the amount there (both NULL without one).
pub fn encode_heads(rows: &[super::current::Head]) -> Vec<u8> {
    let mut out = header(rows.len() * 58);
    let mut digits = Vec::with_capacity(10);
    for head in rows {
        out.extend_from_slice(&4i16.to_be_bytes());
        put_bigint(&mut out, head.id);
        put_numeric(&mut out, head.total, &mut digits);
        match head.period() {
            Some((start, amount)) => {
                put_bigint(&mut out, pg_time(start));
                put_numeric(&mut out, amount, &mut digits);
            }
            None => {
                out.extend_from_slice(&(-1i32).to_be_bytes());
                out.extend_from_slice(&(-1i32).to_be_bytes());
            }
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// PostgreSQL's binary COPY stream of `(BIGINT, TIMESTAMPTZ, NUMERIC)` rows (times in Unix
/// seconds).
pub fn encode_periods(rows: &[((i64, i64), i128)]) -> Vec<u8> {
    let mut out = header(rows.len() * 46);
    let mut digits = Vec::with_capacity(10);
    for &((id, start), total) in rows {
        out.extend_from_slice(&3i16.to_be_bytes());
        put_bigint(&mut out, id);
        put_bigint(&mut out, pg_time(start));
        put_numeric(&mut out, total, &mut digits);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// PostgreSQL's binary COPY stream of change log events of period deltas: rows of
/// `(BIGINT[], TIMESTAMPTZ[], NUMERIC[])`, `per_event` of `rows` each, in order.
pub fn encode_period_events(rows: &[((i64, i64), i128)], per_event: usize) -> Vec<u8> {
    let mut out = header(rows.len() * 50);
    let mut digits = Vec::with_capacity(10);
    for event in rows.chunks(per_event.max(1)) {
        out.extend_from_slice(&3i16.to_be_bytes());
        put_array(&mut out, INT8_OID, event, |out, &((id, _), _)| {
            put_bigint(out, id)
        });
        put_array(&mut out, TIMESTAMPTZ_OID, event, |out, &((_, start), _)| {
            put_bigint(out, pg_time(start))
        });
        put_array(&mut out, NUMERIC_OID, event, |out, &(_, delta)| {
            put_numeric(out, delta, &mut digits)
        });
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// PostgreSQL's binary COPY stream of change log events of running totals: rows of
/// `(BIGINT[], NUMERIC[])`, `per_event` of `rows` each, in order, `row` giving each one's
/// consumer and new running total.
pub fn encode_total_events<T>(
    rows: &[T],
    per_event: usize,
    row: impl Fn(&T) -> (i64, i128),
) -> Vec<u8> {
    let mut out = header(rows.len() * 34);
    let mut digits = Vec::with_capacity(10);
    for event in rows.chunks(per_event.max(1)) {
        out.extend_from_slice(&2i16.to_be_bytes());
        put_array(&mut out, INT8_OID, event, |out, r| {
            put_bigint(out, row(r).0)
        });
        put_array(&mut out, NUMERIC_OID, event, |out, r| {
            put_numeric(out, row(r).1, &mut digits)
        });
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

const INT8_OID: u32 = 20;
const TIMESTAMPTZ_OID: u32 = 1184;
const NUMERIC_OID: u32 = 1700;

/// A one-dimensional array field without NULLs: its length, then the array header
/// (dimensions, null flag, element type, size and lower bound), then each element as
/// `put` writes it (with its own length).
fn put_array<T>(
    out: &mut Vec<u8>,
    element_oid: u32,
    items: &[T],
    mut put: impl FnMut(&mut Vec<u8>, &T),
) {
    let at = out.len();
    out.extend_from_slice(&0i32.to_be_bytes()); // the field's length, set below
    out.extend_from_slice(&1i32.to_be_bytes()); // dimensions
    out.extend_from_slice(&0i32.to_be_bytes()); // no NULLs
    out.extend_from_slice(&element_oid.to_be_bytes());
    out.extend_from_slice(&(items.len() as i32).to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes()); // lower bound
    for item in items {
        put(out, item);
    }
    let len = (out.len() - at - 4) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// PostgreSQL's binary COPY stream of `(BIGINT, TIMESTAMPTZ or NULL, NUMERIC)` rows: `sums`
/// all of `period`.
pub fn encode_staged(period: Option<i64>, sums: &[(i64, i64)]) -> Vec<u8> {
    let mut out = header(sums.len() * 46);
    let mut digits = Vec::with_capacity(10);
    for &(id, total) in sums {
        out.extend_from_slice(&3i16.to_be_bytes());
        put_bigint(&mut out, id);
        match period {
            Some(start) => put_bigint(&mut out, pg_time(start)),
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        put_numeric(&mut out, i128::from(total), &mut digits);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// A Unix time in seconds as PostgreSQL's binary timestamp: microseconds since 2000-01-01 UTC.
fn pg_time(unix_seconds: i64) -> i64 {
    const PG_EPOCH: i64 = 946_684_800;
    unix_seconds
        .saturating_sub(PG_EPOCH)
        .saturating_mul(1_000_000)
}

fn header(room: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + room + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension
    out
}

fn put_bigint(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_numeric(out: &mut Vec<u8>, v: i128, digits: &mut Vec<i16>) {
    numeric(v, digits);
    // ndigits, weight, sign, dscale, then the base-10000 digits.
    let len = 8 + 2 * digits.len();
    out.extend_from_slice(&(len as i32).to_be_bytes());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    let weight = digits.len() as i16 - 1;
    out.extend_from_slice(&weight.max(0).to_be_bytes());
    let sign: u16 = if v < 0 { 0x4000 } else { 0 };
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&0i16.to_be_bytes());
    for d in digits.iter() {
        out.extend_from_slice(&d.to_be_bytes());
    }
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
