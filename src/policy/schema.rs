//! The policy as a user writes it: every field documented in `conf/sluice.yaml`, unknown fields
//! refused. Nothing here is used on the request path; [`super::compile`] turns it into the
//! internal [`super::Policy`] the proxy runs on (river's split between the two).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};
use serde_saphyr::Spanned;
use sluice_filters::auth::AuthSpec;
use sluice_filters::cache::StoreConfig as CacheStoreSpec;
use sluice_filters::limits::{OnError, Price, RequestLimits};
pub use sluice_filters::units::ByteSize;
use sluice_filters::FilterSpec;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub listen: Listen,
    /// Where limit counters live.
    #[serde(default)]
    pub state: StateSpec,
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<UpstreamSpec>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteSpec>>,
    /// What each tier may use (and, with the limits filter, how much).
    #[serde(default)]
    pub tiers: BTreeMap<String, Spanned<TierSpec>>,
    #[serde(default)]
    pub tenants: Vec<Spanned<TenantSpec>>,
    /// More keys, in a file of their own (e.g. a mounted Kubernetes Secret), reloaded with the
    /// policy when it changes. Relative paths are from the policy file's folder.
    #[serde(default)]
    pub keys_file: Option<Spanned<String>>,
    /// Limits over all callers together (same fields as a tier's `limits`).
    #[serde(default)]
    pub system_limits: Option<Spanned<RequestLimits>>,
    /// USD per million tokens by model, for budgets: `gpt-4o: { input: 2.5, output: 10 }`.
    /// Exact names win; patterns (`claude-*`) are tried in alphabetical order.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// The response cache's store, shared by every route with a `cache` filter (defaults apply
    /// when absent).
    #[serde(default)]
    pub cache: Option<Spanned<CacheStoreSpec>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Route names (glob patterns) this tier may call. Default: all.
    #[serde(default = "everything")]
    pub routes: Vec<String>,
    /// Model names (glob patterns) this tier may ask for. Default: all.
    #[serde(default = "everything")]
    pub models: Vec<String>,
    /// What each tenant of this tier may do, counted per tenant.
    #[serde(default)]
    pub limits: RequestLimits,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    pub tier: Spanned<String>,
    #[serde(default)]
    pub keys: Vec<Spanned<KeySpec>>,
}

/// A Sluice key, by its hash (`sluice keygen` prints both). In a keys file each entry also names
/// its tenant.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Keys file only: the tenant the key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `sha256:<64 hex digits>` of the key.
    pub hash: String,
    /// A note for people (who holds the key); shown in `/admin/policy`, never checked.
    #[serde(default)]
    pub label: Option<String>,
    /// RFC 3339 time (`2027-01-31T00:00:00Z`) or date (`2027-01-31`, midnight UTC) after which
    /// the key is refused as expired.
    #[serde(default)]
    pub expires: Option<String>,
    /// A revoked key is refused with a message saying so (a removed key is simply unknown).
    #[serde(default)]
    pub revoked: bool,
}

/// The keys file: `keys: [{ tenant, hash, label, expires, revoked }, …]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<Spanned<KeySpec>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    #[serde(default = "default_proxy_addr")]
    pub proxy: Spanned<String>,
    #[serde(default = "default_admin_addr")]
    pub admin: Spanned<String>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            proxy: default_proxy_addr(),
            admin: default_admin_addr(),
        }
    }
}

fn unspanned<T>(value: T) -> Spanned<T> {
    let nowhere = serde_saphyr::Location::UNKNOWN;
    Spanned::new(value, nowhere, nowhere)
}

fn default_proxy_addr() -> Spanned<String> {
    unspanned("127.0.0.1:8787".to_owned())
}

fn default_admin_addr() -> Spanned<String> {
    unspanned("127.0.0.1:9787".to_owned())
}

/// `state: { backend: memory }` (default: this process only) or
/// `state: { backend: redis, url: redis://…, on_error: fail_open }` (shared by all replicas).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    #[serde(default)]
    pub backend: StateBackend,
    /// Redis only: `redis://[:password@]host:port[/db]`; `${VAR}` allowed; never shown.
    #[serde(default)]
    pub url: Option<SecretTemplate>,
    /// Redis only: when Redis cannot be reached, admit uncounted (`fail_open`) or refuse with
    /// 503 (`fail_closed`).
    #[serde(default)]
    pub on_error: OnError,
    /// Redis only: longest wait for an answer before `on_error` applies.
    #[serde(default = "default_state_timeout")]
    pub timeout: Duration,
    /// Redis only: key prefix, so several deployments can share one Redis.
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
}

impl Default for StateSpec {
    fn default() -> Self {
        Self {
            backend: StateBackend::Memory,
            url: None,
            on_error: OnError::default(),
            timeout: default_state_timeout(),
            prefix: default_state_prefix(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    #[default]
    Memory,
    Redis,
}

fn default_state_timeout() -> Duration {
    Duration(std::time::Duration::from_millis(250))
}

fn default_state_prefix() -> String {
    "sluice".to_owned()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Worker threads of the proxy listener.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long SIGTERM waits for in-flight requests (open streams included) before exiting.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// Idle upstream connections kept for reuse, over all upstreams.
    #[serde(default = "default_pool_size")]
    pub upstream_pool_size: usize,
    /// How long a downstream client may take between two reads of its request body.
    #[serde(default = "default_client_body_timeout")]
    pub client_body_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            drain_timeout: default_drain_timeout(),
            upstream_pool_size: default_pool_size(),
            client_body_timeout: default_client_body_timeout(),
        }
    }
}

fn default_threads() -> usize {
    2
}
fn default_drain_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}
fn default_pool_size() -> usize {
    256
}
fn default_client_body_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}

/// The API an upstream speaks: decides its credential header, its error shape and path rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    AzureOpenai,
    Anthropic,
    OpenaiCompatible,
}

impl ProviderKind {
    /// The name the policy writes.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::AzureOpenai => "azure_openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible => "openai_compatible",
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub provider: ProviderKind,
    /// `https://host[:port][/base/path]`; `http://` for local servers. `${VAR}` allowed.
    pub base_url: Spanned<String>,
    /// Provider keys. With none, the caller's own credential passes through unchanged.
    #[serde(default)]
    pub keys: Vec<SecretTemplate>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Extra headers sent upstream (e.g. `OpenAI-Organization`). Values may hold secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretTemplate>,
    #[serde(default)]
    pub tls: UpstreamTls,
    /// Azure OpenAI only: `api-version` for OpenAI-style paths rewritten to deployments.
    #[serde(default)]
    pub api_version: Option<Spanned<String>>,
    /// Azure OpenAI only: model name → deployment name (a model not listed is its own deployment).
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
}

/// TLS to an `https://` upstream. Certificates are always verified (chain and host name).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM file of the CA certificates to trust instead of the system's (a private CA in front
    /// of an internal model server).
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake.
    #[serde(default = "default_connect")]
    pub connect: Duration,
    /// From the request sent to the response head received (a model thinking counts here).
    #[serde(default = "default_first_byte")]
    pub first_byte: Duration,
    /// Longest silence between two body chunks once the response started.
    #[serde(default = "default_idle")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            first_byte: default_first_byte(),
            idle: default_idle(),
        }
    }
}

fn default_connect() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}
fn default_first_byte() -> Duration {
    Duration(std::time::Duration::from_secs(120))
}
fn default_idle() -> Duration {
    Duration(std::time::Duration::from_secs(120))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    /// What replaces the matched path prefix before the upstream's base path is put in front.
    /// Default: the prefix is stripped.
    #[serde(default)]
    pub rewrite_prefix: String,
    /// The upstream this route sends to.
    pub upstream: Spanned<String>,
    /// Largest request body accepted, e.g. `8MiB`; larger gets 413 before the rest is read.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// The route's filters, in order. Default: `[request_id: {}]`.
    #[serde(default)]
    pub filters: Option<Vec<FilterSpec>>,
    /// `required` (a Sluice key; the default when the policy has tenants) or `passthrough`
    /// (`{ mode: passthrough, tenant_header: x-tenant }`: no Sluice key, the caller's provider key
    /// goes through).
    #[serde(default)]
    pub auth: Option<AuthSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Matches whole path segments: `/openai` matches `/openai` and `/openai/v1/…`, not `/openaix`.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Request hosts (without port) this route answers; empty matches any host.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn default_prefix() -> String {
    "/".to_owned()
}

fn default_max_body() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}

/// A string that may hold a secret once interpolated: kept as written (with `${VAR}`), shown
/// nowhere. Its `Debug` and `Serialize` print `<redacted>`.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct SecretTemplate(pub Spanned<String>);

impl std::fmt::Debug for SecretTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for SecretTemplate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// A duration written as `30s`, `250ms`, `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(self.0))
    }
}
