//! Upstreams: where a route sends its requests, and how each provider's API is spoken.

mod bedrock;
pub mod health;
pub mod http1;
pub mod keys;
pub mod pool;
mod provider;
mod resolver;
pub mod system_roots;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub use crate::policy::schema::ProviderKind;
pub use bedrock::{default_base_url as bedrock_base_url, AwsCredentials, SigV4Signer, SignError};
use health::{BreakerSettings, RetryBudgetSettings, UpstreamHealth};
pub use keys::{KeyLease, KeyPool, NoKey, ProviderKey};
pub use pool::{PoolSweeper, UpstreamConnector, UpstreamSession};
pub use provider::CALLER_CREDENTIAL_HEADERS;
pub use resolver::{ResolveError, ResolveOverrides, Resolver};

/// An upstream as the proxy runs it: parsed, interpolated, validated.
pub struct Upstream {
    pub name: Arc<str>,
    pub provider: ProviderKind,
    pub tls: bool,
    /// Host name for DNS and SNI.
    pub host: String,
    pub port: u16,
    /// The `Host` header sent upstream (`host` or `host:port`).
    pub authority: HeaderValue,
    /// Path of `base_url`, without a trailing slash; put in front of every request path.
    pub base_path: String,
    /// The upstream's own provider keys; empty: the caller's credential passes through.
    pub keys: KeyPool,
    /// How long a key rests after a 429 that does not say.
    pub key_cooldown: Duration,
    pub breaker: BreakerSettings,
    pub retry_budget: RetryBudgetSettings,
    /// Its circuit, retry budget and latency, kept across reloads.
    pub health: Arc<UpstreamHealth>,
    /// Rolling first-byte latency and failures of its attempts (`/admin/stats`, SLA rules).
    pub stats: Arc<crate::telemetry::stats::Series>,
    /// Its histograms (`sluice_upstream_first_byte_seconds`, `…_connect_seconds`), resolved
    /// once per policy.
    pub first_byte_seconds: prometheus::Histogram,
    pub connect_seconds: prometheus::Histogram,
    /// Anthropic only: `anthropic-version` for callers that send none.
    pub anthropic_version: Option<HeaderValue>,
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub azure: AzureSettings,
    /// Bedrock: signs every request with the upstream's AWS credentials.
    pub signer: Option<SigV4Signer>,
    /// Trusted CAs replacing the system store, when the policy names a `tls.ca_file`.
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
    /// The address from the policy's `resolve:`, used instead of DNS.
    pub address_override: Option<std::net::SocketAddr>,
}

#[derive(Debug, Default, Clone)]
pub struct AzureSettings {
    pub api_version: Option<String>,
    pub deployments: BTreeMap<String, String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("base_path", &self.base_path)
            .field("custom_ca", &self.ca.is_some())
            .field("address_override", &self.address_override)
            .field("keys", &self.keys.keys())
            .field("signer", &self.signer)
            .field(
                "extra_headers",
                &self
                    .extra_headers
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a provider key contains characters not allowed in an HTTP header")]
pub struct InvalidKey;

#[derive(Debug, thiserror::Error)]
#[error("the host cannot be sent in a Host header")]
pub struct InvalidHost;

impl Upstream {
    /// The `Host` header for an upstream: the port only when it is not the scheme's default.
    pub fn authority_for(tls: bool, host: &str, port: u16) -> Result<HeaderValue, InvalidHost> {
        let default_port = if tls { 443 } else { 80 };
        let authority = if port == default_port {
            HeaderValue::from_str(host)
        } else {
            HeaderValue::from_str(&format!("{host}:{port}"))
        };
        authority.map_err(|_| InvalidHost)
    }

    /// Where to connect: the policy's `resolve:` entry for the host, or DNS.
    pub async fn address(&self, resolver: &Resolver) -> Result<std::net::SocketAddr, ResolveError> {
        match self.address_override {
            Some(address) => Ok(address),
            None => resolver.resolve(&self.host, self.port).await,
        }
    }

    /// Whether Sluice authenticates to this upstream itself (keys, or a signature), so the
    /// caller's credentials need not reach it.
    pub fn has_own_credentials(&self) -> bool {
        !self.keys.is_empty() || self.signer.is_some()
    }

    /// Signs the request, when the upstream authenticates requests by signature (Bedrock);
    /// the last change made to a request before it is sent.
    pub fn sign(
        &self,
        request: &mut sluice_filters::RequestHeader,
        body: &[u8],
    ) -> Result<(), SignError> {
        match &self.signer {
            Some(signer) => signer.sign(request, self.tls, body),
            None => Ok(()),
        }
    }
}
