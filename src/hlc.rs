//! Hybrid logical clock timestamps, as CockroachDB writes them in `updated` and `resolved`.

use std::fmt;
use std::str::FromStr;

/// A CockroachDB HLC: wall nanoseconds and a logical counter. Ordered by nanos, then logical.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc {
    nanos: i64,
    logical: i32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HlcError {
    #[error("timestamp {0:?} must have exactly one '.' separating nanos and logical")]
    Shape(String),
    #[error("timestamp {0:?} has an invalid nanos part")]
    Nanos(String),
    #[error("timestamp {0:?} has an invalid logical part (expected 10 digits)")]
    Logical(String),
}

impl Hlc {
    pub const ZERO: Hlc = Hlc {
        nanos: 0,
        logical: 0,
    };
    pub const MAX: Hlc = Hlc {
        nanos: i64::MAX,
        logical: i32::MAX,
    };

    pub const fn new(nanos: i64, logical: i32) -> Self {
        Hlc { nanos, logical }
    }

    pub const fn nanos(self) -> i64 {
        self.nanos
    }

    pub const fn logical(self) -> i32 {
        self.logical
    }

    pub(crate) const fn is_zero(self) -> bool {
        self.nanos == 0 && self.logical == 0
    }

    /// The smallest timestamp after this one; [`Hlc::MAX`] has none and stays itself rather
    /// than wrapping to an earlier time.
    pub fn next(self) -> Self {
        if self == Hlc::MAX {
            self
        } else if self.logical == i32::MAX {
            Hlc::new(self.nanos.saturating_add(1), 0)
        } else {
            Hlc::new(self.nanos, self.logical + 1)
        }
    }

    /// The largest timestamp before this one; the smallest representable one stays itself.
    pub fn before(self) -> Self {
        if self.nanos == i64::MIN && self.logical <= 0 {
            self
        } else if self.logical > 0 {
            Hlc::new(self.nanos, self.logical - 1)
        } else {
            Hlc::new(self.nanos.saturating_sub(1), i32::MAX)
        }
    }

    /// Wall time in (fractional) seconds since the Unix epoch.
    pub fn seconds(self) -> f64 {
        self.nanos as f64 / 1e9
    }

    /// The HLC of a wall-clock instant (logical 0).
    pub fn from_system_time(t: std::time::SystemTime) -> Self {
        let nanos = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
            .unwrap_or(0);
        Hlc::new(nanos, 0)
    }

    /// The `DECIMAL` spelling used by the checkpoints table: nanos + logical/10^10.
    pub fn to_decimal(self) -> String {
        format!("{}.{:010}", self.nanos, self.logical)
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:010}", self.nanos, self.logical)
    }
}

impl FromStr for Hlc {
    type Err = HlcError;

    /// Parses `<nanos>.<logical>`; logical must be 10 digits unless it is zero (`1.0` is fine).
    /// Unlike the reference we accept only decimal digits: CockroachDB never emits hex or octal.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.');
        let (Some(n), Some(l), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(HlcError::Shape(s.to_string()));
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HlcError::Nanos(s.to_string()));
        }
        let nanos: i64 = n.parse().map_err(|_| HlcError::Nanos(s.to_string()))?;
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HlcError::Logical(s.to_string()));
        }
        let logical: i64 = if l.len() > 10 && l.bytes().any(|b| b != b'0') {
            return Err(HlcError::Logical(s.to_string()));
        } else if l.len() > 10 {
            0
        } else {
            l.parse().map_err(|_| HlcError::Logical(s.to_string()))?
        };
        if logical != 0 && l.len() != 10 {
            return Err(HlcError::Logical(s.to_string()));
        }
        let logical = i32::try_from(logical).map_err(|_| HlcError::Logical(s.to_string()))?;
        Ok(Hlc::new(nanos, logical))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonical_text() {
        let h: Hlc = "1586019746136571000.0000000001".parse().unwrap();
        assert_eq!(h, Hlc::new(1586019746136571000, 1));
        assert_eq!(h.to_string(), "1586019746136571000.0000000001");
        assert_eq!("1.0".parse::<Hlc>().unwrap(), Hlc::new(1, 0));
        assert_eq!("1.00".parse::<Hlc>().unwrap(), Hlc::new(1, 0));
        assert_eq!("0.0".parse::<Hlc>().unwrap(), Hlc::ZERO);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "1",
            "1.1",
            "123.123",
            "1.2.3",
            "-1.0",
            "a.0",
            "1.x",
            ".0",
            "1.",
            "0x10.0",
            "1.00000000001",
        ] {
            assert!(bad.parse::<Hlc>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn orders_by_nanos_then_logical() {
        let a = Hlc::new(1, 5);
        let b = Hlc::new(2, 0);
        assert!(a < b);
        assert!(Hlc::new(1, 4) < a);
        assert_eq!(a.next(), Hlc::new(1, 6));
        assert_eq!(b.before(), Hlc::new(1, i32::MAX));
        assert_eq!(a.before(), Hlc::new(1, 4));
    }

    #[test]
    fn next_and_before_never_go_the_wrong_way_at_the_ends() {
        // The largest HLC parses from text; its next used to wrap to an earlier time.
        let max: Hlc = "9223372036854775807.2147483647".parse().expect("parses");
        assert_eq!(max, Hlc::MAX);
        assert_eq!(max.next(), Hlc::MAX);
        assert_eq!(Hlc::new(i64::MAX, 0).next(), Hlc::new(i64::MAX, 1));
        assert_eq!(Hlc::new(5, i32::MAX).next(), Hlc::new(6, 0));
        let min = Hlc::new(i64::MIN, 0);
        assert_eq!(min.before(), min);
        assert_eq!(Hlc::new(i64::MIN, 1).before(), min);
        for h in [max, min, Hlc::ZERO, Hlc::new(3, i32::MAX)] {
            assert!(h.next() >= h && h.before() <= h, "{h}");
        }
    }
}
