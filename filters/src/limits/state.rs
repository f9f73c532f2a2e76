//! Exact request counters, kept in process memory outside the policy: a reload never resets
//! them, and a changed limit applies to the counts already made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::RequestLimits;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitName {
    Rate,
    PerMinute,
    PerHour,
    PerDay,
    Concurrent,
}

impl LimitName {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitName::Rate => "rps",
            LimitName::PerMinute => "requests_per_minute",
            LimitName::PerHour => "requests_per_hour",
            LimitName::PerDay => "requests_per_day",
            LimitName::Concurrent => "concurrent",
        }
    }
}

/// A refusal: the limit, its value, and when trying again can succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub scope: Arc<str>,
    pub limit: LimitName,
    pub value: f64,
    pub retry_after: Duration,
}

/// What the response's `x-ratelimit-*-requests` headers report: the tightest request limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// One windowed count: the window's start (seconds since the epoch, aligned) and the count.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    start: u64,
    count: u64,
}

#[derive(Debug, Default)]
struct Counters {
    /// GCRA's theoretical arrival time for the `rps`/`burst` bucket.
    tat: Option<Instant>,
    /// Minute, hour, day windows (UTC-aligned).
    windows: [Window; 3],
    in_flight: u32,
    last_seen: u64,
}

const WINDOWS: [(LimitName, u64); 3] = [
    (LimitName::PerMinute, 60),
    (LimitName::PerHour, 3600),
    (LimitName::PerDay, 86_400),
];

/// Entries idle longer than this (and with nothing in flight) may be swept.
const IDLE_SWEEP_SECS: u64 = 2 * 86_400;
/// Sweep when the table grows past this many scopes (e.g. many passthrough tenant names).
const SWEEP_ABOVE: usize = 100_000;

/// The counters of every scope (a tenant, or the whole system). One short lock per admission
/// and per release: all of a request's limits are checked and charged together, so a refused
/// request is charged nothing and concurrent requests can never overshoot a limit.
#[derive(Debug, Default)]
pub struct LimitStore {
    scopes: Mutex<HashMap<Arc<str>, Counters>>,
}

/// A request's checks: the scopes it counts against, each with its limits.
pub type Checks<'a> = &'a [(&'a Arc<str>, &'a RequestLimits)];

fn epoch_secs(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl LimitStore {
    /// Admits a request against every scope's limits, or refuses it having charged nothing.
    pub fn admit(
        &self,
        checks: Checks,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Option<Standing>, Refused> {
        let secs = epoch_secs(wall);
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        if scopes.len() > SWEEP_ABOVE {
            scopes.retain(|_, c| {
                c.in_flight > 0 || secs.saturating_sub(c.last_seen) < IDLE_SWEEP_SECS
            });
        }
        // First pass: would every limit allow it?
        let mut new_tats = Vec::with_capacity(checks.len());
        let mut standing: Option<Standing> = None;
        for (scope, limits) in checks {
            let counters = scopes.get(*scope);
            let mut new_tat = None;
            if let Some(rps) = limits.rps.filter(|r| *r > 0.0) {
                let interval = Duration::from_secs_f64(1.0 / rps);
                let burst = f64::from(limits.burst_or_default());
                let tolerance = interval.mul_f64(burst);
                let tat = counters.and_then(|c| c.tat).map_or(now, |t| t.max(now));
                let next = tat + interval;
                let ahead = next - now;
                if ahead > tolerance {
                    return Err(Refused {
                        scope: (*scope).clone(),
                        limit: LimitName::Rate,
                        value: rps,
                        retry_after: ahead - tolerance,
                    });
                }
                new_tat = Some(next);
                let remaining = ((tolerance - ahead).as_secs_f64() / interval.as_secs_f64()) as u64;
                standing = tighter(
                    standing,
                    Standing {
                        limit: burst as u64,
                        remaining,
                        reset: ahead,
                    },
                );
            }
            new_tats.push(new_tat);
            for (i, (name, length)) in WINDOWS.iter().enumerate() {
                let Some(limit) = limits.window_limit(*name) else {
                    continue;
                };
                let start = secs - secs % length;
                let count = counters
                    .map(|c| c.windows[i])
                    .filter(|w| w.start == start)
                    .map_or(0, |w| w.count);
                let reset = Duration::from_secs(start + length - secs);
                if count + 1 > limit {
                    return Err(Refused {
                        scope: (*scope).clone(),
                        limit: *name,
                        value: limit as f64,
                        retry_after: reset,
                    });
                }
                standing = tighter(
                    standing,
                    Standing {
                        limit,
                        remaining: limit - count - 1,
                        reset,
                    },
                );
            }
            if let Some(max) = limits.concurrent {
                if counters.map_or(0, |c| c.in_flight) + 1 > max {
                    return Err(Refused {
                        scope: (*scope).clone(),
                        limit: LimitName::Concurrent,
                        value: f64::from(max),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
        // Second pass: charge them all.
        for ((scope, limits), new_tat) in checks.iter().zip(new_tats) {
            let counters = scopes.entry((*scope).clone()).or_default();
            counters.last_seen = secs;
            if new_tat.is_some() {
                counters.tat = new_tat;
            }
            for (i, (name, length)) in WINDOWS.iter().enumerate() {
                if limits.window_limit(*name).is_some() {
                    let start = secs - secs % length;
                    let window = &mut counters.windows[i];
                    if window.start != start {
                        *window = Window { start, count: 0 };
                    }
                    window.count += 1;
                }
            }
            counters.in_flight += 1;
        }
        Ok(standing)
    }

    /// Ends a request's in-flight count in each of its scopes.
    pub fn release(&self, scopes: &[Arc<str>]) {
        let mut table = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        for scope in scopes {
            if let Some(counters) = table.get_mut(scope) {
                counters.in_flight = counters.in_flight.saturating_sub(1);
            }
        }
    }

    #[cfg(test)]
    pub fn in_flight(&self, scope: &str) -> u32 {
        let table = self.scopes.lock().unwrap();
        table.get(scope).map_or(0, |c| c.in_flight)
    }
}

/// The standing with the fewest requests left.
fn tighter(current: Option<Standing>, candidate: Standing) -> Option<Standing> {
    match current {
        Some(current) if current.remaining <= candidate.remaining => Some(current),
        _ => Some(candidate),
    }
}
