//! Tunnels: the target dialled only at an address the policy allows, then bytes spliced both
//! ways untouched until either side closes or the tunnel idles out.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::rules::ForwardPolicy;
use crate::upstream::ResolveOverrides;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve {host}: {why}")]
    Resolve { host: String, why: String },
    #[error("{host} resolves to {address}, which the policy does not let tunnels reach (not a public address; name it in `resolve` or set forward.tunnel.allow_private)")]
    Forbidden {
        host: String,
        address: std::net::IpAddr,
    },
    #[error("cannot connect to {host}:{port}: {why}")]
    Connect {
        host: String,
        port: u16,
        why: String,
    },
    #[error("no connection to {host}:{port} within {limit:?}")]
    Timeout {
        host: String,
        port: u16,
        limit: Duration,
    },
}

/// Connects to `host:port` for a tunnel. Every address the name resolves to is checked before
/// any is dialled (a name with one forbidden address is refused whole), and the connection goes
/// to a checked address, never to a second lookup's answer.
pub async fn dial(
    forward: &ForwardPolicy,
    overrides: &ResolveOverrides,
    host: &str,
    port: u16,
) -> Result<TcpStream, DialError> {
    dial_with(forward, overrides, host, port, resolve).await
}

/// [`dial`] with the name lookup given, so that a test can make a name resolve to any mix of
/// addresses (DNS cannot be told to in a test).
async fn dial_with<'a, R, F>(
    forward: &ForwardPolicy,
    overrides: &ResolveOverrides,
    host: &'a str,
    port: u16,
    lookup: R,
) -> Result<TcpStream, DialError>
where
    R: FnOnce(&'a str, u16, Duration) -> F,
    F: std::future::Future<Output = Result<Vec<SocketAddr>, DialError>>,
{
    let addresses: Vec<SocketAddr> = match overrides.get(host, port) {
        Some(address) => vec![address],
        None => lookup(host, port, forward.connect_timeout).await?,
    };
    let from_override = overrides.get(host, port).is_some();
    if let Some(forbidden) = addresses
        .iter()
        .find(|a| !forward.may_reach(host, a.ip(), from_override))
    {
        return Err(DialError::Forbidden {
            host: host.to_owned(),
            address: forbidden.ip(),
        });
    }
    let limit = forward.connect_timeout;
    let attempt = async {
        let mut last = None;
        for address in &addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(DialError::Connect {
            host: host.to_owned(),
            port,
            why: last.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
        })
    };
    let stream = tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| DialError::Timeout {
            host: host.to_owned(),
            port,
            limit,
        })??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn resolve(host: &str, port: u16, limit: Duration) -> Result<Vec<SocketAddr>, DialError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let failed = |why: String| DialError::Resolve {
        host: host.to_owned(),
        why,
    };
    let found = tokio::time::timeout(limit, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| failed(format!("no answer within {limit:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    let addresses: Vec<SocketAddr> = found.collect();
    if addresses.is_empty() {
        return Err(failed("no addresses".to_owned()));
    }
    Ok(addresses)
}

/// Bytes moved each way by a finished tunnel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spliced {
    pub up: u64,
    pub down: u64,
}

/// Copies both ways until both sides have finished sending (each end's close is passed on as a
/// write shutdown), or until nothing moves for `idle`.
pub async fn splice<A, B>(client: A, target: B, idle: Duration) -> std::io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut target_read, mut target_write) = tokio::io::split(target);
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    let mut moved = Spliced::default();
    let (mut client_done, mut target_done) = (false, false);
    while !(client_done && target_done) {
        tokio::select! {
            read = client_read.read(&mut up), if !client_done => {
                let n = read?;
                if n == 0 {
                    client_done = true;
                    let _ = target_write.shutdown().await;
                } else {
                    target_write.write_all(&up[..n]).await?;
                    target_write.flush().await?;
                    moved.up += n as u64;
                }
            }
            read = target_read.read(&mut down), if !target_done => {
                let n = read?;
                if n == 0 {
                    target_done = true;
                    let _ = client_write.shutdown().await;
                } else {
                    client_write.write_all(&down[..n]).await?;
                    client_write.flush().await?;
                    moved.down += n as u64;
                }
            }
            () = tokio::time::sleep(idle) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no bytes either way for {idle:?}"),
                ));
            }
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::super::rules::tests::tunnel_policy;
    use super::*;

    #[tokio::test]
    async fn a_name_with_one_private_address_is_refused_whole() {
        // Where the private address points: it must see no connection.
        let private = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let private_addr = private.local_addr().unwrap();
        let port = private_addr.port();
        let public: SocketAddr = SocketAddr::new("1.1.1.1".parse().unwrap(), port);
        let forward = tunnel_policy(&["*"], false);
        let overrides = ResolveOverrides::default();
        // The public address first: a check of the first answer only would dial it.
        let lookup = |_: &str, _: u16, _: Duration| async move { Ok(vec![public, private_addr]) };
        let refused = dial_with(&forward, &overrides, "rebinding.example", port, lookup)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, DialError::Forbidden { address, .. } if *address == private_addr.ip()),
            "{refused}"
        );
        let accepted = tokio::time::timeout(Duration::from_millis(100), private.accept()).await;
        assert!(accepted.is_err(), "the private address was dialled");

        // The same lookup under `allow_private`: the addresses are tried in order, and the
        // private one answers.
        let open = tunnel_policy(&["*"], true);
        let only_private = |_: &str, _: u16, _: Duration| async move { Ok(vec![private_addr]) };
        dial_with(&open, &overrides, "rebinding.example", port, only_private)
            .await
            .unwrap();
        assert!(private.accept().await.is_ok());
    }

    #[tokio::test]
    async fn splice_passes_bytes_and_closes_both_ways() {
        let (client, mut client_far) = tokio::io::duplex(1024);
        let (target, mut target_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(client, target, Duration::from_secs(5)));
        client_far.write_all(b"\x00\x01hello\xff").await.unwrap();
        let mut got = [0u8; 8];
        target_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x00\x01hello\xff");
        target_far.write_all(b"back").await.unwrap();
        drop(target_far);
        let mut back = Vec::new();
        client_far.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
        drop(client_far);
        let moved = task.await.unwrap().unwrap();
        assert_eq!((moved.up, moved.down), (8, 4));
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed() {
        let (client, _client_far) = tokio::io::duplex(1024);
        let (target, _target_far) = tokio::io::duplex(1024);
        let result = splice(client, target, Duration::from_millis(50)).await;
        assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}
