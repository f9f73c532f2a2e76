//! The local store: entries in moka, bounded by bytes, each with its own TTL; large bodies kept
//! zstd-compressed; counters readable by the process; identical misses coalesced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use tokio::sync::watch;

use super::config::StoreConfig;
use super::key::{CacheKey, Scope};
use super::shared::SharedTier;
use crate::usage::Usage;

/// A stored response: a complete 200, its body as the caller received it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub scope: Scope,
    pub route: Arc<str>,
    /// Wall time, so an entry from another replica (shared tier) ages the same way.
    pub stored_at: SystemTime,
    pub ttl: Duration,
    /// Answer to a streaming request (an SSE byte sequence).
    pub stream: bool,
    /// The response headers a hit replays (see [`REPLAYED_HEADERS`]).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Body,
    /// The provider's usage for the original response, for `charge_hits`.
    pub usage: Option<Usage>,
}

/// A body as kept: as is, or zstd-compressed (above the store's `compress_above`).
#[derive(Debug, Clone)]
pub enum Body {
    Plain(Bytes),
    Zstd { data: Bytes, len: usize },
}

/// zstd level: fast to compress (entries are written on the request path's tail), and JSON
/// and SSE text compress well even at low levels.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("cache entry does not decompress: {0}")]
    Corrupt(#[from] std::io::Error),
    #[error("cache entry decompressed to {got} bytes, {expected} expected")]
    Length { expected: usize, got: usize },
}

impl Body {
    /// Compresses when `plain` is larger than `above` (and compression helps).
    pub fn new(plain: Bytes, above: usize) -> Body {
        if plain.len() <= above {
            return Body::Plain(plain);
        }
        match zstd::bulk::compress(&plain, ZSTD_LEVEL) {
            Ok(data) if data.len() < plain.len() => Body::Zstd {
                data: Bytes::from(data),
                len: plain.len(),
            },
            _ => Body::Plain(plain),
        }
    }

    /// The body as sent: no copy when plain.
    pub fn bytes(&self) -> Result<Bytes, BodyError> {
        match self {
            Body::Plain(bytes) => Ok(bytes.clone()),
            Body::Zstd { data, len } => {
                let plain = zstd::bulk::decompress(data, *len)?;
                if plain.len() != *len {
                    return Err(BodyError::Length {
                        expected: *len,
                        got: plain.len(),
                    });
                }
                Ok(Bytes::from(plain))
            }
        }
    }

    /// Bytes held in memory.
    pub fn stored_len(&self) -> usize {
        match self {
            Body::Plain(bytes) => bytes.len(),
            Body::Zstd { data, .. } => data.len(),
        }
    }

    pub fn plain_len(&self) -> usize {
        match self {
            Body::Plain(bytes) => bytes.len(),
            Body::Zstd { len, .. } => *len,
        }
    }
}

/// Response headers a hit replays: what describes the answer. Per-response headers (request
/// ids, rate limits, dates, timings, cookies) belong to the exchange that made them.
pub const REPLAYED_HEADERS: [&str; 6] = [
    "content-type",
    "content-encoding",
    "openai-model",
    "openai-organization",
    "openai-project",
    "openai-version",
];

/// Memory an entry takes beyond its body and headers (key, bookkeeping), for the byte bound.
const ENTRY_OVERHEAD: usize = 160;

impl Entry {
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at).unwrap_or_default()
    }

    /// Time left before it expires.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.ttl.saturating_sub(self.age(now))
    }

    /// What it counts for against `max_bytes`.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let total = ENTRY_OVERHEAD + self.route.len() + headers + self.body.stored_len();
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// Counters of the cache, kept across store rebuilds so they only ever go up.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bypasses: AtomicU64,
    pub refreshes: AtomicU64,
    /// Entries written to the local store.
    pub inserts: AtomicU64,
    /// Entries removed to keep the byte bound.
    pub evictions: AtomicU64,
    pub expirations: AtomicU64,
    /// Requests that waited for an identical request's answer instead of going upstream.
    pub coalesced_waits: AtomicU64,
    /// Waits that ended without an answer to share (timeout, or the first request failed).
    pub coalesced_timeouts: AtomicU64,
    /// Complete 200 responses not stored because they were larger than `max_entry`.
    pub too_large: AtomicU64,
    pub shared_hits: AtomicU64,
    pub shared_writes: AtomicU64,
    /// Shared-tier reads or writes that failed or timed out.
    pub shared_errors: AtomicU64,
}

/// A snapshot of the counters and of the store's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub bypasses: u64,
    pub refreshes: u64,
    /// hits / (hits + misses), 0 before any lookup.
    pub hit_ratio: f64,
    pub inserts: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub coalesced_waits: u64,
    pub coalesced_timeouts: u64,
    pub too_large: u64,
    pub shared_enabled: bool,
    pub shared_hits: u64,
    pub shared_writes: u64,
    pub shared_errors: u64,
}

/// Which entries a purge removes: all, or those of a tenant, of a route, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Purge {
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
}

impl Purge {
    pub fn route(name: &str) -> Purge {
        Purge {
            tenant: None,
            route: Some(name.to_owned()),
        }
    }

    pub fn matches(&self, entry: &Entry) -> bool {
        self.tenant
            .as_deref()
            .is_none_or(|tenant| entry.scope.tenant() == Some(tenant))
            && self
                .route
                .as_deref()
                .is_none_or(|route| *entry.route == *route)
    }
}

/// Per-entry TTL for moka: each entry lives for its own `ttl` (less its age, for an entry
/// that came from the shared tier), and a refreshed entry starts again.
struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.remaining(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.remaining(SystemTime::now()))
    }
}

/// What an identical request in flight will share once it has its answer.
#[derive(Debug, Clone)]
pub enum FlightState {
    Pending,
    /// The answer (or `None`: it failed or was not cacheable).
    Done(Option<Arc<Entry>>),
}

type Flights = Mutex<HashMap<CacheKey, watch::Sender<FlightState>>>;

/// The first request of a group of identical misses: its answer is shared with those that
/// wait for it. Dropped without [`FlightLead::publish`] (an error, a broken stream, a caller
/// gone), it lets the waiters go upstream themselves.
pub struct FlightLead {
    store: Arc<CacheStore>,
    key: CacheKey,
    sender: watch::Sender<FlightState>,
}

impl std::fmt::Debug for FlightLead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightLead").finish_non_exhaustive()
    }
}

impl FlightLead {
    pub fn publish(&self, entry: Arc<Entry>) {
        self.sender.send_replace(FlightState::Done(Some(entry)));
    }
}

impl Drop for FlightLead {
    fn drop(&mut self) {
        // Waiters not served yet go on by themselves.
        self.sender.send_if_modified(|state| {
            let pending = matches!(state, FlightState::Pending);
            if pending {
                *state = FlightState::Done(None);
            }
            pending
        });
        let mut flights = self.store.lock_flights();
        if flights
            .get(&self.key)
            .is_some_and(|sender| sender.same_channel(&self.sender))
        {
            flights.remove(&self.key);
        }
    }
}

/// The outcome of joining the requests in flight for a key.
pub enum Flight {
    /// No identical request in flight: this one goes upstream and shares its answer.
    Lead(FlightLead),
    /// Wait for the leader's answer.
    Follow(watch::Receiver<FlightState>),
}

/// The process's cache: outlives policies (it lives in the process's shared state), so a
/// reload keeps its entries.
pub struct CacheStore {
    entries: moka::sync::Cache<CacheKey, Arc<Entry>>,
    config: StoreConfig,
    counters: Arc<CacheCounters>,
    flights: Flights,
    shared: Option<Arc<SharedTier>>,
}

impl std::fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStore")
            .field("config", &self.config)
            .field("entries", &self.entries.entry_count())
            .finish_non_exhaustive()
    }
}

impl CacheStore {
    pub fn new(
        config: StoreConfig,
        counters: Arc<CacheCounters>,
        shared: Option<Arc<SharedTier>>,
    ) -> Self {
        let listener_counters = counters.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes.0)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| entry.weight())
            .expire_after(EntryExpiry)
            // Recent answers are the likely repeats; LRU also admits every new entry, where
            // TinyLFU could refuse it.
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |_key, _entry, cause| match cause {
                RemovalCause::Size => {
                    listener_counters.evictions.fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Expired => {
                    listener_counters
                        .expirations
                        .fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        Self {
            entries,
            config,
            counters,
            flights: Mutex::default(),
            shared,
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    pub fn shared(&self) -> Option<&Arc<SharedTier>> {
        self.shared.as_ref()
    }

    fn lock_flights(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<CacheKey, watch::Sender<FlightState>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live entry for a key. The scope is part of the key's equality, so an entry is only
    /// ever found by its own scope; the check here is a second lock on the same door.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        (entry.scope == key.scope && !entry.remaining(SystemTime::now()).is_zero()).then_some(entry)
    }

    pub fn purge_key(&self, key: &CacheKey) {
        self.entries.invalidate(key);
    }

    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if entry.remaining(SystemTime::now()).is_zero() {
            return;
        }
        self.entries.insert(key, entry);
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps a new entry: compressed if large (off the async workers), stored here, then
    /// written to the shared tier in the background. The flight lead, if any, is released once
    /// the entry can be found, so a request arriving meanwhile follows it instead of missing.
    pub fn keep(self: &Arc<Self>, key: CacheKey, entry: Entry, lead: Option<FlightLead>) {
        let large = entry.body.plain_len() > self.config.compress_above.0 as usize;
        let store = self.clone();
        let finish = move || {
            let mut entry = entry;
            if let Body::Plain(plain) = &entry.body {
                entry.body = Body::new(plain.clone(), store.config.compress_above.0 as usize);
            }
            if let Some(shared) = &store.shared {
                shared.put(&key, &entry);
            }
            store.insert(key, Arc::new(entry));
            drop(lead);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if large => drop(runtime.spawn_blocking(finish)),
            _ => finish(),
        }
    }

    /// Leads the group of identical requests for `key`, or follows the one in flight.
    pub fn join(self: &Arc<Self>, key: &CacheKey) -> Flight {
        let mut flights = self.lock_flights();
        if let Some(sender) = flights.get(key) {
            return Flight::Follow(sender.subscribe());
        }
        let (sender, _) = watch::channel(FlightState::Pending);
        flights.insert(key.clone(), sender.clone());
        Flight::Lead(FlightLead {
            store: self.clone(),
            key: key.clone(),
            sender,
        })
    }

    /// Removes the entries a purge names, here and (asynchronously) in the shared tier;
    /// returns how many local entries went.
    pub fn purge(&self, purge: &Purge) -> u64 {
        let mut removed = 0;
        for (key, entry) in self.entries.iter() {
            if purge.matches(&entry) {
                self.entries.invalidate(&*key);
                removed += 1;
            }
        }
        self.entries.run_pending_tasks();
        removed
    }

    pub fn stats(&self) -> CacheStats {
        // Pending evictions and expirations are applied first, so the figures are exact.
        self.entries.run_pending_tasks();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let c = &self.counters;
        let (hits, misses) = (load(&c.hits), load(&c.misses));
        CacheStats {
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
            max_bytes: self.config.max_bytes.0,
            hits,
            misses,
            bypasses: load(&c.bypasses),
            refreshes: load(&c.refreshes),
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            inserts: load(&c.inserts),
            evictions: load(&c.evictions),
            expirations: load(&c.expirations),
            coalesced_waits: load(&c.coalesced_waits),
            coalesced_timeouts: load(&c.coalesced_timeouts),
            too_large: load(&c.too_large),
            shared_enabled: self.shared.is_some(),
            shared_hits: load(&c.shared_hits),
            shared_writes: load(&c.shared_writes),
            shared_errors: load(&c.shared_errors),
        }
    }
}
