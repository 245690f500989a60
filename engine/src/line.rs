//! One line of input: `<consumer_id><SP><amount>`, both unsigned decimal fitting in `i64`.
//!
//! Two parsers that must agree on every line the fast one accepts:
//! - [`parse_fast`]: branch-light SWAR parsing of the common case (1–15 digits per field, LF or
//!   CRLF), reading 8 bytes at a time; it declines anything else by returning `None`;
//! - [`parse_line`]: the careful path; it accepts every valid line and gives each invalid one a
//!   [`Reason`]. Fuzzed (parser/fuzz) and property-tested against the fast path.

/// Why a line is bad. Classification order is fixed (first matching rule wins) so that the same
/// line always gets the same reason; see [`parse_line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Longer than the configured `line_bytes_max` (LF excluded).
    TooLong,
    /// A NUL or other control byte (CR is allowed only right before the LF).
    Binary,
    /// Nothing between two line ends.
    Empty,
    /// A tab, a leading or trailing space, or two spaces in a row.
    Whitespace,
    /// Only one field.
    MissingField,
    /// More than two fields.
    ExtraField,
    /// A field starts with `+` or `-`.
    Sign,
    /// A field holds something other than ASCII digits (letters, non-ASCII digits, NBSP, …).
    NonDigit,
    /// A field is larger than `i64::MAX`.
    OutOfRange,
}

impl Reason {
    /// Every reason, in classification order.
    pub const ALL: [Reason; 9] = [
        Reason::TooLong,
        Reason::Binary,
        Reason::Empty,
        Reason::Whitespace,
        Reason::MissingField,
        Reason::ExtraField,
        Reason::Sign,
        Reason::NonDigit,
        Reason::OutOfRange,
    ];

    /// Stable kebab-case name, used in dead-letter records and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLong => "too-long",
            Reason::Binary => "binary",
            Reason::Empty => "empty",
            Reason::Whitespace => "whitespace",
            Reason::MissingField => "missing-field",
            Reason::ExtraField => "extra-field",
            Reason::Sign => "sign",
            Reason::NonDigit => "non-digit",
            Reason::OutOfRange => "out-of-range",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses one line (the bytes before its LF; a trailing CR is tolerated).
///
/// Rules, in order: longer than `line_bytes_max` → [`Reason::TooLong`]; a control byte other
/// than a final CR → [`Reason::Binary`]; nothing left → [`Reason::Empty`]; tab, leading,
/// trailing or double space → [`Reason::Whitespace`]; one field → [`Reason::MissingField`];
/// three or more → [`Reason::ExtraField`]; a sign → [`Reason::Sign`]; any non-digit →
/// [`Reason::NonDigit`]; above `i64::MAX` → [`Reason::OutOfRange`].
pub fn parse_line(line: &[u8], line_bytes_max: usize) -> Result<(i64, i64), Reason> {
    if line.len() > line_bytes_max {
        return Err(Reason::TooLong);
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Reason::Binary);
    }
    if line.is_empty() {
        return Err(Reason::Empty);
    }
    if line.contains(&b'\t')
        || line[0] == b' '
        || line[line.len() - 1] == b' '
        || line.windows(2).any(|w| w == b"  ")
    {
        return Err(Reason::Whitespace);
    }
    let mut fields = line.split(|&b| b == b' ');
    let (Some(id), Some(amount)) = (fields.next(), fields.next()) else {
        return Err(Reason::MissingField);
    };
    if fields.next().is_some() {
        return Err(Reason::ExtraField);
    }
    Ok((parse_field(id)?, parse_field(amount)?))
}

fn parse_field(field: &[u8]) -> Result<i64, Reason> {
    if matches!(field.first(), Some(b'+' | b'-')) {
        return Err(Reason::Sign);
    }
    if !field.iter().all(u8::is_ascii_digit) {
        return Err(Reason::NonDigit);
    }
    let mut value: i64 = 0;
    for &b in field {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(b - b'0')))
            .ok_or(Reason::OutOfRange)?;
    }
    Ok(value)
}

/// Bytes the fast path may read from a line start; callers use [`parse_fast`] only when this
/// many bytes are available, so it never reads out of bounds.
pub const FAST_LOOKAHEAD: usize = 40;

const ASCII_ZEROS: u64 = 0x3030_3030_3030_3030;

const POW10: [i64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];

/// Number of leading ASCII digits in the 8 bytes of `w` (little-endian: byte 0 first), 0..=8.
///
/// After `x = w ^ '0'`, a digit lane holds 0..=9. `x + 0x76` sets a lane's high bit exactly when
/// the lane is ≥ 10, and `| x` covers lanes ≥ 0x80. A carry out of a lane only happens for
/// non-digit lanes and only moves upwards, so the lowest flagged lane is exact.
#[inline(always)]
fn leading_digits(w: u64) -> usize {
    let x = w ^ ASCII_ZEROS;
    let flags = (x.wrapping_add(0x7676_7676_7676_7676) | x) & 0x8080_8080_8080_8080;
    (flags.trailing_zeros() / 8) as usize
}

/// Value of the first `n` (1..=8) digits of `w`.
#[inline(always)]
fn digits_value(w: u64, n: usize) -> i64 {
    // Move the n digit lanes to the top; the lanes shifted in are zeros (leading zeros).
    let mut v = (w ^ ASCII_ZEROS) << (8 * (8 - n));
    v = (v.wrapping_mul(10 << 8 | 1)) >> 8 & 0x00FF_00FF_00FF_00FF;
    v = (v.wrapping_mul(100 << 16 | 1)) >> 16 & 0x0000_FFFF_0000_FFFF;
    v = (v.wrapping_mul(10_000 << 32 | 1)) >> 32;
    v as i64
}

/// The 8 bytes of `bytes[at..]` as a little-endian word.
#[inline(always)]
fn word(bytes: &[u8; FAST_LOOKAHEAD], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A number of 1–15 digits at `bytes[at..]` (it cannot overflow `i64`): `(value, digits)`.
#[inline(always)]
fn number(bytes: &[u8; FAST_LOOKAHEAD], at: usize) -> Option<(i64, usize)> {
    let w = word(bytes, at);
    let n = leading_digits(w);
    if n == 0 {
        return None;
    }
    if n < 8 {
        return Some((digits_value(w, n), n));
    }
    let w2 = word(bytes, at + 8);
    match leading_digits(w2) {
        0 => Some((digits_value(w, 8), 8)),
        8 => None,
        n2 => Some((
            digits_value(w, 8) * POW10[n2] + digits_value(w2, n2),
            8 + n2,
        )),
    }
}

/// The common case, or `None` to defer to [`parse_line`]: `data[at..]` starts a line of 1–15
/// digits, one space, 1–15 digits, then LF or CRLF. Returns `(id, amount, next line start)`.
/// Declines when fewer than [`FAST_LOOKAHEAD`] bytes follow `at`.
///
/// The usual line (an id of 1–8 digits, an amount of 1–7, LF) is read from one word per
/// field and the byte after each, from a window whose length the compiler knows (no bounds
/// checks); other lines go through [`number`], which reads a longer field as two words.
#[inline(always)]
pub fn parse_fast(data: &[u8], at: usize) -> Option<(i64, i64, usize)> {
    let bytes: &[u8; FAST_LOOKAHEAD] = data.get(at..at + FAST_LOOKAHEAD)?.try_into().ok()?;
    let w = word(bytes, 0);
    let n1 = leading_digits(w);
    if n1 != 0 && bytes[n1] == b' ' {
        let w2 = word(bytes, n1 + 1);
        let n2 = leading_digits(w2);
        if (1..8).contains(&n2) && bytes[n1 + 1 + n2] == b'\n' {
            return Some((digits_value(w, n1), digits_value(w2, n2), at + n1 + n2 + 2));
        }
    }
    parse_long(bytes, at)
}

/// [`parse_fast`] for the lines its usual case does not cover.
#[inline(always)]
fn parse_long(bytes: &[u8; FAST_LOOKAHEAD], at: usize) -> Option<(i64, i64, usize)> {
    let (id, n1) = number(bytes, 0)?;
    if bytes[n1] != b' ' {
        return None;
    }
    let q = n1 + 1;
    let (amount, n2) = number(bytes, q)?;
    let end = q + n2;
    let next = match bytes[end] {
        b'\n' => end + 1,
        b'\r' if bytes[end + 1] == b'\n' => end + 2,
        _ => return None,
    };
    Some((id, amount, at + next))
}

/// Fuzzing entry point: runs both parsers on `data` (as a line followed by an LF) and panics
/// if they disagree or if either panics.
#[doc(hidden)]
pub fn check_line_parsers(data: &[u8]) {
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(i) => &data[..i],
        None => data,
    };
    let careful = parse_line(line, 4096);
    let mut padded = line.to_vec();
    padded.push(b'\n');
    padded.resize(padded.len() + FAST_LOOKAHEAD, 0);
    if let Some((id, amount, next)) = parse_fast(&padded, 0) {
        assert_eq!(next, line.len() + 1, "fast path ended the line elsewhere");
        assert_eq!(
            careful,
            Ok((id, amount)),
            "fast path accepted what parse_line does not"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4096;

    #[test]
    fn accepts_valid_lines() {
        assert_eq!(parse_line(b"123 12345", MAX), Ok((123, 12345)));
        assert_eq!(parse_line(b"0 0", MAX), Ok((0, 0)));
        assert_eq!(parse_line(b"7 8\r", MAX), Ok((7, 8)));
        assert_eq!(parse_line(b"007 010", MAX), Ok((7, 10)));
        assert_eq!(
            parse_line(b"9223372036854775807 9223372036854775807", MAX),
            Ok((i64::MAX, i64::MAX))
        );
    }

    #[test]
    fn every_reason() {
        let cases: &[(&[u8], Reason)] = &[
            (b"", Reason::Empty),
            (b"\r", Reason::Empty),
            (b"123", Reason::MissingField),
            (b"123 4 5", Reason::ExtraField),
            (b"-1 5", Reason::Sign),
            (b"1 +5", Reason::Sign),
            (b" 1 5", Reason::Whitespace),
            (b"1 5 ", Reason::Whitespace),
            (b"1  5", Reason::Whitespace),
            (b"1\t5", Reason::Whitespace),
            (b"1 5\t", Reason::Whitespace),
            (b"1a 5", Reason::NonDigit),
            (b"1 5.0", Reason::NonDigit),
            ("1 \u{0661}".as_bytes(), Reason::NonDigit), // ARABIC-INDIC DIGIT ONE
            ("1\u{a0}5".as_bytes(), Reason::MissingField), // NBSP is not a separator
            ("1 5\u{a0}".as_bytes(), Reason::NonDigit),
            (b"9223372036854775808 1", Reason::OutOfRange),
            (b"1 99999999999999999999", Reason::OutOfRange),
            (b"1 2\x00", Reason::Binary),
            (b"\x00\x01\x02", Reason::Binary),
            (b"1 2\r\r", Reason::Binary),
            (b"1\r2 3", Reason::Binary),
        ];
        for (line, reason) in cases {
            assert_eq!(
                parse_line(line, MAX),
                Err(*reason),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(parse_line(&[b'1'; 65], 64), Err(Reason::TooLong));
        assert_eq!(parse_line(b"1 2", 3), Ok((1, 2)));
    }

    #[test]
    fn swar_helpers_match_scalar() {
        for s in [
            "", "1", "12", "1234567", "12345678", "0000000", "9999999", "12 3", "1x",
        ] {
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(8, b'\n');
            let w = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            let n = s.bytes().take_while(u8::is_ascii_digit).count().min(8);
            assert_eq!(leading_digits(w), n, "{s}");
            if (1..=8).contains(&n) {
                assert_eq!(digits_value(w, n), s[..n].parse::<i64>().unwrap(), "{s}");
            }
        }
        // Bytes right around the digit range.
        for b in 0u8..=255 {
            let w = u64::from_le_bytes([b, b'\n', 0, 0, 0, 0, 0, 0]);
            assert_eq!(
                leading_digits(w),
                usize::from(b.is_ascii_digit()),
                "byte {b}"
            );
        }
    }

    #[test]
    fn fast_path_agrees_or_declines() {
        let lines: &[&[u8]] = &[
            b"1 2\n",
            b"1234567 7654321\n",
            b"12345678 1\n",
            b"1 12345678\n",
            b"12345678 1234567\n",
            b"12345678 1234567\r\n",
            b"123456789 1\n",
            b"12345678 12345678\n",
            b"1234567812345678 1\n",
            b"1 2\n3 4\n",
            b"1 2\r\n",
            b"1 2\r\r\n",
            b"1 2\r3\n",
            b"1  2\n",
            b" 1 2\n",
            b"1 2 3\n",
            b"1 2",
            b"-1 2\n",
            b"0 0\n",
        ];
        for line in lines {
            let mut data = line.to_vec();
            data.resize(data.len() + FAST_LOOKAHEAD, b'#');
            if let Some((id, amount, next)) = parse_fast(&data, 0) {
                let end = line.iter().position(|&b| b == b'\n').unwrap();
                assert_eq!(next, end + 1);
                assert_eq!(parse_line(&line[..end], MAX), Ok((id, amount)));
            }
        }
        let mut data = b"42 99\n".to_vec();
        data.resize(FAST_LOOKAHEAD, 0);
        assert_eq!(parse_fast(&data, 0), Some((42, 99, 6)));
        let mut data = b"100000000 123456789012\n".to_vec();
        data.resize(64, 0);
        assert_eq!(
            parse_fast(&data, 0),
            Some((100_000_000, 123_456_789_012, 23))
        );
    }

    proptest::proptest! {
        #[test]
        fn the_parsers_agree_on_lines_of_any_field_lengths(line in "[0-9]{1,19} [0-9]{1,19}\r?") {
            check_line_parsers(line.as_bytes());
        }

        #[test]
        fn the_parsers_agree_on_near_misses(
            line in proptest::collection::vec(proptest::sample::select(b"0123456789  \r\t+-a".to_vec()), 0..40)
        ) {
            check_line_parsers(&line);
        }
    }
}
