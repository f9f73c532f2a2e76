//! `forward:` and `resolve:` as written: HTTPS_PROXY mode (which hosts are intercepted, which
//! tunnelled, the CA) and the name-resolution overrides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::{unspanned, yes, Duration};

/// `forward:` — what the forward listener (`listen.forward`) does with each `CONNECT` and
/// absolute-form request. Requires `listen.forward`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    /// Hosts whose TLS Sluice terminates, to run the exchange on their requests.
    #[serde(default)]
    pub intercept: InterceptSpec,
    /// Hosts passed through untouched (bytes spliced to the target). Everything neither
    /// intercepted nor tunnelled is refused with 403.
    #[serde(default)]
    pub tunnel: TunnelSpec,
    /// The CA that signs the certificates Sluice presents for intercepted hosts.
    #[serde(default)]
    pub ca: CaSpec,
    /// Longest wait for a request head on the forward listener, and for a TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
    /// Minted leaf certificates kept (one per intercepted host name).
    #[serde(default = "default_certificate_cache")]
    pub certificate_cache: u64,
}

/// The defaults `listen.forward` alone gets (no `forward:` block).
impl Default for ForwardSpec {
    fn default() -> Self {
        Self {
            intercept: InterceptSpec::default(),
            tunnel: TunnelSpec::default(),
            ca: CaSpec::default(),
            handshake_timeout: default_handshake_timeout(),
            certificate_cache: default_certificate_cache(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptSpec {
    /// Host patterns: `*` matches within one label (`*.openai.azure.com`); writing the list
    /// replaces the defaults.
    #[serde(default = "default_intercepted_hosts")]
    pub hosts: Vec<Spanned<String>>,
    /// Ports a `CONNECT` to an intercepted host may name.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
}

impl Default for InterceptSpec {
    fn default() -> Self {
        Self {
            hosts: default_intercepted_hosts(),
            ports: default_ports(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSpec {
    /// Host patterns tunnelled untouched (`*` alone: any host). Default: none.
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Ports a tunnel may reach.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// Let tunnels reach loopback, private, link-local and other non-public addresses. Off:
    /// such an address is reached only when the policy names it (a `resolve` entry, or the
    /// address itself in `hosts`).
    #[serde(default)]
    pub allow_private: bool,
    /// TCP connect to the tunnel's target.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Duration,
}

impl Default for TunnelSpec {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            ports: default_ports(),
            allow_private: false,
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

/// `ca:` — PEM files; relative paths are from the policy's folder. Both files are part of the
/// policy: changing them is a reload.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// The CA certificate (public): what the app trusts.
    #[serde(default = "default_ca_cert_file")]
    pub cert_file: Spanned<String>,
    /// The CA private key; never shown, never logged.
    #[serde(default = "default_ca_key_file")]
    pub key_file: Spanned<String>,
    /// When neither file exists at startup, make a new CA and write both (the key with mode
    /// 0600). Never on reload, and never over an existing file.
    #[serde(default = "yes")]
    pub generate: bool,
}

impl Default for CaSpec {
    fn default() -> Self {
        Self {
            cert_file: default_ca_cert_file(),
            key_file: default_ca_key_file(),
            generate: true,
        }
    }
}

/// `resolve:` — host → `IP:port` or `IP`, used instead of DNS for upstreams and tunnels. For
/// tests and special networks (a provider reached through a private endpoint).
pub type ResolveSpec = BTreeMap<String, Spanned<String>>;

pub const DEFAULT_INTERCEPTED_HOSTS: [&str; 4] = [
    "api.openai.com",
    "api.anthropic.com",
    "*.openai.azure.com",
    "bedrock-runtime.*.amazonaws.com",
];

fn default_intercepted_hosts() -> Vec<Spanned<String>> {
    DEFAULT_INTERCEPTED_HOSTS
        .iter()
        .map(|host| unspanned((*host).to_owned()))
        .collect()
}

fn default_ports() -> Vec<u16> {
    vec![443]
}

fn default_handshake_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

fn default_connect_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}

fn default_idle_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}

fn default_certificate_cache() -> u64 {
    1024
}

fn default_ca_cert_file() -> Spanned<String> {
    unspanned("sluice-ca.pem".to_owned())
}

fn default_ca_key_file() -> Spanned<String> {
    unspanned("sluice-ca.key".to_owned())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::forward::rules::{Asked, Decision, ForwardPolicy};
    use crate::policy::{compile_text, SharedState};

    const ROUTES: &str = "upstreams:\n  openai: { provider: openai, base_url: \"https://api.openai.com\" }\nroutes:\n  - { name: openai, match: { hosts: [api.openai.com] }, upstream: openai }\n";

    /// The forward rules of a policy with `listen.forward` and `forward` as given (no CA files:
    /// `check` makes a stand-in in memory, nothing is written).
    fn rules(forward: &str) -> std::sync::Arc<ForwardPolicy> {
        let text = format!(
            "listen: {{ proxy: 127.0.0.1:1, admin: 127.0.0.1:2, forward: 127.0.0.1:3 }}\n{ROUTES}{forward}"
        );
        let policy = compile_text(
            &text,
            Path::new("/nonexistent/sluice.yaml"),
            &|_| None,
            &SharedState::default(),
        )
        .unwrap();
        policy.forward.clone().unwrap()
    }

    #[test]
    fn the_default_list_intercepts_the_providers_within_one_label() {
        let defaults = rules("");
        let intercepted = |host: &str| defaults.decide(host, 443, Asked::Connect);
        for host in [
            "api.openai.com",
            "api.anthropic.com",
            "eastus.openai.azure.com",
            "bedrock-runtime.us-east-1.amazonaws.com",
        ] {
            assert_eq!(intercepted(host), Decision::Intercept, "{host}");
        }
        // A wildcard stands for one label: deeper or look-alike names are not the provider's.
        for host in [
            "a.b.openai.azure.com",
            "openai.azure.com",
            "bedrock-runtime.us-east-1.amazonaws.com.evil.example",
            "bedrock.us-east-1.amazonaws.com",
            "example.com",
        ] {
            assert!(
                matches!(intercepted(host), Decision::Refuse(_)),
                "{host} intercepted"
            );
        }
        // The defaults are the same with an empty `forward:` block.
        assert_eq!(
            rules("forward: {}\n").decide("eastus.openai.azure.com", 443, Asked::Connect),
            Decision::Intercept
        );
    }

    #[test]
    fn a_written_intercept_list_replaces_the_defaults() {
        let written = rules("forward: { intercept: { hosts: [llm.internal.example] } }\n");
        assert_eq!(
            written.decide("llm.internal.example", 443, Asked::Connect),
            Decision::Intercept
        );
        for host in ["api.openai.com", "eastus.openai.azure.com"] {
            assert!(
                matches!(
                    written.decide(host, 443, Asked::Connect),
                    Decision::Refuse(_)
                ),
                "{host} still intercepted"
            );
        }
    }
}
