//! `limits`: per-tier and system-wide request limits, enforced exactly before a request costs
//! anything. Rate (`rps` with `burst`, GCRA), requests per minute / hour / day (UTC windows),
//! requests in flight, and per-request caps on prompt size and requested output tokens.
//!
//! A refused request gets 429 with `retry-after`, naming the limit, and is charged nothing.
//! Admitted responses carry OpenAI's `x-ratelimit-{limit,remaining,reset}-requests` headers.

mod config;
mod estimate;
mod queue;
mod redis_store;
mod state;
mod tokenizer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

pub use config::{Downgrade, OverMax, Price, RequestLimits};
pub use estimate::{estimate_from_bytes, estimate_input_tokens};
pub use queue::QueueSettings;
use queue::WaitingRoom;
pub use redis_store::{Backend, OnError, RedisCounters};
use state::Check;
pub use state::{BudgetAlert, Charge, LimitName, LimitStore, Refused, Standing, Standings};
pub use tokenizer::warm_up_tokenizers;

use crate::glob::Glob;
use crate::json_edit;
use crate::metrics::FilterMetrics;

use crate::chain::{Filter, Verdict};
use crate::exchange::{ErrorKind, Exchange, Rejection};
use crate::ResponseHeader;

/// The limits of each tier, and of the whole system.
#[derive(Debug, Default)]
pub struct LimitTable {
    pub tiers: HashMap<Arc<str>, RequestLimits>,
    pub system: Option<RequestLimits>,
    /// Model prices: exact names first, then patterns in the order given. Shared with the
    /// process, which prices every response for its metrics.
    pub prices: Arc<Prices>,
}

#[derive(Debug, Default)]
pub struct Prices {
    exact: HashMap<String, Price>,
    patterns: Vec<(Glob, Price)>,
}

impl Prices {
    pub fn add(&mut self, model: &str, price: Price) {
        if model.contains(['*', '?']) {
            self.patterns.push((Glob::new(model), price));
        } else {
            self.exact.insert(model.to_owned(), price);
        }
    }

    pub fn get(&self, model: &str) -> Option<Price> {
        self.exact.get(model).copied().or_else(|| {
            self.patterns
                .iter()
                .find(|(glob, _)| glob.matches(model))
                .map(|(_, p)| *p)
        })
    }

    /// The cost of a usage, in micro-dollars (prices are per million tokens).
    pub fn cost_micros(&self, model: &str, usage: &crate::usage::Usage) -> Option<u64> {
        let price = self.get(model)?;
        let micros =
            usage.input_tokens as f64 * price.input + usage.output_tokens as f64 * price.output;
        Some(micros.round() as u64)
    }
}

impl LimitTable {
    pub fn is_empty(&self) -> bool {
        self.system.as_ref().is_none_or(RequestLimits::is_empty)
            && self.tiers.values().all(RequestLimits::is_empty)
    }
}

/// The scope name of system-wide counters; no tenant can be called this (names cannot hold NUL).
const SYSTEM_SCOPE: &str = "\0system";

pub struct Limits {
    table: Arc<LimitTable>,
    backend: Backend,
    system_scope: Arc<str>,
    room: Arc<WaitingRoom>,
    metrics: FilterMetrics,
    /// Whether tenant names may be metric labels (the policy's choice: they can be many).
    tenant_labels: bool,
}

/// How often a waiter behind others looks again (it is also woken when capacity returns).
const QUEUE_POLL: Duration = Duration::from_millis(50);

type Admitted = Result<Result<(Standings, Charge), Refused>, redis_store::Unavailable>;

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// A request's place in its scopes' in-flight counts, given back when the exchange ends —
/// however it ends, since it lives in the exchange.
struct Admission {
    backend: Backend,
    room: Arc<WaitingRoom>,
    charge: Charge,
    standings: Standings,
    /// Tokens used and their cost in micro-dollars, once known; the token reservation stands
    /// otherwise.
    settled: std::sync::Mutex<Option<(u64, u64)>>,
    /// `(asked, sent)` when a budget downgrade rewrote the model.
    downgraded: Option<(String, String)>,
    /// Streamed events a stream may carry before it is cut, when the tier cuts streams.
    stream_allowance: Option<u64>,
    streamed_events: std::sync::atomic::AtomicU64,
    alerts: AlertSink,
}

/// Where an admission's budget alerts go when its settlement fires them: the log and a metric.
#[derive(Clone)]
struct AlertSink {
    metrics: FilterMetrics,
    /// The tier of the request's tenant (alerts of the system scope are labelled `system`).
    tier: Arc<str>,
    tenant_labels: bool,
}

impl AlertSink {
    fn emit(&self, alerts: Vec<BudgetAlert>) {
        for alert in alerts {
            let system = *alert.scope == *SYSTEM_SCOPE;
            let tenant = if system { "-" } else { &alert.scope };
            tracing::warn!(
                target: "sluice::budget",
                tenant,
                tier = if system { "system" } else { &self.tier },
                threshold_percent = alert.percent,
                spent_usd = alert.spent_micros as f64 / 1e6,
                budget_usd = alert.budget_micros as f64 / 1e6,
                "budget threshold reached"
            );
            let threshold = alert.percent.to_string();
            let labels = [
                if system { "system" } else { &self.tier },
                &threshold,
                if self.tenant_labels && !system {
                    &alert.scope
                } else {
                    ""
                },
            ];
            self.metrics.budget_alerts.with_label_values(&labels).inc();
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let settled = self.settled.lock().map_or(None, |settled| *settled);
        let (used, cost) = settled.unwrap_or((self.charge.reserved_tokens(), 0));
        let charge = std::mem::take(&mut self.charge);
        match &self.backend {
            Backend::Memory(store) => {
                self.alerts.emit(store.settle(&charge, used, cost));
                self.room.capacity_changed();
            }
            Backend::Redis(redis) => {
                // The caller has its answer already; the settlement must not hold it.
                let (redis, room, alerts) = (redis.clone(), self.room.clone(), self.alerts.clone());
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        // Kept and replayed later if Redis does not answer now.
                        let done = move |fired| {
                            alerts.emit(fired);
                            room.capacity_changed();
                        };
                        redis.settle(charge, used, cost, Box::new(done)).await;
                    });
                }
            }
        }
    }
}

fn invalid(message: String) -> Verdict {
    Verdict::Reject(Rejection::new(
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidRequest,
        message,
    ))
}

/// `1s`, `6m0s`, `20ms`: the duration format of OpenAI's reset headers.
/// OpenAI's rate-limit headers (limit, remaining, reset), for requests and for tokens; built at
/// compile time (`from_static` checks the name on every call at run time).
const REQUEST_LIMIT_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKEN_LIMIT_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// How long until a limit resets, as OpenAI writes it (`20ms`, `6m0s`, `1h1m1s`). Pieced
/// together with `itoa` rather than `format!`, whose machinery was most of the limits' cost on
/// every response head (callgrind).
fn reset_text(duration: Duration) -> String {
    let secs = duration.as_secs();
    let mut text = String::with_capacity(12);
    let mut push = |value: u64, unit: &str| {
        text.push_str(itoa::Buffer::new().format(value));
        text.push_str(unit);
    };
    match secs {
        0 => push(u64::from(duration.subsec_millis().max(1)), "ms"),
        1..=59 => push(secs, "s"),
        60..=3599 => {
            push(secs / 60, "m");
            push(secs % 60, "s");
        }
        _ => {
            push(secs / 3600, "h");
            push(secs % 3600 / 60, "m");
            push(secs % 60, "s");
        }
    }
    text
}

impl Limits {
    pub fn new(table: Arc<LimitTable>, backend: Backend) -> Self {
        Self {
            table,
            backend,
            system_scope: SYSTEM_SCOPE.into(),
            room: Arc::default(),
            metrics: FilterMetrics::default(),
            tenant_labels: false,
        }
    }

    /// Records into the process's metrics (by default, into a set nobody reads).
    pub fn with_metrics(mut self, metrics: FilterMetrics, tenant_labels: bool) -> Self {
        self.metrics = metrics;
        self.tenant_labels = tenant_labels;
        self
    }

    /// Per-request caps: prompt size and requested output. A refusal names the cap.
    fn check_request(
        limits: &RequestLimits,
        prompt: u64,
        ex: &mut Exchange,
    ) -> Option<(&'static str, Verdict)> {
        if let Some(max) = limits.max_input_tokens.filter(|max| prompt > *max) {
            let verdict = invalid(format!(
                "the prompt (about {prompt} tokens) exceeds this tier's max_input_tokens of {max}"
            ));
            return Some(("max_input_tokens", verdict));
        }
        let (Some(max), Some(asked)) = (limits.max_output_tokens, ex.facts.max_tokens) else {
            return None;
        };
        if asked <= max {
            return None;
        }
        let too_many = || {
            let verdict = invalid(format!(
                "max_tokens {asked} exceeds this tier's max_output_tokens of {max}"
            ));
            Some(("max_output_tokens", verdict))
        };
        match limits.over_max_output_tokens {
            OverMax::Reject => too_many(),
            OverMax::Clamp => match clamp_max_tokens(ex.body(), max) {
                Some(body) => {
                    ex.set_body(body);
                    ex.facts.max_tokens = Some(max);
                    None
                }
                None => too_many(),
            },
        }
    }

    /// Past the tier's downgrade threshold, rewrites the requested model to its cheaper one.
    /// `spent`: the month's spend the admission read (with Redis, in the same round trip).
    fn downgrade(
        &self,
        tenant: &str,
        limits: &RequestLimits,
        spent: u64,
        ex: &mut Exchange,
    ) -> Option<(String, String)> {
        let rule = limits.downgrade.as_ref()?;
        if ex.dialect == crate::usage::Dialect::Bedrock {
            // Bedrock names the model in the path, not the body; its routes are not downgraded.
            return None;
        }
        let budget = limits.budget_micros()?;
        let asked = ex.facts.model.clone()?;
        let cheaper = rule.models.get(&asked)?;
        if (spent as f64) < budget as f64 * rule.above_percent / 100.0 {
            return None;
        }
        ex.set_body(json_edit::with_string_field(ex.body(), "model", cheaper)?);
        ex.facts.model = Some(cheaper.clone());
        tracing::info!(target: "sluice::budget", tenant, asked = %asked, sent = %cheaper, "model downgraded: budget above {}%", rule.above_percent);
        let tier = ex.tier.as_deref().unwrap_or("-");
        self.metrics
            .model_downgrades
            .with_label_values(&[tier, asked.as_str(), cheaper.as_str()])
            .inc();
        Some((asked, cheaper.clone()))
    }

    async fn admit_once(&self, checks: &[Check<'_>], reserve: u64) -> Admitted {
        match &self.backend {
            Backend::Memory(store) => {
                Ok(store.admit(checks, reserve, Instant::now(), SystemTime::now()))
            }
            Backend::Redis(redis) => redis.admit(checks, reserve, SystemTime::now()).await,
        }
    }

    /// Admits now, or — for a tier with a `queue` — waits in the room for capacity up to its
    /// `max_wait`: only the first waiter (highest priority, then oldest) tries; a refusal whose
    /// retry time is beyond the wait is final at once.
    async fn admit_or_wait(
        &self,
        checks: &[Check<'_>],
        reserve: u64,
        queue: Option<&QueueSettings>,
    ) -> Admitted {
        let Some(queue) = queue else {
            return self.admit_once(checks, reserve).await;
        };
        let deadline = Instant::now() + queue.max_wait;
        let mut ticket = None;
        loop {
            let now = Instant::now();
            let waiting_behind = ticket
                .as_ref()
                .is_some_and(|t: &queue::Ticket| !t.is_first());
            if waiting_behind && now < deadline {
                self.room.wait(QUEUE_POLL.min(deadline - now)).await;
                continue;
            }
            let attempt = self.admit_once(checks, reserve).await;
            let refused = match &attempt {
                Ok(Err(refused)) => refused,
                _ => return attempt,
            };
            let now = Instant::now();
            // A concurrency place can come back at any moment; other limits say when.
            let known_too_late =
                refused.limit != LimitName::Concurrent && refused.retry_after > deadline - now;
            if now >= deadline || known_too_late {
                return attempt;
            }
            if ticket.is_none() {
                ticket = Some(self.room.enter(queue.priority));
                continue;
            }
            self.room
                .wait(refused.retry_after.min(deadline - now))
                .await;
        }
    }

    /// Redis could not be asked: admit uncounted or refuse, as the policy says.
    fn unavailable(&self, why: &redis_store::Unavailable) -> Verdict {
        let fail_closed =
            matches!(&self.backend, Backend::Redis(redis) if redis.on_error == OnError::FailClosed);
        let on_error = if fail_closed {
            "fail_closed"
        } else {
            "fail_open"
        };
        self.metrics
            .limits_unavailable
            .with_label_values(&[on_error])
            .inc();
        match &self.backend {
            Backend::Redis(redis) if redis.on_error == OnError::FailClosed => Verdict::Reject(
                Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorKind::Internal,
                    format!("{why}; try again shortly"),
                )
                .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1")),
            ),
            _ => Verdict::Continue,
        }
    }

    fn refusal(&self, refused: &Refused, ex: &Exchange) -> Verdict {
        let system = *refused.scope == *SYSTEM_SCOPE;
        let scope_label = if system {
            "system"
        } else {
            ex.tier.as_deref().unwrap_or("-")
        };
        self.metrics
            .limit_rejections
            .with_label_values(&[refused.limit.as_str(), scope_label])
            .inc();
        let whose = if system {
            "the system-wide".to_owned()
        } else {
            format!(
                "tenant `{}`'s (tier `{}`)",
                refused.scope,
                ex.tier.as_deref().unwrap_or("-")
            )
        };
        let retry =
            refused.retry_after.as_secs() + u64::from(refused.retry_after.subsec_nanos() > 0);
        let message = format!(
            "rate limit reached: {whose} `{}` limit of {}; retry in {}",
            refused.limit.as_str(),
            refused.value,
            reset_text(refused.retry_after)
        );
        let rejection = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::RateLimited,
            message,
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry.max(1)));
        Verdict::Reject(rejection)
    }
}

#[async_trait]
impl Filter for Limits {
    fn name(&self) -> &'static str {
        "limits"
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let tier = ex.tier.as_ref().and_then(|tier| self.table.tiers.get(tier));
        let applicable = || [tier, self.table.system.as_ref()].into_iter().flatten();
        let counts_tokens = applicable().any(RequestLimits::counts_tokens);
        // The prompt is measured once, and only when a limit needs it.
        let prompt = if counts_tokens || applicable().any(|l| l.max_input_tokens.is_some()) {
            estimate_input_tokens(ex)
        } else {
            0
        };
        for (limits, system) in [(tier, false), (self.table.system.as_ref(), true)] {
            let Some(limits) = limits else { continue };
            if let Some((cap, verdict)) = Self::check_request(limits, prompt, ex) {
                let scope = if system {
                    "system"
                } else {
                    ex.tier.as_deref().unwrap_or("-")
                };
                self.metrics
                    .limit_rejections
                    .with_label_values(&[cap, scope])
                    .inc();
                return verdict;
            }
        }
        let reserve = if counts_tokens {
            let output = ex
                .facts
                .max_tokens
                .or_else(|| tier.map(RequestLimits::reserve_output_tokens))
                .unwrap_or(1024);
            prompt + output
        } else {
            0
        };
        let mut checks: Vec<(&Arc<str>, &RequestLimits)> = Vec::with_capacity(2);
        if let (Some(tenant), Some(limits)) = (ex.tenant.as_ref(), tier) {
            if limits.counts_requests() {
                checks.push((tenant, limits));
            }
        }
        if let Some(limits) = self.table.system.as_ref().filter(|l| l.counts_requests()) {
            checks.push((&self.system_scope, limits));
        }
        if checks.is_empty() {
            return Verdict::Continue;
        }
        let queue = tier.and_then(|limits| limits.queue.as_ref());
        let asked = Instant::now();
        let admitted = self.admit_or_wait(&checks, reserve, queue).await;
        if queue.is_some() {
            ex.timings.queued = asked.elapsed();
        }
        drop(checks);
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(unavailable) => return self.unavailable(&unavailable),
        };
        match admitted {
            Ok((standings, charge)) => {
                let downgraded = match (ex.tenant.clone(), tier) {
                    (Some(tenant), Some(limits)) => charge
                        .scopes
                        .iter()
                        .find(|charged| charged.scope == tenant)
                        .and_then(|charged| charged.budget.as_ref())
                        .and_then(|budget| {
                            self.downgrade(&tenant, limits, budget.spent_at_admission, ex)
                        }),
                    _ => None,
                };
                let cuts =
                    tier.is_some_and(|limits| limits.cut_streams_over_tokens) && ex.facts.stream;
                let reserved_output = reserve.saturating_sub(prompt);
                let stream_allowance = standings
                    .tokens
                    .filter(|_| cuts)
                    .map(|tokens| tokens.remaining + reserved_output);
                ex.extensions.insert(Arc::new(AdmissionSlot(Admission {
                    backend: self.backend.clone(),
                    room: self.room.clone(),
                    charge,
                    standings,
                    settled: std::sync::Mutex::new(None),
                    downgraded,
                    stream_allowance,
                    streamed_events: std::sync::atomic::AtomicU64::new(0),
                    alerts: AlertSink {
                        metrics: self.metrics.clone(),
                        tier: ex.tier.clone().unwrap_or_else(|| "-".into()),
                        tenant_labels: self.tenant_labels,
                    },
                })));
                Verdict::Continue
            }
            Err(refused) => self.refusal(&refused, ex),
        }
    }

    fn on_response_head(&self, ex: &mut Exchange, response: &mut ResponseHeader) {
        let Some(slot) = ex.extensions.get::<Arc<AdmissionSlot>>() else {
            return;
        };
        let standings = slot.0.standings;
        if let Some((asked, sent)) = &slot.0.downgraded {
            if let Ok(value) = HeaderValue::from_str(&format!("{asked} -> {sent}")) {
                let _ = response
                    .insert_header(HeaderName::from_static("x-sluice-model-downgraded"), value);
            }
        }
        let kinds = [
            (standings.requests, &REQUEST_LIMIT_HEADERS),
            (standings.tokens, &TOKEN_LIMIT_HEADERS),
        ];
        for (standing, [limit, remaining, reset]) in kinds {
            let Some(standing) = standing else { continue };
            let reset_value =
                HeaderValue::try_from(reset_text(standing.reset)).expect("digits and unit letters");
            for (name, value) in [
                (limit, HeaderValue::from(standing.limit)),
                (remaining, HeaderValue::from(standing.remaining)),
                (reset, reset_value),
            ] {
                let _ = response.insert_header(name.clone(), value);
            }
        }
    }

    fn on_response_chunk(&self, ex: &mut Exchange, chunk: &Bytes) -> crate::ChunkVerdict {
        let Some(slot) = ex.extensions.get::<Arc<AdmissionSlot>>() else {
            return crate::ChunkVerdict::Pass;
        };
        let Some(allowance) = slot.0.stream_allowance else {
            return crate::ChunkVerdict::Pass;
        };
        let events = ex.dialect.stream_events_in(chunk);
        let total = slot
            .0
            .streamed_events
            .fetch_add(events, std::sync::atomic::Ordering::Relaxed)
            + events;
        if total <= allowance {
            return crate::ChunkVerdict::Pass;
        }
        let message = format!(
            "token limit reached mid-stream: tenant `{}` (tier `{}`) has no tokens left; the response was cut",
            ex.tenant.as_deref().unwrap_or("-"),
            ex.tier.as_deref().unwrap_or("-"),
        );
        crate::ChunkVerdict::Cut(Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::RateLimited,
            message,
        ))
    }

    fn on_done(&self, ex: &Exchange) {
        let Some(slot) = ex.extensions.get::<Arc<AdmissionSlot>>() else {
            return;
        };
        // What was used: the provider's figures; nothing if no successful response came (the
        // provider charges nothing either) or the cache answered (no provider call; a route
        // with `charge_hits` puts the original usage on the exchange instead); the reservation
        // if a success came without figures.
        let succeeded = ex.status.is_some_and(|status| status.is_success());
        let cache_hit = ex.cache == Some(crate::CacheStatus::Hit);
        let used = match &ex.usage {
            Some(usage) => Some(usage.total()),
            None if !succeeded || cache_hit => Some(0),
            None => None,
        };
        let model = ex.served_model.as_deref().or(ex.facts.model.as_deref());
        let cost = match (&ex.usage, model) {
            (Some(usage), Some(model)) => self.table.prices.cost_micros(model, usage).unwrap_or(0),
            _ => 0,
        };
        if let Ok(mut settled) = slot.0.settled.lock() {
            *settled = used.map(|used| (used, cost));
        }
    }

    fn needs_usage(&self) -> bool {
        self.table
            .tiers
            .values()
            .chain(self.table.system.as_ref())
            .any(|limits| limits.counts_tokens() || limits.budget_usd_per_month.is_some())
    }
}

/// `http::Extensions` wants `Clone + Send + Sync`; the admission itself must not be cloned
/// (each clone would release once), so it sits behind an `Arc`.
struct AdmissionSlot(Admission);

/// Rewrites the request's `max_tokens` / `max_completion_tokens` (and Bedrock Converse's
/// `inferenceConfig.maxTokens`) down to `max`.
fn clamp_max_tokens(body: &Bytes, max: u64) -> Option<Bytes> {
    let mut edited = clamp_fields(body, &["max_tokens", "max_completion_tokens"], max)?;
    if let Some(span) = json_edit::field_span(edited.as_ref().unwrap_or(body), "inferenceConfig") {
        let current = edited.as_ref().unwrap_or(body);
        let config = &current[span];
        if let Some(clamped) = clamp_fields(config, &["maxTokens"], max)?.as_ref() {
            edited = Some(json_edit::with_field(current, "inferenceConfig", clamped)?);
        }
    }
    edited
}

/// `object` with each of `fields` above `max` set to `max`: `Some(None)` when none was.
fn clamp_fields(object: &[u8], fields: &[&str], max: u64) -> Option<Option<Bytes>> {
    let mut edited: Option<Bytes> = None;
    for field in fields {
        let current = edited.as_deref().unwrap_or(object);
        let Some(span) = json_edit::field_span(current, field) else {
            continue;
        };
        let asked: Option<u64> = serde_json::from_slice(&current[span]).ok();
        if asked.is_some_and(|asked| asked > max) {
            edited = Some(json_edit::with_field(
                current,
                field,
                max.to_string().as_bytes(),
            )?);
        }
    }
    Some(edited)
}

#[cfg(test)]
mod tests;
