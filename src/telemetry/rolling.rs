//! Counts and latency distributions over a sliding window of time, lock-free: a ring of time
//! slices, each reset by the first writer that finds it holding an older slice's numbers.
//!
//! Used for circuit breakers (failures in the last 30 s), retry budgets (retries against
//! requests in the last 10 s) and latency percentiles (an upstream's p95 time to first byte).
//! A write that races a slice's reset may be lost; the numbers guide decisions, they are not
//! accounting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds since the process's first call: a monotonic clock that fits in an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Slices per window: a window's edge moves in steps of a tenth of its length.
const SLICES: usize = 10;

/// The slice a time falls in, and the ring index of that slice.
#[derive(Debug)]
struct Ring {
    slice_ms: u64,
}

impl Ring {
    fn new(window: Duration) -> Self {
        Self {
            slice_ms: (window.as_millis() as u64 / SLICES as u64).max(1),
        }
    }

    fn slice(&self, now: u64) -> (u64, usize) {
        let slice = now / self.slice_ms;
        (slice, (slice % SLICES as u64) as usize)
    }
}

/// Makes `epoch` hold `current`, calling `reset` once if it held an older slice.
fn claim(epoch: &AtomicU64, current: u64, reset: impl FnOnce()) {
    let seen = epoch.load(Ordering::Acquire);
    if seen != current
        && epoch
            .compare_exchange(seen, current, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        reset();
    }
}

#[derive(Debug, Default)]
struct CountSlice {
    epoch: AtomicU64,
    counts: [AtomicU64; 2],
}

/// Two counts (e.g. successes and failures) over a sliding window.
#[derive(Debug)]
pub struct RollingCounts {
    ring: Ring,
    slices: [CountSlice; SLICES],
}

impl RollingCounts {
    pub fn new(window: Duration) -> Self {
        Self {
            ring: Ring::new(window),
            slices: Default::default(),
        }
    }

    /// Adds one to count `which` (0 or 1).
    pub fn add(&self, which: usize, now: u64) {
        let (current, index) = self.ring.slice(now);
        let slice = &self.slices[index];
        claim(&slice.epoch, current, || {
            for count in &slice.counts {
                count.store(0, Ordering::Relaxed);
            }
        });
        slice.counts[which].fetch_add(1, Ordering::Relaxed);
    }

    /// Both counts over the window ending now.
    pub fn totals(&self, now: u64) -> [u64; 2] {
        let (current, _) = self.ring.slice(now);
        let mut totals = [0; 2];
        for slice in &self.slices {
            let epoch = slice.epoch.load(Ordering::Acquire);
            if current.saturating_sub(epoch) < SLICES as u64 {
                for (total, count) in totals.iter_mut().zip(&slice.counts) {
                    *total += count.load(Ordering::Relaxed);
                }
            }
        }
        totals
    }
}

/// Buckets of a latency histogram: exact below 16 µs, then 8 per power of two (each bucket at
/// most 12.5 % wide), up to 2^32 µs.
const LINEAR: usize = 16;
const PER_OCTAVE: usize = 8;
const BUCKETS: usize = LINEAR + (32 - 4) * PER_OCTAVE;

fn bucket_of(micros: u64) -> usize {
    let micros = micros.min(u64::from(u32::MAX));
    if micros < LINEAR as u64 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros() as usize; // ≥ 4
    let sub = (micros >> (octave - 3)) as usize & (PER_OCTAVE - 1);
    LINEAR + (octave - 4) * PER_OCTAVE + sub
}

/// The upper bound of a bucket, in microseconds.
fn bucket_ceiling(bucket: usize) -> u64 {
    if bucket < LINEAR {
        return bucket as u64;
    }
    let octave = (bucket - LINEAR) / PER_OCTAVE + 4;
    let sub = ((bucket - LINEAR) % PER_OCTAVE) as u64;
    ((PER_OCTAVE as u64 + sub + 1) << (octave - 3)) - 1
}

struct HistogramSlice {
    epoch: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

/// A latency distribution over a sliding window, for percentiles.
pub struct RollingHistogram {
    ring: Ring,
    slices: Vec<HistogramSlice>,
}

impl std::fmt::Debug for RollingHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollingHistogram")
            .field("slice_ms", &self.ring.slice_ms)
            .finish_non_exhaustive()
    }
}

impl RollingHistogram {
    pub fn new(window: Duration) -> Self {
        let slices = (0..SLICES)
            .map(|_| HistogramSlice {
                epoch: AtomicU64::new(0),
                buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        Self {
            ring: Ring::new(window),
            slices,
        }
    }

    pub fn record(&self, latency: Duration, now: u64) {
        let (current, index) = self.ring.slice(now);
        let slice = &self.slices[index];
        claim(&slice.epoch, current, || {
            for bucket in slice.buckets.iter() {
                bucket.store(0, Ordering::Relaxed);
            }
        });
        slice.buckets[bucket_of(latency.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    /// The window's samples merged: count per bucket.
    fn merged(&self, now: u64) -> Vec<u64> {
        let (current, _) = self.ring.slice(now);
        let mut merged = vec![0; BUCKETS];
        for slice in &self.slices {
            let epoch = slice.epoch.load(Ordering::Acquire);
            if current.saturating_sub(epoch) < SLICES as u64 {
                for (total, bucket) in merged.iter_mut().zip(slice.buckets.iter()) {
                    *total += bucket.load(Ordering::Relaxed);
                }
            }
        }
        merged
    }

    /// The samples in the window and the given quantiles (each `0.0..=1.0`), as the upper
    /// bound of the bucket holding them (at most 12.5 % above the true value).
    pub fn quantiles<const Q: usize>(&self, quantiles: [f64; Q], now: u64) -> (u64, [Duration; Q]) {
        let merged = self.merged(now);
        let count: u64 = merged.iter().sum();
        let mut out = [Duration::ZERO; Q];
        if count == 0 {
            return (0, out);
        }
        for (slot, quantile) in out.iter_mut().zip(quantiles) {
            let rank = ((quantile.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, n) in merged.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    *slot = Duration::from_micros(bucket_ceiling(bucket));
                    break;
                }
            }
        }
        (count, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_tight() {
        let mut last = 0;
        for micros in [0, 1, 15, 16, 17, 31, 32, 100, 1_000, 65_432, 1 << 31] {
            let bucket = bucket_of(micros);
            assert!(bucket >= last, "{micros}");
            last = bucket;
            let ceiling = bucket_ceiling(bucket);
            assert!(ceiling >= micros, "{micros} ≤ {ceiling}");
            assert!(
                ceiling as f64 <= micros as f64 * 1.125 + 1.0,
                "{micros}: {ceiling}"
            );
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn counts_slide_out_of_the_window() {
        let counts = RollingCounts::new(Duration::from_secs(10));
        counts.add(0, 1_000);
        counts.add(1, 1_500);
        counts.add(1, 9_000);
        assert_eq!(counts.totals(9_500), [1, 2]);
        // 10 s later the first slice has left the window; the one at 9 s has not.
        assert_eq!(counts.totals(11_000), [0, 1]);
        assert_eq!(counts.totals(30_000), [0, 0]);
        // A slice reused by a later time starts from zero.
        counts.add(0, 21_000);
        assert_eq!(counts.totals(21_000), [1, 0]);
    }

    #[test]
    fn percentiles_come_from_the_window() {
        let histogram = RollingHistogram::new(Duration::from_secs(60));
        for ms in 1..=100 {
            histogram.record(Duration::from_millis(ms), 5_000);
        }
        let (count, [p50, p95, p99]) = histogram.quantiles([0.5, 0.95, 0.99], 5_000);
        assert_eq!(count, 100);
        let near = |d: Duration, ms: f64| {
            let got = d.as_secs_f64() * 1000.0;
            got >= ms && got <= ms * 1.125 + 0.001
        };
        assert!(near(p50, 50.0), "{p50:?}");
        assert!(near(p95, 95.0), "{p95:?}");
        assert!(near(p99, 99.0), "{p99:?}");
        let (later, _) = histogram.quantiles([0.5], 70_000);
        assert_eq!(later, 0, "samples leave the window");
    }
}
