//! Canonical equality of JSON values: two spellings of the same datum compare equal, so
//! a value read back from the target matches the one the changefeed sent.
//!
//! Numbers compare by decimal text (exponents expanded), and a string holding a number equals
//! that number (`1` == `"1"`, `1` != `"01"`); booleans only equal booleans; timestamps with an
//! offset are compared as UTC instants, fractions without trailing zeros; `\x` byte strings
//! ignore hex case; objects ignore key order; arrays compare element-wise.

use super::value::normalise_number;
use crate::civil::{days_from_civil, days_in_month};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, PartialEq, Eq)]
enum Canon {
    Null,
    Bool(bool),
    Text(String),
    Array(Vec<Canon>),
    Object(BTreeMap<String, Canon>),
}

fn canon(v: &Value) -> Canon {
    match v {
        Value::Null => Canon::Null,
        Value::Bool(b) => Canon::Bool(*b),
        Value::Number(n) => Canon::Text(normalise_number(n.as_str()).into_owned()),
        Value::String(s) => Canon::Text(canonical_text(s)),
        Value::Array(a) => Canon::Array(a.iter().map(canon).collect()),
        Value::Object(o) => Canon::Object(o.iter().map(|(k, v)| (k.clone(), canon(v))).collect()),
    }
}

/// Whether two property values are the same datum; `None` is an absent property, which only
/// equals another absent one (an explicit `null` is a value).
pub(crate) fn equal(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a == b || canon(a) == canon(b),
        _ => false,
    }
}

/// The comparable spelling of a string: numbers as plain decimals, timestamps normalised,
/// byte strings in lower-case hex; anything else as is.
fn canonical_text(s: &str) -> String {
    if is_json_number(s) {
        return normalise_number(s).into_owned();
    }
    if let Some(t) = normalise_timestamp(s) {
        return t;
    }
    if let Some(hex) = s.strip_prefix("\\x") {
        if hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return format!("\\x{}", hex.to_ascii_lowercase());
        }
    }
    s.to_string()
}

/// JSON number syntax: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
pub(crate) fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.f…][offset]` → with an offset, the UTC instant as
/// `YYYY-MM-DDTHH:MM:SS[.f]Z`; without one, the same shape without `Z`. The fraction keeps up
/// to nanoseconds, without trailing zeros. `None` when `s` is not such a timestamp.
pub(crate) fn normalise_timestamp(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.len() < 19 || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut frac = String::new();
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return None;
        }
        frac = s[start..i].trim_end_matches('0').to_string();
    }
    let offset = match &s[i..] {
        "" => None,
        "Z" | "z" => Some(0),
        rest => Some(parse_offset(rest)?),
    };
    let frac = if frac.is_empty() {
        frac
    } else {
        format!(".{frac}")
    };
    let Some(offset) = offset else {
        return Some(format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{frac}"
        ));
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// `+HH`, `+HHMM`, `+HH:MM`, `+HH:MM:SS` (or `-`) in seconds east of UTC.
fn parse_offset(s: &str) -> Option<i64> {
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits: String = s[1..].chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let colons = s[1..].matches(':').count();
    let (h, m, sec) = match (digits.len(), colons) {
        (2, 0) => (&digits[0..2], "0", "0"),
        (4, 0 | 1) => (&digits[0..2], &digits[2..4], "0"),
        (6, 2) => (&digits[0..2], &digits[2..4], &digits[4..6]),
        _ => return None,
    };
    let (h, m, sec): (i64, i64, i64) = (h.parse().ok()?, m.parse().ok()?, sec.parse().ok()?);
    if h > 15 || m > 59 || sec > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60 + sec))
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eq(a: &str, b: &str) -> bool {
        let a: Value = serde_json::from_str(a).unwrap();
        let b: Value = serde_json::from_str(b).unwrap();
        equal(Some(&a), Some(&b))
    }

    #[test]
    fn numbers_compare_by_decimal_text() {
        assert!(eq("1", r#""1""#));
        assert!(eq("4e2", "400"));
        assert!(eq(r#""4E+2""#, "400"));
        assert!(eq("9007199254740995", r#""9007199254740995""#));
        assert!(!eq("9007199254740995", "9007199254740994"));
        assert!(!eq("1", r#""01""#));
        assert!(!eq("1", "1.0"), "decimal text differs");
        assert!(!eq("1", "true"));
    }

    #[test]
    fn booleans_only_equal_booleans() {
        assert!(eq("true", "true"));
        assert!(!eq("true", r#""true""#));
        assert!(!eq("false", "0"));
        assert!(!eq("null", "false"));
    }

    #[test]
    fn absent_differs_from_null() {
        assert!(equal(None, None));
        assert!(!equal(None, Some(&Value::Null)));
        assert!(equal(Some(&Value::Null), Some(&Value::Null)));
    }

    #[test]
    fn timestamps_compare_as_utc_instants() {
        assert!(eq(
            r#""2024-02-23T23:39:22.135Z""#,
            r#""2024-02-23T23:39:22.135000+00:00""#
        ));
        assert!(eq(
            r#""2024-02-24T05:09:22.135+05:30""#,
            r#""2024-02-23T23:39:22.135Z""#
        ));
        assert!(eq(
            r#""2024-02-23 18:39:22.1350-05""#,
            r#""2024-02-23T23:39:22.135Z""#
        ));
        assert!(eq(
            r#""2016-01-25T10:10:10""#,
            r#""2016-01-25 10:10:10.000000""#
        ));
        assert!(!eq(r#""2016-01-25T10:10:10""#, r#""2016-01-25T10:10:10Z""#));
        assert!(!eq(
            r#""2024-02-23T23:39:22.135Z""#,
            r#""2024-02-23T23:39:22.136Z""#
        ));
        // Across a day, month and year boundary.
        assert_eq!(
            normalise_timestamp("2023-12-31T22:30:00-02:00").as_deref(),
            Some("2024-01-01T00:30:00Z")
        );
        assert_eq!(
            normalise_timestamp("2024-03-01T01:00:00.5+03").as_deref(),
            Some("2024-02-29T22:00:00.5Z")
        );
    }

    #[test]
    fn malformed_timestamps_are_plain_strings() {
        for s in [
            "2024-02-30T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00+25:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.1234567890Z",
            "2024-01-01X00:00:00Z",
            "2024-01-01",
            "not a time at all, really",
            "2024-01-01T00:00:00Zjunk",
            "२०२४-01-01T00:00:00Z",
        ] {
            assert_eq!(normalise_timestamp(s), None, "{s}");
        }
        assert!(!eq(
            r#""2024-02-30T00:00:00Z""#,
            r#""2024-03-01T00:00:00Z""#
        ));
    }

    #[test]
    fn byte_strings_ignore_hex_case() {
        assert!(eq(r#""\\x6162ff""#, r#""\\x6162FF""#));
        assert!(!eq(r#""\\x6162""#, r#""\\x6163""#));
        assert!(!eq(r#""\\xzz""#, r#""\\xZZ""#));
    }

    #[test]
    fn objects_ignore_key_order_and_arrays_compare_elementwise() {
        assert!(eq(r#"{"a":1,"b":[1,"2"]}"#, r#"{"b":["1",2],"a":"1"}"#));
        assert!(!eq(r#"{"a":1}"#, r#"{"a":1,"b":null}"#));
        assert!(!eq("[1,2]", "[2,1]"));
        assert!(!eq("[1]", "[1,1]"));
        assert!(equal(
            Some(&json!({"t": "2024-01-01T00:00:00+01:00"})),
            Some(&json!({"t": "2023-12-31T23:00:00Z"}))
        ));
    }

    #[test]
    fn number_syntax_is_strict() {
        for s in ["0", "-1", "1.5", "1e3", "-0.5E-2", "10"] {
            assert!(is_json_number(s), "{s}");
        }
        for s in [
            "", "-", "01", "1.", ".5", "1e", "+1", "1e+", "0x10", " 1", "NaN",
        ] {
            assert!(!is_json_number(s), "{s}");
        }
    }
}
