//! Counters shared by every replica through Redis: one atomic Lua script per admission (all
//! limits checked and charged together, times from the Redis server) and one per settlement,
//! run after the response without holding the caller. No local leases: a request waits for
//! one round trip, and the bound is exact across replicas.

use std::collections::VecDeque;
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

/// While Redis is unreachable, a background task pings it this often: a `fail_closed`
/// replica out of `/readyz` gets no traffic, so no request would ever find Redis back.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Settlements that failed are kept (oldest dropped past this many) and replayed when Redis
/// answers again, so in-flight places, token reservations and spend are settled after a blip.
const MAX_PENDING_SETTLEMENTS: usize = 10_000;
/// A kept settlement that Redis still refuses this many times while it answers pings (a
/// script error, `OOM` under `noeviction`) is dropped: it must not hold the ones behind it.
const MAX_REPLAYS: u8 = 3;

pub struct RedisCounters {
    inner: Arc<Inner>,
    pub on_error: OnError,
    admit: redis::Script,
}

/// What the recovery probe shares with the requests.
struct Inner {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Milliseconds since `started` of the last failed connection attempt.
    last_failure_ms: AtomicU64,
    started: Instant,
    healthy: AtomicBool,
    timeout: Duration,
    prefix: String,
    on_error: OnError,
    /// Counts every failed call (the process's `sluice_limits_store_errors_total`).
    errors: prometheus::IntCounter,
    settle: redis::Script,
    backlog: std::sync::Mutex<Backlog>,
    /// Failed settlements dropped because the backlog was full.
    dropped: AtomicU64,
}

/// Settlements waiting for Redis, and whether a probe is running.
#[derive(Default)]
struct Backlog {
    pending: VecDeque<Pending>,
    probing: bool,
    /// Whether this outage has dropped settlements already (logged once per outage).
    overflowed: bool,
}

/// Called with the budget alerts a settlement fired, once it has landed.
pub type Settled = Box<dyn FnOnce(Vec<BudgetAlert>) + Send>;

struct Pending {
    charge: Charge,
    used: u64,
    cost: u64,
    done: Settled,
    /// Replays that failed although Redis answered the probe's ping.
    replays_failed: u8,
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
            inner: Arc::new(Inner {
                client: redis::Client::open(url)?,
                connection: tokio::sync::Mutex::new(None),
                last_failure_ms: AtomicU64::new(0),
                started: Instant::now(),
                healthy: AtomicBool::new(true),
                timeout,
                prefix: prefix.to_owned(),
                on_error,
                errors,
                settle: redis::Script::new(include_str!("settle.lua")),
                backlog: std::sync::Mutex::default(),
                dropped: AtomicU64::new(0),
            }),
            on_error,
            admit: redis::Script::new(include_str!("admit.lua")),
        })
    }

    /// The key prefix of this deployment (`state.prefix`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Failed settlements waiting for Redis to answer again.
    pub fn pending_settlements(&self) -> usize {
        self.inner.backlog().pending.len()
    }

    /// Failed settlements dropped, oldest first, because too many were waiting.
    pub fn dropped_settlements(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The multiplexed connection (shared with the cache's shared tier), made on first use.
    pub(crate) async fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        self.inner.connection().await
    }

    fn key_prefix(&self, scope: &str) -> String {
        self.inner.key_prefix(scope)
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
        let reply: Vec<i64> = self.inner.run(&invocation).await?;
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
                .enumerate()
                .map(|(index, (scope, limits))| ScopeCharge {
                    scope: (*scope).clone(),
                    token_windows,
                    budget: limits.budget_micros().map(|budget_micros| BudgetTerms {
                        budget_micros,
                        alerts: limits.budget_alerts.clone(),
                        spent_at_admission: reply.get(8 + index).copied().unwrap_or(0).max(0)
                            as u64,
                    }),
                })
                .collect(),
            reserved_tokens: tokens,
            month_start,
            request_id,
        };
        Ok(Ok((standings, charge)))
    }

    /// Settles a request; `done` gets the budget alerts it fired. When Redis cannot be
    /// reached the settlement waits in a bounded backlog and is replayed once Redis answers
    /// (settle.lua applies a request's settlement at most once, so a replay after a lost
    /// reply changes nothing).
    pub async fn settle(&self, charge: Charge, used_tokens: u64, cost_micros: u64, done: Settled) {
        match self.inner.settle(&charge, used_tokens, cost_micros).await {
            Ok(fired) => done(fired),
            Err(_) => self.inner.keep(Pending {
                charge,
                used: used_tokens,
                cost: cost_micros,
                done,
                replays_failed: 0,
            }),
        }
    }
}

/// Clears `probing` if a probe ends other than by finding Redis back (its runtime shut down),
/// so that the next failure starts a new one.
struct ProbeGuard {
    store: std::sync::Weak<Inner>,
    armed: bool,
}

impl ProbeGuard {
    /// The probe ends having cleared `probing` itself.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.store.upgrade().filter(|_| self.armed) {
            inner.backlog().probing = false;
        }
    }
}

impl Inner {
    fn backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn key_prefix(&self, scope: &str) -> String {
        format!("{}:{{{scope}}}:", self.prefix)
    }

    fn failed(self: &Arc<Self>, why: impl std::fmt::Display) -> Unavailable {
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
        self.watch();
        Unavailable(why.to_string())
    }

    fn succeeded(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(target: "sluice::limits", "Redis reachable again, limits enforced");
        }
    }

    /// Starts the recovery probe unless one runs: it pings Redis every `PROBE_EVERY`
    /// without holding any request, marks the store healthy when Redis answers (so `/readyz`
    /// and `sluice_limits_store_up` recover with no traffic), replays the kept settlements,
    /// and ends once Redis is healthy with nothing left to replay. It holds the store weakly:
    /// a reload that replaces the store ends it.
    fn watch(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut backlog = self.backlog();
            if backlog.probing {
                return;
            }
            backlog.probing = true;
        }
        let mut guard = ProbeGuard {
            store: Arc::downgrade(self),
            armed: true,
        };
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(inner) = guard.store.upgrade() else {
                    return;
                };
                if !inner.is_healthy() && !inner.ping().await {
                    continue;
                }
                inner.succeeded();
                inner.replay().await;
                let mut backlog = inner.backlog();
                if inner.is_healthy() && backlog.pending.is_empty() {
                    backlog.probing = false;
                    backlog.overflowed = false;
                    guard.disarm();
                    return;
                }
            }
        });
    }

    /// One PING within the timeout, on the shared connection (made here if there is none,
    /// outside the connection lock so that requests never wait on the probe).
    async fn ping(&self) -> bool {
        let existing = self.connection.lock().await.clone();
        let mut connection = match existing {
            Some(connection) => connection,
            None => match self.connect().await {
                Ok(connection) => {
                    let mut slot = self.connection.lock().await;
                    slot.get_or_insert(connection).clone()
                }
                Err(_) => return false,
            },
        };
        let ping = redis::cmd("PING");
        let reply = tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut connection));
        matches!(reply.await, Ok(Ok(_)))
    }

    /// Runs the kept settlements in order; stops at the first that fails (it stays first,
    /// unless Redis has now refused it `MAX_REPLAYS` times: then it is dropped and counted).
    async fn replay(self: &Arc<Self>) {
        loop {
            let Some(mut pending) = self.backlog().pending.pop_front() else {
                return;
            };
            match self
                .settle(&pending.charge, pending.used, pending.cost)
                .await
            {
                Ok(fired) => (pending.done)(fired),
                Err(Unavailable(why)) => {
                    pending.replays_failed += 1;
                    if pending.replays_failed >= MAX_REPLAYS {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(target: "sluice::limits", "a kept settlement was refused {MAX_REPLAYS} times by a reachable Redis and is dropped: {why}");
                        continue;
                    }
                    self.backlog().pending.push_front(pending);
                    return;
                }
            }
        }
    }

    /// Keeps a failed settlement for the probe to replay; past the bound the oldest goes
    /// (its in-flight place then lapses and its reservation stands: see the README).
    fn keep(self: &Arc<Self>, pending: Pending) {
        {
            let mut backlog = self.backlog();
            if backlog.pending.len() >= MAX_PENDING_SETTLEMENTS {
                backlog.pending.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut backlog.overflowed, true) {
                    tracing::error!(target: "sluice::limits", "Redis unreachable: more than {MAX_PENDING_SETTLEMENTS} settlements waiting, the oldest are dropped");
                }
            }
            backlog.pending.push_back(pending);
        }
        self.watch();
    }

    async fn connect(&self) -> Result<ConnectionManager, String> {
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
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connection timed out".to_owned()),
        }
    }

    async fn connection(self: &Arc<Self>) -> Result<ConnectionManager, Unavailable> {
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
        match self.connect().await {
            Ok(connection) => {
                *slot = Some(connection.clone());
                Ok(connection)
            }
            Err(why) => Err(self.failed(why)),
        }
    }

    /// Runs a script within the timeout, keeping the health flag current.
    async fn run(
        self: &Arc<Self>,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<i64>, Unavailable> {
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

    async fn settle(
        self: &Arc<Self>,
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
}

/// Where counters live: this process, or Redis shared by all replicas.
#[derive(Debug, Clone)]
pub enum Backend {
    Memory(Arc<super::LimitStore>),
    Redis(Arc<RedisCounters>),
}
