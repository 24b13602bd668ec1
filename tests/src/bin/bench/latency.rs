//! Latency samples and their percentiles (nearest rank).

/// Samples in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    samples_ms: Vec<f64>,
}

impl Latency {
    /// Add one sample.
    pub fn push(&mut self, ms: f64) {
        self.samples_ms.push(ms);
    }

    /// How many samples.
    pub fn count(&self) -> usize {
        self.samples_ms.len()
    }

    /// The `p`-th percentile (`0 < p <= 100`) by nearest rank; `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let mut sorted = self.samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
    }

    /// The median.
    pub fn p50(&self) -> Option<f64> {
        self.percentile(50.0)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Option<f64> {
        self.percentile(99.0)
    }
}

impl FromIterator<f64> for Latency {
    fn from_iter<I: IntoIterator<Item = f64>>(samples: I) -> Self {
        Latency {
            samples_ms: samples.into_iter().collect(),
        }
    }
}

impl Extend<f64> for Latency {
    fn extend<I: IntoIterator<Item = f64>>(&mut self, samples: I) {
        self.samples_ms.extend(samples);
    }
}

/// Milliseconds in a [`std::time::Duration`].
pub fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::Latency;

    #[test]
    fn nearest_rank() {
        let mut latency = Latency::default();
        assert_eq!(latency.p50(), None);
        latency.extend((1..=100).rev().map(f64::from));
        assert_eq!(latency.p50(), Some(50.0));
        assert_eq!(latency.p99(), Some(99.0));
        assert_eq!(latency.percentile(100.0), Some(100.0));
        latency.push(1000.0);
        assert_eq!(latency.count(), 101);
        assert_eq!(latency.p50(), Some(51.0));
    }
}
