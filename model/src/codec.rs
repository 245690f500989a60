//! The bytes of a [`SumsRecord`] on `tally.sums` / `tally.totals`.
//!
//! Sums are most of the traffic, so they are binary (docs/messages.md): a version byte `0x01`
//! (or `0x02`, followed by the period start in Unix seconds as a zigzag varint), the pair count as an unsigned LEB128 varint, then the pairs sorted by consumer id, each as
//! the id's difference from the previous id (the first from 0) as an unsigned varint and the
//! sum as a zigzag varint. Sorted, dense ids take one or two bytes each, and small sums one to
//! three, against about 20 bytes per pair in JSON. Unit-end markers are rare and stay JSON
//! (they start with `{`), and so does any sums record written by an older parser: the first
//! byte tells them apart.

use crate::messages::SumsRecord;

/// First byte of a binary sums record, version 1 (no period).
pub const SUMS_V1: u8 = 0x01;
/// First byte of a binary sums record of one usage period, version 2.
pub const SUMS_V2: u8 = 0x02;

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Empty payload.
    #[error("empty record")]
    Empty,
    /// A first byte that is no known format.
    #[error("unknown record format (first byte {0:#04x})")]
    UnknownFormat(u8),
    /// The bytes end inside the record.
    #[error("truncated record")]
    Truncated,
    /// Bytes that are not what the format says.
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// Encodes `record`: sums in binary (sorted by id), a unit-end as JSON.
pub fn encode(record: &SumsRecord) -> Vec<u8> {
    match record {
        SumsRecord::Sums { period, sums } => encode_sums(*period, sums),
        SumsRecord::UnitEnd { .. } => serde_json::to_vec(record).expect("serialisable"),
    }
}

/// Encodes sums (any order; ids may repeat; ids must be non-negative) of `period` (its start,
/// or `None` with periods off) as a binary record.
pub fn encode_sums(period: Option<i64>, sums: &[(i64, i64)]) -> Vec<u8> {
    let mut sorted = sums.to_vec();
    sorted.sort_unstable_by_key(|&(id, _)| id);
    let mut out = Vec::with_capacity(1 + 20 + sorted.len() * 4);
    match period {
        None => out.push(SUMS_V1),
        Some(start) => {
            out.push(SUMS_V2);
            put_varint(&mut out, zigzag(start));
        }
    }
    put_varint(&mut out, sorted.len() as u64);
    let mut previous = 0u64;
    for (id, sum) in sorted {
        let id = id as u64;
        put_varint(&mut out, id - previous);
        put_varint(&mut out, zigzag(sum));
        previous = id;
    }
    out
}

/// Decodes a record of either format.
pub fn decode(bytes: &[u8]) -> Result<SumsRecord, DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Empty),
        Some(&SUMS_V1) => {
            decode_sums(&bytes[1..]).map(|sums| SumsRecord::Sums { period: None, sums })
        }
        Some(&SUMS_V2) => {
            let mut rest = &bytes[1..];
            let period = unzigzag(take_varint(&mut rest)?);
            decode_sums(rest).map(|sums| SumsRecord::Sums {
                period: Some(period),
                sums,
            })
        }
        Some(b'{') => {
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
        }
        Some(&other) => Err(DecodeError::UnknownFormat(other)),
    }
}

/// The period a sums record belongs to, read from its first bytes (without decoding its
/// pairs); `None` for a record without one, a unit-end marker, or an undecodable record.
pub fn period_of(bytes: &[u8]) -> Option<i64> {
    match bytes.first()? {
        &SUMS_V2 => take_varint(&mut &bytes[1..]).ok().map(unzigzag),
        b'{' => match decode(bytes) {
            Ok(SumsRecord::Sums { period, .. }) => period,
            _ => None,
        },
        _ => None,
    }
}

/// At most how many pairs decoding `bytes` yields, from its first bytes (without decoding the
/// pairs): what a consumer of many records can budget memory by before it decodes them. A
/// binary record's count, never more than its bytes can hold (two bytes a pair); a JSON record
/// (a unit-end marker, sums of an older parser) at most one pair per six bytes (`[1,2],`).
pub fn pairs_at_most(bytes: &[u8]) -> u64 {
    let len = bytes.len() as u64;
    let mut rest = match bytes.first() {
        Some(&SUMS_V1) => &bytes[1..],
        Some(&SUMS_V2) => {
            let mut rest = &bytes[1..];
            if take_varint(&mut rest).is_err() {
                return 0;
            }
            rest
        }
        _ => return len / 6,
    };
    take_varint(&mut rest).map_or(0, |count| count.min(rest.len() as u64 / 2))
}

fn decode_sums(mut bytes: &[u8]) -> Result<Vec<(i64, i64)>, DecodeError> {
    let count = take_varint(&mut bytes)?;
    // Each pair takes at least two bytes: a count beyond that is a lie, not an allocation.
    if count > bytes.len() as u64 / 2 {
        return Err(DecodeError::Truncated);
    }
    let mut sums = Vec::with_capacity(count as usize);
    let mut id = 0u64;
    for _ in 0..count {
        id = id
            .checked_add(take_varint(&mut bytes)?)
            .filter(|&id| id <= i64::MAX as u64)
            .ok_or_else(|| DecodeError::Malformed("consumer id out of range".to_owned()))?;
        let sum = unzigzag(take_varint(&mut bytes)?);
        sums.push((id as i64, sum));
    }
    if !bytes.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the last pair",
            bytes.len()
        )));
    }
    Ok(sums)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
        *bytes = rest;
        if shift == 63 && b > 1 {
            return Err(DecodeError::Malformed(
                "varint overflows 64 bits".to_owned(),
            ));
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Malformed(
        "varint longer than 10 bytes".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted(mut v: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
        v.sort_by_key(|&(id, _)| id);
        v
    }

    proptest! {
        #[test]
        fn sums_round_trip(
            sums in prop::collection::vec((0..=i64::MAX, any::<i64>()), 0..300),
            period in prop::option::of(any::<i64>()),
        ) {
            let bytes = encode_sums(period, &sums);
            prop_assert_eq!(pairs_at_most(&bytes), sums.len() as u64);
            match decode(&bytes).unwrap() {
                SumsRecord::Sums { period: back_period, sums: back } => {
                    prop_assert_eq!(back_period, period);
                    // Sorted by id; pairs of one id keep their multiset of sums.
                    let mut a = sorted(sums.clone());
                    let mut b = back;
                    a.sort();
                    b.sort();
                    prop_assert_eq!(a, b);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn repeated_and_dense_ids_round_trip(
            ids in prop::collection::vec(0..1_000i64, 0..500),
            sum in any::<i64>(),
        ) {
            let sums: Vec<(i64, i64)> = ids.iter().map(|&id| (id, sum)).collect();
            let back = match decode(&encode_sums(None, &sums)).unwrap() {
                SumsRecord::Sums { sums, .. } => sums,
                other => panic!("{other:?}"),
            };
            prop_assert_eq!(back, sorted(sums));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            // Whatever decodes holds no more pairs than its first bytes promised.
            if let Ok(SumsRecord::Sums { sums, .. }) = decode(&bytes) {
                prop_assert!(sums.len() as u64 <= pairs_at_most(&bytes));
            }
        }
    }

    #[test]
    fn edges_and_formats() {
        for sums in [
            vec![],
            vec![(0, 0)],
            vec![(i64::MAX, i64::MIN), (0, i64::MAX)],
        ] {
            assert_eq!(
                decode(&encode_sums(None, &sums)).unwrap(),
                SumsRecord::Sums {
                    period: None,
                    sums: sorted(sums.clone())
                }
            );
        }
        // Dense ids with small sums: about 2 bytes a pair.
        let dense: Vec<(i64, i64)> = (1_000_000..1_020_000).map(|id| (id, 5)).collect();
        assert!(encode_sums(None, &dense).len() < 2 * dense.len() + 8);
        // A period costs a few bytes per record.
        assert!(encode_sums(Some(1_795_651_200), &dense).len() < 2 * dense.len() + 14);
        // JSON records (unit ends, and sums from older parsers) still decode.
        let json = br#"{"type":"sums","sums":[[1,2]]}"#;
        assert_eq!(
            decode(json).unwrap(),
            SumsRecord::Sums {
                period: None,
                sums: vec![(1, 2)]
            }
        );
        assert_eq!(period_of(&encode_sums(Some(-7), &dense)), Some(-7));
        assert_eq!(period_of(&encode_sums(None, &dense)), None);
        assert_eq!(
            period_of(br#"{"type":"sums","period":3600,"sums":[]}"#),
            Some(3600)
        );
        // The pairs a record holds, read from its first bytes; never more than it can hold.
        assert_eq!(pairs_at_most(&encode_sums(None, &dense)), 20_000);
        assert_eq!(pairs_at_most(&encode_sums(Some(-7), &dense)), 20_000);
        assert_eq!(pairs_at_most(&encode_sums(Some(7), &[])), 0);
        assert_eq!(pairs_at_most(&[SUMS_V1, 0xff, 0x7f, 1, 2, 3, 4]), 2);
        assert_eq!(pairs_at_most(&[SUMS_V2, 0x80]), 0);
        assert_eq!(pairs_at_most(&[]), 0);
        assert!(pairs_at_most(json) >= 1);
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&[0x07]), Err(DecodeError::UnknownFormat(0x07)));
        assert_eq!(decode(&[SUMS_V1, 5, 1]), Err(DecodeError::Truncated));
        assert!(matches!(
            decode(&[SUMS_V1, 0, 0]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
