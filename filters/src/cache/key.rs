//! What makes two requests the same for the cache: the key, the body's canonical form, and the
//! caller's cache controls.
//!
//! The key is SHA-256 over length-prefixed fields — a version tag, the scope, the caller's
//! credential fingerprint (when the provider, not Sluice, authenticates callers), the route, the
//! upstream and its API, the method, path and query, the stream flag, the request headers that
//! change an answer, and the canonical body — and the scope itself is kept beside the digest
//! and compared on every lookup, so two tenants never share an entry even if their digests
//! collided.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::auth::CredentialHeader;
use crate::RequestHeader;

/// Top-level body fields that never change an answer, left out of the key so that requests
/// differing only there share an entry: `user` and `safety_identifier` (end-user ids for abuse
/// monitoring), `metadata` (tags for the caller's own dashboards; Anthropic's `user_id`),
/// `prompt_cache_key` (a routing hint for the provider's prompt cache).
pub const IGNORED_BODY_FIELDS: [&str; 4] =
    ["user", "safety_identifier", "metadata", "prompt_cache_key"];

/// Request headers that change an answer, so they are part of the key (lower-case names).
pub const KEYED_HEADERS: [&str; 5] = [
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "openai-organization",
    "openai-project",
];

/// The callers who may share entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One tenant's entries.
    Tenant(Arc<str>),
    /// Every caller of the route (`scope: shared`, or a route with no tenants).
    Shared,
}

impl Scope {
    /// A tag byte and the name, for hashing and for the shared tier's records.
    pub(crate) fn parts(&self) -> (u8, &str) {
        match self {
            Scope::Tenant(name) => (1, name),
            Scope::Shared => (2, ""),
        }
    }

    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::Tenant(name) => Some(name),
            Scope::Shared => None,
        }
    }
}

/// An entry's identity: the scope in clear (compared on lookup) and the digest of everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub scope: Scope,
    pub digest: [u8; 32],
}

/// Everything the key is made of, borrowed from the exchange.
pub struct KeyInput<'a> {
    pub scope: &'a Scope,
    pub route: &'a str,
    pub upstream: &'a str,
    pub api: &'a str,
    pub request: &'a RequestHeader,
    /// Hash the caller's provider credential into the key: the provider authenticates these
    /// callers, so an answer is only for the credential it was given to.
    pub credential_scoped: bool,
    pub stream: bool,
    pub body: &'a Value,
    /// The route's cache rules ([`CacheConfig::fingerprint`](super::CacheConfig::fingerprint)).
    /// A reload that changes them purges the route, but a miss already in flight under the old
    /// rules stores its answer after that purge; with the rules in the key, that late entry is
    /// never found by a request under the new rules (it ages out or is evicted instead).
    pub rules: &'a [u8; 32],
}

const KEY_VERSION: &[u8] = b"sluice-cache-v1";

/// Length-prefixed fields into one hasher: no two different field lists give the same bytes.
struct Fields(Sha256);

impl Fields {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }
}

impl std::io::Write for Fields {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CacheKey {
    pub fn new(input: &KeyInput<'_>) -> CacheKey {
        let mut fields = Fields(Sha256::new());
        fields.field(KEY_VERSION);
        fields.field(input.rules);
        let (tag, name) = input.scope.parts();
        fields.field(&[tag]);
        fields.field(name.as_bytes());
        if input.credential_scoped {
            // Only the credential's own hash enters the key, never the credential.
            for header in [
                CredentialHeader::Bearer,
                CredentialHeader::XApiKey,
                CredentialHeader::ApiKey,
            ] {
                let value = input.request.headers.get(header.name());
                let print = value.map(|v| Sha256::digest(v.as_bytes()));
                fields.field(print.as_deref().unwrap_or_default());
            }
        } else {
            fields.field(b"-");
        }
        fields.field(input.route.as_bytes());
        fields.field(input.upstream.as_bytes());
        fields.field(input.api.as_bytes());
        fields.field(input.request.method.as_str().as_bytes());
        let path = input
            .request
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str());
        fields.field(path.as_bytes());
        fields.field(&[u8::from(input.stream)]);
        for name in KEYED_HEADERS {
            let values = input.request.headers.get_all(name);
            fields.field(&(values.iter().count() as u64).to_le_bytes());
            for value in values {
                fields.field(value.as_bytes());
            }
        }
        // The body comes last: its canonical form is self-delimiting JSON.
        fields.field(b"body");
        write_canonical(input.body, &mut fields, true);
        CacheKey {
            scope: input.scope.clone(),
            digest: fields.0.finalize().into(),
        }
    }

    pub fn hex(&self) -> String {
        hex::encode(self.digest)
    }
}

/// Writes JSON with object keys sorted and no insignificant whitespace; at the top level the
/// fields of [`IGNORED_BODY_FIELDS`] are left out. Strings and numbers are written as serde_json
/// writes them (escapes normalised; `1` and `1.0` stay different, as a provider may treat them
/// differently).
fn write_canonical(value: &Value, out: &mut impl std::io::Write, top: bool) {
    // Writing into a hasher or a Vec cannot fail.
    let _ = match value {
        // serde_json's `Map` is a `BTreeMap` here (its `preserve_order` feature is off), so
        // keys already come sorted; `everything_that_changes_the_answer_changes_the_key`
        // fails if that feature is ever switched on.
        Value::Object(map) => {
            let _ = out.write_all(b"{");
            let kept = map
                .iter()
                .filter(|(key, _)| !(top && IGNORED_BODY_FIELDS.contains(&key.as_str())));
            for (i, (key, item)) in kept.enumerate() {
                if i > 0 {
                    let _ = out.write_all(b",");
                }
                let _ = serde_json::to_writer(&mut *out, key);
                let _ = out.write_all(b":");
                write_canonical(item, out, false);
            }
            out.write_all(b"}")
        }
        Value::Array(items) => {
            let _ = out.write_all(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    let _ = out.write_all(b",");
                }
                write_canonical(item, out, false);
            }
            out.write_all(b"]")
        }
        scalar => serde_json::to_writer(&mut *out, scalar).map_err(std::io::Error::other),
    };
}

/// The canonical form as bytes (what the key hashes), for tests and inspection.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out, true);
    out
}

/// Whether a request's answer is meant to repeat: `temperature` 0 (top level, as OpenAI,
/// Anthropic and Bedrock InvokeModel write it, or in Bedrock Converse's `inferenceConfig`), or
/// a fixed integer `seed`.
pub fn is_deterministic(body: &Value) -> bool {
    let zero = |temperature: Option<&Value>| {
        temperature
            .and_then(Value::as_f64)
            .is_some_and(|t| t == 0.0)
    };
    let zero_temperature =
        zero(body.get("temperature")) || zero(body.pointer("/inferenceConfig/temperature"));
    let seeded = body
        .get("seed")
        .is_some_and(|seed| seed.is_i64() || seed.is_u64());
    zero_temperature || seeded
}

/// The header a caller sets to choose its entry's TTL (capped by the route's `max_ttl`).
pub const TTL_HEADER: HeaderName = HeaderName::from_static("x-sluice-cache-ttl");

/// The caller's cache controls: `Cache-Control: no-cache | no-store | max-age=N` and
/// `x-sluice-cache-ttl: <duration>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controls {
    /// Do not answer from the cache; store the fresh answer.
    pub no_cache: bool,
    /// Neither answer from nor store into the cache.
    pub no_store: bool,
    /// Accept an entry at most this old.
    pub max_age: Option<Duration>,
    /// TTL asked for the entry this request stores.
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("Cache-Control max-age must be a whole number of seconds, not {0:?}")]
    MaxAge(String),
    #[error("Cache-Control is not valid text")]
    NotText,
    #[error("x-sluice-cache-ttl must be a duration such as 10m or 30s, not {0:?}")]
    Ttl(String),
}

impl Controls {
    /// Reads the controls; unknown `Cache-Control` directives are ignored (RFC 9111 §5.2).
    pub fn parse(request: &RequestHeader) -> Result<Controls, ControlError> {
        let mut controls = Controls::default();
        for value in request.headers.get_all(http::header::CACHE_CONTROL) {
            let text = value.to_str().map_err(|_| ControlError::NotText)?;
            for directive in text.split(',') {
                let directive = directive.trim();
                let (name, argument) = match directive.split_once('=') {
                    Some((name, argument)) => (name.trim(), Some(argument.trim())),
                    None => (directive, None),
                };
                if name.eq_ignore_ascii_case("no-cache") {
                    controls.no_cache = true;
                } else if name.eq_ignore_ascii_case("no-store") {
                    controls.no_store = true;
                } else if name.eq_ignore_ascii_case("max-age") {
                    let raw = argument.unwrap_or("");
                    let seconds = raw.trim_matches('"');
                    let valid = !seconds.is_empty() && seconds.bytes().all(|b| b.is_ascii_digit());
                    // Beyond u64 is "forever" (RFC 9111 §1.2.2).
                    let age = valid.then(|| seconds.parse::<u64>().unwrap_or(u64::MAX));
                    let age = age.ok_or_else(|| ControlError::MaxAge(raw.to_owned()))?;
                    controls.max_age = Some(Duration::from_secs(age));
                }
            }
        }
        if let Some(value) = request.headers.get(TTL_HEADER) {
            let text = value.to_str().unwrap_or_default();
            let ttl = humantime::parse_duration(text.trim())
                .map_err(|_| ControlError::Ttl(text.to_owned()))?;
            controls.ttl = Some(ttl);
        }
        Ok(controls)
    }
}
