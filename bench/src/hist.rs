//! A small latency histogram that merges across processes: values are bucketed to seven
//! significant bits (under 1 % error), so a worker sends its buckets and the orchestrator adds them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// Bucket lower bound (µs) → count.
    buckets: BTreeMap<u64, u64>,
    count: u64,
    sum: u64,
    max: u64,
}

fn bucket(v: u64) -> u64 {
    if v < 128 {
        return v;
    }
    let shift = 64 - v.leading_zeros() - 7;
    (v >> shift) << shift
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        *self.buckets.entry(bucket(micros)).or_default() += 1;
        self.count += 1;
        self.sum += micros;
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (k, v) in &other.buckets {
            *self.buckets.entry(*k).or_default() += v;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0.0–1.0), in µs; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            return self.max;
        }
        let mut seen = 0;
        for (k, v) in &self.buckets {
            seen += v;
            if seen >= rank {
                return (*k).min(self.max);
            }
        }
        self.max
    }

    /// p50, p90, p99 and max in milliseconds, and the count: what every JSON result reports.
    pub fn summary_ms(&self) -> serde_json::Value {
        let ms = |us: u64| (us as f64 / 1000.0 * 100.0).round() / 100.0;
        serde_json::json!({
            "count": self.count,
            "mean_ms": self.sum.checked_div(self.count).map(ms).unwrap_or(0.0),
            "p50_ms": ms(self.quantile(0.50)),
            "p90_ms": ms(self.quantile(0.90)),
            "p99_ms": ms(self.quantile(0.99)),
            "max_ms": ms(self.max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 9_900.0).abs() / 9_900.0 < 0.01, "{p99}");
        assert_eq!(h.quantile(1.0), 10_000);
        assert_eq!(h.quantile(0.0001), 1);
    }

    #[test]
    fn merged_histograms_add_up() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record(10);
        b.record(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.quantile(1.0), 1_000_000);
    }
}
