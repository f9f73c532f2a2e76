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

mod forward;
pub use forward::{CaSpec, ForwardSpec, ResolveSpec};

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
    /// What Sluice reports about itself.
    #[serde(default)]
    pub telemetry: TelemetrySpec,
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
    /// HTTPS_PROXY mode: what the forward listener intercepts, tunnels or refuses, and its CA.
    #[serde(default)]
    pub forward: Option<Spanned<ForwardSpec>>,
    /// Host → address, used instead of DNS (tests, special networks).
    #[serde(default)]
    pub resolve: ResolveSpec,
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
    /// HTTPS_PROXY mode (`CONNECT` and absolute-form requests); off when absent.
    #[serde(default)]
    pub forward: Option<Spanned<String>>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            proxy: default_proxy_addr(),
            admin: default_admin_addr(),
            forward: None,
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

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySpec {
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// Rolling percentiles and success rates at `GET /admin/stats`.
    #[serde(default)]
    pub stats: StatsSpec,
    /// Service-level rules: an alert when one breaks, a recovery when it heals.
    #[serde(default)]
    pub sla: Vec<Spanned<SlaSpec>>,
    /// Traces to an OpenTelemetry collector. Changes apply at the next restart.
    #[serde(default)]
    pub otlp: Option<Spanned<OtlpSpec>>,
    /// The access log (one line per request on `sluice::access`).
    #[serde(default)]
    pub access_log: AccessLogSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSpec {
    /// The windows percentiles are computed over.
    #[serde(default = "default_stats_windows")]
    pub windows: Vec<Duration>,
}

impl Default for StatsSpec {
    fn default() -> Self {
        Self {
            windows: default_stats_windows(),
        }
    }
}

fn default_stats_windows() -> Vec<Duration> {
    vec![
        Duration(std::time::Duration::from_secs(60)),
        Duration(std::time::Duration::from_secs(300)),
    ]
}

/// One SLA rule over a route or an upstream.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlaSpec {
    pub name: String,
    /// The route it watches (end-to-end latency as callers see it), or
    #[serde(default)]
    pub route: Option<String>,
    /// the upstream (its attempts' latency and failures).
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default = "default_sla_window")]
    pub window: Duration,
    /// Latency ceilings: `p50`, `p95`, `p99`.
    #[serde(default)]
    pub p50: Option<Duration>,
    #[serde(default)]
    pub p95: Option<Duration>,
    #[serde(default)]
    pub p99: Option<Duration>,
    /// `total` (the whole exchange, default) or `first_byte` (until the response head).
    #[serde(default)]
    pub latency: LatencyKind,
    /// Floor, in percent of requests that did not fail (5xx, broken streams).
    #[serde(default)]
    pub success_rate: Option<f64>,
    /// Fewer requests than this in the window: not judged.
    #[serde(default = "default_sla_min_requests")]
    pub min_requests: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyKind {
    #[default]
    Total,
    FirstByte,
}

fn default_sla_window() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}

fn default_sla_min_requests() -> u64 {
    20
}

/// `otlp:` — where traces go.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSpec {
    /// `http://collector:4318` (http/protobuf: `/v1/traces` is added) or
    /// `http://collector:4317` (grpc). `${VAR}` allowed.
    pub endpoint: SecretTemplate,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Sent with every export (e.g. an API key); values may hold secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretTemplate>,
    /// Share of requests traced (a caller's sampled `traceparent` is always followed).
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// Finished spans waiting for export at most; beyond it spans are dropped (and counted),
    /// never waited for.
    #[serde(default = "default_otlp_queue")]
    pub queue_size: usize,
    #[serde(default = "default_otlp_batch")]
    pub batch_size: usize,
    #[serde(default = "default_otlp_interval")]
    pub export_interval: Duration,
    #[serde(default = "default_otlp_timeout")]
    pub timeout: Duration,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

fn default_sampling_ratio() -> f64 {
    1.0
}
fn default_otlp_queue() -> usize {
    4096
}
fn default_otlp_batch() -> usize {
    512
}
fn default_otlp_interval() -> Duration {
    Duration(std::time::Duration::from_secs(1))
}
fn default_otlp_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}
fn default_service_name() -> String {
    "sluice".to_owned()
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSpec {
    /// Also log request bodies and the responses' text (at most 64 KiB each). Off by default:
    /// prompts and completions are the callers' data.
    #[serde(default)]
    pub bodies: bool,
}

/// `/metrics` on the admin listener (Prometheus text).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// Label per-tenant metrics with the tenant's name. Off by default: every tenant adds
    /// series, and a time-series database pays for each.
    #[serde(default)]
    pub tenant_labels: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Worker threads of the proxy and forward listeners, one runtime each; a connection is served
    /// by one of them from accept to close.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long SIGTERM waits for in-flight requests (open streams included) before exiting.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// Idle HTTP/1 upstream connections kept for reuse, per upstream address and worker thread.
    #[serde(default = "default_pool_size")]
    pub upstream_pool_size: usize,
    /// How long an idle upstream connection is kept for reuse. Keep it below the provider's
    /// own idle timeout, so a reused connection is rarely one the provider is closing.
    #[serde(default = "default_upstream_idle_timeout")]
    pub upstream_idle_timeout: Duration,
    /// How long a downstream client may take between two reads of its request body.
    #[serde(default = "default_client_body_timeout")]
    pub client_body_timeout: Duration,
    /// The most a request's header section may hold (names and values); larger is refused
    /// with 431. Beyond 1 MiB Pingora refuses it with 400 before Sluice sees it.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            drain_timeout: default_drain_timeout(),
            upstream_pool_size: default_pool_size(),
            upstream_idle_timeout: default_upstream_idle_timeout(),
            client_body_timeout: default_client_body_timeout(),
            max_header_bytes: default_max_header_bytes(),
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
fn default_upstream_idle_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}
fn default_client_body_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 * 1024)
}

/// The API an upstream speaks: decides its credential header, its error shape and path rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    AzureOpenai,
    Anthropic,
    OpenaiCompatible,
    /// Amazon Bedrock runtime (Converse, ConverseStream, InvokeModel,
    /// InvokeModelWithResponseStream), requests signed with SigV4.
    Bedrock,
}

impl ProviderKind {
    /// The name the policy writes.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::AzureOpenai => "azure_openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible => "openai_compatible",
            ProviderKind::Bedrock => "bedrock",
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub provider: ProviderKind,
    /// `https://host[:port][/base/path]`; `http://` for local servers. `${VAR}` allowed.
    /// Required, except for bedrock (default `https://bedrock-runtime.{region}.amazonaws.com`).
    #[serde(default)]
    pub base_url: Option<Spanned<String>>,
    /// Provider keys: `"${VAR}"`, or `{ key | file, name, weight, models, max_concurrent }`.
    /// With none, the caller's own credential passes through unchanged.
    #[serde(default)]
    pub keys: Vec<Spanned<KeyEntrySpec>>,
    /// How long a key rests after a 429 that does not say (`retry-after`,
    /// `x-ratelimit-reset-*`).
    #[serde(default = "default_key_cooldown")]
    pub key_cooldown: Duration,
    /// When the upstream (and each of its keys) is taken out of rotation, and how it returns.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// How many retries requests to this upstream may cause, so an outage cannot multiply
    /// traffic.
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    /// Anthropic only: the `anthropic-version` sent when the caller sends none.
    #[serde(default)]
    pub anthropic_version: Option<String>,
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
    /// Bedrock only (required there): the AWS region requests are signed for. `${VAR}` allowed.
    #[serde(default)]
    pub region: Option<Spanned<String>>,
    /// Bedrock only: the AWS credentials requests are signed with. Without this block, the
    /// standard environment variables `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_SESSION_TOKEN` (optional).
    #[serde(default)]
    pub aws: Option<Spanned<AwsCredentialsSpec>>,
}

/// An upstream's AWS credentials; each value may be `${VAR}`, and none is ever shown.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsCredentialsSpec {
    pub access_key_id: SecretTemplate,
    pub secret_access_key: SecretTemplate,
    /// For temporary credentials (STS); `${VAR:-}` leaves it out when the variable is unset.
    #[serde(default)]
    pub session_token: Option<SecretTemplate>,
}

fn default_key_cooldown() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

/// One provider key: the key itself (`"${OPENAI_KEY_A}"`), or a map.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum KeyEntrySpec {
    Plain(SecretTemplate),
    Detailed(KeySpecDetailed),
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpecDetailed {
    /// The key (`${VAR}` allowed); or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SecretTemplate>,
    /// a file holding it (a mounted Kubernetes Secret), relative to the policy's folder; read
    /// again, like the policy, whenever it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// For people: shown in `/admin/upstreams`, logs and metrics instead of `#<position>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Share of the requests, relative to the other keys (smooth weighted round robin).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Models (glob patterns) this key may serve; default: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests this key may have in flight at once (open streams included).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

fn default_weight() -> u32 {
    1
}

impl<'de> Deserialize<'de> for KeyEntrySpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        string_or_map(
            deserializer,
            "a key, or a map with `key` or `file`",
            |text| KeyEntrySpec::Plain(SecretTemplate(unspanned(text.to_owned()))),
            KeyEntrySpec::Detailed,
        )
    }
}

/// Deserialises a value written either as a plain string or as a map (`- openai` or
/// `- { upstream: openai, model: x }`). serde's untagged enums would lose the map's error
/// messages (an unknown field becomes "did not match any variant") and its locations.
fn string_or_map<'de, D, T, M>(
    deserializer: D,
    expecting: &'static str,
    from_string: impl FnOnce(&str) -> T,
    from_map: impl FnOnce(M) -> T,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    M: Deserialize<'de>,
{
    struct Either<S, F, M> {
        expecting: &'static str,
        from_string: S,
        from_map: F,
        map: std::marker::PhantomData<M>,
    }
    impl<'de, T, M, S, F> serde::de::Visitor<'de> for Either<S, F, M>
    where
        M: Deserialize<'de>,
        S: FnOnce(&str) -> T,
        F: FnOnce(M) -> T,
    {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
            Ok((self.from_string)(text))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            M::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(self.from_map)
        }
    }
    deserializer.deserialize_any(Either {
        expecting,
        from_string,
        from_map,
        map: std::marker::PhantomData,
    })
}

/// `circuit_breaker:` — defaults shown in `conf/sluice.yaml`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Opens after this many failures in a row (connect errors, timeouts, 5xx, broken streams)…
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// …or when this share of the requests of the last `window` failed, once there were at
    /// least `min_requests`.
    #[serde(default = "default_error_ratio")]
    pub error_ratio: f64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_breaker_window")]
    pub window: Duration,
    /// How long it stays open (the upstream or key skipped) before probes go through.
    #[serde(default = "default_open_for")]
    pub open_for: Duration,
    /// Requests let through at once while half-open; a success closes it, a failure opens it.
    #[serde(default = "default_half_open_probes")]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: default_consecutive_failures(),
            error_ratio: default_error_ratio(),
            min_requests: default_min_requests(),
            window: default_breaker_window(),
            open_for: default_open_for(),
            half_open_probes: default_half_open_probes(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_error_ratio() -> f64 {
    0.5
}
fn default_min_requests() -> u32 {
    20
}
fn default_breaker_window() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}
fn default_open_for() -> Duration {
    Duration(std::time::Duration::from_secs(15))
}
fn default_half_open_probes() -> u32 {
    1
}

/// `retry_budget:` — over `window`, retries ≤ `ratio` × requests + `min_per_second` × window.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSpec {
    #[serde(default = "default_budget_ratio")]
    pub ratio: f64,
    #[serde(default = "default_budget_min")]
    pub min_per_second: f64,
    #[serde(default = "default_budget_window")]
    pub window: Duration,
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_min(),
            window: default_budget_window(),
        }
    }
}

fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min() -> f64 {
    1.0
}
fn default_budget_window() -> Duration {
    Duration(std::time::Duration::from_secs(10))
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
    /// The upstream this route sends to (`upstream: openai`), or
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
    /// an ordered fallback list: `[openai, { upstream: azure }, { upstream: openai, model:
    /// gpt-4o-mini }]`. Each target is an upstream, optionally with the model sent to it.
    #[serde(default)]
    pub targets: Vec<Spanned<TargetSpec>>,
    /// Per requested model (exact names first, then glob patterns in alphabetical order), its
    /// own fallback list instead of `upstream`/`targets`.
    #[serde(default)]
    pub model_targets: BTreeMap<String, Vec<Spanned<TargetSpec>>>,
    /// When and how often a failed attempt is tried again (on another key or target).
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// Send the request to the next target too when the first is slow to answer; the first
    /// response wins, the other is cancelled.
    #[serde(default)]
    pub hedge: Option<HedgeSpec>,
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

/// One fallback target: an upstream's name, or `{ upstream, model }`.
#[derive(Debug, Clone, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub upstream: String,
    /// The model sent to this target instead of the one asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl<'de> Deserialize<'de> for TargetSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Map {
            upstream: String,
            #[serde(default)]
            model: Option<String>,
        }
        string_or_map(
            deserializer,
            "an upstream name, or a map with `upstream` (and `model`)",
            |name| TargetSpec {
                upstream: name.to_owned(),
                model: None,
            },
            |map: Map| TargetSpec {
                upstream: map.upstream,
                model: map.model,
            },
        )
    }
}

/// `retry:` — what is tried again, how often, how soon.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included (1: never retry). Default: one per target, plus
    /// one.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// What is tried again: `connect_error`, `first_byte_timeout`, `5xx`, `4xx`, or statuses
    /// (`429`, `408`, `409`, `529`). Whatever the list, a 401/403 for one of the upstream's own
    /// keys is tried on another key.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Longest wait for each attempt's response head (connect included). Default: the
    /// upstream's `timeouts.first_byte`.
    #[serde(default)]
    pub attempt_timeout: Option<Duration>,
    /// Before a target is tried again: a random wait up to `base` × 2^(round − 1), at most
    /// `max` ("full jitter").
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// A provider's `retry-after` up to this long is waited out; a longer one is not retried.
    #[serde(default = "default_retry_after_max")]
    pub retry_after_max: Duration,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: None,
            on: default_retry_on(),
            attempt_timeout: None,
            backoff: BackoffSpec::default(),
            retry_after_max: default_retry_after_max(),
        }
    }
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectError,
        RetryOn::Status(429),
        RetryOn::ServerErrors,
    ]
}

fn default_retry_after_max() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    #[serde(default = "default_backoff_base")]
    pub base: Duration,
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> Duration {
    Duration(std::time::Duration::from_millis(100))
}
fn default_backoff_max() -> Duration {
    Duration(std::time::Duration::from_secs(2))
}

/// One retry condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    ConnectError,
    FirstByteTimeout,
    ServerErrors,
    ClientErrors,
    Status(u16),
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u16),
            Text(String),
        }
        let parsed = match Raw::deserialize(deserializer)? {
            Raw::Number(status) => Some(RetryOn::Status(status)),
            Raw::Text(text) => match text.as_str() {
                "connect_error" => Some(RetryOn::ConnectError),
                "first_byte_timeout" => Some(RetryOn::FirstByteTimeout),
                "5xx" => Some(RetryOn::ServerErrors),
                "4xx" => Some(RetryOn::ClientErrors),
                other => other.parse().ok().map(RetryOn::Status),
            },
        };
        match parsed {
            Some(RetryOn::Status(status)) if !(400..=599).contains(&status) => {
                Err(serde::de::Error::custom(format!(
                    "retry on status {status}: only 4xx and 5xx statuses are retried"
                )))
            }
            Some(on) => Ok(on),
            None => Err(serde::de::Error::custom(
                "retry on: use connect_error, first_byte_timeout, 5xx, 4xx or a status like 429",
            )),
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::ConnectError => serializer.serialize_str("connect_error"),
            RetryOn::FirstByteTimeout => serializer.serialize_str("first_byte_timeout"),
            RetryOn::ServerErrors => serializer.serialize_str("5xx"),
            RetryOn::ClientErrors => serializer.serialize_str("4xx"),
            RetryOn::Status(status) => serializer.serialize_u16(*status),
        }
    }
}

/// `hedge: { after: 300ms }` or `hedge: { after: p95 }`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HedgeSpec {
    pub after: HedgeAfter,
}

/// When the second request goes out: a fixed delay, or the first target's running percentile
/// of time to first byte (over the last minute; with fewer than 20 samples, no hedge).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeAfter {
    Delay(std::time::Duration),
    Percentile(f64),
}

impl<'de> Deserialize<'de> for HedgeAfter {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if let Some(percent) = text.strip_prefix('p').and_then(|p| p.parse::<f64>().ok()) {
            if percent > 0.0 && percent < 100.0 {
                return Ok(HedgeAfter::Percentile(percent / 100.0));
            }
        }
        humantime::parse_duration(&text)
            .map(HedgeAfter::Delay)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "hedge after {text:?}: use a duration (300ms) or a percentile (p95)"
                ))
            })
    }
}

impl Serialize for HedgeAfter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            HedgeAfter::Delay(delay) => serializer.collect_str(&humantime::format_duration(*delay)),
            HedgeAfter::Percentile(q) => serializer.collect_str(&format_args!("p{}", q * 100.0)),
        }
    }
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
