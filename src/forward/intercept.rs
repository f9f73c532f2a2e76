//! Interception: TLS terminated with a certificate minted for the host the client asked for
//! (ALPN h2 and http/1.1), then the very exchange of the proxy listener on the decrypted
//! requests — [`ForwardedExchange`] wraps [`SluiceProxy`] and only checks that each request is
//! for the host its connection was opened to.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{header, StatusCode};
use pingora::listeners::TlsAccept;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::{server::handshake_with_callback, SslStream, TlsRef};
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::{self, AlpnError, SslAcceptor, SslMethod};
use sluice_filters::{ErrorKind, Rejection};

use super::ca::{CertificateAuthority, LeafCertificate};
use super::rules::normalize_host;
use crate::exchange::{self, SluiceProxy};
use crate::policy::PolicyStore;
use crate::server::Handler;
use crate::upstream::ProviderKind;

/// ALPN protocols offered to intercepted clients, in Sluice's order of preference.
const ALPN_OFFER: &[u8] = b"\x02h2\x08http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot set up TLS: {0}")]
    Setup(#[from] pingora::tls::error::ErrorStack),
    #[error("{0}")]
    Certificate(#[from] super::ca::CaError),
    #[error("TLS handshake failed: {0}")]
    Handshake(Box<pingora::Error>),
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
}

/// The host an intercepted connection was opened to (`CONNECT host:port`), carried on the TLS
/// connection's digest to every request on it.
#[derive(Debug)]
pub struct InterceptedHost(pub String);

/// Terminates intercepted TLS; one per process, certificates chosen per connection.
pub struct Interceptor {
    acceptor: SslAcceptor,
}

impl Interceptor {
    pub fn new() -> Result<Self, InterceptError> {
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
        builder.set_alpn_select_callback(|_, offered| {
            ssl::select_next_proto(ALPN_OFFER, offered).ok_or(AlpnError::NOACK)
        });
        Ok(Self {
            acceptor: builder.build(),
        })
    }

    /// The server side of the client's TLS, presenting a certificate for `host` from `ca`.
    pub async fn accept(
        &self,
        stream: L4Stream,
        host: &str,
        ca: &CertificateAuthority,
        limit: Duration,
    ) -> Result<SslStream<L4Stream>, InterceptError> {
        let presented = Presented {
            leaf: ca.leaf(host)?,
            key: ca.leaf_key().clone(),
            host: host.to_owned(),
        };
        tokio::time::timeout(
            limit,
            handshake_with_callback(&self.acceptor, stream, &presented),
        )
        .await
        .map_err(|_| InterceptError::Timeout(limit))?
        .map_err(InterceptError::Handshake)
    }
}

/// The certificate for one connection, given to OpenSSL when the handshake asks for one.
struct Presented {
    leaf: Arc<LeafCertificate>,
    key: PKey<Private>,
    host: String,
}

#[async_trait]
impl TlsAccept for Presented {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let set = pingora::tls::ext::ssl_use_certificate(ssl, &self.leaf.certificate)
            .and_then(|()| pingora::tls::ext::ssl_use_private_key(ssl, &self.key));
        if let Err(e) = set {
            // The handshake then fails for want of a certificate; the client sees that.
            tracing::warn!(target: "sluice::forward", host = %self.host, "cannot use the minted certificate: {e}");
        }
    }

    async fn handshake_complete_callback(
        &self,
        _ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(Arc::new(InterceptedHost(self.host.clone())))
    }
}

/// The proxy listener's exchange, for requests that came through the forward listener.
pub struct ForwardedExchange {
    inner: SluiceProxy,
    policies: Arc<PolicyStore>,
}

impl ForwardedExchange {
    pub fn new(inner: SluiceProxy, policies: Arc<PolicyStore>) -> Self {
        Self { inner, policies }
    }
}

#[async_trait]
impl Handler for ForwardedExchange {
    async fn answer(&self, session: &mut ServerSession) -> pingora::Result<()> {
        let intercepted = session
            .digest()
            .and_then(|digest| digest.ssl_digest.as_ref())
            .and_then(|tls| tls.extension.get::<InterceptedHost>())
            .map(|host| host.0.clone());
        match intercepted {
            Some(expected) => {
                let asked = exchange::request_host(session.req_header()).map(normalize_host);
                if asked.as_deref() != Some(expected.as_str()) {
                    // A request for another host on a connection opened to this one
                    // (RFC 9110 §15.5.20): routing it would be by a host the client did not
                    // CONNECT to.
                    let path = session.req_header().uri.path().to_owned();
                    let provider = self
                        .policies
                        .current()
                        .route_for(Some(&expected), &path)
                        .map_or(ProviderKind::Openai, |route| route.provider);
                    let message = format!(
                        "this connection was opened to {expected}; the request is for {}",
                        asked.as_deref().unwrap_or("no host")
                    );
                    let rejection = Rejection::new(
                        StatusCode::MISDIRECTED_REQUEST,
                        ErrorKind::InvalidRequest,
                        message,
                    );
                    exchange::reject(session, provider, rejection, self.policies.metrics()).await?;
                    return Ok(());
                }
            }
            None => {
                // A plain absolute-form request: a proxy goes by the URI's authority, not by
                // the Host header (RFC 9112 §3.2.2).
                if let Some(authority) = session.req_header().uri.authority().cloned() {
                    let _ = session
                        .req_header_mut()
                        .insert_header(header::HOST, authority.as_str());
                }
            }
        }
        self.inner.answer(session).await
    }
}
