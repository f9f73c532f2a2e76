//! The exchange: one request through a route's filters to its upstream and back.
//!
//! Sluice drives the upstream exchange itself from Pingora's `request_filter` (see DESIGN.md):
//! the whole body is read first so it can be inspected and replayed, the upstream is called over
//! Pingora's pooled connector, and the response is streamed downstream chunk by chunk.

mod headers;
mod inflight;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, Method, StatusCode};
use pingora::connectors::http::Connector;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::ALPN;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType};
use sluice_filters::{
    ErrorKind, Exchange, LocalResponse, Outcome, Rejection, RequestHeader, ResponseHeader, Verdict,
};

use sluice_filters::usage::{inject_include_usage, Dialect, UsageMeter};
use sluice_filters::ChunkVerdict;

use crate::policy::{Policy, PolicyStore, Route};
use crate::upstream::{ProviderKind, Resolver, Upstream};
pub use inflight::Inflight;

/// How long an idle upstream connection stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(60);

pub struct SluiceProxy {
    policies: Arc<PolicyStore>,
    connector: Connector,
    resolver: Resolver,
    inflight: Arc<Inflight>,
}

impl SluiceProxy {
    pub fn new(policies: Arc<PolicyStore>, inflight: Arc<Inflight>, pool_size: usize) -> Self {
        let mut options = pingora::connectors::ConnectorOptions::new(pool_size);
        options.keepalive_pool_size = pool_size;
        Self {
            policies,
            connector: Connector::new(Some(options)),
            resolver: Resolver::default(),
            inflight,
        }
    }
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
impl ProxyHttp for SluiceProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        let _counted = self.inflight.enter();
        let policy = self.policies.current();
        self.exchange(session, &policy)
            .await
            .map(|()| true)
            .map_err(Close::into_pingora)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        // Every request is answered in `request_filter`; Pingora's own upstream path is unused.
        Error::e_explain(ErrorType::InternalError, "sluice answers in request_filter")
    }

    async fn fail_to_proxy(&self, session: &mut Session, _e: &Error, _ctx: &mut ()) -> FailToProxy {
        // Sluice has already answered (or the caller is gone) when its own exchange fails; only
        // a failure inside Pingora before the exchange began leaves the caller without an answer.
        if session.response_written().is_none() {
            let body = ProviderKind::Openai.error_body(ErrorKind::Internal, "internal error");
            let _ = write_simple(session, StatusCode::INTERNAL_SERVER_ERROR, &[], body).await;
        }
        FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _: &Session, _: &(), _: &Error) -> bool {
        // The exchange logs its own outcome, with the route and request id.
        true
    }
}

impl SluiceProxy {
    async fn exchange(&self, session: &mut Session, policy: &Policy) -> Result<(), Close> {
        let request = session.req_header();
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = request_host(request);
        let Some(route) = policy.route_for(host, path) else {
            // The path only: a query string may carry something the caller would not want echoed.
            let message = format!("no route for {}", request.uri.path());
            let rejection = Rejection::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message);
            log_early_rejection(session, "-", &rejection);
            return respond_rejection(session, ProviderKind::Openai, rejection).await;
        };
        let provider = route.upstream.provider;
        if has_conflicting_framing(session) {
            // Ambiguous framing is how request smuggling starts (pingora#945).
            let rejection = Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                "a request may not carry both Content-Length and Transfer-Encoding",
            );
            log_early_rejection(session, &route.name, &rejection);
            return respond_rejection(session, provider, rejection).await;
        }
        let body = match read_body(session, route, policy.server.client_body_timeout).await {
            Ok(body) => body,
            Err(BodyError::Refused(rejection)) => {
                log_early_rejection(session, &route.name, &rejection);
                return respond_rejection(session, provider, rejection).await;
            }
            Err(BodyError::CallerGone(e)) => return Err(Close::CallerGone(e)),
        };

        let mut ex = Exchange::new(route.name.clone(), session.req_header().clone(), body);
        ex.dialect = provider.dialect();
        let result = match route.chain.on_request(&mut ex).await {
            Verdict::Continue => {
                let injected = ask_for_stream_usage(route, &mut ex);
                self.forward(session, route, &mut ex, injected).await
            }
            Verdict::Reject(rejection) => {
                ex.status = Some(rejection.status);
                ex.outcome = Outcome::Refused;
                respond_rejection(session, provider, rejection).await
            }
            Verdict::Respond(local) => respond_local(session, route, &mut ex, *local).await,
        };
        route.chain.on_done(&ex);
        log_exchange(&ex);
        result
    }

    /// Sends the request upstream and streams the answer back. `usage_injected`: Sluice added
    /// `stream_options.include_usage`, so the usage chunk is the caller's to not see.
    async fn forward(
        &self,
        session: &mut Session,
        route: &Route,
        ex: &mut Exchange,
        usage_injected: bool,
    ) -> Result<(), Close> {
        let upstream = &route.upstream;
        let upstream_request = match build_upstream_request(route, ex) {
            Ok(request) => request,
            Err(rejection) => return refuse(session, upstream.provider, ex, rejection).await,
        };

        let (mut upstream_session, peer) = match self
            .send_request(session, upstream, upstream_request, &ex.body)
            .await
        {
            Ok(sent) => sent,
            Err(Attempt::Refused(rejection)) => {
                return refuse(session, upstream.provider, ex, rejection).await
            }
            Err(Attempt::CallerGone(e)) => {
                ex.outcome = Outcome::CallerGone;
                return Err(Close::CallerGone(e));
            }
        };

        let mut response = match upstream_session.response_header() {
            Some(head) => head.clone(),
            None => {
                let rejection = Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorKind::UpstreamUnavailable,
                    "upstream sent no response head",
                );
                return refuse(session, upstream.provider, ex, rejection).await;
            }
        };
        let downstream_h1_1 =
            !session.is_http2() && session.req_header().version == http::Version::HTTP_11;
        headers::sanitize_response(&mut response, downstream_h1_1);
        ex.status = Some(response.status);
        ex.upstream = Some(upstream.name.clone());
        route.chain.on_response_head(ex, &mut response);
        let head_only = upstream_session.response_done() || ex.request.method == Method::HEAD;
        if let Err(e) = session
            .write_response_header(Box::new(response), head_only)
            .await
        {
            ex.outcome = Outcome::CallerGone;
            return Err(Close::CallerGone(e));
        }
        if head_only {
            ex.outcome = Outcome::Completed;
            if upstream_session.response_done() {
                self.release(upstream_session, &peer).await;
            }
            return Ok(());
        }
        upstream_session.set_read_timeout(Some(upstream.idle_timeout));
        let mut meter = route.chain.needs_usage().then(|| {
            let head = upstream_session.response_header();
            let header = |name| head.and_then(|h| h.headers.get(name));
            let stream = header(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            // Cutting an event out of a body of declared length would break its framing.
            let strip = usage_injected && header(header::CONTENT_LENGTH).is_none();
            UsageMeter::new(ex.dialect, stream, strip)
        });
        let end = self
            .stream_body(session, route, ex, &mut upstream_session, meter.as_mut())
            .await?;
        if let Some(meter) = meter.as_mut() {
            meter.finish();
            ex.usage = meter.usage();
        }
        if let StreamEnd::Cut = end {
            // Already finished downstream; the upstream session is dropped, not pooled.
            return Ok(());
        }
        if let Err(e) = session.write_response_body(None, true).await {
            ex.outcome = Outcome::CallerGone;
            return Err(Close::CallerGone(e));
        }
        ex.outcome = Outcome::Completed;
        if upstream_session.response_done() {
            self.release(upstream_session, &peer).await;
        }
        Ok(())
    }

    /// Copies the response body downstream chunk by chunk as it arrives, while watching the
    /// caller: a caller that leaves ends the upstream call too (the session is dropped, not
    /// pooled).
    async fn stream_body(
        &self,
        session: &mut Session,
        route: &Route,
        ex: &mut Exchange,
        upstream_session: &mut HttpSession,
        mut meter: Option<&mut UsageMeter>,
    ) -> Result<StreamEnd, Close> {
        loop {
            let chunk = tokio::select! {
                biased;
                chunk = upstream_session.read_response_body() => chunk,
                gone = session.as_downstream_mut().read_body_or_idle(true) => {
                    ex.outcome = Outcome::CallerGone;
                    return Err(Close::CallerGone(caller_gone(gone)));
                }
            };
            match chunk {
                Ok(Some(mut chunk)) => {
                    if let Some(meter) = meter.as_deref_mut() {
                        chunk = meter.feed(chunk);
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                    if let ChunkVerdict::Cut(rejection) = route.chain.on_response_chunk(ex, &chunk)
                    {
                        // A provider-shaped error as the stream's last event; the upstream
                        // connection is dropped, which stops the generation.
                        let provider = route.upstream.provider;
                        let event = provider.stream_error_event(rejection.kind, &rejection.message);
                        ex.outcome = Outcome::Cut;
                        tracing::info!(route = %ex.route, "stream cut: {}", rejection.message);
                        return match session.write_response_body(Some(event), true).await {
                            Ok(()) => Ok(StreamEnd::Cut),
                            Err(e) => Err(Close::CallerGone(e)),
                        };
                    }
                    ex.response_bytes += chunk.len() as u64;
                    if let Err(e) = session.write_response_body(Some(chunk), false).await {
                        ex.outcome = Outcome::CallerGone;
                        return Err(Close::CallerGone(e));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // The head is gone; the only honest signal left is an unfinished body.
                    ex.outcome = Outcome::UpstreamBroke;
                    return Err(Close::UpstreamBroke(e));
                }
            }
            if upstream_session.response_done() {
                break;
            }
        }
        Ok(StreamEnd::Complete)
    }

    async fn release(&self, upstream_session: HttpSession, peer: &HttpPeer) {
        self.connector
            .release_http_session(upstream_session, peer, Some(POOL_IDLE))
            .await;
    }

    /// Connects (or reuses a pooled connection), sends the request and waits for the response
    /// head, watching the caller all along: a caller that leaves cancels the upstream call.
    async fn send_request(
        &self,
        session: &mut Session,
        upstream: &Upstream,
        request: RequestHeader,
        body: &Bytes,
    ) -> Result<(HttpSession, HttpPeer), Attempt> {
        let addr = self
            .resolver
            .resolve(&upstream.host, upstream.port)
            .await
            .map_err(|e| {
                Attempt::Refused(Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorKind::UpstreamUnavailable,
                    format!("upstream `{}`: {e}", upstream.name),
                ))
            })?;
        let mut peer = HttpPeer::new(addr, upstream.tls, upstream.host.clone());
        peer.options.connection_timeout = Some(upstream.connect_timeout);
        peer.options.total_connection_timeout = Some(upstream.connect_timeout);
        peer.options.idle_timeout = Some(POOL_IDLE);
        peer.options.write_timeout = Some(upstream.idle_timeout);
        if upstream.tls {
            peer.options.alpn = ALPN::H2H1;
            peer.options.ca = upstream.ca.clone();
        }

        // A pooled connection may have been closed by the upstream just before reuse; that
        // failure says nothing about the upstream, so it gets one fresh connection.
        let mut fresh_retry = true;
        let mut request = Some(request);
        loop {
            let connected = tokio::select! {
                connected = self.connector.get_http_session(&peer) => connected,
                gone = session.as_downstream_mut().read_body_or_idle(true) => return Err(Attempt::CallerGone(caller_gone(gone))),
            };
            let (mut upstream_session, reused) = connected.map_err(|e| {
                Attempt::Refused(Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorKind::UpstreamUnavailable,
                    format!(
                        "cannot connect to upstream `{}`: {}",
                        upstream.name,
                        e.etype().as_str()
                    ),
                ))
            })?;
            let started = Instant::now();
            let sent = tokio::select! {
                // Keep a copy only when a retry is possible.
                sent = write_request(
                    &mut upstream_session,
                    if reused && fresh_retry { request.clone() } else { request.take() },
                    body,
                ) => sent,
                gone = session.as_downstream_mut().read_body_or_idle(true) => return Err(Attempt::CallerGone(caller_gone(gone))),
            };
            let head = match sent {
                Ok(()) => {
                    let remaining = upstream
                        .first_byte_timeout
                        .saturating_sub(started.elapsed());
                    tokio::select! {
                        head = tokio::time::timeout(remaining, upstream_session.read_response_header()) => head,
                        gone = session.as_downstream_mut().read_body_or_idle(true) => return Err(Attempt::CallerGone(caller_gone(gone))),
                    }
                }
                Err(e) => Ok(Err(e)),
            };
            match head {
                Ok(Ok(())) => return Ok((upstream_session, peer)),
                Ok(Err(_)) if reused && fresh_retry => {
                    fresh_retry = false;
                    continue;
                }
                Ok(Err(e)) => {
                    return Err(Attempt::Refused(Rejection::new(
                        StatusCode::BAD_GATEWAY,
                        ErrorKind::UpstreamUnavailable,
                        format!(
                            "upstream `{}` failed: {}",
                            upstream.name,
                            e.etype().as_str()
                        ),
                    )))
                }
                Err(_elapsed) => {
                    return Err(Attempt::Refused(Rejection::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        ErrorKind::UpstreamTimeout,
                        format!(
                            "upstream `{}` sent no response within {:?}",
                            upstream.name, upstream.first_byte_timeout
                        ),
                    )))
                }
            }
        }
    }
}

/// How a response body ended when it did not fail.
enum StreamEnd {
    /// The upstream finished it.
    Complete,
    /// A filter ended it early; the response is already finished downstream.
    Cut,
}

enum Attempt {
    Refused(Rejection),
    CallerGone(Box<Error>),
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

async fn write_request(
    upstream: &mut HttpSession,
    request: Option<RequestHeader>,
    body: &Bytes,
) -> pingora::Result<()> {
    let request = request
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "request head already sent"))?;
    upstream.write_request_header(Box::new(request)).await?;
    if !body.is_empty() {
        upstream.write_request_body(body.clone(), true).await?;
    }
    upstream.finish_request_body().await
}

/// Makes an OpenAI stream report its usage when a filter needs it and the caller did not ask;
/// returns whether the body was changed.
fn ask_for_stream_usage(route: &Route, ex: &mut Exchange) -> bool {
    if !(route.chain.needs_usage() && ex.facts.stream && ex.dialect == Dialect::OpenAi) {
        return false;
    }
    match inject_include_usage(&ex.body) {
        Some(body) => {
            ex.body = body;
            true
        }
        None => false,
    }
}

/// The request head for the upstream: path rewritten, headers cleaned, filters applied,
/// credentials set.
fn build_upstream_request(route: &Route, ex: &Exchange) -> Result<RequestHeader, Rejection> {
    let upstream = &route.upstream;
    let incoming = &ex.request;
    let path_and_query = incoming.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = upstream
        .provider
        .upstream_path(
            route.upstream_path(path_and_query),
            ex.facts.model.as_deref(),
            &upstream.azure,
        )
        .map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                e.to_string(),
            )
        })?;
    let mut request = RequestHeader::build(
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
    let credential = upstream.next_credential();
    headers::copy_request_headers(incoming, &mut request, credential.is_some());
    let _ = request.insert_header(header::HOST, upstream.authority.clone());
    let carries_body = !ex.body.is_empty()
        || matches!(incoming.method, Method::POST | Method::PUT | Method::PATCH);
    if carries_body {
        let _ = request.insert_header(header::CONTENT_LENGTH, ex.body.len());
    }
    // Filters first, Sluice's own credentials last: no filter can remove or replace them.
    route.chain.on_upstream_request(ex, &mut request);
    if let Some(credential) = credential {
        let _ = request.insert_header(upstream.provider.credential_header(), credential.clone());
    }
    for (name, value) in &upstream.extra_headers {
        let _ = request.insert_header(name.clone(), value.clone());
    }
    Ok(request)
}

enum BodyError {
    Refused(Rejection),
    CallerGone(Box<Error>),
}

/// Reads the whole request body, refusing (413) as soon as it is known to exceed the route's
/// limit — from `Content-Length` before reading anything, or while reading a chunked body.
async fn read_body(
    session: &mut Session,
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
fn has_conflicting_framing(session: &Session) -> bool {
    let request = session.req_header();
    if !request.headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    if request.headers.contains_key(header::CONTENT_LENGTH) {
        return true;
    }
    session
        .as_downstream()
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
fn request_host(request: &RequestHeader) -> Option<&str> {
    let raw = match request.headers.get(header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => request.uri.host()?,
    };
    Some(match raw.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => raw,
    })
}

async fn refuse(
    session: &mut Session,
    provider: ProviderKind,
    ex: &mut Exchange,
    rejection: Rejection,
) -> Result<(), Close> {
    ex.status = Some(rejection.status);
    ex.outcome = Outcome::Refused;
    tracing::debug!(route = %ex.route, status = rejection.status.as_u16(), "{}", rejection.message);
    respond_rejection(session, provider, rejection).await
}

/// Answers with an error of Sluice's own in the provider's shape. The connection is closed
/// afterwards if the request body was not read to its end.
async fn respond_rejection(
    session: &mut Session,
    provider: ProviderKind,
    rejection: Rejection,
) -> Result<(), Close> {
    let body = provider.error_body(rejection.kind, &rejection.message);
    write_simple(session, rejection.status, &rejection.headers, body).await
}

async fn respond_local(
    session: &mut Session,
    route: &Route,
    ex: &mut Exchange,
    local: LocalResponse,
) -> Result<(), Close> {
    let mut response = ResponseHeader::build(local.status, Some(local.headers.len() + 2))
        .map_err(Close::CallerGone)?;
    for (name, value) in local.headers {
        let _ = response.append_header(name, value);
    }
    let _ = response.insert_header(header::CONTENT_LENGTH, local.body.len());
    ex.status = Some(local.status);
    route.chain.on_response_head(ex, &mut response);
    let written = async {
        session
            .write_response_header(Box::new(response), local.body.is_empty())
            .await?;
        if !local.body.is_empty() {
            session.write_response_body(Some(local.body), true).await?;
        }
        Ok::<(), Box<Error>>(())
    }
    .await;
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

async fn write_simple(
    session: &mut Session,
    status: StatusCode,
    headers: &[(http::HeaderName, http::HeaderValue)],
    body: Bytes,
) -> Result<(), Close> {
    let mut response =
        ResponseHeader::build(status, Some(3 + headers.len())).map_err(Close::CallerGone)?;
    for (name, value) in headers {
        let _ = response.insert_header(name.clone(), value.clone());
    }
    let _ = response.insert_header(header::CONTENT_TYPE, "application/json");
    let _ = response.insert_header(header::CONTENT_LENGTH, body.len());
    if !session.as_downstream_mut().is_body_done() {
        // The rest of the request body will not be read, so the connection cannot carry
        // another request.
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(response), false)
        .await
        .map_err(Close::CallerGone)?;
    session
        .write_response_body(Some(body), true)
        .await
        .map_err(Close::CallerGone)
}

/// The access line for a request refused before its exchange began (no route, bad framing,
/// body too large or too slow).
fn log_early_rejection(session: &Session, route: &str, rejection: &Rejection) {
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

/// One access log line per exchange, on the `sluice::access` target.
fn log_exchange(ex: &Exchange) {
    tracing::info!(
        target: "sluice::access",
        route = %ex.route,
        method = %ex.request.method,
        path = ex.request.uri.path(),
        status = ex.status.map_or(0, |s| s.as_u16()),
        upstream = ex.upstream.as_deref().unwrap_or("-"),
        model = ex.facts.model.as_deref().unwrap_or("-"),
        tenant = ex.tenant.as_deref().unwrap_or("-"),
        tier = ex.tier.as_deref().unwrap_or("-"),
        stream = ex.facts.stream,
        request_bytes = ex.body.len(),
        input_tokens = ex.usage.map(|u| u.input_tokens),
        output_tokens = ex.usage.map(|u| u.output_tokens),
        response_bytes = ex.response_bytes,
        outcome = ?ex.outcome,
        // hit | miss | bypass | refresh: hit durations are the cache's, not the upstream's.
        cache = ex.cache.map_or("-", |status| status.as_str()),
        duration_ms = ex.started.elapsed().as_secs_f64() * 1000.0,
        request_id = ex.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
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
