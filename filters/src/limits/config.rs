//! A tier's limits as the policy writes them (`tiers.NAME.limits`), and the system-wide ones.

use serde::{Deserialize, Serialize};

use super::state::LimitName;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    /// Sustained requests per second (GCRA, exact), with `burst` requests allowed at once.
    #[serde(default)]
    pub rps: Option<f64>,
    /// Default: `rps` rounded up (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub requests_per_hour: Option<u64>,
    /// UTC days.
    #[serde(default)]
    pub requests_per_day: Option<u64>,
    /// Requests in flight at once (open streams included).
    #[serde(default)]
    pub concurrent: Option<u32>,
    /// Tokens (prompt + completion) per UTC minute / day / calendar month. Admission reserves
    /// the prompt estimate plus the requested `max_tokens` (or `reserve_output_tokens`); the
    /// response's reported usage then replaces the reservation.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
    /// Output tokens reserved for a request that names no `max_tokens`. Default 1024.
    #[serde(default)]
    pub reserve_output_tokens: Option<u64>,
    /// Largest prompt, estimated as a quarter of the request body's bytes.
    #[serde(default)]
    pub max_input_tokens: Option<u64>,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// What to do with a request asking for more: `reject` (400) or `clamp` (rewrite it down).
    #[serde(default)]
    pub over_max_output_tokens: OverMax,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverMax {
    #[default]
    Reject,
    Clamp,
}

impl RequestLimits {
    pub fn burst_or_default(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.rps.map_or(1, |r| r.ceil() as u32))
            .max(1)
    }

    pub(super) fn window_limit(&self, name: LimitName) -> Option<u64> {
        match name {
            LimitName::PerMinute => self.requests_per_minute,
            LimitName::PerHour => self.requests_per_hour,
            LimitName::PerDay => self.requests_per_day,
            LimitName::TokensPerMinute => self.tokens_per_minute,
            LimitName::TokensPerDay => self.tokens_per_day,
            LimitName::TokensPerMonth => self.tokens_per_month,
            LimitName::Rate | LimitName::Concurrent => None,
        }
    }

    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
    }

    pub fn reserve_output_tokens(&self) -> u64 {
        self.reserve_output_tokens.unwrap_or(1024)
    }

    /// Whether any limit on the number of requests is set (those need counters).
    pub fn counts_requests(&self) -> bool {
        self.rps.is_some()
            || self.requests_per_minute.is_some()
            || self.requests_per_hour.is_some()
            || self.requests_per_day.is_some()
            || self.concurrent.is_some()
            || self.counts_tokens()
    }

    pub fn is_empty(&self) -> bool {
        !self.counts_requests()
            && self.max_input_tokens.is_none()
            && self.max_output_tokens.is_none()
    }

    /// Problems a policy author should hear about at load time.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.rps.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            problems.push("`rps` must be a positive number".to_owned());
        }
        if self.burst.is_some() && self.rps.is_none() {
            problems.push("`burst` needs `rps`".to_owned());
        }
        if self.burst == Some(0) {
            problems.push("`burst` must be at least 1".to_owned());
        }
        for (name, value) in [
            ("requests_per_minute", self.requests_per_minute),
            ("requests_per_hour", self.requests_per_hour),
            ("requests_per_day", self.requests_per_day),
            ("max_input_tokens", self.max_input_tokens),
            ("max_output_tokens", self.max_output_tokens),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
            ("tokens_per_month", self.tokens_per_month),
        ] {
            if value == Some(0) {
                problems.push(format!(
                    "`{name}: 0` would refuse everything; remove the route from the tier instead"
                ));
            }
        }
        if self.concurrent == Some(0) {
            problems.push("`concurrent: 0` would refuse everything".to_owned());
        }
        problems
    }
}
