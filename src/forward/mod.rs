//! HTTPS_PROXY mode: the forward listener (`listen.forward`).
//!
//! The proxy listener refuses `CONNECT` (405), so this listener is a [`ServerApp`] of its own.
//! On each connection it reads one request head (bounded in size and time) and asks the policy:
//!
//! - `CONNECT host:port` to an **intercepted** host: `200`, then TLS with a certificate minted
//!   for `host` from the sidecar's CA, then the decrypted stream goes to the proxy listener's
//!   HTTP app (`server::HttpApp`) and exchange ([`ForwardedExchange`]) — routed by host,
//!   every filter as in base-URL mode. Sluice never dials the host the client named: the
//!   exchange goes to the policy's upstreams.
//! - `CONNECT` to a host and port the policy lets through (`forward.tunnel`): the target is
//!   dialled (at an address the policy allows), `200`, and bytes are spliced untouched.
//! - An absolute-form request (`GET http://host/…`): the same decision; intercepted requests
//!   run the exchange, tunnelled ones go to the target as they are, with `Connection: close`.
//! - Anything else: a plain `403` (or `400`, `408`, `431`, `502`, `504`), and nothing is dialled.

pub mod ca;
mod head;
mod intercept;
pub mod rules;
mod tunnel;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use crate::exchange::SluiceProxy;
use crate::policy::{Policy, PolicyStore};
use crate::server::HttpApp;
use head::{Head, HeadError, Target};
pub use intercept::ForwardedExchange;
use intercept::{InterceptError, Interceptor};
use rules::{Asked, Decision, ForwardPolicy};
use tunnel::DialError;

/// Keep-alive between plain absolute-form requests handed to the exchange, in seconds.
const KEEPALIVE_SECONDS: u64 = 60;

pub struct ForwardApp {
    policies: Arc<PolicyStore>,
    exchange: Arc<HttpApp<ForwardedExchange>>,
    interceptor: Interceptor,
}

impl ForwardApp {
    pub fn new(policies: Arc<PolicyStore>, proxy: SluiceProxy) -> Result<Self, InterceptError> {
        let exchange = ForwardedExchange::new(proxy, policies.clone());
        for action in Action::ALL {
            // Present from the start, so a rate over them has a zero to begin with.
            policies
                .metrics()
                .forward
                .with_label_values(&[action.label()]);
        }
        Ok(Self {
            policies,
            // No h2c: a plain request here is HTTP/1.1 absolute-form; h2 comes by ALPN.
            exchange: Arc::new(HttpApp::new(exchange, HttpServerOptions::default())),
            interceptor: Interceptor::new()?,
        })
    }

    fn count(&self, action: Action) {
        self.policies
            .metrics()
            .forward
            .with_label_values(&[action.label()])
            .inc();
    }

    /// Counts a refusal and logs it (the target, never a request's content).
    fn log_refusal(&self, host: &str, port: u16, refusal: &Refusal) {
        self.count(refusal.action);
        tracing::info!(
            target: "sluice::forward",
            host, port, status = refusal.status, action = refusal.action.label(),
            "{}", refusal.message
        );
    }
}

/// What the forward listener did with a connection (or an absolute-form request): the
/// `action` of `sluice_forward_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Intercept,
    Tunnel,
    Refuse,
    BadRequest,
    HandshakeFailed,
    TunnelFailed,
}

impl Action {
    const ALL: [Action; 6] = [
        Action::Intercept,
        Action::Tunnel,
        Action::Refuse,
        Action::BadRequest,
        Action::HandshakeFailed,
        Action::TunnelFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            Action::Intercept => "intercept",
            Action::Tunnel => "tunnel",
            Action::Refuse => "refuse",
            Action::BadRequest => "bad_request",
            Action::HandshakeFailed => "handshake_failed",
            Action::TunnelFailed => "tunnel_failed",
        }
    }
}

/// A plain answer of the forward listener's own (not in a provider's shape: no provider has
/// been chosen); the connection is closed after it.
#[derive(Debug)]
struct Refusal {
    status: u16,
    reason: &'static str,
    message: String,
    /// How it is counted.
    action: Action,
}

impl Refusal {
    /// A refusal by the policy (403 and the like).
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            action: Action::Refuse,
        }
    }

    fn counted_as(mut self, action: Action) -> Self {
        self.action = action;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let body = format!("sluice: {}\n", self.message);
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.status,
            self.reason,
            body.len()
        )
        .into_bytes()
    }
}

impl From<HeadError> for Refusal {
    fn from(error: HeadError) -> Self {
        let message = error.to_string();
        let refusal = match error {
            HeadError::Timeout(_) => Refusal::new(408, "Request Timeout", message),
            HeadError::TooLarge => Refusal::new(431, "Request Header Fields Too Large", message),
            _ => Refusal::new(400, "Bad Request", message),
        };
        refusal.counted_as(Action::BadRequest)
    }
}

impl From<DialError> for Refusal {
    fn from(error: DialError) -> Self {
        let message = error.to_string();
        match error {
            DialError::Forbidden { .. } => Refusal::new(403, "Forbidden", message),
            DialError::Timeout { .. } => {
                Refusal::new(504, "Gateway Timeout", message).counted_as(Action::TunnelFailed)
            }
            DialError::Resolve { .. } | DialError::Connect { .. } => {
                Refusal::new(502, "Bad Gateway", message).counted_as(Action::TunnelFailed)
            }
        }
    }
}

#[async_trait]
impl ServerApp for ForwardApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A TCP listener's connections are Pingora's L4 streams; the concrete type can put
        // bytes read past a request head back in front of the rest (`rewind`).
        let Ok(stream) = stream.into_any().downcast::<L4Stream>() else {
            tracing::error!(target: "sluice::forward", "unexpected stream type on the forward listener");
            return None;
        };
        let mut stream = *stream;
        loop {
            let policy = self.policies.current();
            let Some(forward) = policy.forward.clone() else {
                let refusal = Refusal::new(
                    503,
                    "Service Unavailable",
                    "the active policy has no forward mode (listen.forward)",
                );
                self.log_refusal("-", 0, &refusal);
                let _ = refuse(&mut stream, &refusal).await;
                return None;
            };
            let head = match head::read(&mut stream, forward.handshake_timeout).await {
                Ok(head) => head,
                Err(HeadError::Closed | HeadError::Io(_)) => return None,
                Err(error) => {
                    let refusal = Refusal::from(error);
                    self.log_refusal("-", 0, &refusal);
                    let _ = refuse(&mut stream, &refusal).await;
                    return None;
                }
            };
            match head.target.clone() {
                Target::Connect { host, port } => {
                    self.connect(stream, head, &host, port, &policy, &forward, shutdown)
                        .await;
                    return None;
                }
                Target::Absolute { host, port, .. } => {
                    match forward.decide(&host, port, Asked::Absolute) {
                        Decision::Intercept => {
                            self.count(Action::Intercept);
                            stream.rewind(&head.bytes);
                            stream = self.exchange_one(stream, shutdown).await?;
                        }
                        Decision::Tunnel => {
                            self.forward_plain(stream, head, &host, port, &policy, &forward)
                                .await;
                            return None;
                        }
                        Decision::Refuse(why) => {
                            let refusal = Refusal::new(403, "Forbidden", why);
                            self.log_refusal(&host, port, &refusal);
                            let _ = refuse(&mut stream, &refusal).await;
                            return None;
                        }
                    }
                }
            }
        }
    }

    async fn cleanup(&self) {
        self.exchange.http_cleanup().await;
    }
}

impl ForwardApp {
    #[allow(clippy::too_many_arguments)]
    async fn connect(
        self: &Arc<Self>,
        mut stream: L4Stream,
        head: Head,
        host: &str,
        port: u16,
        policy: &Policy,
        forward: &ForwardPolicy,
        shutdown: &ShutdownWatch,
    ) {
        let started = Instant::now();
        match forward.decide(host, port, Asked::Connect) {
            Decision::Refuse(why) => {
                let refusal = Refusal::new(403, "Forbidden", why);
                self.log_refusal(host, port, &refusal);
                let _ = refuse(&mut stream, &refusal).await;
            }
            Decision::Intercept => {
                if established(&mut stream).await.is_err() {
                    return;
                }
                stream.rewind(head.rest());
                let accepted = self
                    .interceptor
                    .accept(stream, host, &forward.ca, forward.handshake_timeout)
                    .await;
                match accepted {
                    Ok(tls) => {
                        self.count(Action::Intercept);
                        tracing::debug!(target: "sluice::forward", host, port, action = "intercept", "TLS terminated");
                        // h2 or HTTP/1.1 by ALPN, keep-alive and shutdown as on the proxy listener.
                        ServerApp::process_new(&self.exchange, Box::new(tls), shutdown).await;
                    }
                    Err(e) => {
                        self.count(Action::HandshakeFailed);
                        // Often the client not trusting Sluice's CA: say which CA it was shown.
                        tracing::info!(
                            target: "sluice::forward", host, port, action = Action::HandshakeFailed.label(),
                            ca = %forward.ca.fingerprint, "{e} (does the client trust Sluice's CA?)"
                        );
                    }
                }
            }
            Decision::Tunnel => {
                let Some(target) = self.dial(&mut stream, policy, forward, host, port).await else {
                    return;
                };
                if established(&mut stream).await.is_err() {
                    return;
                }
                stream.rewind(head.rest());
                let result = tunnel::splice(stream, target, forward.idle_timeout).await;
                log_tunnel(host, port, started, result);
            }
        }
    }

    /// The tunnel's target, dialled as the policy allows; or the client is told why not.
    async fn dial(
        &self,
        client: &mut L4Stream,
        policy: &Policy,
        forward: &ForwardPolicy,
        host: &str,
        port: u16,
    ) -> Option<tokio::net::TcpStream> {
        match tunnel::dial(forward, &policy.resolve, host, port).await {
            Ok(target) => {
                self.count(Action::Tunnel);
                Some(target)
            }
            Err(e) => {
                let refusal = Refusal::from(e);
                self.log_refusal(host, port, &refusal);
                let _ = refuse(client, &refusal).await;
                None
            }
        }
    }

    /// One plain absolute-form request through the exchange; the connection back if it may
    /// carry another request.
    async fn exchange_one(
        self: &Arc<Self>,
        stream: L4Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<L4Stream> {
        let mut session = ServerSession::new_http1(Box::new(stream));
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECONDS));
        let reused = self.exchange.process_new_http(session, shutdown).await?;
        let (stream, _settings) = reused.consume();
        stream.into_any().downcast::<L4Stream>().ok().map(|s| *s)
    }

    /// A tunnelled absolute-form request: sent to its target as it came, but for hop-by-hop
    /// headers and `Connection: close` (the next request on this connection may be for another
    /// host, so this one is the connection's last).
    async fn forward_plain(
        &self,
        mut stream: L4Stream,
        head: Head,
        host: &str,
        port: u16,
        policy: &Policy,
        forward: &ForwardPolicy,
    ) {
        let started = Instant::now();
        let Some(mut target) = self.dial(&mut stream, policy, forward, host, port).await else {
            return;
        };
        let request = closing_head(&head.bytes[..head.len]);
        if target.write_all(&request).await.is_err() {
            return;
        }
        stream.rewind(head.rest());
        let result = tunnel::splice(stream, target, forward.idle_timeout).await;
        log_tunnel(host, port, started, result);
    }
}

/// The head with `Connection`, `Keep-Alive`, `Proxy-Connection` and `Proxy-Authorization`
/// removed and `Connection: close` added. Header lines are otherwise kept byte for byte.
fn closing_head(head: &[u8]) -> Vec<u8> {
    const DROPPED: [&[u8]; 4] = [
        b"connection:",
        b"keep-alive:",
        b"proxy-connection:",
        b"proxy-authorization:",
    ];
    let mut out = Vec::with_capacity(head.len() + 20);
    let mut lines = head.split_inclusive(|&b| b == b'\n');
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
    }
    for line in lines {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let dropped = DROPPED
            .iter()
            .any(|name| line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name));
        if !dropped {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

async fn established(stream: &mut L4Stream) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    stream.flush().await
}

async fn refuse(stream: &mut L4Stream, refusal: &Refusal) -> std::io::Result<()> {
    stream.write_all(&refusal.bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

fn log_tunnel(host: &str, port: u16, started: Instant, result: std::io::Result<tunnel::Spliced>) {
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(moved) => tracing::info!(
            target: "sluice::forward",
            host, port, action = "tunnel", up_bytes = moved.up, down_bytes = moved.down, duration_ms,
            "tunnel closed"
        ),
        Err(e) => tracing::info!(
            target: "sluice::forward",
            host, port, action = "tunnel", duration_ms, "tunnel ended: {e}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_head_closes_its_connection() {
        let head = b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nX-Keep: yes\r\nProxy-Authorization: Basic abc\r\n\r\n";
        let out = String::from_utf8(closing_head(head)).unwrap();
        assert_eq!(
            out,
            "GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\nX-Keep: yes\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn refusals_are_plain_http() {
        let text = String::from_utf8(Refusal::new(403, "Forbidden", "no").bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nsluice: no\n"), "{text}");
        assert!(text.contains("content-length: 11\r\n"), "{text}");
    }
}
