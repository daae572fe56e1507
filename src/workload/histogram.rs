//! A small latency histogram: logarithmic buckets 2% wide, so quantiles are within 2% and
//! memory stays constant however long the run.

use std::time::Duration;

const GROWTH: f64 = 1.02;
/// Covers 1µs .. about 10 minutes.
const BUCKETS: usize = 1400;

#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_micros: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max_micros: 0,
        }
    }
}

fn bucket(micros: u64) -> usize {
    if micros <= 1 {
        return 0;
    }
    ((micros as f64).ln() / GROWTH.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

/// The upper bound of bucket `b`, in microseconds.
fn upper(b: usize) -> f64 {
    GROWTH.powi(b as i32)
}

impl Histogram {
    pub(crate) fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(us)] += 1;
        self.total += 1;
        self.max_micros = self.max_micros.max(us);
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max_micros = self.max_micros.max(other.max_micros);
    }

    #[cfg(test)]
    fn count(&self) -> u64 {
        self.total
    }

    pub(crate) fn max(&self) -> Duration {
        Duration::from_micros(self.max_micros)
    }

    /// The `q` quantile (0..=1); zero when empty.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let us = upper(b).min(self.max_micros as f64);
                return Duration::from_micros(us as u64);
            }
        }
        self.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).as_secs_f64() * 1000.0;
        let p99 = h.quantile(0.99).as_secs_f64() * 1000.0;
        assert!((50.0..=51.0).contains(&p50), "{p50}");
        assert!((99.0..=101.0).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Duration::from_millis(100));
        let mut other = Histogram::default();
        other.record(Duration::from_secs(2));
        h.merge(&other);
        assert_eq!(h.count(), 101);
        assert_eq!(h.max(), Duration::from_secs(2));
    }
}
