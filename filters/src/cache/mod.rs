//! `cache`: an exact-match response cache. A request whose key (scope, route, upstream, path,
//! answer-changing headers, canonical body) matches a stored complete 200 is answered from
//! memory — byte for byte what the first caller received, streams included — without going
//! upstream. Identical misses in flight at once make one upstream call.
//!
//! Only complete 200 responses are stored: errors, broken or cut streams and responses larger
//! than `max_entry` never are. With `when: deterministic` (the default) only requests with
//! `temperature: 0` or a fixed `seed` are cached.

mod config;
mod key;
mod shared;
mod store;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, StatusCode};

pub use config::{CacheConfig, ModelTtl, ScopeRule, SharedTierConfig, StoreConfig, When};
pub use key::{
    canonical_json, is_deterministic, CacheKey, ControlError, Controls, KeyInput, Scope,
    IGNORED_BODY_FIELDS, KEYED_HEADERS, TTL_HEADER,
};
pub use shared::{decode, encode, DecodeError, SharedError, SharedTier};
pub use store::{
    Body, CacheCounters, CacheStats, CacheStore, Entry, Flight, FlightLead, FlightState, Purge,
    REPLAYED_HEADERS,
};

use crate::chain::{Filter, Verdict};
use crate::exchange::{CacheStatus, ErrorKind, Exchange, LocalResponse, Outcome, Rejection};
use crate::{RequestHeader, ResponseHeader};

/// The response header saying what the cache did: `hit`, `miss`, `bypass` or `refresh`.
pub const STATUS_HEADER: HeaderName = HeaderName::from_static("x-sluice-cache");

/// What a route's cache filter knows of its route beyond its rules.
#[derive(Debug, Clone)]
pub struct RouteFacts {
    pub route: Arc<str>,
    pub upstream: Arc<str>,
    /// The upstream's API (`openai`, `anthropic`, …).
    pub api: Arc<str>,
    /// The caller's own provider key goes upstream (the upstream has no keys): entries are then
    /// scoped to that key too, since only the provider can tell whether it is good.
    pub credential_scoped: bool,
}

pub struct Cache {
    config: CacheConfig,
    /// `config.fingerprint()`: every key this filter makes is under these rules.
    rules: [u8; 32],
    store: Arc<CacheStore>,
    facts: RouteFacts,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .field("route", &self.facts.route)
            .finish_non_exhaustive()
    }
}

/// A miss on its way: what its response is recorded into, per exchange.
#[derive(Clone)]
struct Recording {
    key: CacheKey,
    ttl: Duration,
    /// Still a candidate: a 200 so far, within `max_entry`.
    storable: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The body as it went downstream, copied: a refcounted slice would keep the whole read
    /// buffer it came from (4 KiB or more) alive for as long as the stream, and the entry, last.
    body: BytesMut,
    /// The flight this request leads; released in `on_done`, or when the exchange is dropped.
    lead: Arc<Mutex<Option<FlightLead>>>,
}

/// What the request phase decided to do with a cacheable request.
struct Plan {
    key: CacheKey,
    ttl: Duration,
    controls: Controls,
}

impl Cache {
    pub fn new(config: CacheConfig, store: Arc<CacheStore>, facts: RouteFacts) -> Self {
        Self {
            rules: config.fingerprint(),
            config,
            store,
            facts,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The key and TTL of a cacheable request, or `None` when the cache stays out of it.
    fn plan(&self, ex: &Exchange, controls: Controls) -> Option<Plan> {
        if ex.request.method != Method::POST || controls.no_store {
            return None;
        }
        let body = ex.body_json()?;
        if !body.is_object() {
            return None;
        }
        if self.config.when == When::Deterministic && !is_deterministic(body) {
            return None;
        }
        let model_ttl = self.config.ttl_for(ex.facts.model.as_deref());
        if model_ttl.is_zero() {
            return None;
        }
        let ttl = match controls.ttl {
            Some(asked) => asked.min(self.config.max_ttl.unwrap_or(model_ttl)),
            None => model_ttl,
        };
        if ttl.is_zero() {
            return None;
        }
        let scope = match (self.config.scope, &ex.tenant) {
            (ScopeRule::Tenant, Some(tenant)) => Scope::Tenant(tenant.clone()),
            _ => Scope::Shared,
        };
        let key = CacheKey::new(&KeyInput {
            scope: &scope,
            route: &self.facts.route,
            upstream: &self.facts.upstream,
            api: &self.facts.api,
            request: &ex.request,
            credential_scoped: self.facts.credential_scoped,
            stream: ex.facts.stream,
            body,
            rules: &self.rules,
        });
        Some(Plan { key, ttl, controls })
    }

    /// Whether an entry may answer this request.
    fn usable(entry: &Entry, ex: &Exchange, controls: &Controls) -> bool {
        let now = SystemTime::now();
        entry.stream == ex.facts.stream
            && !entry.remaining(now).is_zero()
            && controls.max_age.is_none_or(|max| entry.age(now) <= max)
    }

    /// Answers from an entry; `None` if its body cannot be read (the entry is then dropped).
    fn serve(&self, ex: &mut Exchange, key: &CacheKey, entry: &Entry) -> Option<Verdict> {
        let body = match entry.body.bytes() {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(target: "sluice::cache", route = %self.facts.route, "{e}; entry dropped");
                self.store.purge_key(key);
                return None;
            }
        };
        let mut headers = Vec::with_capacity(entry.headers.len() + 2);
        headers.extend(entry.headers.iter().cloned());
        headers.push((STATUS_HEADER, HeaderValue::from_static("hit")));
        headers.push((
            http::header::AGE,
            HeaderValue::from(entry.age(SystemTime::now()).as_secs()),
        ));
        ex.cache = Some(CacheStatus::Hit);
        if self.config.charge_hits {
            ex.usage = entry.usage;
        }
        self.count(|c| &c.hits);
        Some(Verdict::Respond(Box::new(LocalResponse {
            status: StatusCode::OK,
            headers,
            body,
        })))
    }

    fn count(&self, counter: impl Fn(&CacheCounters) -> &std::sync::atomic::AtomicU64) {
        counter(self.store.counters()).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits (at most `coalesce_wait`) for the answer of the identical request in flight.
    async fn follow(
        &self,
        mut receiver: tokio::sync::watch::Receiver<FlightState>,
    ) -> Option<Arc<Entry>> {
        let done = receiver.wait_for(|state| matches!(state, FlightState::Done(_)));
        match tokio::time::timeout(self.config.coalesce_wait, done).await {
            Ok(Ok(state)) => match &*state {
                FlightState::Done(entry) => entry.clone(),
                FlightState::Pending => None,
            },
            _ => None,
        }
    }

    /// A miss goes upstream with its response recorded.
    fn record(&self, ex: &mut Exchange, plan: Plan, lead: Option<FlightLead>) {
        ex.extensions.insert(Recording {
            key: plan.key,
            ttl: plan.ttl,
            storable: true,
            headers: Vec::new(),
            body: BytesMut::new(),
            lead: Arc::new(Mutex::new(lead)),
        });
    }

    async fn lookup(&self, ex: &mut Exchange, plan: Plan) -> Verdict {
        if let Some(entry) = self.store.get(&plan.key) {
            if Self::usable(&entry, ex, &plan.controls) {
                if let Some(verdict) = self.serve(ex, &plan.key, &entry) {
                    return verdict;
                }
            }
        }
        let mut lead = None;
        if !self.config.coalesce_wait.is_zero() {
            match self.store.join(&plan.key) {
                Flight::Lead(leader) => lead = Some(leader),
                Flight::Follow(receiver) => {
                    let answer = self.follow(receiver).await;
                    match answer.filter(|entry| Self::usable(entry, ex, &plan.controls)) {
                        Some(entry) => {
                            if let Some(verdict) = self.serve(ex, &plan.key, &entry) {
                                self.count(|c| &c.coalesced_waits);
                                return verdict;
                            }
                        }
                        None => self.count(|c| &c.coalesced_timeouts),
                    }
                }
            }
        }
        if let Some(shared) = self.store.shared() {
            if let Some(entry) = shared.get(&plan.key, &self.facts.route).await {
                let entry = Arc::new(entry);
                if Self::usable(&entry, ex, &plan.controls) {
                    self.store.insert(plan.key.clone(), entry.clone());
                    if let Some(lead) = &lead {
                        lead.publish(entry.clone());
                    }
                    if let Some(verdict) = self.serve(ex, &plan.key, &entry) {
                        self.count(|c| &c.shared_hits);
                        return verdict;
                    }
                }
            }
        }
        ex.cache = Some(CacheStatus::Miss);
        self.count(|c| &c.misses);
        self.record(ex, plan, lead);
        Verdict::Continue
    }
}

#[async_trait]
impl Filter for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let controls = match Controls::parse(&ex.request) {
            Ok(controls) => controls,
            Err(e) => {
                return Verdict::Reject(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::InvalidRequest,
                    e.to_string(),
                ))
            }
        };
        let Some(plan) = self.plan(ex, controls) else {
            ex.cache = Some(CacheStatus::Bypass);
            self.count(|c| &c.bypasses);
            return Verdict::Continue;
        };
        if plan.controls.no_cache {
            ex.cache = Some(CacheStatus::Refresh);
            self.count(|c| &c.refreshes);
            self.record(ex, plan, None);
            return Verdict::Continue;
        }
        self.lookup(ex, plan).await
    }

    fn on_upstream_request(&self, _ex: &Exchange, upstream: &mut RequestHeader) {
        // Sluice's own control; the provider has no use for it.
        upstream.remove_header(&TTL_HEADER);
    }

    fn on_response_head(&self, ex: &mut Exchange, response: &mut ResponseHeader) {
        let Some(status) = ex.cache else { return };
        if status == CacheStatus::Hit {
            return; // The hit's headers are already on its local response.
        }
        let _ = response.insert_header(STATUS_HEADER, HeaderValue::from_static(status.as_str()));
        let ok = ex.status == Some(StatusCode::OK);
        if let Some(recording) = ex.extensions.get_mut::<Recording>() {
            recording.storable = ok;
            recording.headers = REPLAYED_HEADERS
                .iter()
                .flat_map(|name| {
                    response
                        .headers
                        .get_all(*name)
                        .iter()
                        .map(|value| (HeaderName::from_static(name), value.clone()))
                })
                .collect();
        }
    }

    fn on_response_chunk(&self, ex: &mut Exchange, chunk: &Bytes) -> crate::ChunkVerdict {
        let max_entry = self.config.max_entry.0 as usize;
        if let Some(recording) = ex.extensions.get_mut::<Recording>() {
            if recording.storable {
                if recording.body.len() + chunk.len() > max_entry {
                    recording.storable = false;
                    recording.body = BytesMut::new();
                    self.count(|c| &c.too_large);
                } else {
                    recording.body.extend_from_slice(chunk);
                }
            }
        }
        crate::ChunkVerdict::Pass
    }

    fn on_done(&self, ex: &Exchange) {
        let Some(recording) = ex.extensions.get::<Recording>() else {
            return;
        };
        let lead = recording
            .lead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Only a complete 200: an error, a broken or cut stream, a caller gone, a body over
        // `max_entry` leave nothing (and the lead's followers go upstream themselves).
        let complete = ex.outcome == Outcome::Completed && ex.status == Some(StatusCode::OK);
        if !(complete && recording.storable) {
            return;
        }
        let entry = Entry {
            scope: recording.key.scope.clone(),
            route: self.facts.route.clone(),
            stored_at: SystemTime::now(),
            ttl: recording.ttl,
            stream: ex.facts.stream,
            headers: recording.headers.clone(),
            // Exactly its size: the entry outlives the recording's growth room.
            body: Body::Plain(Bytes::copy_from_slice(&recording.body)),
            usage: ex.usage,
        };
        if let Some(lead) = &lead {
            lead.publish(Arc::new(entry.clone()));
        }
        self.store.keep(recording.key.clone(), entry, lead);
    }
}
