//! Totals in JSON. PostgreSQL keeps them as `NUMERIC` (they never overflow); JSON readers
//! differ in how many digits of a number they keep exactly (JavaScript: 2^53 − 1). So a total
//! is a JSON number when its magnitude is at most 2^53 − 1 (exact in every reader) and a
//! string of decimal digits otherwise, the same digits PostgreSQL holds.

use serde_json::Value;

/// The largest integer every JSON reader holds exactly (`Number.MAX_SAFE_INTEGER`).
pub const EXACT_MAX: i64 = (1 << 53) - 1;

/// `text`, PostgreSQL's decimal text of an integral `NUMERIC`, as a JSON number when it is
/// exact everywhere, else as that text.
pub fn total(text: &str) -> Value {
    match text.parse::<i64>() {
        Ok(n) if (-EXACT_MAX..=EXACT_MAX).contains(&n) => Value::from(n),
        _ => Value::from(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_while_exact_then_strings() {
        assert_eq!(total("0"), Value::from(0));
        assert_eq!(
            total("9007199254740991"),
            Value::from(9_007_199_254_740_991_i64)
        );
        assert_eq!(
            total("-9007199254740991"),
            Value::from(-9_007_199_254_740_991_i64)
        );
        assert_eq!(total("9007199254740992"), Value::from("9007199254740992"));
        assert_eq!(
            total("18446744073709551614"),
            Value::from("18446744073709551614")
        );
    }
}
