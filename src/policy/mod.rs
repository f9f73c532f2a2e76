//! The policy: loading (parse → interpolate → validate → compile), the compiled form the proxy
//! runs on, and the store that swaps it atomically on reload.

mod compile;
mod error;
mod interpolate;
pub mod schema;
mod store;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sluice_filters::auth::Directory;
use sluice_filters::cache::{CacheConfig, CacheCounters, CacheStore, SharedTier, StoreConfig};
use sluice_filters::limits::{LimitStore, OnError, Prices, RedisCounters};
use sluice_filters::Chain;

use crate::forward::ca::CertificateAuthority;
use crate::forward::rules::{CaOrigin, ForwardPolicy};
use crate::telemetry::metrics::RouteMetrics;
use crate::telemetry::sla::SlaRule;
use crate::telemetry::stats::{Series, StatsRegistry};
use crate::telemetry::traces::{OtlpSettings, Tracer};
use crate::telemetry::Metrics;
use crate::upstream::health::HealthRegistry;
use crate::upstream::{ProviderKind, ResolveOverrides, Upstream};
pub use compile::MissingCa;
pub use error::{PolicyError, PolicyErrors};
use schema::{HedgeAfter, RetryOn};
use sluice_filters::glob::Glob;
pub use store::{PolicyStore, ReloadOutcome};
pub use watch::PolicyWatcher;

/// Largest policy file accepted: room for about 300,000 tenants written one per line; beyond
/// that, tenants' keys belong in a `keys_file`.
const MAX_POLICY_BYTES: u64 = 16 * 1024 * 1024;

/// Largest file a policy may name (a keys file, a provider key, a CA): a million keys in a keys
/// file is about 90 MB.
const MAX_REFERENCED_BYTES: u64 = 128 * 1024 * 1024;

/// Reads a whole file, refusing it beyond `limit` bytes without reading more than that.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "the file is larger than {limit} bytes, the most accepted"
        ));
    }
    Ok(bytes)
}

/// A compiled, immutable policy. Requests hold an `Arc` of the one they started with.
#[derive(Debug)]
pub struct Policy {
    /// SHA-256 of the file's bytes, hex.
    pub hash: String,
    pub loaded_at: SystemTime,
    pub source: PathBuf,
    pub listen: ListenAddrs,
    pub server: ServerRuntime,
    pub routes: Vec<Route>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The policy as written, secrets shown as `<redacted>`, for `GET /admin/policy`.
    /// Kept as JSON text: as a `serde_json::Value` a 100,000-tenant policy took about 70 MiB.
    pub redacted: Box<serde_json::value::RawValue>,
    /// Tiers, tenants and keys, shared by the routes' auth filters.
    pub directory: Arc<Directory>,
    /// The files this policy was made from (the policy, its keys file): what reload watches.
    pub watched: Vec<PathBuf>,
    /// The shared counters, when `state.backend` is `redis`.
    pub redis: Option<Arc<RedisCounters>>,
    /// The response cache (it outlives the policy: see [`SharedState::cache`]).
    pub cache: Arc<CacheStore>,
    /// The forward listener's rules and CA, when `listen.forward` is set.
    pub forward: Option<Arc<ForwardPolicy>>,
    /// `resolve:`: addresses used instead of DNS for upstreams and tunnels.
    pub resolve: ResolveOverrides,
    pub telemetry: TelemetryPolicy,
    pub sla: Vec<SlaRule>,
    /// USD per million tokens, by model (also the limits filter's).
    pub prices: Arc<Prices>,
}

/// What the exchange needs of `telemetry` on every request.
#[derive(Debug)]
pub struct TelemetryPolicy {
    pub tenant_labels: bool,
    /// The windows of `/admin/stats`.
    pub stats_windows: Vec<Duration>,
    /// Log request bodies and response text in the access log.
    pub log_bodies: bool,
    pub otlp: Option<OtlpSettings>,
    pub models: ModelLabels,
}

/// Model names as metric labels: the ones the policy names, patterns it names for the rest
/// (`claude-*`), and `other` — never whatever a caller wrote.
#[derive(Debug, Default)]
pub struct ModelLabels {
    exact: std::collections::HashSet<String>,
    patterns: Vec<(Glob, Arc<str>)>,
}

impl ModelLabels {
    pub fn add(&mut self, model: &str) {
        if model.contains(['*', '?']) {
            if !self.patterns.iter().any(|(_, p)| &**p == model) {
                self.patterns.push((Glob::new(model), model.into()));
            }
        } else {
            self.exact.insert(model.to_owned());
        }
    }

    pub fn label<'a>(&'a self, model: Option<&'a str>) -> &'a str {
        let Some(model) = model else { return "" };
        if self.exact.contains(model) {
            return model;
        }
        self.patterns
            .iter()
            .find(|(glob, _)| glob.matches(model))
            .map_or("other", |(_, pattern)| pattern)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddrs {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// HTTPS_PROXY mode, when set.
    pub forward: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRuntime {
    pub threads: usize,
    pub drain_timeout: Duration,
    pub upstream_pool_size: usize,
    pub upstream_idle_timeout: Duration,
    pub client_body_timeout: Duration,
    pub max_header_bytes: u64,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// Lower-case host names; empty matches any host.
    pub hosts: Vec<String>,
    /// Without a trailing slash; empty for the root prefix.
    pub path_prefix: String,
    pub rewrite_prefix: String,
    /// The API every target speaks: the caller's credential header and Sluice's error shape.
    pub provider: ProviderKind,
    pub targets: Targets,
    pub retry: RetryPolicy,
    /// Send to the next target too when the first has not answered by then.
    pub hedge: Option<HedgeAfter>,
    pub max_body: u64,
    pub chain: Chain,
    /// The route's cache rules, when it has a `cache` filter: a reload that changes them
    /// purges the route's entries.
    pub cache_rules: Option<CacheConfig>,
    pub metrics: RouteMetrics,
    /// Rolling latency and success, for `/admin/stats` and SLA rules.
    pub stats: Arc<Series>,
}

/// Where a route sends, in fallback order.
#[derive(Debug, Default)]
pub struct Targets {
    pub default: Vec<Target>,
    pub by_model: ModelTargets,
}

impl Targets {
    /// The fallback list for a request asking for `model`.
    pub fn for_model(&self, model: Option<&str>) -> &[Target] {
        model
            .and_then(|model| self.by_model.get(model))
            .unwrap_or(&self.default)
    }

    pub fn all(&self) -> impl Iterator<Item = &Target> {
        self.default.iter().chain(self.by_model.lists().flatten())
    }

    pub fn longest_list(&self) -> usize {
        self.by_model
            .lists()
            .map(Vec::len)
            .chain([self.default.len()])
            .max()
            .unwrap_or(1)
    }

    /// The API family of the targets (validated to be one).
    pub fn provider(&self) -> ProviderKind {
        self.all()
            .next()
            .map_or(ProviderKind::Openai, |t| t.upstream.provider)
    }
}

/// Per-model target lists: exact names first, then patterns in the order added.
#[derive(Debug, Default)]
pub struct ModelTargets {
    exact: std::collections::HashMap<String, Vec<Target>>,
    patterns: Vec<(Glob, Vec<Target>)>,
}

impl ModelTargets {
    pub fn add(&mut self, model: &str, targets: Vec<Target>) {
        if model.contains(['*', '?']) {
            self.patterns.push((Glob::new(model), targets));
        } else {
            self.exact.insert(model.to_owned(), targets);
        }
    }

    fn get(&self, model: &str) -> Option<&[Target]> {
        self.exact.get(model).map(Vec::as_slice).or_else(|| {
            self.patterns
                .iter()
                .find(|(glob, _)| glob.matches(model))
                .map(|(_, targets)| targets.as_slice())
        })
    }

    fn lists(&self) -> impl Iterator<Item = &Vec<Target>> {
        self.exact
            .values()
            .chain(self.patterns.iter().map(|(_, targets)| targets))
    }
}

/// One place a request may go: an upstream, and the model to ask it for instead of the
/// caller's (a fallback to a cheaper model, an Azure deployment's model).
#[derive(Debug, Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub model: Option<Arc<str>>,
}

/// A route's retry rules, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub attempt_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_after_max: Duration,
}

impl RetryPolicy {
    /// Whether a response status is tried again.
    pub fn retries_status(&self, status: u16) -> bool {
        self.on.iter().any(|on| match on {
            RetryOn::Status(s) => *s == status,
            RetryOn::ServerErrors => (500..=599).contains(&status),
            RetryOn::ClientErrors => (400..=499).contains(&status),
            RetryOn::ConnectError | RetryOn::FirstByteTimeout => false,
        })
    }

    pub fn retries(&self, on: RetryOn) -> bool {
        self.on.contains(&on)
    }
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = self.hosts.is_empty()
            || host.is_some_and(|host| self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)));
        host_ok && self.prefix_len(path).is_some()
    }

    /// Length of the matched prefix, on a path-segment boundary.
    fn prefix_len(&self, path: &str) -> Option<usize> {
        let rest = path.strip_prefix(self.path_prefix.as_str())?;
        (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
            .then_some(self.path_prefix.len())
    }

    /// The upstream path: the matched prefix replaced by `rewrite_prefix`, behind the upstream's
    /// base path. The query string is kept as sent.
    pub fn upstream_path(&self, upstream: &Upstream, path_and_query: &str) -> String {
        let rest = &path_and_query[self.prefix_len(path_and_query).unwrap_or(0)..];
        let base = &upstream.base_path;
        let mut out =
            String::with_capacity(base.len() + self.rewrite_prefix.len() + rest.len() + 1);
        out.push_str(base);
        out.push_str(&self.rewrite_prefix);
        if !rest.is_empty() && !rest.starts_with('/') && !out.ends_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        out
    }
}

impl Policy {
    /// The first route, in file order, whose hosts and path prefix match.
    pub fn route_for(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.matches(host, path))
    }

    /// One line for `sluice check` and the log.
    pub fn summary(&self) -> String {
        let forward = match (self.listen.forward, &self.forward) {
            (Some(addr), Some(forward)) => match &forward.ca_origin {
                CaOrigin::Files => {
                    format!(
                        ", forward {addr} (CA sha256 {})",
                        &forward.ca.fingerprint[..12]
                    )
                }
                CaOrigin::ToBeGenerated(path) => {
                    format!(
                        ", forward {addr} (CA generated at startup into {})",
                        path.display()
                    )
                }
            },
            _ => String::new(),
        };
        format!(
            "{} routes, {} upstreams, {} keys, proxy {}, admin {}{forward}, sha256 {}",
            self.routes.len(),
            self.upstreams.len(),
            self.directory.key_count(),
            self.listen.proxy,
            self.listen.admin,
            &self.hash[..12]
        )
    }
}

/// State that outlives every policy: counters are kept across reloads, so a reload that leaves
/// a tier's limits unchanged does not reset its usage (and a changed limit applies to the
/// usage already counted).
#[derive(Debug, Default)]
pub struct SharedState {
    pub limits: Arc<LimitStore>,
    /// Counters must not restart at zero on a reload either.
    pub metrics: Arc<Metrics>,
    /// Circuit breakers, retry budgets, key cooldowns: a reload keeps them.
    pub health: HealthRegistry,
    /// Rolling statistics of routes and upstreams.
    pub stats: StatsRegistry,
    /// Set once, when the server starts (`telemetry.otlp` applies at a restart).
    pub tracer: std::sync::OnceLock<Tracer>,
    /// The Redis counters in use, by the settings that made them (a reload that keeps the
    /// settings keeps the connection).
    redis: std::sync::Mutex<Option<(RedisSettings, Arc<RedisCounters>)>>,
    /// The response cache, by the settings that made it: a reload that keeps the top-level
    /// `cache` block (and the Redis connection) keeps every entry.
    cache: std::sync::Mutex<Option<(StoreConfig, Arc<CacheStore>)>>,
    /// The cache's counters, kept even when the store is rebuilt, so they only go up.
    pub cache_counters: Arc<CacheCounters>,
    /// The forward listener's CA, by the bytes of its files: a reload that keeps them keeps
    /// the certificates already minted.
    certificate_authority: std::sync::Mutex<Option<(Vec<u8>, Arc<CertificateAuthority>)>>,
    /// What a load does when the CA files are missing (see [`MissingCa`]).
    missing_ca: std::sync::Mutex<MissingCa>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    pub on_error: OnError,
}

impl SharedState {
    /// The counters for these settings: the existing ones if unchanged.
    pub fn redis(&self, settings: &RedisSettings) -> Result<Arc<RedisCounters>, String> {
        let mut slot = self.redis.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((current, counters)) = slot.as_ref() {
            if current == settings {
                return Ok(counters.clone());
            }
        }
        let counters = RedisCounters::new(
            &settings.url,
            &settings.prefix,
            settings.timeout,
            settings.on_error,
            self.metrics.filters.limits_store_errors.clone(),
        )
        .map_err(|e| format!("invalid Redis URL ({:?})", e.kind()))?;
        let counters = Arc::new(counters);
        *slot = Some((settings.clone(), counters.clone()));
        Ok(counters)
    }
}

impl SharedState {
    /// The cache store for these settings: the existing one (entries and all) if unchanged.
    pub fn cache(
        &self,
        config: &StoreConfig,
        redis: Option<&Arc<RedisCounters>>,
    ) -> Arc<CacheStore> {
        let mut slot = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let tier_redis = redis.filter(|_| config.shared.enabled);
        if let Some((current, store)) = slot.as_ref() {
            let same_redis = match (store.shared(), tier_redis) {
                (Some(tier), Some(redis)) => tier.uses(redis),
                (None, None) => true,
                _ => false,
            };
            if current == config && same_redis {
                return store.clone();
            }
        }
        let shared = tier_redis.map(|redis| {
            Arc::new(SharedTier::new(
                redis.clone(),
                config.shared.read_timeout,
                self.cache_counters.clone(),
            ))
        });
        let store = Arc::new(CacheStore::new(
            config.clone(),
            self.cache_counters.clone(),
            shared,
        ));
        *slot = Some((config.clone(), store.clone()));
        store
    }
}

/// Reads, parses and compiles a policy file, with `${VAR}` taken from the process environment.
pub fn load(path: &Path, shared: &SharedState) -> Result<Policy, PolicyErrors> {
    let file = path.display().to_string();
    let fail = |message: String| PolicyErrors {
        file: file.clone(),
        errors: vec![PolicyError::new("", message)],
    };
    let bytes = read_limited(path, MAX_POLICY_BYTES).map_err(fail)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "the file is not UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    compile::compile_text(&text, path, &|name| std::env::var(name).ok(), shared).map_err(|errors| {
        PolicyErrors {
            file: file.clone(),
            errors,
        }
    })
}

/// Compiles policy text (no file read, `${VAR}` from `env`): for tests and the fuzz targets.
pub use compile::compile_text;

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Result<Policy, Vec<PolicyError>> {
        let env = |name: &str| (name == "KEY").then(|| "sk-1".to_owned());
        compile_text(text, Path::new("test.yaml"), &env, &SharedState::default())
    }

    const POLICY: &str = r#"
upstreams:
  openai: { provider: openai, base_url: "https://api.openai.com/", keys: ["${KEY}"] }
  proxied: { provider: openai_compatible, base_url: "http://127.0.0.1:8000/base/" }
routes:
  - { name: by-host, match: { hosts: [API.openai.com], path_prefix: / }, upstream: openai }
  - { name: openai, match: { path_prefix: /openai/ }, upstream: openai }
  - { name: local, match: { path_prefix: /local }, rewrite_prefix: /v1, upstream: proxied }
"#;

    #[test]
    fn routes_match_by_host_and_whole_segments() {
        let policy = compile(POLICY).unwrap();
        let name = |host, path| policy.route_for(host, path).map(|r| &*r.name);
        assert_eq!(name(Some("api.openai.com"), "/v1/models"), Some("by-host"));
        assert_eq!(name(Some("localhost"), "/openai/v1/models"), Some("openai"));
        assert_eq!(name(None, "/openai"), Some("openai"));
        assert_eq!(name(None, "/openai?x=1"), Some("openai"));
        assert_eq!(name(None, "/openaix/v1"), None);
        assert_eq!(name(None, "/local/chat/completions"), Some("local"));
    }

    #[test]
    fn upstream_paths_are_rewritten_behind_the_base_path() {
        let policy = compile(POLICY).unwrap();
        let path = |name: &str, path: &str| {
            let route = policy.routes.iter().find(|r| &*r.name == name).unwrap();
            route.upstream_path(&route.targets.default[0].upstream, path)
        };
        assert_eq!(
            path("openai", "/openai/v1/chat/completions?a=b"),
            "/v1/chat/completions?a=b"
        );
        assert_eq!(path("openai", "/openai"), "/");
        assert_eq!(path("by-host", "/v1/models"), "/v1/models");
        assert_eq!(
            path("local", "/local/chat/completions"),
            "/base/v1/chat/completions"
        );
        let upstream = &policy.upstreams["proxied"];
        assert_eq!(
            (
                upstream.tls,
                upstream.port,
                upstream.authority.to_str().unwrap()
            ),
            (false, 8000, "127.0.0.1:8000")
        );
        let openai = &policy.upstreams["openai"];
        assert_eq!(
            (openai.tls, openai.port, openai.authority.to_str().unwrap()),
            (true, 443, "api.openai.com")
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_and_the_redacted_view() {
        let policy = compile(POLICY).unwrap();
        let debug = format!("{policy:?}");
        assert!(!debug.contains("sk-1"), "{debug}");
        let shown = policy.redacted.to_string();
        assert!(
            !shown.contains("sk-1") && !shown.contains("${KEY}"),
            "{shown}"
        );
        assert_eq!(
            policy.upstreams["openai"].keys.get(0).credential,
            "Bearer sk-1"
        );
    }

    #[test]
    fn all_semantic_errors_come_in_one_pass() {
        let errors = compile(
            r#"
upstreams:
  a: { provider: anthropic, base_url: "https://x", api_version: "1", keys: ["${MISSING}", ""] }
routes:
  - { name: r, match: { path_prefix: nope }, upstream: zzz, max_body: 0, rewrite_prefix: v1 }
"#,
        )
        .unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let joined = text.join("\n");
        for expected in [
            "environment variable `MISSING` is not set",
            "the key is empty",
            "apply to provider azure_openai only",
            "must start with /",
            "must be empty or start with /",
            "must be more than 0",
            "unknown upstream `zzz`",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
        assert!(errors.iter().all(|e| e.line.is_some()), "{joined}");
    }

    #[test]
    fn structural_errors_carry_the_yaml_path_of_their_line() {
        let text = "upstreams:\n  a:\n    provider: openai\n    base_url: http://x\nroutes:\n  - name: first\n    match: { path_prefix: /a }\n    upstream: a\n  - name: second\n    match:\n      path_prefix: /b\n      colour: blue\n    upstream: a\n";
        let errors = compile(text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(12));
        assert_eq!(errors[0].path, "routes[1].match.colour", "{:?}", errors[0]);
        let bad_duration = "upstreams:\n  a:\n    provider: openai\n    base_url: http://x\n    timeouts:\n      connect: soon\n";
        let errors = compile(bad_duration).unwrap_err();
        assert_eq!(
            errors[0].path, "upstreams.a.timeouts.connect",
            "{:?}",
            errors[0]
        );
    }

    fn compile_with(text: &str, vars: &[(&str, &str)]) -> Result<Policy, Vec<PolicyError>> {
        let env = |name: &str| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| value.to_string())
        };
        compile_text(text, Path::new("test.yaml"), &env, &SharedState::default())
    }

    const BEDROCK: &str = r#"
upstreams:
  bedrock:
    provider: bedrock
    region: us-west-2
    aws: { access_key_id: "${AKID}", secret_access_key: "${SECRET}", session_token: "${TOKEN:-}" }
  local: { provider: bedrock, region: "${REGION}", base_url: "http://127.0.0.1:9900/base" }
routes:
  - { name: bedrock, match: { path_prefix: /bedrock }, upstream: bedrock }
  - { name: local, match: { path_prefix: /local }, upstream: local }
tiers:
  t: {}
tenants:
  - { name: a, tier: t, keys: [{ hash: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }] }
"#;

    #[test]
    fn bedrock_upstreams_sign_with_policy_or_environment_credentials() {
        let vars = [
            ("AKID", "AKIDPOLICY"),
            ("SECRET", "policy-secret-value"),
            ("REGION", "eu-central-1"),
            ("AWS_ACCESS_KEY_ID", "AKIDENVIRONMENT"),
            ("AWS_SECRET_ACCESS_KEY", "environment-secret-value"),
            ("AWS_SESSION_TOKEN", "environment-session-token"),
        ];
        // `auth: required` (the default with tenants) is fine: Sluice signs with its own
        // credentials, so no Sluice key can reach the provider.
        let policy = compile_with(BEDROCK, &vars).unwrap();
        let bedrock = &policy.upstreams["bedrock"];
        assert_eq!(
            (bedrock.tls, bedrock.host.as_str(), bedrock.port),
            (true, "bedrock-runtime.us-west-2.amazonaws.com", 443)
        );
        assert!(bedrock.has_own_credentials());
        let local = &policy.upstreams["local"];
        assert_eq!(
            (local.tls, local.port, local.base_path.as_str()),
            (false, 9900, "/base")
        );
        let debug = format!("{policy:?}");
        let shown = policy.redacted.to_string();
        for secret in [
            "AKIDPOLICY",
            "policy-secret-value",
            "AKIDENVIRONMENT",
            "environment-secret-value",
            "environment-session-token",
            "${SECRET}",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(debug.contains("eu-central-1"), "{debug}");
    }

    #[test]
    fn missing_aws_credentials_are_named() {
        let errors = compile_with(BEDROCK, &[("AKID", "a"), ("REGION", "us-east-1")]).unwrap_err();
        let joined: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let joined = joined.join("\n");
        assert!(
            joined.contains(
                "upstreams.bedrock.aws.secret_access_key: environment variable `SECRET` is not set"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("upstreams.local: no AWS credentials: give the upstream an `aws:` block (access_key_id, secret_access_key) or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in Sluice's environment"),
            "{joined}"
        );
        let only_secret = compile_with(
            BEDROCK,
            &[
                ("AKID", "a"),
                ("SECRET", "s"),
                ("REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", "a"),
            ],
        )
        .unwrap_err();
        assert_eq!(only_secret.len(), 1, "{only_secret:?}");
        assert!(only_secret[0]
            .message
            .ends_with("set AWS_SECRET_ACCESS_KEY in Sluice's environment"));
        let block_without_secret = "upstreams:\n  b:\n    provider: bedrock\n    region: us-east-1\n    aws: { access_key_id: a }\n";
        let errors = compile_with(block_without_secret, &[]).unwrap_err();
        assert!(
            errors[0].message.contains("secret_access_key"),
            "{errors:?}"
        );
    }

    #[test]
    fn bedrock_fields_are_checked() {
        let errors = compile_with(
            r#"
upstreams:
  a: { provider: bedrock, keys: ["k"], aws: { access_key_id: a, secret_access_key: "" } }
  b: { provider: bedrock, region: "US East", aws: { access_key_id: a, secret_access_key: s } }
  c: { provider: openai, base_url: "https://x", region: us-east-1, aws: { access_key_id: a, secret_access_key: s } }
  d: { provider: openai }
routes:
  - { name: r, match: { path_prefix: / }, upstream: a }
"#,
            &[],
        )
        .unwrap_err();
        let joined: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let joined = joined.join("\n");
        for expected in [
            "upstreams.a.region: is required for provider bedrock",
            "upstreams.a.keys: bedrock signs its requests with AWS credentials",
            "upstreams.a.aws.secret_access_key: is empty",
            "upstreams.b.region: `US East` is not an AWS region",
            "upstreams.c.region: applies to provider bedrock only",
            "upstreams.c.aws: applies to provider bedrock only",
            "upstreams.d.base_url: is required (only bedrock has a default)",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
    }

    #[test]
    fn an_empty_policy_is_an_error() {
        let errors = compile("{}").unwrap_err();
        assert!(errors[0].message.contains("no routes"));
    }
}
