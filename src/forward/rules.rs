//! What the forward listener may do with a target: intercept it, tunnel it, or refuse it; and
//! which addresses a tunnel may reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use sluice_filters::glob::Glob;

use super::ca::CertificateAuthority;

/// A host pattern from the policy: compared label by label, `*` and `?` matching within one
/// label (`*.openai.azure.com` matches `x.openai.azure.com`, not `a.b.openai.azure.com`), so a
/// pattern never reaches further than it reads. `*` alone matches any host.
#[derive(Debug, Clone)]
pub struct HostPattern {
    text: String,
    shape: Shape,
}

#[derive(Debug, Clone)]
enum Shape {
    Any,
    /// No wildcard: the host itself (a name or an IP address).
    Exact,
    Labels(Vec<Glob>),
}

#[derive(Debug, thiserror::Error)]
#[error("`{pattern}` is not a host pattern: {why}")]
pub struct BadPattern {
    pattern: String,
    why: &'static str,
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, BadPattern> {
        let bad = |why| BadPattern {
            pattern: text.to_owned(),
            why,
        };
        let normal = normalize_host(text);
        if normal.is_empty() {
            return Err(bad("it is empty"));
        }
        if normal == "*" {
            return Ok(Self {
                text: normal,
                shape: Shape::Any,
            });
        }
        if normal.parse::<IpAddr>().is_ok() {
            return Ok(Self {
                text: normal,
                shape: Shape::Exact,
            });
        }
        let allowed =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'?' | b'_');
        if !normal.bytes().all(allowed) {
            return Err(bad("a host name has letters, digits, `-`, `.` and the wildcards `*` and `?` only (no port, no scheme)"));
        }
        if normal.split('.').any(str::is_empty) {
            return Err(bad("it has an empty label"));
        }
        let shape = if normal.contains(['*', '?']) {
            Shape::Labels(normal.split('.').map(Glob::new).collect())
        } else {
            Shape::Exact
        };
        Ok(Self {
            text: normal,
            shape,
        })
    }

    /// `host` must be normalised ([`normalize_host`]).
    pub fn matches(&self, host: &str) -> bool {
        match &self.shape {
            Shape::Any => true,
            Shape::Exact => self.text == host,
            Shape::Labels(labels) => {
                let mut parts = host.split('.');
                let all_match = labels
                    .iter()
                    .all(|glob| parts.next().is_some_and(|part| glob.matches(part)));
                all_match && parts.next().is_none()
            }
        }
    }

    /// The pattern is this host written out, not a wildcard that happens to match it.
    pub fn names(&self, host: &str) -> bool {
        matches!(self.shape, Shape::Exact) && self.text == host
    }
}

/// Lower case, without a trailing dot or IPv6 brackets.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The forward listener's rules, compiled from `forward:`.
#[derive(Debug)]
pub struct ForwardPolicy {
    pub intercept_hosts: Vec<HostPattern>,
    pub intercept_ports: Vec<u16>,
    pub tunnel_hosts: Vec<HostPattern>,
    pub tunnel_ports: Vec<u16>,
    pub allow_private: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub ca: Arc<CertificateAuthority>,
    /// Where `ca` came from: what `sluice check` can say of a CA that does not exist yet.
    pub ca_origin: CaOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaOrigin {
    /// Read from the policy's CA files.
    Files,
    /// A stand-in made by `sluice check`: `sluice run` would generate the CA and write it to
    /// this certificate path.
    ToBeGenerated(std::path::PathBuf),
}

/// What happens to one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Terminate TLS (or take the plain request) and run the exchange.
    Intercept,
    /// Splice bytes to the target, untouched.
    Tunnel,
    /// 403, and nothing is dialled.
    Refuse(String),
}

/// How the target was asked for: a `CONNECT` names a port Sluice would reach; an
/// absolute-form request to an intercepted host is answered by the exchange, whatever its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Connect,
    Absolute,
}

impl ForwardPolicy {
    /// `host` must be normalised.
    pub fn decide(&self, host: &str, port: u16, asked: Asked) -> Decision {
        if self.intercept_hosts.iter().any(|p| p.matches(host)) {
            // An intercepted host is never tunnelled: that would bypass the policy.
            return if asked == Asked::Absolute || self.intercept_ports.contains(&port) {
                Decision::Intercept
            } else {
                Decision::Refuse(format!(
                    "{host} is intercepted on port{} {} only (forward.intercept.ports)",
                    plural(self.intercept_ports.len()),
                    list_ports(&self.intercept_ports)
                ))
            };
        }
        if !self.tunnel_hosts.iter().any(|p| p.matches(host)) {
            return Decision::Refuse(format!(
                "{host} is neither intercepted nor tunnelled by the policy (forward.intercept.hosts, forward.tunnel.hosts)"
            ));
        }
        if !self.tunnel_ports.contains(&port) {
            return Decision::Refuse(format!(
                "port {port} is not one a tunnel may reach (forward.tunnel.ports: {})",
                list_ports(&self.tunnel_ports)
            ));
        }
        Decision::Tunnel
    }

    /// Whether a tunnel may connect to `address`, found for `host`: a public address, one the
    /// policy names (its own `resolve` entry, or the address written in `tunnel.hosts`), or any
    /// when `allow_private` is set.
    pub fn may_reach(&self, host: &str, address: IpAddr, from_override: bool) -> bool {
        self.allow_private
            || from_override
            || is_public(address)
            || self
                .tunnel_hosts
                .iter()
                .any(|p| p.names(host) && host.parse::<IpAddr>() == Ok(address))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn list_ports(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "none".to_owned();
    }
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an address is on the public internet: not loopback, private (RFC 1918, ULA),
/// link-local (cloud metadata endpoints live there), shared (CGNAT), documentation,
/// benchmarking, multicast, reserved or unspecified. IPv4 inside IPv6 (mapped, NAT64) is judged
/// as the IPv4 address it carries.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let private = a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 192 && b == 168)
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224;
    !private
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let segments = ip.segments();
    // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., hi, lo] = segments;
        return is_public_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    }
    let private = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local
        || (segments[0] & 0xffc0) == 0xfe80 // link-local
        || segments[0] == 0x2001 && segments[1] == 0x0db8 // documentation
        || segments[..6] == [0, 0, 0, 0, 0, 0]; // IPv4-compatible, deprecated
    !private
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        HostPattern::parse(text).unwrap()
    }

    /// Rules with nothing intercepted, `tunnel_hosts` tunnelled on any port, and a CA made in
    /// memory (never used to sign here).
    pub(in crate::forward) fn tunnel_policy(
        tunnel_hosts: &[&str],
        allow_private: bool,
    ) -> ForwardPolicy {
        ForwardPolicy {
            intercept_hosts: Vec::new(),
            intercept_ports: vec![443],
            tunnel_hosts: tunnel_hosts.iter().map(|host| pattern(host)).collect(),
            tunnel_ports: (1..=u16::MAX).collect(),
            allow_private,
            connect_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            ca: Arc::new(CertificateAuthority::generate(1).unwrap().0),
            ca_origin: CaOrigin::Files,
        }
    }

    #[test]
    fn a_wildcard_tunnel_names_no_private_address() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        let public: IpAddr = "1.1.1.1".parse().unwrap();

        // `*` lets any host be asked for, but names no address: private ones stay refused,
        // whatever the host was written as.
        let any = tunnel_policy(&["*"], false);
        assert!(!pattern("*").names("127.0.0.1"));
        assert_eq!(
            any.decide("127.0.0.1", 80, Asked::Connect),
            Decision::Tunnel
        );
        for host in ["127.0.0.1", "localhost", "metadata.internal", "127.1"] {
            assert!(!any.may_reach(host, loopback, false), "{host}");
            assert!(!any.may_reach(host, metadata, false), "{host}");
        }
        assert!(any.may_reach("one.one.one.one", public, false));
        // A wildcard that happens to match an address's text does not name it either.
        let globbed = tunnel_policy(&["127.0.0.*"], false);
        assert_eq!(
            globbed.decide("127.0.0.1", 80, Asked::Connect),
            Decision::Tunnel
        );
        assert!(!globbed.may_reach("127.0.0.1", loopback, false));

        // The address written out in `tunnel.hosts` is named, for that host text only: not for
        // a name that resolves to it, nor for another address.
        let exact = tunnel_policy(&["127.0.0.1"], false);
        assert!(exact.may_reach("127.0.0.1", loopback, false));
        assert!(!exact.may_reach("localhost", loopback, false));
        assert!(!exact.may_reach("127.0.0.1", metadata, false));

        // A `resolve:` entry names the address it gives.
        assert!(any.may_reach("tunnel.example", loopback, true));

        // `allow_private` lets every address through.
        let open = tunnel_policy(&["*"], true);
        assert!(open.may_reach("localhost", loopback, false));
        assert!(open.may_reach("169.254.169.254", metadata, false));
    }

    #[test]
    fn patterns_match_label_by_label() {
        let cases = [
            ("api.openai.com", "api.openai.com", true),
            ("API.OpenAI.com.", "api.openai.com", true),
            ("api.openai.com", "xapi.openai.com", false),
            ("*.openai.azure.com", "eastus.openai.azure.com", true),
            ("*.openai.azure.com", "a.b.openai.azure.com", false),
            ("*.openai.azure.com", "openai.azure.com", false),
            ("*.openai.azure.com", "evil.com", false),
            (
                "bedrock-runtime.*.amazonaws.com",
                "bedrock-runtime.us-east-1.amazonaws.com",
                true,
            ),
            (
                "bedrock-runtime.*.amazonaws.com",
                "bedrock-runtime.amazonaws.com.evil.com",
                false,
            ),
            ("api-?.example.com", "api-1.example.com", true),
            ("*", "anything.at.all", true),
            ("127.0.0.1", "127.0.0.1", true),
            ("[::1]", "::1", true),
        ];
        for (text, host, expected) in cases {
            assert_eq!(pattern(text).matches(host), expected, "{text} ~ {host}");
        }
        for bad in ["", "https://x.com", "x.com:443", "a..b", "a b"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn public_addresses_are_told_from_the_rest() {
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "ff02::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }
}
