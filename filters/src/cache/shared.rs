//! The shared tier: entries in Redis, shared by every replica. Read after a local miss, within a
//! short timeout; written in the background, never on the caller's path. When Redis fails, the
//! tier is skipped for a second at a time and the local store carries on alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::key::{CacheKey, Scope};
use super::store::{Body, CacheCounters, Entry, Purge};
use crate::limits::RedisCounters;
use crate::usage::Usage;

/// After a failure the tier is not tried again for this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Background writes and purges get this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys deleted per SCAN page in a purge.
const SCAN_COUNT: usize = 500;

pub struct SharedTier {
    redis: Arc<RedisCounters>,
    read_timeout: Duration,
    counters: Arc<CacheCounters>,
    started: Instant,
    /// Milliseconds since `started` before which the tier is not tried (0: healthy).
    down_until_ms: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared cache unavailable: {0}")]
    Unavailable(String),
    #[error("shared cache timed out")]
    Timeout,
    #[error("shared cache: {0}")]
    Redis(#[from] redis::RedisError),
}

impl SharedTier {
    pub fn new(
        redis: Arc<RedisCounters>,
        read_timeout: Duration,
        counters: Arc<CacheCounters>,
    ) -> Self {
        Self {
            redis,
            read_timeout,
            counters,
            started: Instant::now(),
            down_until_ms: AtomicU64::new(0),
        }
    }

    /// Whether this tier talks through these counters' connection.
    pub fn uses(&self, redis: &Arc<RedisCounters>) -> bool {
        Arc::ptr_eq(&self.redis, redis)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn is_resting(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    fn failed(&self, error: &SharedError) {
        self.counters.shared_errors.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + RETRY_AFTER_FAILURE.as_millis() as u64;
        if self.down_until_ms.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(target: "sluice::cache", "{error}; serving from the local cache only");
        }
    }

    fn succeeded(&self) {
        if self.down_until_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(target: "sluice::cache", "shared cache reachable again");
        }
    }

    /// `PREFIX:cache:ROUTE:SCOPE:DIGEST`: route and scope as short hashes (names may hold
    /// characters that mean something to SCAN's patterns), so a purge can match them.
    fn redis_key(&self, key: &CacheKey, route: &str) -> String {
        format!(
            "{}:cache:{}:{}:{}",
            self.redis.prefix(),
            route_tag(route),
            scope_tag(&key.scope),
            key.hex()
        )
    }

    async fn command<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
        timeout: Duration,
    ) -> Result<T, SharedError> {
        // The whole call is bounded, connecting included: a caller waits `timeout` at most.
        let call = async {
            let mut connection = self
                .redis
                .connection()
                .await
                .map_err(|e| SharedError::Unavailable(e.to_string()))?;
            Ok(command.query_async(&mut connection).await?)
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(SharedError::Timeout))
    }

    /// The entry for a key, if another replica stored it; `None` on a miss, and at once while
    /// Redis is failing.
    pub async fn get(&self, key: &CacheKey, route: &str) -> Option<Entry> {
        if self.is_resting() {
            return None;
        }
        let command = redis::cmd("GET").arg(self.redis_key(key, route)).clone();
        let raw: Option<Vec<u8>> = match self.command(&command, self.read_timeout).await {
            Ok(raw) => {
                self.succeeded();
                raw
            }
            Err(e) => {
                self.failed(&e);
                return None;
            }
        };
        let entry = match decode(&raw?) {
            Ok(entry) => entry,
            Err(e) => {
                self.counters.shared_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "sluice::cache", "unreadable shared cache entry ignored: {e}");
                return None;
            }
        };
        // The scope is in the key's digest; checking the record's own scope and route too
        // means no hash collision or foreign writer can hand one tenant another's answer.
        let usable = entry.scope == key.scope
            && *entry.route == *route
            && !entry.remaining(SystemTime::now()).is_zero();
        usable.then_some(entry)
    }

    /// Stores an entry for the other replicas, in the background.
    pub fn put(self: &Arc<Self>, key: &CacheKey, entry: &Entry) {
        if self.is_resting() {
            return;
        }
        let ttl_ms = entry.remaining(SystemTime::now()).as_millis() as u64;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if ttl_ms == 0 {
            return;
        }
        let command = redis::cmd("SET")
            .arg(self.redis_key(key, &entry.route))
            .arg(encode(entry))
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        let tier = self.clone();
        runtime.spawn(async move {
            match tier.command::<()>(&command, WRITE_TIMEOUT).await {
                Ok(()) => {
                    tier.succeeded();
                    tier.counters.shared_writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tier.failed(&e),
            }
        });
    }

    /// Deletes the shared entries a purge names; returns how many.
    pub async fn purge(&self, purge: &Purge) -> Result<u64, SharedError> {
        let route = purge.route.as_deref().map_or("*".to_owned(), route_tag);
        let scope = purge.tenant.as_deref().map_or("*".to_owned(), |tenant| {
            scope_tag(&Scope::Tenant(tenant.into()))
        });
        let pattern = format!(
            "{}:cache:{route}:{scope}:*",
            escape_pattern(self.redis.prefix())
        );
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .clone();
            let (next, keys): (u64, Vec<String>) = self.command(&scan, WRITE_TIMEOUT).await?;
            if !keys.is_empty() {
                let unlink = redis::cmd("UNLINK").arg(&keys).clone();
                deleted += self.command::<u64>(&unlink, WRITE_TIMEOUT).await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..8])
}

fn route_tag(route: &str) -> String {
    short_hash(&[route.as_bytes()])
}

fn scope_tag(scope: &Scope) -> String {
    let (tag, name) = scope.parts();
    short_hash(&[&[tag], name.as_bytes()])
}

/// Escapes the glob characters of a SCAN pattern.
fn escape_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

const MAGIC: &[u8; 4] = b"SLC1";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a Sluice cache record")]
    Magic,
    #[error("record ends early")]
    Truncated,
    #[error("record has an invalid {0}")]
    Invalid(&'static str),
}

/// A record: magic, flags, times, scope, route, usage, headers, body; every variable-length
/// field length-prefixed.
pub fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry.body.stored_len() + 256);
    out.extend_from_slice(MAGIC);
    let compressed = matches!(entry.body, Body::Zstd { .. });
    let flags =
        u8::from(entry.stream) | u8::from(compressed) << 1 | u8::from(entry.usage.is_some()) << 2;
    out.push(flags);
    let millis = entry
        .stored_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    out.extend_from_slice(&millis.to_le_bytes());
    out.extend_from_slice(&(entry.ttl.as_millis() as u64).to_le_bytes());
    let (tag, name) = entry.scope.parts();
    out.push(tag);
    put_bytes(&mut out, name.as_bytes());
    put_bytes(&mut out, entry.route.as_bytes());
    let usage = entry.usage.unwrap_or_default();
    out.extend_from_slice(&usage.input_tokens.to_le_bytes());
    out.extend_from_slice(&usage.output_tokens.to_le_bytes());
    out.extend_from_slice(&(entry.headers.len() as u32).to_le_bytes());
    for (name, value) in &entry.headers {
        put_bytes(&mut out, name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    out.extend_from_slice(&(entry.body.plain_len() as u64).to_le_bytes());
    let data = match &entry.body {
        Body::Plain(bytes) => bytes,
        Body::Zstd { data, .. } => data,
    };
    put_bytes(&mut out, data);
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u64()?).map_err(|_| DecodeError::Truncated)?;
        self.take(len)
    }

    fn text(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::Invalid(what))
    }
}

pub fn decode(raw: &[u8]) -> Result<Entry, DecodeError> {
    let mut reader = Reader(raw);
    if reader.take(4)? != MAGIC {
        return Err(DecodeError::Magic);
    }
    let flags = reader.u8()?;
    let stored_at = UNIX_EPOCH + Duration::from_millis(reader.u64()?);
    let ttl = Duration::from_millis(reader.u64()?);
    let scope = match (reader.u8()?, reader.text("scope")?) {
        (1, name) => Scope::Tenant(name.into()),
        (2, "") => Scope::Shared,
        _ => return Err(DecodeError::Invalid("scope")),
    };
    let route: Arc<str> = reader.text("route")?.into();
    let usage = Usage {
        input_tokens: reader.u64()?,
        output_tokens: reader.u64()?,
    };
    let count = reader.u32()? as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = HeaderName::from_bytes(reader.bytes()?)
            .map_err(|_| DecodeError::Invalid("header name"))?;
        let value = HeaderValue::from_bytes(reader.bytes()?)
            .map_err(|_| DecodeError::Invalid("header value"))?;
        headers.push((name, value));
    }
    let len = usize::try_from(reader.u64()?).map_err(|_| DecodeError::Invalid("length"))?;
    let data = Bytes::copy_from_slice(reader.bytes()?);
    if !reader.0.is_empty() {
        return Err(DecodeError::Invalid("trailing bytes"));
    }
    let body = if flags & 2 != 0 {
        Body::Zstd { data, len }
    } else if data.len() == len {
        Body::Plain(data)
    } else {
        return Err(DecodeError::Invalid("length"));
    };
    Ok(Entry {
        scope,
        route,
        stored_at,
        ttl,
        stream: flags & 1 != 0,
        headers,
        body,
        usage: (flags & 4 != 0).then_some(usage),
    })
}
