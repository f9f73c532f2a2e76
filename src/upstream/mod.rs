//! Upstreams: where a route sends its requests, and how each provider's API is spoken.

mod provider;
mod resolver;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub use crate::policy::schema::ProviderKind;
pub use provider::CALLER_CREDENTIAL_HEADERS;
pub use resolver::Resolver;

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
    /// The provider credential header values, one per key, marked sensitive.
    pub credentials: Vec<HeaderValue>,
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub azure: AzureSettings,
    /// Trusted CAs replacing the system store, when the policy names a `tls.ca_file`.
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
    /// Round-robin position over `credentials`. Weighted rotation with cooldowns comes with key
    /// pools; until then an even spread is the expected behaviour.
    next_credential: AtomicUsize,
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
            .field(
                "credentials",
                &format_args!("<{} redacted>", self.credentials.len()),
            )
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

pub struct UpstreamParts {
    pub name: Arc<str>,
    pub provider: ProviderKind,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub base_path: String,
    pub keys: Vec<String>,
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub azure: AzureSettings,
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
}

#[derive(Debug, thiserror::Error)]
#[error("a provider key contains characters not allowed in an HTTP header")]
pub struct InvalidKey;

impl Upstream {
    pub fn new(parts: UpstreamParts) -> Result<Self, InvalidKey> {
        let default_port = if parts.tls { 443 } else { 80 };
        let authority = if parts.port == default_port {
            parts.host.clone()
        } else {
            format!("{}:{}", parts.host, parts.port)
        };
        let credentials = parts
            .keys
            .iter()
            .map(|key| parts.provider.credential_value(key))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: parts.name,
            provider: parts.provider,
            tls: parts.tls,
            authority: HeaderValue::from_str(&authority).map_err(|_| InvalidKey)?,
            host: parts.host,
            port: parts.port,
            base_path: parts.base_path,
            credentials,
            extra_headers: parts.extra_headers,
            connect_timeout: parts.connect_timeout,
            first_byte_timeout: parts.first_byte_timeout,
            idle_timeout: parts.idle_timeout,
            azure: parts.azure,
            ca: parts.ca,
            next_credential: AtomicUsize::new(0),
        })
    }

    /// The credential for the next attempt, if this upstream has keys of its own.
    pub fn next_credential(&self) -> Option<&HeaderValue> {
        if self.credentials.is_empty() {
            return None;
        }
        let at = self.next_credential.fetch_add(1, Ordering::Relaxed) % self.credentials.len();
        Some(&self.credentials[at])
    }
}
