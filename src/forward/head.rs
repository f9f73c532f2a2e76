//! The first thing on a forward-listener connection: one request head, read whole within a
//! size bound and a deadline, then told apart — `CONNECT host:port`, an absolute-form request
//! (`GET http://host/…`), or something a proxy does not take.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::rules::normalize_host;

/// Largest request head taken (request line and headers), as Pingora's own limit.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// A request head as read, with the bytes that came after it in the same reads.
#[derive(Debug)]
pub struct Head {
    /// Everything read: the head, then the first bytes of what follows.
    pub bytes: BytesMut,
    /// Length of the head within `bytes`.
    pub len: usize,
    pub target: Target,
}

impl Head {
    /// The bytes read past the head (a pipelined TLS ClientHello, a request body's start).
    pub fn rest(&self) -> &[u8] {
        &self.bytes[self.len..]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `CONNECT host:port`.
    Connect { host: String, port: u16 },
    /// `METHOD http://host[:port]/path`.
    Absolute {
        host: String,
        port: u16,
        /// The URI's authority as sent (`host[:port]`), for the `Host` header.
        authority: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The connection closed before any byte: not an error worth an answer.
    #[error("connection closed")]
    Closed,
    #[error("no complete request head within {0:?}")]
    Timeout(Duration),
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the forward listener takes CONNECT host:port or an absolute URI (http://host/…); for base-URL requests use listen.proxy")]
    NotProxyForm,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request head within `deadline` (the whole head, not each read).
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> Result<Head, HeadError> {
    tokio::time::timeout(deadline, read_untimed(stream))
        .await
        .unwrap_or(Err(HeadError::Timeout(deadline)))
}

async fn read_untimed<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Head, HeadError> {
    let mut bytes = BytesMut::with_capacity(4096);
    loop {
        if bytes.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let read = stream.read_buf(&mut bytes).await?;
        if read == 0 {
            return Err(if bytes.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Malformed("the connection closed inside the request head".to_owned())
            });
        }
        if let Some((len, target)) = parse(&bytes)? {
            if len > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            return Ok(Head { bytes, len, target });
        }
    }
}

/// `Ok(None)` while the head is incomplete.
fn parse(bytes: &[u8]) -> Result<Option<(usize, Target)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let method = request.method.unwrap_or_default();
    let path = request.path.unwrap_or_default();
    let target = if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_authority(path, None)?;
        Target::Connect { host, port }
    } else {
        let uri: http::Uri = path.parse().map_err(|_| {
            HeadError::Malformed(format!("the request target `{path}` is not a URI"))
        })?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(authority)) => {
                let (host, port) = split_authority(authority.as_str(), Some(80))?;
                Target::Absolute {
                    host,
                    port,
                    authority: authority.as_str().to_owned(),
                }
            }
            (Some(other), Some(_)) => {
                return Err(HeadError::Malformed(format!(
                    "scheme `{other}`: only http:// URIs are forwarded (https goes through CONNECT)"
                )))
            }
            _ => return Err(HeadError::NotProxyForm),
        }
    };
    Ok(Some((len, target)))
}

/// `host:port` (the port required unless a default is given), IPv6 in brackets.
fn split_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), HeadError> {
    let malformed = || HeadError::Malformed(format!("`{authority}` is not host:port"));
    if authority.contains(['@', '/', '?', '#']) || authority.is_empty() {
        return Err(malformed());
    }
    let (host, port) = match authority.rsplit_once(':') {
        // A bare IPv6 address without brackets is ambiguous; `]` ends a bracketed one.
        Some((host, port)) if !port.contains(']') => {
            let port = port.parse::<u16>().map_err(|_| malformed())?;
            (host, port)
        }
        _ => (authority, default_port.ok_or_else(malformed)?),
    };
    let host = normalize_host(host);
    if host.is_empty() || port == 0 {
        return Err(malformed());
    }
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(malformed());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Result<Option<Target>, HeadError> {
        parse(text.as_bytes()).map(|parsed| parsed.map(|(_, target)| target))
    }

    #[test]
    fn connect_and_absolute_forms_are_told_apart() {
        assert_eq!(
            target("CONNECT API.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
                .unwrap(),
            Some(Target::Connect {
                host: "api.openai.com".into(),
                port: 443
            })
        );
        assert_eq!(
            target("CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").unwrap(),
            Some(Target::Connect {
                host: "::1".into(),
                port: 8443
            })
        );
        assert_eq!(
            target("GET http://example.com/x?y HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap(),
            Some(Target::Absolute {
                host: "example.com".into(),
                port: 80,
                authority: "example.com".into()
            })
        );
        assert_eq!(
            target("POST http://127.0.0.1:9000/v1 HTTP/1.1\r\n\r\n").unwrap(),
            Some(Target::Absolute {
                host: "127.0.0.1".into(),
                port: 9000,
                authority: "127.0.0.1:9000".into()
            })
        );
        assert!(target("CONNECT api.openai.com:443 HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        for bad in [
            "CONNECT api.openai.com HTTP/1.1\r\n\r\n",
            "CONNECT user@host:443 HTTP/1.1\r\n\r\n",
            "CONNECT host:0 HTTP/1.1\r\n\r\n",
            "CONNECT host:99999 HTTP/1.1\r\n\r\n",
            "GET https://example.com/ HTTP/1.1\r\n\r\n",
            "GE T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(target(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            target("GET /v1/models HTTP/1.1\r\n\r\n"),
            Err(HeadError::NotProxyForm)
        ));
    }

    #[tokio::test]
    async fn the_head_is_bounded_in_size_and_time() {
        let endless = vec![b'a'; MAX_HEAD * 2];
        let mut huge = b"GET http://x/ HTTP/1.1\r\nX: ".to_vec();
        huge.extend_from_slice(&endless);
        let result = read(&mut huge.as_slice(), Duration::from_secs(5)).await;
        assert!(matches!(result, Err(HeadError::TooLarge)), "{result:?}");

        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"CONNECT a:443 HTTP/1.1\r\n")
            .await
            .unwrap();
        let result = read(&mut server, Duration::from_millis(100)).await;
        assert!(matches!(result, Err(HeadError::Timeout(_))), "{result:?}");

        let mut pipelined = &b"CONNECT a.example:443 HTTP/1.1\r\n\r\n\x16\x03\x01"[..];
        let head = read(&mut pipelined, Duration::from_secs(1)).await.unwrap();
        assert_eq!(head.rest(), b"\x16\x03\x01");
    }
}
