//! Rolling latency percentiles and success rates per route and per upstream, over the windows
//! the policy names (`telemetry.stats.windows`, plus every SLA rule's window): what
//! `GET /admin/stats` shows and SLA rules are checked against.
//!
//! Series live outside the policy, by name and windows, so a reload that keeps them keeps
//! their numbers. Recording is two atomic adds per window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::rolling::{now_ms, RollingCounts, RollingHistogram};

/// One window's numbers.
#[derive(Debug)]
struct Window {
    length: Duration,
    /// Time to the response head (what a caller waits before anything arrives).
    first_byte: RollingHistogram,
    /// The whole exchange.
    total: RollingHistogram,
    /// Successes (0) and failures (1).
    outcomes: RollingCounts,
    /// Requests answered from the cache, whole: kept apart so their microseconds do not hide
    /// the upstream's latency in the percentiles above.
    cache_hits: RollingHistogram,
}

/// The rolling numbers of one route or upstream.
#[derive(Debug)]
pub struct Series {
    windows: Vec<Window>,
}

/// One finished request (or upstream attempt), as the statistics see it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub first_byte: Option<Duration>,
    pub total: Duration,
    pub failed: bool,
}

/// What a window's numbers say now.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub failures: u64,
    /// Percent of requests that did not fail (100 with no requests).
    pub success_rate: f64,
    pub first_byte_ms: Percentiles,
    pub total_ms: Percentiles,
    /// Requests answered from the cache (not in `requests` or the percentiles above).
    pub cache_hits: u64,
    pub cache_hit_ms: Percentiles,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(histogram: &RollingHistogram, now: u64) -> Self {
        Self::counted(histogram, now).1
    }

    /// The percentiles and how many samples they are of.
    fn counted(histogram: &RollingHistogram, now: u64) -> (u64, Self) {
        let (count, [p50, p95, p99]) = histogram.quantiles([0.5, 0.95, 0.99], now);
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let percentiles = Self {
            p50: ms(p50),
            p95: ms(p95),
            p99: ms(p99),
        };
        (count, percentiles)
    }

    /// The value of a percentile by its number (50, 95, 99).
    pub fn get(&self, percentile: u8) -> Option<f64> {
        match percentile {
            50 => Some(self.p50),
            95 => Some(self.p95),
            99 => Some(self.p99),
            _ => None,
        }
    }
}

impl Series {
    fn new(windows: &[Duration]) -> Self {
        Self {
            windows: windows
                .iter()
                .map(|length| Window {
                    length: *length,
                    first_byte: RollingHistogram::new(*length),
                    total: RollingHistogram::new(*length),
                    outcomes: RollingCounts::new(*length),
                    cache_hits: RollingHistogram::new(*length),
                })
                .collect(),
        }
    }

    pub fn record(&self, sample: Sample) {
        let now = now_ms();
        for window in &self.windows {
            if let Some(first_byte) = sample.first_byte {
                window.first_byte.record(first_byte, now);
            }
            window.total.record(sample.total, now);
            window.outcomes.add(usize::from(sample.failed), now);
        }
    }

    /// A request answered from the cache: counted apart from the rest.
    pub fn record_cache_hit(&self, total: Duration) {
        let now = now_ms();
        for window in &self.windows {
            window.cache_hits.record(total, now);
        }
    }

    /// The numbers of the window of this length, if the series keeps one.
    pub fn summary(&self, length: Duration) -> Option<Summary> {
        let now = now_ms();
        let window = self.windows.iter().find(|w| w.length == length)?;
        let [ok, failed] = window.outcomes.totals(now);
        let requests = ok + failed;
        let (cache_hits, cache_hit_ms) = Percentiles::counted(&window.cache_hits, now);
        Some(Summary {
            requests,
            failures: failed,
            success_rate: if requests == 0 {
                100.0
            } else {
                100.0 * ok as f64 / requests as f64
            },
            first_byte_ms: Percentiles::of(&window.first_byte, now),
            total_ms: Percentiles::of(&window.total, now),
            cache_hits,
            cache_hit_ms,
        })
    }

    pub fn windows(&self) -> impl Iterator<Item = Duration> + '_ {
        self.windows.iter().map(|w| w.length)
    }
}

/// Series by name, shared by every policy.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    series: Mutex<HashMap<String, Arc<Series>>>,
}

impl StatsRegistry {
    /// The series of a route (`route:NAME`) or upstream (`upstream:NAME`) with these windows:
    /// the existing one when the windows are the same.
    pub fn series(&self, id: &str, windows: &[Duration]) -> Arc<Series> {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = series.get(id) {
            if existing.windows().eq(windows.iter().copied()) {
                return existing.clone();
            }
        }
        let fresh = Arc::new(Series::new(windows));
        series.insert(id.to_owned(), fresh.clone());
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_summarises_each_window() {
        let registry = StatsRegistry::default();
        let windows = [Duration::from_secs(60), Duration::from_secs(300)];
        let series = registry.series("route:a", &windows);
        for ms in 1..=100u64 {
            series.record(Sample {
                first_byte: Some(Duration::from_millis(ms)),
                total: Duration::from_millis(ms * 2),
                failed: ms % 10 == 0,
            });
        }
        let summary = series.summary(Duration::from_secs(60)).unwrap();
        assert_eq!((summary.requests, summary.failures), (100, 10));
        assert_eq!(summary.success_rate, 90.0);
        assert!(
            (95.0..=107.0).contains(&summary.first_byte_ms.p95),
            "{summary:?}"
        );
        assert!(
            (190.0..=214.0).contains(&summary.total_ms.p95),
            "{summary:?}"
        );
        // Hits are counted apart and leave the percentiles alone.
        for _ in 0..1000 {
            series.record_cache_hit(Duration::from_micros(50));
        }
        let with_hits = series.summary(Duration::from_secs(60)).unwrap();
        assert_eq!(with_hits.cache_hits, 1000);
        assert_eq!(with_hits.requests, 100);
        assert_eq!(with_hits.total_ms, summary.total_ms);
        assert!(with_hits.cache_hit_ms.p99 < 1.0, "{with_hits:?}");
        assert!(series.summary(Duration::from_secs(10)).is_none());
        // The same windows: the same series; others: a fresh one.
        assert!(Arc::ptr_eq(&series, &registry.series("route:a", &windows)));
        let other = registry.series("route:a", &windows[..1]);
        assert_eq!(other.summary(windows[0]).unwrap().requests, 0);
    }
}
