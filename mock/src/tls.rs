//! HTTPS for the mock: a second listener, beside the plain one and sharing its state, that
//! terminates TLS with a certificate the test provides (ALPN h2 and http/1.1). Tests of
//! HTTPS_PROXY mode need a provider reached by name over TLS; the plain listener stays for the
//! tests' own control requests (`/_mock/*`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use openssl::ssl::{self, AlpnError, Ssl, SslAcceptor, SslFiletype, SslMethod};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_openssl::SslStream;

/// A client that opens a connection and says nothing is dropped after this long.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
const ALPN: &[u8] = b"\x02h2\x08http/1.1";

/// The certificate (chain, PEM) and key files the TLS listener presents.
#[derive(Debug, Clone)]
pub struct MockTls {
    pub certificate_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

impl MockTls {
    pub(crate) fn acceptor(&self) -> std::io::Result<SslAcceptor> {
        let failed = |what: &str, e: openssl::error::ErrorStack| {
            std::io::Error::other(format!("mock TLS: {what}: {e}"))
        };
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
            .map_err(|e| failed("setup", e))?;
        builder
            .set_certificate_chain_file(&self.certificate_file)
            .map_err(|e| failed(&format!("{}", self.certificate_file.display()), e))?;
        builder
            .set_private_key_file(&self.key_file, SslFiletype::PEM)
            .map_err(|e| failed(&format!("{}", self.key_file.display()), e))?;
        builder.set_alpn_select_callback(|_, offered| {
            ssl::select_next_proto(ALPN, offered).ok_or(AlpnError::NOACK)
        });
        Ok(builder.build())
    }
}

/// Handshakes run on tasks of their own, so one silent client does not hold up the others;
/// finished ones are handed to axum's accept loop.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(SslStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// The listener, and the accept loop to run beside the server.
    pub(crate) fn new(
        tcp: TcpListener,
        acceptor: SslAcceptor,
    ) -> std::io::Result<(Self, impl std::future::Future<Output = ()> + Send)> {
        let local = tcp.local_addr()?;
        let (sender, ready) = mpsc::channel(64);
        let accept_loop = async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok(ssl) = Ssl::new(acceptor.context()) else {
                    continue;
                };
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let Ok(mut tls) = SslStream::new(ssl, stream) else {
                        return;
                    };
                    let handshake = Pin::new(&mut tls).accept();
                    if let Ok(Ok(())) = tokio::time::timeout(HANDSHAKE_LIMIT, handshake).await {
                        let _ = sender.send((tls, peer)).await;
                    }
                });
            }
        };
        Ok((Self { ready, local }, accept_loop))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = SslStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended: the server is being dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
