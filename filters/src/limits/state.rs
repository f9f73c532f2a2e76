//! Exact counters, kept in process memory outside the policy: a reload never resets them, and
//! a changed limit applies to the counts already made.

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
    TokensPerMinute,
    TokensPerDay,
    TokensPerMonth,
    Budget,
}

impl LimitName {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitName::Rate => "rps",
            LimitName::PerMinute => "requests_per_minute",
            LimitName::PerHour => "requests_per_hour",
            LimitName::PerDay => "requests_per_day",
            LimitName::Concurrent => "concurrent",
            LimitName::TokensPerMinute => "tokens_per_minute",
            LimitName::TokensPerDay => "tokens_per_day",
            LimitName::TokensPerMonth => "tokens_per_month",
            LimitName::Budget => "budget_usd_per_month",
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

/// What a response's `x-ratelimit-*` headers report: the tightest limit of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// The standings of an admitted request, for requests and for tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standings {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
}

/// One windowed count: the window's start (seconds since the epoch, aligned) and the count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: u64,
    count: u64,
}

#[derive(Debug, Default)]
struct Counters {
    /// GCRA's theoretical arrival time for the `rps`/`burst` bucket.
    tat: Option<Instant>,
    /// Requests per minute, hour, day (UTC-aligned).
    requests: [Window; 3],
    /// Tokens per minute, day, month (UTC-aligned).
    tokens: [Window; 3],
    in_flight: u32,
    last_seen: u64,
    /// Spend this calendar month, in micro-dollars.
    spend: Window,
    /// Budget alerts fired this month: `count` is a bit mask over the tier's alert list.
    alerts_fired: Window,
}

/// A budget threshold crossed by a request's cost: to be logged once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAlert {
    pub scope: Arc<str>,
    pub percent: u8,
    pub spent_micros: u64,
    pub budget_micros: u64,
}

/// A scope's budget as charged at admission: the budget and its alert thresholds.
#[derive(Debug, Clone, Default)]
pub(super) struct BudgetTerms {
    pub(super) budget_micros: u64,
    pub(super) alerts: Vec<u8>,
    /// The month's spend when the request was admitted (before its own cost): what a
    /// downgrade rule compares, read in the same step as the limits.
    pub(super) spent_at_admission: u64,
}

#[derive(Debug, Clone, Copy)]
enum Span {
    Seconds(u64),
    Month,
}

const REQUEST_WINDOWS: [(LimitName, Span); 3] = [
    (LimitName::PerMinute, Span::Seconds(60)),
    (LimitName::PerHour, Span::Seconds(3600)),
    (LimitName::PerDay, Span::Seconds(86_400)),
];

const TOKEN_WINDOWS: [(LimitName, Span); 3] = [
    (LimitName::TokensPerMinute, Span::Seconds(60)),
    (LimitName::TokensPerDay, Span::Seconds(86_400)),
    (LimitName::TokensPerMonth, Span::Month),
];

/// Entries idle longer than this (and with nothing in flight) may be swept.
const IDLE_SWEEP_SECS: u64 = 32 * 86_400;
/// Sweep when the table grows past this many scopes (e.g. many passthrough tenant names).
const SWEEP_ABOVE: usize = 100_000;

/// The counters of every scope (a tenant, or the whole system). One short lock per admission
/// and per settlement: all of a request's limits are checked and charged together, so a refused
/// request is charged nothing and concurrent requests can never overshoot a limit.
#[derive(Debug, Default)]
pub struct LimitStore {
    scopes: Mutex<HashMap<Arc<str>, Counters>>,
}

/// One scope a request counts against, with that scope's limits.
pub type Check<'a> = (&'a Arc<str>, &'a RequestLimits);

/// What an admission charged, so the exchange's end can settle it.
#[derive(Debug, Clone, Default)]
pub struct Charge {
    pub(super) scopes: Vec<ScopeCharge>,
    pub(super) reserved_tokens: u64,
    /// The month the request was admitted in (its cost goes to that month's spend).
    pub(super) month_start: u64,
    /// Names the request among the in-flight ones (Redis only).
    pub(super) request_id: u64,
}

#[derive(Debug, Clone)]
pub(super) struct ScopeCharge {
    pub(super) scope: Arc<str>,
    /// The token windows the reservation went into.
    pub(super) token_windows: [u64; 3],
    pub(super) budget: Option<BudgetTerms>,
}

impl Charge {
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved_tokens
    }
}

pub(super) fn epoch_secs(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Days since 1970-01-01 → (year, month 1–12) — the civil calendar (Howard Hinnant's algorithm).
fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// (year, month) → days since 1970-01-01 of its first day.
fn days_from_civil(year: i64, month: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar month (UTC) holding `secs`: its start and its end.
pub(super) fn month_bounds(secs: u64) -> (u64, u64) {
    window_bounds(Span::Month, secs)
}

/// The window holding `secs`: its start and its end.
fn window_bounds(span: Span, secs: u64) -> (u64, u64) {
    match span {
        Span::Seconds(length) => {
            let start = secs - secs % length;
            (start, start + length)
        }
        Span::Month => {
            let (year, month) = year_month((secs / 86_400) as i64);
            let start = days_from_civil(year, month) as u64 * 86_400;
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            (
                start,
                days_from_civil(next_year, next_month) as u64 * 86_400,
            )
        }
    }
}

fn count_in(window: Window, start: u64) -> u64 {
    if window.start == start {
        window.count
    } else {
        0
    }
}

impl LimitStore {
    /// Admits a request of `tokens` reserved tokens against every scope's limits, or refuses it
    /// having charged nothing.
    pub fn admit(
        &self,
        checks: &[Check],
        tokens: u64,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(Standings, Charge), Refused> {
        let secs = epoch_secs(wall);
        let request_bounds = REQUEST_WINDOWS.map(|(_, span)| window_bounds(span, secs));
        let token_bounds = TOKEN_WINDOWS.map(|(_, span)| window_bounds(span, secs));
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        if scopes.len() > SWEEP_ABOVE {
            scopes.retain(|_, c| {
                c.in_flight > 0 || secs.saturating_sub(c.last_seen) < IDLE_SWEEP_SECS
            });
        }
        // First pass: would every limit allow it?
        let mut new_tats = Vec::with_capacity(checks.len());
        let mut standings = Standings::default();
        for (scope, limits) in checks {
            let counters = scopes.get(*scope);
            let refuse = |limit: LimitName, value: f64, retry_after: Duration| Refused {
                scope: (*scope).clone(),
                limit,
                value,
                retry_after,
            };
            let mut new_tat = None;
            if let Some(rps) = limits.rps.filter(|r| *r > 0.0) {
                let interval = Duration::from_secs_f64(1.0 / rps);
                let burst = f64::from(limits.burst_or_default());
                let tolerance = interval.mul_f64(burst);
                let tat = counters.and_then(|c| c.tat).map_or(now, |t| t.max(now));
                let next = tat + interval;
                let ahead = next - now;
                if ahead > tolerance {
                    return Err(refuse(LimitName::Rate, rps, ahead - tolerance));
                }
                new_tat = Some(next);
                let remaining = ((tolerance - ahead).as_secs_f64() / interval.as_secs_f64()) as u64;
                standings.requests = tighter(
                    standings.requests,
                    Standing {
                        limit: burst as u64,
                        remaining,
                        reset: ahead,
                    },
                );
            }
            new_tats.push(new_tat);
            for (i, (name, _)) in REQUEST_WINDOWS.iter().enumerate() {
                let Some(limit) = limits.window_limit(*name) else {
                    continue;
                };
                let (start, end) = request_bounds[i];
                let count = counters.map_or(0, |c| count_in(c.requests[i], start));
                let reset = Duration::from_secs(end - secs);
                if count + 1 > limit {
                    return Err(refuse(*name, limit as f64, reset));
                }
                standings.requests = tighter(
                    standings.requests,
                    Standing {
                        limit,
                        remaining: limit - count - 1,
                        reset,
                    },
                );
            }
            for (i, (name, _)) in TOKEN_WINDOWS.iter().enumerate() {
                let Some(limit) = limits.window_limit(*name) else {
                    continue;
                };
                let (start, end) = token_bounds[i];
                let count = counters.map_or(0, |c| count_in(c.tokens[i], start));
                let reset = Duration::from_secs(end - secs);
                if count + tokens > limit {
                    return Err(refuse(*name, limit as f64, reset));
                }
                standings.tokens = tighter(
                    standings.tokens,
                    Standing {
                        limit,
                        remaining: limit - count - tokens,
                        reset,
                    },
                );
            }
            if let Some(max) = limits.concurrent {
                if counters.map_or(0, |c| c.in_flight) + 1 > max {
                    return Err(refuse(
                        LimitName::Concurrent,
                        f64::from(max),
                        Duration::from_secs(1),
                    ));
                }
            }
            if let Some(budget) = limits.budget_micros() {
                let (month_start, month_end) = token_bounds[2];
                let spent = counters.map_or(0, |c| count_in(c.spend, month_start));
                let stop = budget as f64 * limits.budget_hard_stop_percent / 100.0;
                if spent as f64 >= stop {
                    let usd = limits.budget_usd_per_month.unwrap_or_default();
                    let until_next_month = Duration::from_secs(month_end - secs);
                    return Err(refuse(LimitName::Budget, usd, until_next_month));
                }
            }
        }
        // Second pass: charge them all.
        let mut charge = Charge {
            scopes: Vec::with_capacity(checks.len()),
            reserved_tokens: tokens,
            month_start: token_bounds[2].0,
            request_id: 0,
        };
        for ((scope, limits), new_tat) in checks.iter().zip(new_tats) {
            let counters = scopes.entry((*scope).clone()).or_default();
            counters.last_seen = secs;
            if new_tat.is_some() {
                counters.tat = new_tat;
            }
            for (i, (name, _)) in REQUEST_WINDOWS.iter().enumerate() {
                if limits.window_limit(*name).is_some() {
                    bump(&mut counters.requests[i], request_bounds[i].0, 1);
                }
            }
            for (i, (name, _)) in TOKEN_WINDOWS.iter().enumerate() {
                if limits.window_limit(*name).is_some() {
                    bump(&mut counters.tokens[i], token_bounds[i].0, tokens);
                }
            }
            counters.in_flight += 1;
            charge.scopes.push(ScopeCharge {
                scope: (*scope).clone(),
                token_windows: token_bounds.map(|(start, _)| start),
                budget: limits.budget_micros().map(|budget_micros| BudgetTerms {
                    budget_micros,
                    alerts: limits.budget_alerts.clone(),
                    spent_at_admission: count_in(counters.spend, token_bounds[2].0),
                }),
            });
        }
        Ok((standings, charge))
    }

    /// Ends a request: gives back its in-flight place, replaces its token reservation by what
    /// it really used (in the windows it was charged to, if they are still current) and adds
    /// its cost to each budget, returning the budget thresholds this crossed.
    pub fn settle(&self, charge: &Charge, used_tokens: u64, cost_micros: u64) -> Vec<BudgetAlert> {
        let mut alerts = Vec::new();
        let mut table = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        for ScopeCharge {
            scope,
            token_windows,
            budget,
        } in &charge.scopes
        {
            let Some(counters) = table.get_mut(scope) else {
                continue;
            };
            counters.in_flight = counters.in_flight.saturating_sub(1);
            if used_tokens != charge.reserved_tokens {
                for (window, start) in counters.tokens.iter_mut().zip(token_windows) {
                    if window.start == *start {
                        window.count =
                            (window.count + used_tokens).saturating_sub(charge.reserved_tokens);
                    }
                }
            }
            let Some(terms) = budget else { continue };
            if cost_micros == 0 {
                continue;
            }
            bump(&mut counters.spend, charge.month_start, cost_micros);
            let spent = counters.spend.count;
            if counters.alerts_fired.start != charge.month_start {
                counters.alerts_fired = Window {
                    start: charge.month_start,
                    count: 0,
                };
            }
            for (bit, percent) in terms.alerts.iter().enumerate().take(64) {
                let threshold = terms.budget_micros as f64 * f64::from(*percent) / 100.0;
                let mask = 1u64 << bit;
                if spent as f64 >= threshold && counters.alerts_fired.count & mask == 0 {
                    counters.alerts_fired.count |= mask;
                    alerts.push(BudgetAlert {
                        scope: scope.clone(),
                        percent: *percent,
                        spent_micros: spent,
                        budget_micros: terms.budget_micros,
                    });
                }
            }
        }
        alerts
    }

    /// A scope's spend this month, in micro-dollars.
    pub fn spent_micros(&self, scope: &str, wall: SystemTime) -> u64 {
        let start = window_bounds(Span::Month, epoch_secs(wall)).0;
        let table = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        table.get(scope).map_or(0, |c| count_in(c.spend, start))
    }

    #[cfg(test)]
    pub fn in_flight(&self, scope: &str) -> u32 {
        let table = self.scopes.lock().unwrap();
        table.get(scope).map_or(0, |c| c.in_flight)
    }

    #[cfg(test)]
    pub fn tokens_today(&self, scope: &str, wall: SystemTime) -> u64 {
        let table = self.scopes.lock().unwrap();
        let start = window_bounds(Span::Seconds(86_400), epoch_secs(wall)).0;
        table.get(scope).map_or(0, |c| count_in(c.tokens[1], start))
    }
}

fn bump(window: &mut Window, start: u64, by: u64) {
    if window.start != start {
        *window = Window { start, count: 0 };
    }
    window.count += by;
}

/// The standing with the fewest left.
fn tighter(current: Option<Standing>, candidate: Standing) -> Option<Standing> {
    match current {
        Some(current) if current.remaining <= candidate.remaining => Some(current),
        _ => Some(candidate),
    }
}

#[cfg(test)]
mod calendar_tests {
    use super::*;

    #[test]
    fn months_are_calendar_months() {
        // 2024-02-15T12:00:00Z: February of a leap year.
        let feb_15 = 1_708_000_000;
        let (start, end) = window_bounds(Span::Month, feb_15);
        assert_eq!(start, 1_706_745_600, "2024-02-01T00:00:00Z");
        assert_eq!(end, 1_709_251_200, "2024-03-01T00:00:00Z");
        // December rolls into the next year.
        let (start, end) = window_bounds(Span::Month, 1_703_462_400); // 2023-12-25
        assert_eq!((start, end), (1_701_388_800, 1_704_067_200));
    }
}
