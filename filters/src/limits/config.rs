//! A tier's limits as the policy writes them (`tiers.NAME.limits`), and the system-wide ones.

use serde::{Deserialize, Serialize};

use super::state::LimitName;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// Cut a stream that outgrows the tokens left (its reservation plus what the token limits
    /// still allow) with a provider-shaped error event, instead of letting it finish over the
    /// limit. Output is counted as one token per streamed event while it flows.
    #[serde(default)]
    pub cut_streams_over_tokens: bool,
    /// Wait for capacity instead of refusing at once: `{ max_wait: 2s, priority: 10 }`.
    #[serde(default)]
    pub queue: Option<super::QueueSettings>,
    /// Spend per tenant per calendar month (UTC), priced from the policy's `prices`.
    #[serde(default)]
    pub budget_usd_per_month: Option<f64>,
    /// Percentages of the budget at which an alert is logged, once each per month.
    #[serde(default = "default_alerts")]
    pub budget_alerts: Vec<u8>,
    /// Percentage of the budget at which requests are refused (429) until the month ends.
    #[serde(default = "default_hard_stop")]
    pub budget_hard_stop_percent: f64,
    /// Above a percentage of the budget, rewrite expensive models to cheaper ones.
    #[serde(default)]
    pub downgrade: Option<Downgrade>,
    /// Largest prompt, in tokens (see `estimate_input_tokens`).
    #[serde(default)]
    pub max_input_tokens: Option<u64>,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// What to do with a request asking for more: `reject` (400) or `clamp` (rewrite it down).
    #[serde(default)]
    pub over_max_output_tokens: OverMax,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            rps: None,
            burst: None,
            requests_per_minute: None,
            requests_per_hour: None,
            requests_per_day: None,
            concurrent: None,
            tokens_per_minute: None,
            tokens_per_day: None,
            tokens_per_month: None,
            reserve_output_tokens: None,
            cut_streams_over_tokens: false,
            queue: None,
            max_input_tokens: None,
            max_output_tokens: None,
            over_max_output_tokens: OverMax::default(),
            budget_usd_per_month: None,
            budget_alerts: default_alerts(),
            budget_hard_stop_percent: default_hard_stop(),
            downgrade: None,
        }
    }
}

fn default_alerts() -> Vec<u8> {
    vec![50, 75, 90, 95]
}

fn default_hard_stop() -> f64 {
    100.0
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Downgrade {
    /// From this share of the month's budget spent, in percent.
    pub above_percent: f64,
    /// Requested model → the model sent instead.
    pub models: std::collections::BTreeMap<String, String>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
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
            LimitName::Rate | LimitName::Concurrent | LimitName::Budget => None,
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
            || self.budget_usd_per_month.is_some()
    }

    /// The budget in micro-dollars, the unit spend is counted in.
    pub fn budget_micros(&self) -> Option<u64> {
        self.budget_usd_per_month
            .map(|usd| (usd * 1e6).round() as u64)
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
        if self
            .budget_usd_per_month
            .is_some_and(|b| !(b > 0.0 && b.is_finite()))
        {
            problems.push("`budget_usd_per_month` must be a positive number".to_owned());
        }
        if self.budget_alerts.iter().any(|p| *p == 0 || *p > 100) {
            problems.push("`budget_alerts` are percentages from 1 to 100".to_owned());
        }
        if self.budget_hard_stop_percent.is_nan() || self.budget_hard_stop_percent <= 0.0 {
            problems.push("`budget_hard_stop_percent` must be above 0".to_owned());
        }
        if self.budget_usd_per_month.is_none() && self.downgrade.is_some() {
            problems.push("`downgrade` needs `budget_usd_per_month`".to_owned());
        }
        if self.concurrent == Some(0) {
            problems.push("`concurrent: 0` would refuse everything".to_owned());
        }
        problems
    }
}
