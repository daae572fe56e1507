//! `.RESOLVED` file names of the cloud-storage sink: `YYYYMMDDHHMMSS` (UTC) + 9 digits of
//! nanoseconds + 10 digits of logical counter.

use super::WebhookError;
use crate::civil::{days_from_civil, days_in_month};
use crate::hlc::Hlc;

/// Number of digits in a resolved file name.
pub(crate) const RESOLVED_DIGITS: usize = 33;

/// Converts the 33 digits of a resolved file name into an HLC.
pub fn parse_resolved_digits(digits: &str) -> Result<Hlc, WebhookError> {
    let bad = |reason| WebhookError::BadResolvedName {
        name: digits.to_string(),
        reason,
    };
    if digits.len() != RESOLVED_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected 33 digits"));
    }
    // All ASCII digits, so byte slicing is safe and every field fits in an i64.
    let num = |from: usize, to: usize| -> i64 {
        digits.as_bytes()[from..to]
            .iter()
            .fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0'))
    };
    let (year, month, day) = (num(0, 4), num(4, 6), num(6, 8));
    let (hour, minute, second) = (num(8, 10), num(10, 12), num(12, 14));
    let (frac, logical) = (num(14, 23), num(23, 33));

    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("invalid calendar date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("invalid time of day"));
    }
    let logical = i32::try_from(logical).map_err(|_| bad("logical counter out of range"))?;
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    let nanos = secs
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(frac))
        .filter(|n| *n >= 0)
        .ok_or_else(|| bad("time out of range"))?;
    Ok(Hlc::new(nanos, logical))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_example_gives_its_nanos() {
        let h = parse_resolved_digits("202004042351304139680000000000000").unwrap();
        assert_eq!(h, Hlc::new(1_586_044_290_413_968_000, 0));
    }

    #[test]
    fn the_logical_counter_is_the_last_ten_digits() {
        let h = parse_resolved_digits("197001010000000000000010000000042").unwrap();
        assert_eq!(h, Hlc::new(1, 42));
    }

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1970, 3, 1), 59);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 12, 31), 20_088);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn leap_days_are_accepted_only_in_leap_years() {
        assert!(parse_resolved_digits("200002291200000000000000000000000").is_ok());
        assert!(parse_resolved_digits("202402290000000000000000000000000").is_ok());
        assert!(parse_resolved_digits("190002290000000000000000000000000").is_err());
        assert!(parse_resolved_digits("202302290000000000000000000000000").is_err());
    }

    #[test]
    fn out_of_range_fields_are_rejected() {
        for bad in [
            "202013010000000000000000000000000", // month 13
            "202000010000000000000000000000000", // month 0
            "202004000000000000000000000000000", // day 0
            "202004310000000000000000000000000", // April 31
            "202004042400000000000000000000000", // hour 24
            "202004042360000000000000000000000", // minute 60
            "202004042359600000000000000000000", // second 60
            "202004042351300000000009999999999", // logical > i32::MAX
            "196912312359590000000000000000000", // before the epoch
            "999912312359590000000000000000000", // past i64 nanos
            "20200404235130413968000000000000",  // 32 digits
            "20200404235130413968000000000000x",
        ] {
            let e = parse_resolved_digits(bad).unwrap_err();
            assert!(e.is_routing(), "{bad}: {e}");
        }
    }

    #[test]
    fn the_last_representable_instant_is_accepted() {
        // 2262-04-11T23:47:16.854775807Z is i64::MAX nanoseconds.
        let h = parse_resolved_digits("226204112347168547758070000000000").unwrap();
        assert_eq!(h.nanos(), i64::MAX);
        assert!(parse_resolved_digits("226204112347168547758080000000000").is_err());
    }
}
