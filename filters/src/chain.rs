use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::exchange::{Exchange, LocalResponse, Rejection};
use crate::{RequestHeader, ResponseHeader};

/// What the request phase decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on to the next filter, then upstream.
    Continue,
    /// Refuse the request; the process renders it in the route's provider error shape.
    Reject(Rejection),
    /// Answer locally (e.g. a cache hit) without going upstream.
    Respond(Box<LocalResponse>),
}

/// What the response-chunk phase decided.
#[derive(Debug)]
pub enum ChunkVerdict {
    Pass,
    /// End the response before this chunk, with this error as the stream's last event.
    Cut(Rejection),
}

/// One filter. Every phase has a default that does nothing, so a filter implements only the
/// phases it cares about.
#[async_trait]
pub trait Filter: Send + Sync {
    /// The name used in the policy and in logs.
    fn name(&self) -> &'static str;

    /// Request phase: the request head and body facts are known. Async because later filters
    /// (limits with a shared store) may need to wait.
    async fn on_request(&self, _ex: &mut Exchange) -> Verdict {
        Verdict::Continue
    }

    /// The request head about to go upstream, once per attempt.
    fn on_upstream_request(&self, _ex: &Exchange, _upstream: &mut RequestHeader) {}

    /// The response head about to go downstream.
    fn on_response_head(&self, _ex: &mut Exchange, _response: &mut ResponseHeader) {}

    /// A response body chunk before it passes downstream. Runs per chunk: no allocation, no
    /// waiting. `Cut` ends the response here with a provider-shaped error event.
    fn on_response_chunk(&self, _ex: &mut Exchange, _chunk: &Bytes) -> ChunkVerdict {
        ChunkVerdict::Pass
    }

    /// The exchange is over (completed, failed or cancelled); see [`Exchange::outcome`].
    fn on_done(&self, _ex: &Exchange) {}

    /// Whether this filter reads [`Exchange::usage`]: the process then meters the response
    /// (and asks OpenAI streams for their usage chunk, hidden from a caller who did not).
    fn needs_usage(&self) -> bool {
        false
    }
}

/// A route's filters in their validated order.
#[derive(Clone, Default)]
pub struct Chain {
    filters: Vec<Arc<dyn Filter>>,
    needs_usage: bool,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.filters.iter().map(|filter| filter.name()))
            .finish()
    }
}

impl Chain {
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        let needs_usage = filters.iter().any(|filter| filter.needs_usage());
        Self {
            filters,
            needs_usage,
        }
    }

    pub fn needs_usage(&self) -> bool {
        self.needs_usage
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.filters.iter().map(|filter| filter.name())
    }

    /// Runs the request phase; the first filter that does not continue ends it.
    pub async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let mut verdict = Verdict::Continue;
        for filter in &self.filters {
            verdict = filter.on_request(ex).await;
            if !matches!(verdict, Verdict::Continue) {
                break;
            }
        }
        // Only request filters read the parsed body.
        ex.release_body_json();
        verdict
    }

    pub fn on_upstream_request(&self, ex: &Exchange, upstream: &mut RequestHeader) {
        for filter in &self.filters {
            filter.on_upstream_request(ex, upstream);
        }
    }

    pub fn on_response_head(&self, ex: &mut Exchange, response: &mut ResponseHeader) {
        for filter in &self.filters {
            filter.on_response_head(ex, response);
        }
    }

    /// The first filter that cuts the response wins.
    pub fn on_response_chunk(&self, ex: &mut Exchange, chunk: &Bytes) -> ChunkVerdict {
        for filter in &self.filters {
            if let ChunkVerdict::Cut(rejection) = filter.on_response_chunk(ex, chunk) {
                return ChunkVerdict::Cut(rejection);
            }
        }
        ChunkVerdict::Pass
    }

    /// Runs in reverse order, like unwinding: the first filter to see the request is the last to
    /// see it finish.
    pub fn on_done(&self, ex: &Exchange) {
        for filter in self.filters.iter().rev() {
            filter.on_done(ex);
        }
    }
}
