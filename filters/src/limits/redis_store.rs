//! Counters shared by every replica through Redis: one atomic Lua script per admission (all
//! limits checked and charged together, times from the Redis server) and one per settlement,
//! run after the response without holding the caller. No local leases: a request waits for
//! one round trip, and the bound is exact across replicas.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::config::RequestLimits;
use super::state::{
    epoch_secs, month_bounds, BudgetAlert, BudgetTerms, Charge, Check, LimitName, Refused,
    ScopeCharge, Standing, Standings,
};

/// What to do with a request when Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Admit it uncounted (availability first).
    #[default]
    FailOpen,
    /// Refuse it with 503 (limits first).
    FailClosed,
}

/// After a failed connection, requests do not try again for this long (they fail open or
/// closed at once instead of each waiting on a dead server).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

pub struct RedisCounters {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Milliseconds since `started` of the last failed connection attempt.
    last_failure_ms: AtomicU64,
    started: Instant,
    healthy: AtomicBool,
    timeout: Duration,
    prefix: String,
    pub on_error: OnError,
    /// Counts every failed call (the process's `sluice_limits_store_errors_total`).
    errors: prometheus::IntCounter,
    admit: redis::Script,
    settle: redis::Script,
}

impl std::fmt::Debug for RedisCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: not shown.
        f.debug_struct("RedisCounters")
            .field("healthy", &self.is_healthy())
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

/// Why a Redis call did not give an answer.
#[derive(Debug, thiserror::Error)]
#[error("limits store unavailable: {0}")]
pub struct Unavailable(String);

fn limit_name(code: i64) -> LimitName {
    match code {
        1 => LimitName::Rate,
        2 => LimitName::PerMinute,
        3 => LimitName::PerHour,
        4 => LimitName::PerDay,
        5 => LimitName::TokensPerMinute,
        6 => LimitName::TokensPerDay,
        7 => LimitName::TokensPerMonth,
        8 => LimitName::Concurrent,
        _ => LimitName::Budget,
    }
}

fn limit_value(limits: &RequestLimits, name: LimitName) -> f64 {
    match name {
        LimitName::Rate => limits.rps.unwrap_or_default(),
        LimitName::Concurrent => f64::from(limits.concurrent.unwrap_or_default()),
        LimitName::Budget => limits.budget_usd_per_month.unwrap_or_default(),
        windowed => limits.window_limit(windowed).unwrap_or_default() as f64,
    }
}

fn opt(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| v as i64)
}

impl RedisCounters {
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        on_error: OnError,
        errors: prometheus::IntCounter,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: tokio::sync::Mutex::new(None),
            last_failure_ms: AtomicU64::new(0),
            started: Instant::now(),
            healthy: AtomicBool::new(true),
            timeout,
            prefix: prefix.to_owned(),
            on_error,
            errors,
            admit: redis::Script::new(include_str!("admit.lua")),
            settle: redis::Script::new(include_str!("settle.lua")),
        })
    }

    /// The key prefix of this deployment (`state.prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn failed(&self, why: impl std::fmt::Display) -> Unavailable {
        self.errors.inc();
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(target: "sluice::limits", "Redis unreachable, limits {}: {why}", match self.on_error {
                OnError::FailOpen => "not enforced (fail_open)",
                OnError::FailClosed => "refusing requests (fail_closed)",
            });
        }
        self.last_failure_ms.store(
            self.started.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        Unavailable(why.to_string())
    }

    fn succeeded(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(target: "sluice::limits", "Redis reachable again, limits enforced");
        }
    }

    /// The multiplexed connection (shared with the cache's shared tier), made on first use.
    pub(crate) async fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let last = self.last_failure_ms.load(Ordering::Relaxed);
        if last > 0
            && self.started.elapsed().as_millis() as u64 + 1 - last
                < RETRY_AFTER_FAILURE.as_millis() as u64
        {
            return Err(Unavailable("recently unreachable".to_owned()));
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        match tokio::time::timeout(
            self.timeout * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        {
            Ok(Ok(connection)) => {
                *slot = Some(connection.clone());
                Ok(connection)
            }
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed("connection timed out")),
        }
    }

    /// Runs a script within the timeout, keeping the health flag current.
    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, Unavailable> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(reply)) => {
                self.succeeded();
                Ok(reply)
            }
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed("no answer in time")),
        }
    }

    fn key_prefix(&self, scope: &str) -> String {
        format!("{}:{{{scope}}}:", self.prefix)
    }

    /// The same contract as the memory store's `admit`, across every replica.
    pub async fn admit(
        &self,
        checks: &[Check<'_>],
        tokens: u64,
        wall: SystemTime,
    ) -> Result<Result<(Standings, Charge), Refused>, Unavailable> {
        let (month_start, month_end) = month_bounds(epoch_secs(wall));
        let mut invocation = self.admit.prepare_invoke();
        // Names this request among the in-flight ones, for its settlement.
        let request_id: u64 = rand::random();
        invocation
            .arg(tokens)
            .arg(month_start)
            .arg(month_end)
            .arg(checks.len())
            .arg(request_id);
        for (scope, limits) in checks {
            let stop = limits
                .budget_micros()
                .map(|budget| (budget as f64 * limits.budget_hard_stop_percent / 100.0) as u64);
            invocation
                .arg(self.key_prefix(scope))
                .arg(limits.rps.unwrap_or(0.0))
                .arg(limits.burst_or_default())
                .arg(opt(limits.requests_per_minute))
                .arg(opt(limits.requests_per_hour))
                .arg(opt(limits.requests_per_day))
                .arg(opt(limits.tokens_per_minute))
                .arg(opt(limits.tokens_per_day))
                .arg(opt(limits.tokens_per_month))
                .arg(opt(limits.concurrent.map(u64::from)))
                .arg(opt(limits.budget_micros()))
                .arg(opt(stop));
        }
        let reply: Vec<i64> = self.run(&invocation).await?;
        if reply.first() == Some(&0) && reply.len() >= 4 {
            let index = reply[1] as usize;
            let limit = limit_name(reply[2]);
            let (scope, limits) = checks[index.min(checks.len() - 1)];
            return Ok(Err(Refused {
                scope: scope.clone(),
                limit,
                value: limit_value(limits, limit),
                retry_after: Duration::from_millis(reply[3].max(1) as u64),
            }));
        }
        let standing = |at: usize| {
            (reply.get(at).copied().unwrap_or(-1) >= 0).then(|| Standing {
                limit: reply[at] as u64,
                remaining: reply[at + 1].max(0) as u64,
                reset: Duration::from_millis(reply[at + 2].max(0) as u64),
            })
        };
        let secs = reply.get(7).copied().unwrap_or(0) as u64;
        let standings = Standings {
            requests: standing(1),
            tokens: standing(4),
        };
        let token_windows = [secs - secs % 60, secs - secs % 86_400, month_start];
        let charge = Charge {
            scopes: checks
                .iter()
                .map(|(scope, limits)| ScopeCharge {
                    scope: (*scope).clone(),
                    token_windows,
                    budget: limits.budget_micros().map(|budget_micros| BudgetTerms {
                        budget_micros,
                        alerts: limits.budget_alerts.clone(),
                    }),
                })
                .collect(),
            reserved_tokens: tokens,
            month_start,
            request_id,
        };
        Ok(Ok((standings, charge)))
    }

    /// Settles a request; returns the budget alerts it fired.
    pub async fn settle(
        &self,
        charge: &Charge,
        used_tokens: u64,
        cost_micros: u64,
    ) -> Result<Vec<BudgetAlert>, Unavailable> {
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .arg(used_tokens)
            .arg(charge.reserved_tokens)
            .arg(cost_micros)
            .arg(charge.month_start)
            .arg(charge.scopes.len())
            .arg(charge.request_id);
        for scope in &charge.scopes {
            let (budget, alerts) = match &scope.budget {
                Some(terms) => (
                    terms.budget_micros as i64,
                    terms
                        .alerts
                        .iter()
                        .map(u8::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                None => (-1, String::new()),
            };
            invocation
                .arg(self.key_prefix(&scope.scope))
                .arg(scope.token_windows[0])
                .arg(scope.token_windows[1])
                .arg(scope.token_windows[2])
                .arg(budget)
                .arg(alerts);
        }
        let fired: Vec<i64> = self.run(&invocation).await?;
        Ok(fired
            .chunks_exact(3)
            .filter_map(|alert| {
                let scope = charge.scopes.get(alert[0] as usize)?;
                Some(BudgetAlert {
                    scope: scope.scope.clone(),
                    percent: alert[1] as u8,
                    spent_micros: alert[2] as u64,
                    budget_micros: scope.budget.as_ref()?.budget_micros,
                })
            })
            .collect())
    }

    /// A scope's spend this month (for budget downgrades).
    pub async fn spent_micros(&self, scope: &str, wall: SystemTime) -> Result<u64, Unavailable> {
        let (month_start, _) = month_bounds(epoch_secs(wall));
        let key = format!("{}spend:{month_start}", self.key_prefix(scope));
        let mut connection = self.connection().await?;
        let result: redis::RedisResult<Option<u64>> = match tokio::time::timeout(
            self.timeout,
            redis::cmd("GET").arg(key).query_async(&mut connection),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => return Err(self.failed("no answer in time")),
        };
        result
            .map(Option::unwrap_or_default)
            .map_err(|e| self.failed(e))
    }
}

/// Where counters live: this process, or Redis shared by all replicas.
#[derive(Debug, Clone)]
pub enum Backend {
    Memory(Arc<super::LimitStore>),
    Redis(Arc<RedisCounters>),
}
