//! The attempt loop's parts: which target and key each attempt goes to, sending one attempt,
//! judging its answer (key cooldowns, disabled keys, circuit breakers), when a failure is tried
//! again and how soon, and what the caller hears when no attempt succeeded.
//!
//! Order of attempts: the route's targets in turn, one pass a round. A failure that belongs to
//! a key (429, or 401/403 for one of the upstream's own keys) is tried again on the same
//! target, where another key is picked; any other failure moves on to the next target. A
//! target is tried again only in a later round, after a backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, StatusCode};
use pingora::prelude::HttpPeer;
use pingora::protocols::ALPN;
use pingora::{Error, ErrorType};
use sluice_filters::{json_edit, ErrorKind, Exchange, Rejection, RequestHeader};

use super::headers;
use crate::policy::schema::{HedgeAfter, RetryOn};
use crate::policy::{Route, Target};
use crate::telemetry::rolling::now_ms;
use crate::telemetry::stats::Sample;
use crate::telemetry::traces::{Span, Tracer};
use crate::telemetry::Metrics;
use crate::upstream::health::Permit;
use crate::upstream::keys::backoff_asked;
use crate::upstream::{KeyLease, NoKey, Resolver, Upstream, UpstreamConnector, UpstreamSession};
use opentelemetry::trace::{Span as _, SpanContext, Status};
use opentelemetry::KeyValue;

/// The fewest first-byte samples a percentile hedge delay is read from.
const HEDGE_MIN_SAMPLES: u64 = 20;

/// One attempt on its way: where it went and what it holds.
pub struct Launched<'r> {
    pub target: &'r Target,
    /// The key it uses (its concurrency place and circuit permit), if the upstream has keys.
    pub lease: Option<KeyLease>,
    /// The upstream's circuit permit.
    pub permit: Option<Permit>,
    /// The model asked of the upstream, when the request names one.
    pub model: Option<Arc<str>>,
    pub hedge: bool,
    pub started: Instant,
    /// Its client span, when the request is traced; ends when this is dropped.
    pub span: Option<Span>,
}

/// An attempt that got a response head.
pub struct Answered {
    pub session: UpstreamSession,
    pub peer: HttpPeer,
    /// When the head arrived.
    pub head_at: Instant,
    /// Whether the connection came from the pool; if not, how long opening it took.
    pub reused: bool,
    pub connect: Duration,
}

/// How an attempt failed before any response head.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection failed before a response: {0}")]
    Broken(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

pub type AttemptResult = Result<Answered, AttemptError>;

/// The loop's state over the targets of one request.
pub struct Plan<'r> {
    pub route: &'r Route,
    pub targets: &'r [Target],
    /// The target of the next attempt.
    position: usize,
    /// Passes over the targets completed so far.
    round: u32,
    pub made: u32,
    /// Why targets could not be tried, for the answer if none could.
    unavailable: Option<Unavailable>,
    /// The request's span, parent of every attempt's.
    pub trace: Option<SpanContext>,
}

#[derive(Debug, Clone, Copy)]
enum Unavailable {
    CircuitOpen(Duration),
    NoKey(NoKey),
}

/// What the loop does after a failed attempt.
pub enum Next {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Give up: the last failure is the answer.
    GiveUp,
}

/// A failure to judge: what the attempt ended with.
pub struct Failure {
    /// Tried again on the same target (another key) rather than the next one.
    pub key_specific: bool,
    pub retryable: bool,
    /// The provider asked for this pause.
    pub asked_pause: Option<Duration>,
}

impl<'r> Plan<'r> {
    pub fn new(route: &'r Route, targets: &'r [Target]) -> Self {
        Self {
            route,
            targets,
            position: 0,
            round: 0,
            made: 0,
            unavailable: None,
            trace: None,
        }
    }

    /// The upstream whose retry budget this request's retries draw on: its first target's.
    pub fn budget_upstream(&self) -> &'r Upstream {
        &self.targets[0].upstream
    }

    /// Picks the next available target and key, starting at the current position: a target
    /// whose circuit is open, or with no key free for the model, is passed over.
    pub fn take_candidate(&mut self, requested: Option<&str>) -> Option<Launched<'r>> {
        for _ in 0..self.targets.len() {
            let target = &self.targets[self.position];
            let upstream = &target.upstream;
            let model: Option<Arc<str>> = target.model.clone().or_else(|| requested.map(Arc::from));
            match upstream.health.breaker.try_acquire(&upstream.breaker) {
                Err(rest) => self.note(Unavailable::CircuitOpen(rest)),
                Ok(permit) => {
                    let lease = if upstream.keys.is_empty() {
                        Ok(None)
                    } else {
                        upstream
                            .keys
                            .pick(model.as_deref(), &upstream.breaker)
                            .map(Some)
                    };
                    match lease {
                        Ok(lease) => {
                            return Some(Launched {
                                target,
                                lease,
                                permit: Some(permit),
                                model,
                                hedge: false,
                                started: Instant::now(),
                                span: None,
                            })
                        }
                        // The permit is dropped unused: the upstream was not asked.
                        Err(why) => self.note(Unavailable::NoKey(why)),
                    }
                }
            }
            self.advance_within_round();
        }
        None
    }

    fn note(&mut self, why: Unavailable) {
        // A resting key comes back; say that rather than a disabled one.
        self.unavailable = match (self.unavailable, why) {
            (Some(Unavailable::NoKey(NoKey::Resting(_))), Unavailable::NoKey(_)) => {
                self.unavailable
            }
            _ => Some(why),
        };
    }

    fn advance_within_round(&mut self) {
        self.position = (self.position + 1) % self.targets.len();
    }

    /// After a failure: whether and when to try again.
    pub fn after_failure(&mut self, failure: &Failure, metrics: &Metrics) -> Next {
        let retry = &self.route.retry;
        if !failure.retryable || self.made >= retry.attempts {
            return Next::GiveUp;
        }
        let mut wait = Duration::ZERO;
        if !failure.key_specific {
            if failure
                .asked_pause
                .is_some_and(|pause| pause > retry.retry_after_max)
            {
                return Next::GiveUp;
            }
            let wraps = self.position + 1 == self.targets.len();
            self.advance_within_round();
            if wraps {
                self.round += 1;
            }
            if self.round > 0 {
                wait = full_jitter(retry.backoff_base, retry.backoff_max, self.round)
                    .max(failure.asked_pause.unwrap_or_default());
            }
        }
        if !self.take_retry(metrics) {
            return Next::GiveUp;
        }
        Next::RetryAfter(wait)
    }

    /// Draws one retry (or hedge) from the budget.
    pub fn take_retry(&self, metrics: &Metrics) -> bool {
        let upstream = self.budget_upstream();
        let granted = upstream
            .health
            .retry_budget
            .try_retry(&upstream.retry_budget);
        if !granted {
            metrics
                .retry_budget_exhausted
                .with_label_values(&[&upstream.name])
                .inc();
            tracing::warn!(upstream = %upstream.name, route = %self.route.name, "retry budget exhausted: not retrying");
        }
        granted
    }

    /// Moves on to the next target for a hedge (no backoff: the first attempt still runs).
    pub fn next_for_hedge(&mut self) {
        self.advance_within_round();
    }

    /// When a hedge goes out for an attempt on `target`, if the route hedges and attempts
    /// are left.
    pub fn hedge_at(&self, target: &Target) -> Option<Instant> {
        if self.made >= self.route.retry.attempts {
            return None;
        }
        let delay = match self.route.hedge? {
            HedgeAfter::Delay(delay) => delay,
            HedgeAfter::Percentile(q) => {
                let (samples, [p]) = target.upstream.health.first_byte.quantiles([q], now_ms());
                if samples < HEDGE_MIN_SAMPLES {
                    return None;
                }
                p
            }
        };
        Some(Instant::now() + delay)
    }

    /// The answer when no target could be tried at all.
    pub fn unavailable_rejection(&self) -> Rejection {
        let first = &self.targets[0].upstream.name;
        match self.unavailable {
            Some(Unavailable::CircuitOpen(rest)) => Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::UpstreamUnavailable,
                format!(
                    "upstream `{first}` is failing and taken out of rotation (circuit open); retry in {}s",
                    rest.as_secs().max(1)
                ),
            )
            .with_header(header::RETRY_AFTER, seconds(rest)),
            Some(Unavailable::NoKey(NoKey::Resting(rest))) => Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorKind::RateLimited,
                format!(
                    "every provider key of upstream `{first}` is rate limited; retry in {}s",
                    rest.as_secs().max(1)
                ),
            )
            .with_header(header::RETRY_AFTER, seconds(rest)),
            Some(Unavailable::NoKey(NoKey::AtCapacity)) => Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorKind::RateLimited,
                format!("every provider key of upstream `{first}` is at its concurrency limit"),
            )
            .with_header(header::RETRY_AFTER, http::HeaderValue::from_static("1")),
            Some(Unavailable::NoKey(NoKey::Disabled)) => Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::UpstreamUnavailable,
                format!("every provider key of upstream `{first}` was refused by the provider (401/403) and is disabled until the policy is reloaded"),
            ),
            Some(Unavailable::NoKey(NoKey::ModelNotAllowed)) => Rejection::new(
                StatusCode::FORBIDDEN,
                ErrorKind::PermissionDenied,
                format!("no provider key of upstream `{first}` may serve this model"),
            ),
            None => Rejection::new(
                StatusCode::BAD_GATEWAY,
                ErrorKind::UpstreamUnavailable,
                "no upstream could be tried",
            ),
        }
    }
}

fn seconds(duration: Duration) -> http::HeaderValue {
    http::HeaderValue::from(duration.as_secs() + u64::from(duration.subsec_nanos() > 0))
}

/// A random wait in `0..=min(max, base × 2^(round − 1))` ("full jitter": retries from many
/// callers spread out instead of arriving together).
fn full_jitter(base: Duration, max: Duration, round: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << round.saturating_sub(1).min(16))
        .min(max);
    ceiling.mul_f64(rand::random::<f64>())
}

/// The request head for one attempt: path rewritten for the target, headers cleaned, filters
/// applied, credentials set. The body is the caller's, with the target's model if it maps one.
pub fn build_request(
    route: &Route,
    ex: &Exchange,
    launched: &Launched,
    tracer: &Tracer,
) -> Result<(RequestHeader, Bytes), Rejection> {
    let upstream = &launched.target.upstream;
    let body = match (&launched.target.model, ex.facts.model.as_deref()) {
        (Some(mapped), Some(asked)) if **mapped != *asked => {
            json_edit::with_string_field(ex.body(), "model", mapped)
                .unwrap_or_else(|| ex.body().clone())
        }
        _ => ex.body().clone(),
    };
    let incoming = &ex.request;
    let path_and_query = incoming.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = upstream
        .provider
        .upstream_path(
            route.upstream_path(upstream, path_and_query),
            launched.model.as_deref(),
            &upstream.azure,
        )
        .map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                e.to_string(),
            )
        })?;
    let mut request = RequestHeader::build_no_case(
        incoming.method.clone(),
        path.as_bytes(),
        Some(incoming.headers.len() + 4),
    )
    .map_err(|_| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::InvalidRequest,
            "the request path cannot be sent upstream",
        )
    })?;
    let credential = launched
        .lease
        .as_ref()
        .map(|lease| &upstream.keys.get(lease.index).credential);
    headers::copy_request_headers(incoming, &mut request, credential.is_some());
    let _ = request.insert_header(header::HOST, upstream.authority.clone());
    let carries_body =
        !body.is_empty() || matches!(incoming.method, Method::POST | Method::PUT | Method::PATCH);
    if carries_body {
        let _ = request.insert_header(header::CONTENT_LENGTH, body.len());
    }
    if let Some(version) = &upstream.anthropic_version {
        if !request.headers.contains_key("anthropic-version") {
            let _ = request.insert_header("anthropic-version", version.clone());
        }
    }
    // The caller's trace continues through this attempt's span.
    if let Some(span) = &launched.span {
        tracer.inject(span.span_context(), &mut request);
    }
    // Filters first, Sluice's own credentials last: no filter can remove or replace them.
    route.chain.on_upstream_request(ex, &mut request);
    if let Some(credential) = credential {
        let _ = request.insert_header(upstream.provider.credential_header(), credential.clone());
    }
    for (name, value) in &upstream.extra_headers {
        let _ = request.insert_header(name.clone(), value.clone());
    }
    // Last: a signature covers the request exactly as it is sent.
    upstream.sign(&mut request, &body).map_err(|e| {
        Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Internal,
            format!(
                "cannot sign the request for upstream `{}`: {e}",
                upstream.name
            ),
        )
    })?;
    Ok((request, body))
}

/// Sends one attempt and waits for its response head, all within `timeout`.
pub async fn send(
    connector: &UpstreamConnector,
    resolver: &Resolver,
    upstream: &Upstream,
    request: RequestHeader,
    body: Bytes,
    timeout: Duration,
) -> AttemptResult {
    match pingora_timeout::fast_timeout::fast_timeout(
        timeout,
        send_untimed(connector, resolver, upstream, request, body),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(AttemptError::Timeout(timeout)),
    }
}

async fn send_untimed(
    connector: &UpstreamConnector,
    resolver: &Resolver,
    upstream: &Upstream,
    request: RequestHeader,
    body: Bytes,
) -> AttemptResult {
    let addr = upstream
        .address(resolver)
        .await
        .map_err(|e| AttemptError::Connect(e.to_string()))?;
    let mut peer = HttpPeer::new(addr, upstream.tls, upstream.host.clone());
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.total_connection_timeout = Some(upstream.connect_timeout);
    peer.options.idle_timeout = Some(connector.idle_timeout());
    peer.options.write_timeout = Some(upstream.idle_timeout);
    if upstream.tls {
        peer.options.alpn = ALPN::H2H1;
        peer.options.ca = upstream.ca.clone();
    }
    // A pooled connection may have been closed by the upstream just before reuse; that failure
    // says nothing about the upstream, so it gets one fresh connection.
    let mut fresh_retry = true;
    let mut request = Some(request);
    loop {
        let asked = Instant::now();
        let (mut session, reused) = connector
            .get(&peer)
            .await
            .map_err(|e| AttemptError::Connect(e.etype().as_str().to_owned()))?;
        let connect = asked.elapsed();
        // Keep a copy only when a retry is possible.
        let head = if reused && fresh_retry {
            request.clone()
        } else {
            request.take()
        };
        let sent = match head {
            Some(head) => session.write_request(head, &body).await,
            None => Err(Error::explain(
                ErrorType::InternalError,
                "request head already sent",
            )),
        };
        let answered = match sent {
            Ok(()) => session.read_response_header().await,
            Err(e) => Err(e),
        };
        match answered {
            Ok(()) => {
                return Ok(Answered {
                    session,
                    peer,
                    head_at: Instant::now(),
                    reused,
                    connect,
                })
            }
            Err(_) if reused && fresh_retry => fresh_retry = false,
            Err(e) => return Err(AttemptError::Broken(e.etype().as_str().to_owned())),
        }
    }
}

/// What an attempt's result means.
pub enum Judged {
    /// Send it to the caller.
    Deliver(Answered),
    /// A failure, with the answer when it has a response head (relayed to the caller if
    /// nothing better comes), or the error.
    Failed(Failure, Result<Answered, AttemptError>),
}

/// Judges an attempt's result, recording what it says about the upstream and the key: a 429
/// rests the key, a 401/403 disables it, connect errors, timeouts and 5xx count against
/// circuits.
pub fn judge(
    plan: &Plan,
    launched: &mut Launched,
    result: AttemptResult,
    metrics: &Metrics,
) -> Judged {
    let upstream = &launched.target.upstream;
    let retry = &plan.route.retry;
    let elapsed = launched.started.elapsed();
    let key = launched
        .lease
        .as_ref()
        .map(|lease| upstream.keys.get(lease.index));
    let key_name = key.map_or("", |key| &key.name);
    let count = |outcome: &str| {
        metrics
            .upstream_attempts
            .with_label_values(&[&upstream.name, outcome])
            .inc();
    };
    let answered = match result {
        Ok(answered) if answered.session.response_header().is_some() => answered,
        failed => {
            let error = failed
                .err()
                .unwrap_or_else(|| AttemptError::Broken("no response head".to_owned()));
            let (outcome, on) = match error {
                AttemptError::Timeout(_) => ("timeout", RetryOn::FirstByteTimeout),
                _ => ("connect_error", RetryOn::ConnectError),
            };
            count(outcome);
            tracing::info!(upstream = %upstream.name, key = key_name, route = %plan.route.name, "attempt failed: {error}");
            upstream.stats.record(Sample {
                first_byte: None,
                total: elapsed,
                failed: true,
            });
            if let Some(span) = launched.span.as_mut() {
                span.set_attribute(KeyValue::new("error.type", outcome));
                span.set_status(Status::error(error.to_string()));
            }
            fail_circuits(launched, metrics);
            let failure = Failure {
                key_specific: false,
                retryable: retry.retries(on),
                asked_pause: None,
            };
            return Judged::Failed(failure, Err(error));
        }
    };
    let Some(head) = answered.session.response_header() else {
        unreachable!("checked above");
    };
    upstream.health.first_byte.record(elapsed, now_ms());
    let status = head.status.as_u16();
    upstream.stats.record(Sample {
        first_byte: Some(elapsed),
        total: elapsed,
        failed: status >= 500,
    });
    upstream.first_byte_seconds.observe(elapsed.as_secs_f64());
    let reused = if answered.reused { "true" } else { "false" };
    metrics
        .upstream_connections
        .with_label_values(&[&upstream.name, reused])
        .inc();
    if !answered.reused {
        upstream
            .connect_seconds
            .observe(answered.connect.as_secs_f64());
    }
    if let Some(span) = launched.span.as_mut() {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 400 {
            span.set_status(Status::error(format!("HTTP {status}")));
        }
    }
    let judged = match status {
        429 => {
            count("rate_limited");
            let asked = backoff_asked(&head.headers, true);
            if let Some(key) = key {
                let rest = asked.unwrap_or(upstream.key_cooldown);
                key.cool_down(rest);
                metrics
                    .key_cooldowns
                    .with_label_values(&[&upstream.name, &key.name])
                    .inc();
                tracing::info!(upstream = %upstream.name, key = %key.name, "provider key rate limited: resting {rest:?}");
            }
            Some(Failure {
                key_specific: key.is_some(),
                retryable: retry.retries_status(429),
                asked_pause: asked,
            })
        }
        401 | 403 if key.is_some() => {
            count("client_error");
            if let Some(key) = key.filter(|key| key.disable()) {
                metrics
                    .keys_disabled
                    .with_label_values(&[&upstream.name, &key.name])
                    .inc();
                tracing::error!(upstream = %upstream.name, key = %key.name, status, "provider refused a key: disabled until the policy is reloaded");
            }
            // The caller did nothing wrong: another key is tried, whatever `retry.on` says.
            Some(Failure {
                key_specific: true,
                retryable: true,
                asked_pause: None,
            })
        }
        500..=599 => {
            count("server_error");
            let asked_pause = backoff_asked(&head.headers, false);
            fail_circuits(launched, metrics);
            Some(Failure {
                key_specific: false,
                retryable: retry.retries_status(status),
                asked_pause,
            })
        }
        _ => {
            count(if status >= 400 { "client_error" } else { "ok" });
            retry.retries_status(status).then(|| Failure {
                key_specific: false,
                retryable: true,
                asked_pause: backoff_asked(&head.headers, false),
            })
        }
    };
    match judged {
        Some(failure) => Judged::Failed(failure, Ok(answered)),
        None => Judged::Deliver(answered),
    }
}

/// The upstream (and key) failed: their circuits hear of it.
fn fail_circuits(launched: &mut Launched, metrics: &Metrics) {
    let upstream = &launched.target.upstream;
    if let Some(permit) = launched.permit.take() {
        if permit.failure(&upstream.breaker) {
            metrics
                .circuit_opens
                .with_label_values(&[&upstream.name, ""])
                .inc();
            tracing::warn!(upstream = %upstream.name, "circuit opened: upstream taken out of rotation for {:?}", upstream.breaker.open_for);
        }
    }
    if let Some(lease) = launched.lease.as_mut() {
        if let Some(permit) = lease.permit.take() {
            let key = upstream.keys.get(lease.index);
            if permit.failure(&upstream.breaker) {
                metrics
                    .circuit_opens
                    .with_label_values(&[&upstream.name, &key.name])
                    .inc();
                tracing::warn!(upstream = %upstream.name, key = %key.name, "circuit opened: key taken out of rotation");
            }
        }
    }
}

/// A delivered attempt succeeded as far as circuits care.
pub fn succeed_circuits(launched: &mut Launched) {
    if let Some(permit) = launched.permit.take() {
        permit.success();
    }
    if let Some(permit) = launched
        .lease
        .as_mut()
        .and_then(|lease| lease.permit.take())
    {
        permit.success();
    }
}

/// A delivered response broke midway: counted, and the upstream's circuit hears of it.
pub fn broke_midway(launched: &Launched, metrics: &Metrics) {
    let upstream = &launched.target.upstream;
    metrics
        .upstream_broke
        .with_label_values(&[&upstream.name])
        .inc();
    if upstream.health.breaker.on_failure(&upstream.breaker) {
        metrics
            .circuit_opens
            .with_label_values(&[&upstream.name, ""])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile_text, Policy, SharedState};

    fn two_target_policy() -> Policy {
        let text = r#"
upstreams:
  a: { provider: openai, base_url: "http://127.0.0.1:9/", retry_budget: { min_per_second: 1000 } }
  b: { provider: openai, base_url: "http://127.0.0.1:9/" }
routes:
  - name: r
    match: { path_prefix: / }
    targets: [a, b]
    retry: { attempts: 4, backoff: { base: 40ms, max: 60ms }, retry_after_max: 2s }
"#;
        let env = |_: &str| None;
        let path = std::path::Path::new("test.yaml");
        compile_text(text, path, &env, &SharedState::default()).unwrap()
    }

    fn failure(asked_pause: Option<Duration>) -> Failure {
        Failure {
            key_specific: false,
            retryable: true,
            asked_pause,
        }
    }

    fn wait(next: Next) -> Option<Duration> {
        match next {
            Next::RetryAfter(wait) => Some(wait),
            Next::GiveUp => None,
        }
    }

    #[test]
    fn backoff_starts_when_the_targets_come_round_again() {
        let policy = two_target_policy();
        let route = &policy.routes[0];
        let metrics = Metrics::default();
        let mut longest = Duration::ZERO;
        for _ in 0..30 {
            let mut plan = Plan::new(route, &route.targets.default);
            // First pass: a failed, b is tried at once — even if a asked for a pause.
            plan.made = 1;
            let first = wait(plan.after_failure(&failure(Some(Duration::from_secs(1))), &metrics));
            assert_eq!(first, Some(Duration::ZERO));
            assert_eq!(plan.position, 1);
            // b failed too: a again, in round 2, after a jittered wait of at most `base`.
            plan.made = 2;
            let second = wait(plan.after_failure(&failure(None), &metrics)).unwrap();
            assert!(second <= Duration::from_millis(40), "{second:?}");
            assert_eq!((plan.position, plan.round), (0, 1));
            longest = longest.max(second);
            // b again, still in round 2 (ceiling `base`); then a in round 3 (ceiling `max`),
            // where an asked pause under the cap is waited out in full.
            plan.made = 3;
            let third = wait(plan.after_failure(&failure(None), &metrics)).unwrap();
            assert!(third <= Duration::from_millis(40), "{third:?}");
            let asked = Duration::from_millis(500);
            let fourth = wait(plan.after_failure(&failure(Some(asked)), &metrics)).unwrap();
            assert!(fourth >= asked, "{fourth:?}");
            // Attempts spent: no more.
            plan.made = 4;
            assert!(wait(plan.after_failure(&failure(None), &metrics)).is_none());
        }
        assert!(longest > Duration::ZERO, "round 2 waits");
        // A pause beyond `retry_after_max`, or a failure not to retry, ends the request.
        let mut plan = Plan::new(route, &route.targets.default);
        plan.made = 1;
        let beyond = failure(Some(Duration::from_secs(3)));
        assert!(wait(plan.after_failure(&beyond, &metrics)).is_none());
        let final_answer = Failure {
            retryable: false,
            ..failure(None)
        };
        assert!(wait(plan.after_failure(&final_answer, &metrics)).is_none());
    }

    #[test]
    fn full_jitter_stays_under_its_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for round in 1..10 {
            let ceiling = (base * 2u32.pow(round - 1)).min(max);
            for _ in 0..50 {
                assert!(full_jitter(base, max, round) <= ceiling);
            }
        }
        let spread: std::collections::HashSet<u128> = (0..20)
            .map(|_| full_jitter(base, max, 3).as_micros())
            .collect();
        assert!(spread.len() > 10, "waits are spread out");
    }
}
