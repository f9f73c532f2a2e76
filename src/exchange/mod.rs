//! The exchange: one request through a route's filters to its upstream and back.
//!
//! Sluice drives the upstream exchange itself (see DESIGN.md), as the [`Handler`] of its
//! listeners' HTTP app (`server::HttpApp`, on Pingora's server sessions):
//! the whole body is read first so it can be inspected and replayed, the upstream is called over
//! Sluice's connection pool (`upstream::pool`: HTTP/1 pooled by Sluice, new connections and
//! HTTP/2 through Pingora's connector), and the response is streamed downstream chunk by chunk.

mod attempts;
mod framing;
pub mod headers;
mod inflight;
mod record;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, Method, StatusCode};
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorType};
use sluice_filters::{
    ErrorKind, Exchange, LocalResponse, Outcome, Rejection, RequestHeader, ResponseHeader, Verdict,
};

use http::HeaderValue;
use opentelemetry::trace::{Span as _, SpanContext};
use sluice_filters::usage::{carries_content, inject_include_usage, Dialect, UsageMeter};
use sluice_filters::ChunkVerdict;

use attempts::{Answered, AttemptError, Judged, Launched, Next, Plan};
use framing::{EventFramer, Framing};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::policy::{Policy, PolicyStore, Route, Target};
use crate::server::Handler;
use crate::telemetry::Metrics;
use crate::upstream::{ProviderKind, Resolver, UpstreamConnector, UpstreamSession};
pub use inflight::Inflight;

pub struct SluiceProxy {
    policies: Arc<PolicyStore>,
    connector: Arc<UpstreamConnector>,
    resolver: Resolver,
    inflight: Arc<Inflight>,
}

impl SluiceProxy {
    pub fn new(
        policies: Arc<PolicyStore>,
        inflight: Arc<Inflight>,
        connector: Arc<UpstreamConnector>,
    ) -> Self {
        Self {
            policies,
            connector,
            resolver: Resolver::default(),
            inflight,
        }
    }
}

/// How the attempts ended: an answer to stream to the caller (with the attempts made), or
/// no answer at all and what to tell the caller.
// Returned once per request: a move of the answer costs less than boxing it.
#[allow(clippy::large_enum_variant)]
enum Forwarded<'r> {
    Answer(Launched<'r>, Answered, u32),
    Failed(Rejection),
}

/// Why a downstream connection must be closed rather than reused after an exchange.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("caller went away: {0}")]
    CallerGone(Box<Error>),
    #[error("upstream broke mid-response: {0}")]
    UpstreamBroke(Box<Error>),
}

impl Close {
    fn into_pingora(self) -> Box<Error> {
        let kind = match self {
            Close::CallerGone(_) => ErrorType::ConnectionClosed,
            Close::UpstreamBroke(_) => ErrorType::ReadError,
        };
        Error::explain(kind, self.to_string())
    }
}

#[async_trait]
impl Handler for SluiceProxy {
    async fn answer(&self, session: &mut ServerSession) -> pingora::Result<()> {
        let _counted = self.inflight.enter();
        let policy = self.policies.current();
        let exchange = std::panic::AssertUnwindSafe(self.exchange(session, &policy));

        match futures_util::FutureExt::catch_unwind(exchange).await {
            Ok(result) => result.map_err(Close::into_pingora),
            Err(_panic) => Err(self.answer_panic(session, &policy).await),
        }
    }
}

impl SluiceProxy {
    /// After a panic in an exchange (the hook has reported where, without its message): the
    /// caller gets an error in its provider's shape instead of a dropped connection, and the
    /// connection, in an unknown state, is not reused.
    async fn answer_panic(&self, session: &mut ServerSession, policy: &Policy) -> Box<Error> {
        let request = session.req_header();
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let route = policy.route_for(request_host(request), path);
        let provider = route.map_or(ProviderKind::Openai, |r| r.provider);
        let name = route.map_or_else(|| Arc::from("-"), |r| r.name.clone());
        tracing::error!(route = %name, "the exchange panicked; answered 500");
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        record::count_early_rejection(self.policies.metrics(), &name, status);
        session.set_keepalive(None);
        if session.response_written().is_none() {
            let body = provider.error_body(ErrorKind::Internal, "internal error");
            let _ = write_simple(session, status, &[], body).await;
        }
        Error::explain(ErrorType::InternalError, "the exchange panicked")
    }

    async fn exchange(&self, session: &mut ServerSession, policy: &Policy) -> Result<(), Close> {
        let arrived = (Instant::now(), SystemTime::now());
        let metrics = self.policies.metrics();
        let request = session.req_header();
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = request_host(request);
        let Some(route) = policy.route_for(host, path) else {
            // The path only: a query string may carry something the caller would not want echoed.
            let message = format!("no route for {}", request.uri.path());
            let rejection = Rejection::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message);
            log_early_rejection(session, "-", &rejection, metrics);
            return respond_rejection(session, ProviderKind::Openai, rejection, arrived.0).await;
        };
        let provider = route.provider;
        if header_bytes(session.req_header()) > policy.server.max_header_bytes {
            let rejection = Rejection::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ErrorKind::RequestTooLarge,
                format!(
                    "the request headers exceed {} bytes",
                    policy.server.max_header_bytes
                ),
            );
            log_early_rejection(session, &route.name, &rejection, metrics);
            return respond_rejection(session, provider, rejection, arrived.0).await;
        }
        if has_conflicting_framing(session) {
            // Ambiguous framing is how request smuggling starts (pingora#945).
            let rejection = Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                "a request may not carry both Content-Length and Transfer-Encoding",
            );
            log_early_rejection(session, &route.name, &rejection, metrics);
            return respond_rejection(session, provider, rejection, arrived.0).await;
        }
        let body = match read_body(session, route, policy.server.client_body_timeout).await {
            Ok(body) => body,
            Err(BodyError::Refused(rejection)) => {
                log_early_rejection(session, &route.name, &rejection, metrics);
                return respond_rejection(session, provider, rejection, arrived.0).await;
            }
            Err(BodyError::CallerGone(e)) => return Err(Close::CallerGone(e)),
        };

        // Without the caller's header-name case map, which nothing Sluice sends reads (the
        // heads it builds are case-free): a clone copied it for every request, and a stream
        // held the copy for as long as it was open.
        let request = RequestHeader::from(session.req_header().as_owned_parts());
        let mut ex = Exchange::with_dialect(route.name.clone(), request, body, provider.dialect());
        ex.started = arrived.0;
        let span = record::start_span(self.policies.tracer(), &ex, route, arrived.1);
        let verdict = match ex.facts.duplicate_field {
            // Which copy counts is up to the parser: Sluice would meter, limit and route on
            // one model while the provider might serve the other.
            Some(field) => Verdict::Reject(Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                format!("the request body names `{field}` more than once"),
            )),
            None => route.chain.on_request(&mut ex).await,
        };
        let result = match verdict {
            Verdict::Continue => {
                let injected = ask_for_stream_usage(&mut ex);
                let trace = span.as_ref().map(|span| span.span_context().clone());
                // Boxed, here and at the other marked places: an awaited future is stored in
                // its caller's state, in effect twice over (rust-lang/rust#62958), so nesting
                // doubled the state at each level: 50 KiB an exchange, resident for as long as
                // a stream was open. Boxed, and with the attempts' state gone before the answer
                // streams, about 10 KiB.
                match Box::pin(self.forward(session, route, &mut ex, trace)).await {
                    Ok(Forwarded::Answer(launched, answered, attempts)) => {
                        if !policy.telemetry.log_bodies {
                            // No attempt will send the body again, and nothing else reads it.
                            ex.release_body();
                        }
                        let deliver = self.deliver(
                            session, route, &mut ex, launched, answered, injected, attempts,
                        );
                        Box::pin(deliver).await
                    }
                    Ok(Forwarded::Failed(rejection)) => {
                        refuse(session, provider, &mut ex, rejection).await
                    }
                    Err(close) => Err(close),
                }
            }
            Verdict::Reject(rejection) => refuse(session, provider, &mut ex, rejection).await,
            Verdict::Respond(local) => respond_local(session, route, &mut ex, *local).await,
        };
        route.chain.on_done(&ex);
        record::finish(policy, route, &ex, span, metrics);
        result
    }

    /// Sends the request upstream — to its targets in turn, with retries and hedges as the
    /// route says — until an answer is chosen for the caller. Nothing goes downstream before
    /// that, so every failure can still be tried elsewhere.
    async fn forward<'r>(
        &'r self,
        session: &mut ServerSession,
        route: &'r Route,
        ex: &mut Exchange,
        trace: Option<SpanContext>,
    ) -> Result<Forwarded<'r>, Close> {
        let metrics = self.policies.metrics();
        let targets = route.targets.for_model(ex.facts.model.as_deref());
        let mut plan = Plan::new(route, targets);
        plan.trace = trace;
        plan.budget_upstream().health.retry_budget.request();
        ex.timings.upstream_start = Some(Instant::now());
        let mut running = FuturesUnordered::new();
        // The last failed answer with a response head: relayed if no attempt does better.
        let mut relay: Option<(Launched, Answered)> = None;
        let mut last_error: Option<Rejection> = None;
        let mut launch_at = Some(Instant::now());
        let mut hedge_at: Option<Instant> = None;
        // The latest attempt's upstream: the access log and span name it when none answers.
        let mut tried: Option<Arc<str>> = None;
        loop {
            if running.is_empty() {
                match launch_at {
                    Some(at) if at <= Instant::now() => {
                        launch_at = None;
                        match self.launch(&mut plan, ex, false) {
                            Ok(Some((attempt, target))) => {
                                tried = Some(target.upstream.name.clone());
                                hedge_at = plan.hedge_at(target);
                                running.push(attempt);
                            }
                            Ok(None) => break,
                            Err(rejection) => {
                                last_error = Some(rejection);
                                break;
                            }
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                gone = session.read_body_or_idle(true) => {
                    ex.outcome = Outcome::CallerGone;
                    ex.attempts = plan.made;
                    ex.upstream = tried;
                    return Err(Close::CallerGone(caller_gone(gone)));
                }
                Some((mut launched, result)) = running.next(), if !running.is_empty() => {
                    match attempts::judge(&plan, &mut launched, result, metrics) {
                        Judged::Deliver(answered) => {
                            // Dropping the others cancels them: their connections close.
                            drop(running);
                            return Ok(Forwarded::Answer(launched, answered, plan.made));
                        }
                        Judged::Failed(failure, result) => {
                            match result {
                                Ok(answered) => relay = Some((launched, answered)),
                                Err(error) => {
                                    last_error = Some(attempt_rejection(&launched, &error));
                                    // A failure without an answer replaces an older answer:
                                    // the caller hears about the latest attempt.
                                    relay = None;
                                }
                            }
                            if running.is_empty() {
                                launch_at = match plan.after_failure(&failure, metrics) {
                                    Next::RetryAfter(wait) => Some(Instant::now() + wait),
                                    Next::GiveUp => None,
                                };
                                if launch_at.is_none() {
                                    break;
                                }
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(launch_at.unwrap_or(far).into()), if running.is_empty() && launch_at.is_some() => {}
                () = tokio::time::sleep_until(hedge_at.unwrap_or(far).into()), if hedge_at.is_some() && running.len() == 1 => {
                    hedge_at = None;
                    if plan.take_retry(metrics) {
                        plan.next_for_hedge();
                        if let Ok(Some((attempt, target))) = self.launch(&mut plan, ex, true) {
                            tried = Some(target.upstream.name.clone());
                            metrics.hedges.with_label_values(&[&route.name, "launched"]).inc();
                            running.push(attempt);
                        }
                    }
                }
            }
        }
        // No attempt succeeded: the last provider answer goes to the caller as it is;
        // otherwise Sluice says what went wrong.
        if let Some((launched, answered)) = relay {
            return Ok(Forwarded::Answer(launched, answered, plan.made));
        }
        ex.attempts = plan.made;
        ex.upstream = tried;
        Ok(Forwarded::Failed(
            last_error.unwrap_or_else(|| plan.unavailable_rejection()),
        ))
    }

    /// Starts the next attempt: a target and key from the plan, the request built for them.
    /// `Ok(None)` when no target can be tried now.
    fn launch<'r>(
        &'r self,
        plan: &mut Plan<'r>,
        ex: &Exchange,
        hedge: bool,
    ) -> Result<Option<(RunningAttempt<'r>, &'r Target)>, Rejection> {
        let Some(mut launched) = plan.take_candidate(ex.facts.model.as_deref()) else {
            return Ok(None);
        };
        launched.hedge = hedge;
        let tracer = self.policies.tracer();
        launched.span =
            record::attempt_span(tracer, plan.trace.as_ref(), ex, plan.made + 1, &launched);
        let (request, body) = attempts::build_request(plan.route, ex, &launched, tracer)?;
        #[cfg(debug_assertions)]
        crate::telemetry::panics::canary(&ex.request, &request);
        let upstream = &launched.target.upstream;
        if plan.made > 0 {
            let kind = if hedge { "hedge" } else { "retry" };
            self.policies
                .metrics()
                .upstream_retries
                .with_label_values(&[&upstream.name, kind])
                .inc();
        }
        plan.made += 1;
        let timeout = plan
            .route
            .retry
            .attempt_timeout
            .unwrap_or(upstream.first_byte_timeout);
        let (connector, resolver) = (&self.connector, &self.resolver);
        let target = launched.target;
        let attempt: RunningAttempt<'r> = Box::pin(async move {
            let upstream = launched.target.upstream.clone();
            let result =
                attempts::send(connector, resolver, &upstream, request, body, timeout).await;
            (launched, result)
        });
        Ok(Some((attempt, target)))
    }

    /// Streams the chosen attempt's answer to the caller.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        session: &mut ServerSession,
        route: &Route,
        ex: &mut Exchange,
        mut launched: Launched<'_>,
        answered: Answered,
        usage_injected: bool,
        attempts_made: u32,
    ) -> Result<(), Close> {
        let Answered {
            session: mut upstream_session,
            peer,
            head_at,
            reused,
            connect,
        } = answered;
        ex.timings.upstream_head = Some(head_at);
        ex.timings.connection_reused = Some(reused);
        ex.timings.connect = (!reused).then_some(connect);
        let upstream = &launched.target.upstream;
        let metrics = self.policies.metrics();
        if launched.hedge {
            metrics
                .hedges
                .with_label_values(&[&route.name, "won"])
                .inc();
        }
        let Some(head) = upstream_session.response_header() else {
            let rejection = Rejection::new(
                StatusCode::BAD_GATEWAY,
                ErrorKind::UpstreamUnavailable,
                "upstream sent no response head",
            );
            // Boxed: see `exchange`.
            return Box::pin(refuse(session, route.provider, ex, rejection)).await;
        };
        let mut response = head.clone();
        if response.status.as_u16() < 500 {
            attempts::succeed_circuits(&mut launched);
        }
        let downstream_h1_1 =
            !session.is_http2() && session.req_header().version == http::Version::HTTP_11;
        headers::sanitize_response(&mut response, downstream_h1_1);
        let _ = response.insert_header("x-sluice-upstream", upstream.name.as_ref());
        if let Some(model) = launched.model.as_deref() {
            if let Ok(value) = http::HeaderValue::from_str(model) {
                let _ = response.insert_header("x-sluice-model", value);
            }
        }
        ex.status = Some(response.status);
        ex.upstream = Some(upstream.name.clone());
        ex.served_model = launched.model.clone();
        ex.attempts = attempts_made;
        route.chain.on_response_head(ex, &mut response);
        let stream = is_event_stream(&response);
        if let Some(timing) = record::server_timing(ex, stream) {
            let _ = response.insert_header("server-timing", timing);
        }
        let head_only = upstream_session.response_done() || ex.request.method == Method::HEAD;
        let written = session.write_response_header(Box::new(response)).await;
        ex.timings.head_sent = Some(Instant::now());
        if let Err(e) = written {
            ex.outcome = Outcome::CallerGone;
            return Err(Close::CallerGone(e));
        }
        if head_only {
            ex.outcome = Outcome::Completed;
            if upstream_session.response_done() {
                self.connector.release(upstream_session, &peer);
            }
            return Ok(());
        }
        upstream_session.set_read_timeout(Some(upstream.idle_timeout));
        // Always metered: the limits settle on it, and telemetry reports tokens and cost for
        // every route, limited or not.
        let mut meter = UsageMeter::for_response(
            ex.dialect,
            upstream_session.response_header(),
            usage_injected,
        );
        if launched.span.is_some() {
            meter = meter.reading_model();
        }
        // Boxed: see `exchange`.
        let end = Box::pin(self.stream_body(
            session,
            route,
            ex,
            &mut upstream_session,
            &mut meter,
            stream,
        ))
        .await;
        meter.finish();
        ex.usage = meter.usage();
        ex.response_model = meter.take_response_model();
        match end? {
            // Already finished downstream; the upstream session is dropped, not pooled.
            StreamEnd::Cut => return Ok(()),
            StreamEnd::Broke(error) => {
                attempts::broke_midway(&launched, metrics);
                return Err(Close::UpstreamBroke(error));
            }
            StreamEnd::Complete => {}
        }
        if let Err(e) = session.write_response_body(Bytes::new(), true).await {
            ex.outcome = Outcome::CallerGone;
            return Err(Close::CallerGone(e));
        }
        ex.outcome = Outcome::Completed;
        if upstream_session.response_done() {
            self.connector.release(upstream_session, &peer);
        }
        Ok(())
    }

    /// Copies the response body downstream chunk by chunk as it arrives, while watching the
    /// caller: a caller that leaves ends the upstream call too (the session is dropped, not
    /// pooled).
    async fn stream_body(
        &self,
        session: &mut ServerSession,
        route: &Route,
        ex: &mut Exchange,
        upstream_session: &mut UpstreamSession,
        meter: &mut UsageMeter,
        event_stream: bool,
    ) -> Result<StreamEnd, Close> {
        // The response text for the access log, when the policy logs bodies.
        let mut logged = self
            .policies
            .current()
            .telemetry
            .log_bodies
            .then(BytesMut::new);
        let end = self
            .copy_body(
                session,
                route,
                ex,
                upstream_session,
                meter,
                event_stream,
                &mut logged,
            )
            .await;
        if let Some(logged) = logged {
            ex.extensions
                .insert(record::LoggedResponse(logged.freeze()));
        }
        end
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_body(
        &self,
        session: &mut ServerSession,
        route: &Route,
        ex: &mut Exchange,
        upstream_session: &mut UpstreamSession,
        meter: &mut UsageMeter,
        event_stream: bool,
        logged: &mut Option<BytesMut>,
    ) -> Result<StreamEnd, Close> {
        // Only whole events go downstream, so an error event Sluice adds after a break (or a
        // cut) starts on an event boundary rather than inside half an event.
        let content_type = upstream_session
            .response_header()
            .and_then(|head| head.headers.get(header::CONTENT_TYPE))
            .map_or(&b""[..], |v| v.as_bytes());
        let mut framer = Framing::of(content_type)
            .filter(|_| event_stream)
            .map(EventFramer::new);
        loop {
            let chunk = tokio::select! {
                biased;
                chunk = upstream_session.read_response_body() => chunk,
                gone = session.read_body_or_idle(true) => {
                    ex.outcome = Outcome::CallerGone;
                    return Err(Close::CallerGone(caller_gone(gone)));
                }
            };
            match chunk {
                Ok(Some(mut chunk)) => {
                    // Framed first, so the meter and the chunk filters see whole events: a
                    // field to strip or a usage object is never split across two chunks.
                    if let Some(framer) = framer.as_mut() {
                        chunk = framer.push(chunk);
                    }
                    let chunk = meter.feed(chunk);
                    if let Some(cut) =
                        forward_chunk(session, route, ex, event_stream, logged, chunk).await?
                    {
                        return Ok(cut);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // The head is gone. A stream's caller gets the provider's error event,
                    // which its SDK raises; and every caller an unfinished body, never one
                    // that looks complete.
                    ex.outcome = Outcome::UpstreamBroke;
                    // The incomplete event held back is dropped: the caller must not parse
                    // half of it.
                    let partial = framer.as_ref().is_some_and(EventFramer::holds_partial);
                    tracing::info!(route = %ex.route, partial, "upstream broke mid-response: {e}");
                    if event_stream {
                        let event = route.provider.stream_error_event(
                            ErrorKind::UpstreamUnavailable,
                            "the upstream connection broke mid-stream; the response is incomplete",
                        );
                        if let Err(e) = session.write_response_body(event, false).await {
                            return Err(Close::CallerGone(e));
                        }
                    }
                    return Ok(StreamEnd::Broke(e));
                }
            }
            if upstream_session.response_done() {
                break;
            }
        }
        // What the upstream sent after its last event boundary: its final event without the
        // blank line, or half an event. Metered before the judgement below, which drops it
        // when no closing event went by — or when it is half a Bedrock frame, which no
        // stream can end with (an SDK would stop reading there, silently).
        let half_frame = framer
            .as_ref()
            .is_some_and(|f| f.framing() == Framing::EventStream && f.holds_partial());
        let rest = framer
            .as_mut()
            .map(EventFramer::finish)
            .map(|rest| meter.feed(rest));
        if event_stream && (half_frame || expects_closing_event(ex) && !meter.saw_stream_end()) {
            // A clean end of a stream that never said it was done looks complete to an SDK:
            // the caller gets an explicit error event and an unfinished body instead. A held
            // incomplete event is dropped, as after a break.
            ex.outcome = Outcome::UpstreamBroke;
            tracing::info!(route = %ex.route, "upstream ended a stream without its final event");
            let event = route.provider.stream_error_event(
                ErrorKind::UpstreamUnavailable,
                "the upstream ended the stream without its final event; the response is incomplete",
            );
            if let Err(e) = session.write_response_body(event, false).await {
                return Err(Close::CallerGone(e));
            }
            let error = Error::explain(
                ErrorType::ConnectionClosed,
                "upstream stream ended without its final event",
            );
            return Ok(StreamEnd::Broke(error));
        }
        // The upstream finished: the bytes after its last boundary are its own.
        if let Some(rest) = rest {
            if let Some(cut) = forward_chunk(session, route, ex, event_stream, logged, rest).await?
            {
                return Ok(cut);
            }
        }
        Ok(StreamEnd::Complete)
    }
}

/// One metered piece of the upstream's body on its way down: the chunk filters (which may cut
/// the stream: `Some(StreamEnd::Cut)`), the content timings, then the caller.
async fn forward_chunk(
    session: &mut ServerSession,
    route: &Route,
    ex: &mut Exchange,
    event_stream: bool,
    logged: &mut Option<BytesMut>,
    chunk: Bytes,
) -> Result<Option<StreamEnd>, Close> {
    if chunk.is_empty() {
        return Ok(None);
    }
    if let ChunkVerdict::Cut(rejection) = route.chain.on_response_chunk(ex, &chunk) {
        // A provider-shaped error as the stream's last event; the upstream connection is
        // dropped, which stops the generation.
        let event = route
            .provider
            .stream_error_event(rejection.kind, &rejection.message);
        ex.outcome = Outcome::Cut;
        tracing::info!(route = %ex.route, "stream cut: {}", rejection.message);
        return match session.write_response_body(event, true).await {
            Ok(()) => Ok(Some(StreamEnd::Cut)),
            Err(e) => Err(Close::CallerGone(e)),
        };
    }
    if event_stream && carries_content(&chunk) {
        let now = Instant::now();
        let timings = &mut ex.timings;
        if let Some(last) = timings.last_content {
            let gap = now.saturating_duration_since(last);
            route.metrics.inter_token_gap.observe(gap.as_secs_f64());
        }
        timings.first_content.get_or_insert(now);
        timings.last_content = Some(now);
        timings.content_events += 1;
    }
    send_body(session, ex, logged, chunk).await?;
    Ok(None)
}

/// Sends response body bytes downstream, counted and (when the policy logs bodies) kept.
async fn send_body(
    session: &mut ServerSession,
    ex: &mut Exchange,
    logged: &mut Option<BytesMut>,
    chunk: Bytes,
) -> Result<(), Close> {
    if chunk.is_empty() {
        return Ok(());
    }
    ex.response_bytes += chunk.len() as u64;
    if let Some(logged) = logged.as_mut() {
        let room = record::LOGGED_BODY_LIMIT.saturating_sub(logged.len());
        logged.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    if let Err(e) = session.write_response_body(chunk, false).await {
        ex.outcome = Outcome::CallerGone;
        return Err(Close::CallerGone(e));
    }
    Ok(())
}

/// How a response body ended.
enum StreamEnd {
    /// The upstream finished it.
    Complete,
    /// A filter ended it early; the response is already finished downstream.
    Cut,
    /// The upstream broke midway; the caller's body must stay unfinished.
    Broke(Box<Error>),
}

type RunningAttempt<'r> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Launched<'r>, attempts::AttemptResult)> + Send + 'r>,
>;

/// What Sluice says when an attempt failed before any response head.
fn attempt_rejection(launched: &Launched, error: &AttemptError) -> Rejection {
    let upstream = &launched.target.upstream.name;
    match error {
        AttemptError::Timeout(limit) => Rejection::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::UpstreamTimeout,
            format!("upstream `{upstream}` sent no response within {limit:?}"),
        ),
        AttemptError::Connect(why) => Rejection::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamUnavailable,
            format!("cannot connect to upstream `{upstream}`: {why}"),
        ),
        AttemptError::Broken(why) => Rejection::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamUnavailable,
            format!("upstream `{upstream}` failed: {why}"),
        ),
    }
}

fn caller_gone(result: pingora::Result<Option<Bytes>>) -> Box<Error> {
    match result {
        Err(e) => e,
        Ok(_) => Error::explain(
            ErrorType::ConnectionClosed,
            "caller sent data after its request",
        ),
    }
}

/// Makes an OpenAI stream report its usage when the caller did not ask, so limits settle and
/// telemetry counts tokens on every stream; the added usage chunk is stripped before the caller
/// sees it. Returns whether the body was changed.
fn ask_for_stream_usage(ex: &mut Exchange) -> bool {
    if !(ex.facts.stream && ex.dialect == Dialect::OpenAi) {
        return false;
    }
    match inject_include_usage(ex.body()) {
        Some(body) => {
            ex.set_body(body);
            true
        }
        None => false,
    }
}

enum BodyError {
    Refused(Rejection),
    CallerGone(Box<Error>),
}

/// Reads the whole request body, refusing (413) as soon as it is known to exceed the route's
/// limit — from `Content-Length` before reading anything, or while reading a chunked body.
/// Whether a streamed answer to this request ends with a closing event (the chat, completion,
/// messages and responses APIs), so one that ends without it was cut short.
fn expects_closing_event(ex: &Exchange) -> bool {
    matches!(
        record::operation(ex.request.uri.path()),
        Some("chat" | "text_completion")
    )
}

/// The size of a request's header fields as received: names, values and each line's `: `
/// and CRLF.
fn header_bytes(request: &RequestHeader) -> u64 {
    let fields: usize = request
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    fields as u64
}

/// A body read that failed on the caller's bytes rather than the connection.
fn malformed_body(error: &Error) -> bool {
    // Pingora's chunk errors are custom types in a private module: known by their names.
    matches!(
        error.etype.as_str(),
        "InvalidChunk" | "InvalidTrailerEnd" | "InvalidHTTPHeader"
    )
}

async fn read_body(
    session: &mut ServerSession,
    route: &Route,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    let too_large = || {
        BodyError::Refused(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTooLarge,
            format!(
                "request body exceeds this route's limit of {} bytes",
                route.max_body
            ),
        ))
    };
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > route.max_body) {
        return Err(too_large());
    }
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    loop {
        let read = tokio::time::timeout(timeout, session.read_request_body()).await;
        let chunk = match read {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(e)) if malformed_body(&e) => {
                // The framing is broken, so where this request ends (and a next one would
                // begin) is unknowable: answer, and never read another request here.
                session.set_keepalive(None);
                return Err(BodyError::Refused(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::InvalidRequest,
                    "the request body's chunked framing is malformed",
                )));
            }
            Ok(Err(e)) => return Err(BodyError::CallerGone(e)),
            Err(_) => {
                return Err(BodyError::Refused(Rejection::new(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorKind::InvalidRequest,
                    format!("the request body did not arrive within {timeout:?}"),
                )))
            }
        };
        let so_far = first.as_ref().map_or(0, Bytes::len) + rest.as_ref().map_or(0, BytesMut::len);
        if (so_far + chunk.len()) as u64 > route.max_body {
            return Err(too_large());
        }
        // One chunk (the common case) is kept as it came, without a copy.
        match (&first, &mut rest) {
            (None, _) => first = Some(chunk),
            (Some(head), None) => {
                let capacity = declared.map_or(head.len() + chunk.len(), |len| len as usize);
                let mut buffer = BytesMut::with_capacity(capacity);
                buffer.extend_from_slice(head);
                buffer.extend_from_slice(&chunk);
                rest = Some(buffer);
            }
            (Some(_), Some(buffer)) => buffer.extend_from_slice(&chunk),
        }
    }
    Ok(match rest {
        Some(buffer) => buffer.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// Whether the request carried both `Content-Length` and `Transfer-Encoding`. Pingora drops
/// `Content-Length` in that case (RFC 9112 §6.3) and goes on; the raw head still shows it.
fn has_conflicting_framing(session: &ServerSession) -> bool {
    let request = session.req_header();
    if !request.headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    if request.headers.contains_key(header::CONTENT_LENGTH) {
        return true;
    }
    session
        .as_http1()
        .is_some_and(|h1| raw_head_has_content_length(&h1.get_headers_raw_bytes()))
}

fn raw_head_has_content_length(raw: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length:";
    raw.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
}

/// The request's host, without a port: the `Host` header, or the authority of an absolute URI.
pub(crate) fn request_host(request: &RequestHeader) -> Option<&str> {
    let raw = match request.headers.get(header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => request.uri.host()?,
    };
    Some(match raw.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => raw,
    })
}

/// Answers with an error of Sluice's own in the provider's shape, logged and counted as the
/// exchange's own early refusals are (the forward listener's checks, before the exchange).
pub(crate) async fn reject(
    session: &mut ServerSession,
    provider: ProviderKind,
    rejection: Rejection,
    metrics: &Metrics,
) -> pingora::Result<()> {
    let started = Instant::now();
    log_early_rejection(session, "-", &rejection, metrics);
    respond_rejection(session, provider, rejection, started)
        .await
        .map_err(Close::into_pingora)
}

async fn refuse(
    session: &mut ServerSession,
    provider: ProviderKind,
    ex: &mut Exchange,
    rejection: Rejection,
) -> Result<(), Close> {
    ex.status = Some(rejection.status);
    ex.outcome = Outcome::Refused;
    let timings = &mut ex.timings;
    if timings.upstream_start.is_some() && timings.upstream_end().is_none() {
        // Every attempt failed: the time until now was spent on the upstream, not in Sluice.
        timings.upstream_failed = Some(Instant::now());
    }
    tracing::debug!(route = %ex.route, status = rejection.status.as_u16(), "{}", rejection.message);
    let timing = record::server_timing(ex, false);
    let result = write_rejection(session, provider, rejection, timing).await;
    ex.timings.head_sent = Some(Instant::now());
    result
}

/// Answers with an error of Sluice's own in the provider's shape, before any exchange began.
/// The connection is closed afterwards if the request body was not read to its end.
async fn respond_rejection(
    session: &mut ServerSession,
    provider: ProviderKind,
    rejection: Rejection,
    started: Instant,
) -> Result<(), Close> {
    write_rejection(session, provider, rejection, record::own_timing(started)).await
}

/// Writes a rejection in the provider's shape with its `server-timing`.
async fn write_rejection(
    session: &mut ServerSession,
    provider: ProviderKind,
    rejection: Rejection,
    timing: Option<HeaderValue>,
) -> Result<(), Close> {
    let body = provider.error_body(rejection.kind, &rejection.message);
    let mut headers = rejection.headers;
    headers.extend(provider.error_header(rejection.kind));
    if let Some(timing) = timing {
        headers.push((http::HeaderName::from_static("server-timing"), timing));
    }
    write_simple(session, rejection.status, &headers, body).await
}

/// Answers with a response a filter made (a cache hit).
async fn respond_local(
    session: &mut ServerSession,
    route: &Route,
    ex: &mut Exchange,
    local: LocalResponse,
) -> Result<(), Close> {
    let mut response = ResponseHeader::build_no_case(local.status, Some(local.headers.len() + 3))
        .map_err(Close::CallerGone)?;
    for (name, value) in local.headers {
        let _ = response.append_header(name, value);
    }
    let _ = response.insert_header(header::CONTENT_LENGTH, local.body.len());
    ex.status = Some(local.status);
    route.chain.on_response_head(ex, &mut response);
    if let Some(timing) = record::server_timing(ex, is_event_stream(&response)) {
        let _ = response.insert_header("server-timing", timing);
    }
    let head_only = local.body.is_empty();
    let written = session.write_response_header(Box::new(response)).await;
    ex.timings.head_sent = Some(Instant::now());
    let written = match (written, head_only) {
        (Ok(()), false) => session.write_response_body(local.body, true).await,
        (other, _) => other,
    };
    match written {
        Ok(()) => {
            ex.outcome = Outcome::Completed;
            Ok(())
        }
        Err(e) => {
            ex.outcome = Outcome::CallerGone;
            Err(Close::CallerGone(e))
        }
    }
}

/// Whether a response is a stream of events (SSE, or Bedrock's event stream).
fn is_event_stream(response: &ResponseHeader) -> bool {
    response
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| Framing::of(v.as_bytes()).is_some())
}

async fn write_simple(
    session: &mut ServerSession,
    status: StatusCode,
    headers: &[(http::HeaderName, http::HeaderValue)],
    body: Bytes,
) -> Result<(), Close> {
    let mut response = ResponseHeader::build_no_case(status, Some(3 + headers.len()))
        .map_err(Close::CallerGone)?;
    for (name, value) in headers {
        let _ = response.insert_header(name.clone(), value.clone());
    }
    let _ = response.insert_header(header::CONTENT_TYPE, "application/json");
    let _ = response.insert_header(header::CONTENT_LENGTH, body.len());
    if !session.is_body_done() {
        // The rest of the request body will not be read, so the connection cannot carry
        // another request.
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(response))
        .await
        .map_err(Close::CallerGone)?;
    session
        .write_response_body(body, true)
        .await
        .map_err(Close::CallerGone)
}

/// The access line (and request count) for a request refused before its exchange began (no
/// route, bad framing, body too large or too slow).
fn log_early_rejection(
    session: &ServerSession,
    route: &str,
    rejection: &Rejection,
    metrics: &Metrics,
) {
    record::count_early_rejection(metrics, route, rejection.status);
    let request = session.req_header();
    tracing::info!(
        target: "sluice::access",
        route,
        method = %request.method,
        path = request.uri.path(),
        status = rejection.status.as_u16(),
        outcome = "Refused",
        reason = %rejection.message,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_found_in_a_raw_head() {
        assert!(raw_head_has_content_length(
            b"POST / HTTP/1.1\r\nHost: x\r\nCONTENT-LENGTH: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!raw_head_has_content_length(
            b"POST /content-length: HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Content-Length: 4\r\n\r\n"
        ));
    }

    #[test]
    fn host_is_read_without_port() {
        let mut req = RequestHeader::build("GET", b"/v1/models", None).unwrap();
        req.insert_header("host", "api.openai.com:443").unwrap();
        assert_eq!(request_host(&req), Some("api.openai.com"));
        let mut absolute = RequestHeader::build("GET", b"/x", None).unwrap();
        absolute.set_uri(http::Uri::from_static("http://example.com:80/x"));
        assert_eq!(request_host(&absolute), Some("example.com"));
        let none = RequestHeader::build("GET", b"/x", None).unwrap();
        assert_eq!(request_host(&none), None);
    }
}
