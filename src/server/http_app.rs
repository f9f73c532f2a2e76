//! The HTTP side of a listener: each request's head is read here and the request handed to its
//! [`Handler`] (the exchange), which answers it whole; the connection is then kept for the next
//! request or closed.
//!
//! Sluice answers every request itself, so Pingora's proxy framework (`pingora-proxy`'s
//! `HttpProxy`, its phases, downstream modules and upstream path) had nothing to do but wrap
//! the exchange: its per-request future was 8.7 KiB, moved into a box on every request and
//! held for as long as a stream was open, and its modules and shutdown notifier were built and
//! run per request. This app does what that wrapper did for Sluice — read the head (giving up
//! a kept-alive connection that waits for one when the server shuts down), refuse a malformed
//! head (400) and `CONNECT` (405, as Pingora's proxy does: a tunnel belongs to the forward
//! listener), keep the connection if the exchange ended cleanly — on Pingora's own HTTP/1 and
//! HTTP/2 server sessions.

use std::sync::Arc;

use async_trait::async_trait;
use http::Method;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType};

/// Answers one request whose head has been read.
#[async_trait]
pub trait Handler: Send + Sync {
    /// `Err`: the connection is in no state to carry another request (the caller left, the
    /// upstream broke mid-answer, or nothing could be answered) and is closed.
    async fn answer(&self, session: &mut ServerSession) -> Result<(), Box<Error>>;
}

/// A listener's HTTP app around its request handler.
pub struct HttpApp<H> {
    handler: H,
    options: HttpServerOptions,
}

impl<H> HttpApp<H> {
    pub fn new(handler: H, options: HttpServerOptions) -> Self {
        Self { handler, options }
    }
}

#[async_trait]
impl<H: Handler + 'static> HttpServerApp for HttpApp<H> {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let mut stopping = shutdown.clone();
        let read = tokio::select! {
            // Biased: a head already sent is read and answered rather than dropped.
            biased;
            read = session.read_request() => read,
            () = shut_down(&mut stopping) => return None,
        };
        match read {
            Ok(true) => {}
            // The caller closed a kept-alive connection without another request.
            Ok(false) => return None,
            Err(e) => {
                if e.etype == ErrorType::InvalidHTTPHeader {
                    tracing::debug!("malformed request head: {e}");
                    let _ = session.respond_error(400).await;
                } else {
                    tracing::debug!("reading a request head failed: {e}");
                }
                session.shutdown().await;
                return None;
            }
        }
        if session.req_header().method == Method::CONNECT {
            let _ = session.respond_error(405).await;
            session.shutdown().await;
            return None;
        }
        if *shutdown.borrow() {
            // Answered, but the connection is not kept for another request.
            session.set_keepalive(None);
        }
        self.handler.answer(&mut session).await.ok()?;
        let settings = HttpPersistentSettings::for_session(&session);
        let stream = session.finish().await.ok().flatten()?;
        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

/// Resolves once the server is shutting down (never, if its watch is gone).
async fn shut_down(watch: &mut ShutdownWatch) {
    while !*watch.borrow_and_update() {
        if watch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
