//! The cache as the policy writes it: a route's `- cache: { … }` filter, and the top-level
//! `cache: { … }` block for the store every route shares.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::glob::Glob;
use crate::units::{duration_text, ByteSize};

/// A route's cache rules: `- cache: { ttl: 1h, when: deterministic, scope: tenant }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long an entry is served. Default 1h.
    #[serde(default = "default_ttl", with = "duration_text")]
    pub ttl: Duration,
    /// Per model (exact names or glob patterns, exact names first, then patterns in
    /// alphabetical order): a TTL replacing `ttl`; `0s` caches nothing for that model.
    #[serde(default)]
    pub models: BTreeMap<String, ModelTtl>,
    /// Which requests are cached: `deterministic` (default: `temperature: 0` or a `seed`) or
    /// `always`.
    #[serde(default)]
    pub when: When,
    /// Who shares entries: `tenant` (default: each tenant its own) or `shared` (every tenant
    /// of the route).
    #[serde(default)]
    pub scope: ScopeRule,
    /// Largest response body cached (uncompressed); a larger response is passed on, not
    /// stored. Default 1MiB.
    #[serde(default = "default_max_entry")]
    pub max_entry: ByteSize,
    /// Longest TTL a caller may ask for with `x-sluice-cache-ttl`. Default: `ttl` (callers may
    /// only shorten it).
    #[serde(default, with = "optional_duration")]
    pub max_ttl: Option<Duration>,
    /// How long identical requests wait for the first one's answer instead of each going
    /// upstream; `0s` turns coalescing off. Default 30s.
    #[serde(default = "default_coalesce_wait", with = "duration_text")]
    pub coalesce_wait: Duration,
    /// Whether a hit is charged to the tenant's token limits and budget as the original
    /// response was (`true`), or costs nothing (`false`, default). It always counts as a
    /// request for rate limits.
    #[serde(default)]
    pub charge_hits: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: default_ttl(),
            models: BTreeMap::new(),
            when: When::default(),
            scope: ScopeRule::default(),
            max_entry: default_max_entry(),
            max_ttl: None,
            coalesce_wait: default_coalesce_wait(),
            charge_hits: false,
        }
    }
}

/// A model's TTL (a duration; `0s` = not cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct ModelTtl(#[serde(with = "duration_text")] pub Duration);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only requests whose answer is meant to repeat: `temperature: 0`, or a fixed `seed`.
    #[default]
    Deterministic,
    /// Every request (sampling with temperature included: the first answer is then replayed).
    Always,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeRule {
    #[default]
    Tenant,
    Shared,
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_entry() -> ByteSize {
    ByteSize(1 << 20)
}

fn default_coalesce_wait() -> Duration {
    Duration::from_secs(30)
}

mod optional_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Text(#[serde(with = "crate::units::duration_text")] Duration);
        Ok(Option::<Text>::deserialize(d)?.map(|text| text.0))
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => crate::units::duration_text::serialize(duration, s),
            None => s.serialize_none(),
        }
    }
}

impl CacheConfig {
    /// Problems a policy author should hear about at load time.
    pub fn problems(&self, store: &StoreConfig) -> Vec<String> {
        let mut problems = Vec::new();
        if self.ttl.is_zero() {
            problems.push("`ttl` must be more than 0s (remove the filter to cache nothing)".into());
        }
        if self.max_entry.0 == 0 {
            problems.push("`max_entry` must be more than 0".into());
        }
        if self.max_entry.0 > store.max_bytes.0 {
            problems.push(format!(
                "`max_entry` ({} bytes) is larger than the store's `cache.max_bytes` ({} bytes): such an entry could never be kept",
                self.max_entry.0, store.max_bytes.0
            ));
        }
        if u32::try_from(self.max_entry.0).is_err() {
            problems.push("`max_entry` must be below 4GiB".into());
        }
        if self.max_ttl.is_some_and(|max| max < self.ttl) {
            problems.push("`max_ttl` must be at least `ttl`".into());
        }
        problems
    }

    /// The TTL for a model: its own from `models`, else `ttl`. Zero means not cached.
    pub fn ttl_for(&self, model: Option<&str>) -> Duration {
        let Some(model) = model else {
            return self.ttl;
        };
        if let Some(ttl) = self.models.get(model) {
            return ttl.0;
        }
        self.models
            .iter()
            .filter(|(pattern, _)| pattern.contains(['*', '?']))
            .find(|(pattern, _)| Glob::new(pattern).matches(model))
            .map_or(self.ttl, |(_, ttl)| ttl.0)
    }

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl.unwrap_or(self.ttl)
    }

    /// A digest of the rules that decide what an entry holds and who may be served it (TTLs,
    /// `when`, `scope`, `max_entry`, `max_ttl`). Keys are made under it, so entries stored
    /// under other rules are never served; a reload purges a route when it changes.
    /// `charge_hits` and `coalesce_wait` only decide how entries are used: changing them keeps
    /// the entries.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest;
        let rules = CacheConfig {
            charge_hits: false,
            coalesce_wait: Duration::ZERO,
            ..self.clone()
        };
        // Serialising plain data (durations as text, a BTreeMap of models) cannot fail, and its
        // field order is fixed by the struct.
        let text = serde_json::to_vec(&rules).unwrap_or_default();
        sha2::Sha256::digest(&text).into()
    }
}

/// The top-level `cache:` block: the store all routes share (one per process).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Bound on the memory entries take (bodies as stored, plus their headers). Default 256MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Bodies larger than this are kept zstd-compressed. Default 16KiB.
    #[serde(default = "default_compress_above")]
    pub compress_above: ByteSize,
    /// A second level in Redis shared by every replica (needs `state.backend: redis`).
    #[serde(default)]
    pub shared: SharedTierConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            compress_above: default_compress_above(),
            shared: SharedTierConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedTierConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Longest wait for Redis after a local miss; past it the request goes upstream.
    #[serde(default = "default_read_timeout", with = "duration_text")]
    pub read_timeout: Duration,
}

impl Default for SharedTierConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            read_timeout: default_read_timeout(),
        }
    }
}

fn default_max_bytes() -> ByteSize {
    ByteSize(256 << 20)
}

fn default_compress_above() -> ByteSize {
    ByteSize(16 << 10)
}

fn default_read_timeout() -> Duration {
    Duration::from_millis(100)
}

impl StoreConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_bytes.0 == 0 {
            problems.push("`max_bytes` must be more than 0".into());
        }
        if self.shared.enabled && self.shared.read_timeout.is_zero() {
            problems.push("`shared.read_timeout` must be more than 0s".into());
        }
        problems
    }
}
