//! Quantiles of a long stream of durations in fixed memory: log-spaced buckets 1 % wide from
//! 1 µs to about 20 minutes, so a stream's summary needs no growing list of samples.

use std::time::Duration;

const BUCKETS: usize = 2100;
const RATIO: f64 = 1.01;

/// A histogram of durations (a fixed 8 KiB of counts, allocated once): record a stream's
/// latencies one by one, read their quantiles at any time.
pub struct LatencyHistogram {
    counts: Box<[u32; BUCKETS]>,
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

impl LatencyHistogram {
    /// Count one duration; below 1 µs it counts as 1 µs, beyond about 20 minutes as 20 minutes.
    pub fn record(&mut self, duration: Duration) {
        let micros = duration.as_secs_f64() * 1e6;
        let bucket = if micros <= 1.0 {
            0
        } else {
            ((micros.ln() / RATIO.ln()) as usize).min(BUCKETS - 1)
        };
        self.counts[bucket] = self.counts[bucket].saturating_add(1);
        self.total += 1;
    }

    /// Durations recorded so far.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (0..=1), within 1 %; `None` before the first sample.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let bucket = self
            .counts
            .iter()
            .position(|&c| {
                seen += u64::from(c);
                seen >= rank
            })
            .unwrap_or(BUCKETS - 1);
        // The bucket's geometric centre.
        Some(Duration::from_secs_f64(
            RATIO.powf(bucket as f64 + 0.5) * 1e-6,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut histogram = LatencyHistogram::default();
        assert_eq!(histogram.quantile(0.5), None);
        for ms in 1..=101 {
            histogram.record(Duration::from_millis(ms));
        }
        let near = |got: Duration, want_ms: f64| {
            let got = got.as_secs_f64() * 1e3;
            assert!((got / want_ms - 1.0).abs() < 0.01, "{got} vs {want_ms}");
        };
        near(histogram.quantile(0.5).unwrap(), 51.0);
        near(histogram.quantile(0.99).unwrap(), 100.0);
        near(histogram.quantile(0.0).unwrap(), 1.0);
        assert_eq!(histogram.count(), 101);
    }
}
