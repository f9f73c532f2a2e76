use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::facts::BodyFacts;
use crate::usage::{Dialect, Usage};
use crate::RequestHeader;

/// One request/response pair as the filters see it. The process fills it in as the exchange
/// advances; filters read it and record their own facts on it for the filters after them.
#[derive(Debug)]
pub struct Exchange {
    /// The route's name from the policy.
    pub route: Arc<str>,
    /// The request head as the caller sent it (before any rewrite for the upstream).
    pub request: RequestHeader,
    /// The complete request body; replayed as-is on every upstream attempt.
    body: Bytes,
    /// Its length, kept when the body itself is released (for the access log).
    body_len: usize,
    /// The body as a JSON tree, parsed the first time a filter asks (the token estimate and
    /// the cache key read the same one) and dropped when the request phase ends, so it is not
    /// held for as long as the answer streams. `None` inside: the body is not JSON.
    body_json: OnceLock<Option<serde_json::Value>>,
    pub facts: BodyFacts,
    /// The API family of the route's provider, for reading bodies.
    pub dialect: Dialect,
    /// Token usage read from the response, once the response is complete (when the route's
    /// filters asked for it and the provider reported it).
    pub usage: Option<Usage>,
    /// Set by the `request_id` filter; echoed downstream and sent upstream.
    pub request_id: Option<HeaderValue>,
    /// Set by the `auth` filter: who is calling, and the tier that decides what they may do.
    pub tenant: Option<Arc<str>>,
    pub tier: Option<Arc<str>>,
    /// When the request arrived (before its body was read).
    pub started: Instant,
    /// When the later steps happened: latency metrics, `server-timing` and spans read them.
    pub timings: Timings,
    /// The upstream that served the response, once one did.
    pub upstream: Option<Arc<str>>,
    /// The model that upstream was asked for (a fallback target may map the caller's to
    /// another): what the response is priced as.
    pub served_model: Option<Arc<str>>,
    /// The model the provider says answered (e.g. a dated snapshot of the one asked for);
    /// read only when a trace will report it.
    pub response_model: Option<Box<str>>,
    /// Upstream attempts made (retries and hedges included).
    pub attempts: u32,
    /// The status sent downstream, once the response head went out.
    pub status: Option<StatusCode>,
    /// Response body bytes sent downstream so far.
    pub response_bytes: u64,
    pub outcome: Outcome,
    /// What the `cache` filter did, on routes that have it. A hit was answered from memory:
    /// no provider call, no provider tokens (see the limits filter's settlement).
    pub cache: Option<CacheStatus>,
    /// Per-exchange state a filter keeps for its later phases, by type (e.g. a limits
    /// admission that must be released when the exchange ends, whatever the outcome).
    pub extensions: http::Extensions,
}

impl Exchange {
    pub fn new(route: Arc<str>, request: RequestHeader, body: Bytes) -> Self {
        Self::with_dialect(route, request, body, Dialect::default())
    }

    /// An exchange with a provider of this dialect (which decides how its facts are read).
    pub fn with_dialect(
        route: Arc<str>,
        request: RequestHeader,
        body: Bytes,
        dialect: Dialect,
    ) -> Self {
        let facts = BodyFacts::parse_for(dialect, request.uri.path(), &body);
        Self {
            route,
            request,
            body_len: body.len(),
            body,
            body_json: OnceLock::new(),
            facts,
            dialect,
            usage: None,
            request_id: None,
            tenant: None,
            tier: None,
            started: Instant::now(),
            timings: Timings::default(),
            upstream: None,
            served_model: None,
            response_model: None,
            attempts: 0,
            status: None,
            response_bytes: 0,
            outcome: Outcome::InProgress,
            cache: None,
            extensions: http::Extensions::new(),
        }
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Replaces the body sent upstream (a filter's rewrite); a tree parsed from the old one is
    /// forgotten. The facts stay those of the caller's request.
    pub fn set_body(&mut self, body: Bytes) {
        self.body_len = body.len();
        self.body = body;
        self.release_body_json();
    }

    /// The length of the body sent upstream, also after [`Self::release_body`].
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Frees the body once no attempt will send it again (the answer is chosen): a stream
    /// would otherwise hold its whole prompt, often tens of KiB of conversation, for as long
    /// as it is open. [`Self::body`] is empty afterwards; [`Self::body_len`] is kept.
    pub fn release_body(&mut self) {
        self.body = Bytes::new();
        self.release_body_json();
    }

    /// The body as JSON, parsed on the first call; `None` if it is not JSON.
    pub fn body_json(&self) -> Option<&serde_json::Value> {
        self.body_json
            .get_or_init(|| serde_json::from_slice(&self.body).ok())
            .as_ref()
    }

    /// Frees the parsed body once no filter will read it again.
    pub fn release_body_json(&mut self) {
        self.body_json = OnceLock::new();
    }
}

/// When the steps of an exchange happened, beyond its start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// Time spent waiting in a limits queue (set by the limits filter).
    pub queued: Duration,
    /// The first upstream attempt went out.
    pub upstream_start: Option<Instant>,
    /// The chosen attempt's response head arrived.
    pub upstream_head: Option<Instant>,
    /// Every attempt failed without a response head: when Sluice gave up on the upstream.
    pub upstream_failed: Option<Instant>,
    /// The response head went to the caller.
    pub head_sent: Option<Instant>,
    /// The first and latest streamed events that carried content (text, tool arguments).
    pub first_content: Option<Instant>,
    pub last_content: Option<Instant>,
    pub content_events: u32,
    /// The chosen attempt's connection: reused from the pool, or new (and how long it took).
    pub connection_reused: Option<bool>,
    pub connect: Option<Duration>,
}

impl Timings {
    /// Sluice's own share of the time to the response head: before the first attempt (the
    /// queue excepted) and after the upstream's part ended (its head, or the last attempt's
    /// failure) up to the caller's head. For an answer made without the upstream, everything
    /// up to the head.
    pub fn overhead(&self, started: Instant) -> Option<Duration> {
        let head_sent = self.head_sent?;
        let own = match (self.upstream_start, self.upstream_end()) {
            (Some(start), Some(end)) => {
                start.saturating_duration_since(started) + head_sent.saturating_duration_since(end)
            }
            _ => head_sent.saturating_duration_since(started),
        };
        Some(own.saturating_sub(self.queued))
    }

    /// When the upstream's part ended: the chosen attempt's head, or the give-up after every
    /// attempt failed.
    pub fn upstream_end(&self) -> Option<Instant> {
        self.upstream_head.or(self.upstream_failed)
    }

    /// From the first attempt to the chosen attempt's head, or to the last failure when none
    /// answered (retries and backoff included).
    pub fn upstream(&self) -> Option<Duration> {
        Some(
            self.upstream_end()?
                .saturating_duration_since(self.upstream_start?),
        )
    }
}

/// How the exchange ended, as the `done` phase sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    InProgress,
    /// The response went downstream completely.
    Completed,
    /// Sluice answered with an error of its own (a filter, no route, upstream failure before the
    /// response head).
    Refused,
    /// The upstream failed after the response head went downstream.
    UpstreamBroke,
    /// A filter ended the response early with an error event (e.g. tokens exhausted).
    Cut,
    /// The caller went away before the response was complete.
    CallerGone,
}

impl Outcome {
    /// The variant's name, as spans and logs report it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InProgress => "InProgress",
            Outcome::Completed => "Completed",
            Outcome::Refused => "Refused",
            Outcome::UpstreamBroke => "UpstreamBroke",
            Outcome::Cut => "Cut",
            Outcome::CallerGone => "CallerGone",
        }
    }
}

/// What the cache did with a request (the `x-sluice-cache` response header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from the cache.
    Hit,
    /// Not in the cache: answered upstream, and stored if cacheable.
    Miss,
    /// Not cacheable (by policy or `Cache-Control: no-store`): the cache stayed out of it.
    Bypass,
    /// `Cache-Control: no-cache`: answered upstream, the entry replaced.
    Refresh,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Refresh => "refresh",
        }
    }
}

/// The kinds of error Sluice itself produces; each provider renders them in its own error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    PermissionDenied,
    NotFound,
    RequestTooLarge,
    RateLimited,
    UpstreamUnavailable,
    UpstreamTimeout,
    Internal,
}

/// A refusal from a filter or from the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    /// Headers for the error response (e.g. `retry-after`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Rejection {
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// A response made by a filter instead of the upstream.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_leaves_out_the_upstream_even_when_every_attempt_failed() {
        let started = Instant::now();
        let ms = Duration::from_millis;
        let answered = Timings {
            upstream_start: Some(started + ms(1)),
            upstream_head: Some(started + ms(20)),
            head_sent: Some(started + ms(22)),
            ..Timings::default()
        };
        assert_eq!(answered.overhead(started), Some(ms(3)));
        assert_eq!(answered.upstream(), Some(ms(19)));
        let failed = Timings {
            upstream_head: None,
            upstream_failed: Some(started + ms(20)),
            ..answered
        };
        assert_eq!(failed.overhead(started), Some(ms(3)));
        assert_eq!(failed.upstream(), Some(ms(19)));
        let local = Timings {
            head_sent: Some(started + ms(2)),
            ..Timings::default()
        };
        assert_eq!(local.overhead(started), Some(ms(2)));
        assert_eq!(local.upstream(), None);
    }

    #[test]
    fn a_released_body_keeps_its_length() {
        let mut ex = Exchange::new(
            "r".into(),
            RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap(),
            Bytes::from_static(br#"{"model":"m","messages":[]}"#),
        );
        ex.set_body(Bytes::from_static(br#"{"model":"cheaper","messages":[]}"#));
        assert_eq!(ex.body_len(), 33);
        assert!(ex.body_json().is_some());
        ex.release_body();
        assert!(ex.body().is_empty());
        assert!(ex.body_json().is_none());
        assert_eq!(ex.body_len(), 33);
    }

    #[test]
    fn the_parsed_body_follows_the_body() {
        let request = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        let mut ex = Exchange::new("r".into(), request, Bytes::from_static(br#"{"n":1}"#));
        assert_eq!(ex.body_json().and_then(|b| b["n"].as_u64()), Some(1));
        ex.set_body(Bytes::from_static(br#"{"n":2}"#));
        assert_eq!(
            ex.body_json().and_then(|b| b["n"].as_u64()),
            Some(2),
            "a rewrite is what later filters read"
        );
        ex.release_body_json();
        assert!(ex.body_json.get().is_none(), "released, not kept");
        ex.set_body(Bytes::from_static(b"not json"));
        assert_eq!(ex.body_json(), None);
    }
}
