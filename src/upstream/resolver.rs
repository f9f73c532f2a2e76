//! Upstream name resolution off the request path's critical section: answers are cached per
//! host for a short time and looked up asynchronously (never a blocking `getaddrinfo` on a worker).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {reason}")]
pub struct ResolveError {
    pub host: String,
    pub reason: String,
}

/// How long an answer is reused. Short, so a provider's DNS change is followed within a minute.
const TTL: Duration = Duration::from_secs(30);

/// (port, when it was looked up, address)
type Answer = (u16, Instant, SocketAddr);

#[derive(Default, Clone)]
pub struct Resolver {
    /// Keyed by host alone so a lookup borrows `&str`.
    cache: Arc<RwLock<HashMap<String, Vec<Answer>>>>,
}

impl Resolver {
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, ResolveError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        if let Some((at, addr)) = self.cached(host, port) {
            if at.elapsed() < TTL {
                return Ok(addr);
            }
        }
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ResolveError {
                host: host.to_owned(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ResolveError {
                host: host.to_owned(),
                reason: "no addresses".to_owned(),
            })?;
        if let Ok(mut cache) = self.cache.write() {
            let entries = cache.entry(host.to_owned()).or_default();
            entries.retain(|(cached_port, _, _)| *cached_port != port);
            entries.push((port, Instant::now(), addr));
        }
        Ok(addr)
    }

    fn cached(&self, host: &str, port: u16) -> Option<(Instant, SocketAddr)> {
        let cache = self.cache.read().ok()?;
        cache
            .get(host)?
            .iter()
            .find(|(cached_port, _, _)| *cached_port == port)
            .map(|(_, at, addr)| (*at, *addr))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an IP address or IP:port (names are not resolved here)")]
pub struct NotAnAddress(String);

/// `resolve:` from the policy: addresses used instead of DNS for some hosts (tests, special
/// networks). An entry with a port replaces the port too; one without keeps the asked port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveOverrides {
    entries: HashMap<String, (std::net::IpAddr, Option<u16>)>,
}

impl ResolveOverrides {
    /// `host` in lower case; `address` is `IP:port`, `[IPv6]:port` or a bare IP.
    pub fn insert(&mut self, host: &str, address: &str) -> Result<(), NotAnAddress> {
        let parsed = match address.parse::<SocketAddr>() {
            Ok(socket) => (socket.ip(), Some(socket.port())),
            Err(_) => match address.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                Ok(ip) => (ip, None),
                Err(_) => return Err(NotAnAddress(address.to_owned())),
            },
        };
        self.entries.insert(host.to_ascii_lowercase(), parsed);
        Ok(())
    }

    /// The address the policy gives for `host` (lower case), if any.
    pub fn get(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.entries
            .get(host)
            .map(|(ip, fixed)| SocketAddr::new(*ip, fixed.unwrap_or(port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literal_addresses_skip_lookup_and_localhost_resolves() {
        let resolver = Resolver::default();
        assert_eq!(
            resolver.resolve("127.0.0.1", 80).await.unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        let local = resolver.resolve("localhost", 8080).await.unwrap();
        assert!(local.ip().is_loopback());
        assert_eq!(resolver.cached("localhost", 8080).unwrap().1, local);
        assert!(resolver.resolve("no-such-host.invalid", 1).await.is_err());
    }

    #[test]
    fn overrides_fix_the_address_and_maybe_the_port() {
        let mut overrides = ResolveOverrides::default();
        overrides
            .insert("api.openai.com", "127.0.0.1:8443")
            .unwrap();
        overrides.insert("bare.test", "::1").unwrap();
        assert_eq!(
            overrides.get("api.openai.com", 443),
            Some("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(
            overrides.get("bare.test", 80),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(overrides.get("other.test", 80), None);
        assert!(overrides.insert("x", "localhost:80").is_err());
    }
}
