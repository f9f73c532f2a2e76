//! Upstream connections: HTTP/1 keep-alive connections pooled by Sluice itself (and spoken to by
//! Sluice's own client, `http1`), new connections and HTTP/2 through Pingora's connector.
//!
//! Why not Pingora's HTTP/1 pool: it parks every idle connection on a task of its own and hands
//! it back through a mutex and `Arc::try_unwrap`, which races with that task on a multi-threaded
//! runtime (cloudflare/pingora#998): about one reuse in twenty under steady load threw a healthy
//! connection away and dialled a new one, and every reuse paid a cross-task wake-up. Here an
//! idle connection is a plain value in a list: taking one is a lock, a pop and a non-blocking
//! read that proves it is still open; a background sweep closes the ones that expired or that
//! the upstream closed, so their descriptors do not linger.
//!
//! Idle connections are kept per worker thread: the proxy runs one single-threaded runtime per
//! worker (see `server`), and a connection's socket is watched by the reactor of the thread that
//! opened it. Handed to a request on another worker, its every readiness event would be caught
//! by the first thread and passed over with an eventfd write and a second wake-up.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::FutureExt;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::AsyncReadExt;

use super::http1::Http1Client;

/// How often the sweep looks for expired or closed idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Connections to upstreams: pooled HTTP/1 connections first, otherwise Pingora's connector
/// (a new connection, or a shared HTTP/2 one).
pub struct UpstreamConnector {
    pingora: Arc<Connector>,
    idle: IdlePool,
    idle_timeout: Duration,
}

impl UpstreamConnector {
    /// `pool_size`: idle HTTP/1 connections kept per upstream address, and the size of
    /// Pingora's pool for HTTP/2; `idle_timeout`: how long an idle connection is kept.
    pub fn new(pool_size: usize, idle_timeout: Duration) -> Self {
        let mut options = ConnectorOptions::new(pool_size);
        options.keepalive_pool_size = pool_size;
        Self {
            pingora: Arc::new(Connector::new(Some(options))),
            idle: IdlePool::new(pool_size, idle_timeout),
            idle_timeout,
        }
    }

    /// How long an idle upstream connection is kept for reuse.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// A session to `peer` and whether its connection was reused: HTTP/1 over Sluice's own
    /// client (`http1`), HTTP/2 over Pingora's.
    pub async fn get(&self, peer: &HttpPeer) -> pingora::Result<(UpstreamSession, bool)> {
        let write_timeout = peer.options.write_timeout;
        if let Some(stream) = self.idle.take(PoolKey::of(peer)) {
            let client = Http1Client::new(stream, write_timeout);
            return Ok((UpstreamSession::H1(client), true));
        }
        let (session, reused) = self.pingora.get_http_session(peer).await?;
        Ok(match session {
            HttpSession::H1(h1) => {
                let client = Http1Client::new(h1.into_inner(), write_timeout);
                (UpstreamSession::H1(client), reused)
            }
            other => (UpstreamSession::Pingora(other), reused),
        })
    }

    /// Returns a finished session's connection for reuse, when its protocol state allows it;
    /// otherwise it is closed. Never waits: an HTTP/1 connection goes back to this worker's
    /// list, an HTTP/2 stream is handed back to Pingora's pool on a task of its own.
    pub fn release(&self, session: UpstreamSession, peer: &HttpPeer) {
        match session {
            UpstreamSession::H1(client) => {
                if let Some(stream) = client.into_reusable() {
                    self.idle.put(PoolKey::of(peer), stream);
                }
            }
            UpstreamSession::Pingora(other) => {
                let (pingora, peer, idle) = (self.pingora.clone(), peer.clone(), self.idle_timeout);
                tokio::spawn(async move {
                    pingora.release_http_session(other, &peer, Some(idle)).await;
                });
            }
        }
    }

    /// Closes idle connections that expired or that the upstream closed.
    pub fn sweep(&self) {
        self.idle.sweep(Instant::now());
    }
}

/// The background service that sweeps the pool every second.
pub struct PoolSweeper(pub Arc<UpstreamConnector>);

#[async_trait]
impl BackgroundService for PoolSweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.0.sweep(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One request's exchange with an upstream: HTTP/1 through Sluice's client, HTTP/2 (a shared
/// connection) through Pingora's.
pub enum UpstreamSession {
    H1(Http1Client),
    Pingora(HttpSession),
}

impl UpstreamSession {
    /// Sends the request head and its whole body.
    pub async fn write_request(
        &mut self,
        request: RequestHeader,
        body: &Bytes,
    ) -> pingora::Result<()> {
        match self {
            Self::H1(client) => client.write_request(&request, body).await,
            Self::Pingora(session) => {
                session.write_request_header(Box::new(request)).await?;
                if !body.is_empty() {
                    session.write_request_body(body.clone(), true).await?;
                }
                session.finish_request_body().await
            }
        }
    }

    pub async fn read_response_header(&mut self) -> pingora::Result<()> {
        match self {
            Self::H1(client) => client.read_response_header().await,
            Self::Pingora(session) => session.read_response_header().await,
        }
    }

    pub fn response_header(&self) -> Option<&ResponseHeader> {
        match self {
            Self::H1(client) => client.response_header(),
            Self::Pingora(session) => session.response_header(),
        }
    }

    /// The next piece of the response body; `None` at its end.
    pub async fn read_response_body(&mut self) -> pingora::Result<Option<Bytes>> {
        match self {
            Self::H1(client) => client.read_response_body().await,
            Self::Pingora(session) => session.read_response_body().await,
        }
    }

    pub fn response_done(&mut self) -> bool {
        match self {
            Self::H1(client) => client.response_done(),
            Self::Pingora(session) => session.response_done(),
        }
    }

    /// The longest wait for each read of the response body.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        match self {
            Self::H1(client) => client.set_read_timeout(timeout),
            Self::Pingora(session) => session.set_read_timeout(timeout),
        }
    }
}

/// Where an idle connection may be reused: the same upstream address (the peer's reuse hash:
/// address, TLS, SNI, CA) on the same worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PoolKey {
    peer: u64,
    worker: u32,
}

impl PoolKey {
    fn of(peer: &HttpPeer) -> Self {
        Self {
            peer: peer.reuse_hash(),
            worker: WORKER.with(|worker| *worker),
        }
    }
}

static NEXT_WORKER: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// This thread's number among the threads that have used the pool.
    static WORKER: u32 = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
}

struct Idle {
    stream: Stream,
    since: Instant,
}

/// Idle HTTP/1 connections by upstream address and worker, newest last: the most recently used
/// connection is taken first, so the oldest expire.
struct IdlePool {
    by_peer: Mutex<HashMap<PoolKey, VecDeque<Idle>>>,
    per_peer: usize,
    idle_timeout: Duration,
}

impl IdlePool {
    fn new(per_peer: usize, idle_timeout: Duration) -> Self {
        Self {
            by_peer: Mutex::new(HashMap::new()),
            per_peer,
            idle_timeout,
        }
    }

    fn take(&self, key: PoolKey) -> Option<Stream> {
        let now = Instant::now();
        loop {
            // The lock is not held while a closed connection is dropped (a syscall).
            let idle = self.by_peer.lock().ok()?.get_mut(&key)?.pop_back()?;
            if now.duration_since(idle.since) < self.idle_timeout {
                let mut stream = idle.stream;
                if still_open(&mut stream) {
                    return Some(stream);
                }
            }
        }
    }

    fn put(&self, key: PoolKey, stream: Stream) {
        if self.per_peer == 0 {
            return;
        }
        let evicted = {
            let Ok(mut by_peer) = self.by_peer.lock() else {
                return;
            };
            let list = by_peer.entry(key).or_default();
            list.push_back(Idle {
                stream,
                since: Instant::now(),
            });
            (list.len() > self.per_peer).then(|| list.pop_front())
        };
        drop(evicted);
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        self.by_peer
            .lock()
            .map_or(0, |by_peer| by_peer.values().map(VecDeque::len).sum())
    }

    fn sweep(&self, now: Instant) {
        let closed: Vec<Idle> = {
            let Ok(mut by_peer) = self.by_peer.lock() else {
                return;
            };
            let mut closed = Vec::new();
            by_peer.retain(|_, list| {
                let mut kept = VecDeque::with_capacity(list.len());
                for mut idle in list.drain(..) {
                    if now.duration_since(idle.since) < self.idle_timeout
                        && still_open(&mut idle.stream)
                    {
                        kept.push_back(idle);
                    } else {
                        closed.push(idle);
                    }
                }
                *list = kept;
                !list.is_empty()
            });
            closed
        };
        drop(closed);
    }
}

/// Whether an idle connection is still usable: a read that would block means open and quiet;
/// end of stream, an error or unexpected data (the upstream never speaks first on an idle
/// HTTP/1 connection) mean it must be closed. Pingora's pool checks the same way.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tcp_pair;
    use pingora::protocols::l4;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    fn key(peer: u64) -> PoolKey {
        PoolKey { peer, worker: 0 }
    }

    fn wrap(client: TcpStream) -> Stream {
        Box::new(l4::stream::Stream::from(client))
    }

    async fn pair() -> (Stream, TcpStream) {
        let (client, server) = tcp_pair().await;
        (wrap(client), server)
    }

    /// A connection whose upstream closed it, once the client side has seen the end.
    async fn closed() -> Stream {
        let (client, server) = tcp_pair().await;
        drop(server);
        client.readable().await.unwrap();
        wrap(client)
    }

    #[tokio::test]
    async fn an_open_connection_is_reused_newest_first() {
        let pool = IdlePool::new(4, Duration::from_secs(60));
        let (first, _server_a) = pair().await;
        let (second, _server_b) = pair().await;
        let second_id = second.id();
        pool.put(key(7), first);
        pool.put(key(7), second);
        assert_eq!(pool.take(key(7)).map(|s| s.id()), Some(second_id));
        assert!(
            pool.take(key(8)).is_none(),
            "another peer's key finds nothing"
        );
        let other_worker = PoolKey { peer: 7, worker: 1 };
        assert!(
            pool.take(other_worker).is_none(),
            "another worker's key finds nothing"
        );
        assert_eq!(pool.count(), 1);
    }

    #[test]
    fn each_thread_has_its_own_worker_number() {
        let here = WORKER.with(|worker| *worker);
        let there = std::thread::spawn(|| WORKER.with(|worker| *worker))
            .join()
            .unwrap();
        assert_ne!(here, there);
        assert_eq!(here, WORKER.with(|worker| *worker), "stable on its thread");
    }

    #[tokio::test]
    async fn closed_expired_or_chatty_connections_are_not_reused() {
        let pool = IdlePool::new(4, Duration::from_secs(60));
        let (chatty, mut server) = tcp_pair().await;
        server.write_all(b"HTTP/1.1 408\r\n\r\n").await.unwrap();
        chatty.readable().await.unwrap();
        pool.put(key(1), closed().await);
        pool.put(key(1), wrap(chatty));
        assert!(pool.take(key(1)).is_none());

        let (open, _server) = pair().await;
        pool.put(key(2), open);
        pool.sweep(Instant::now() + Duration::from_secs(61));
        assert_eq!(pool.count(), 0, "expired connections are swept");
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_its_size_per_peer() {
        let pool = IdlePool::new(2, Duration::from_secs(60));
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (stream, server) = pair().await;
            servers.push(server);
            pool.put(key(1), stream);
        }
        assert_eq!(pool.count(), 2);
        pool.put(key(3), closed().await);
        pool.sweep(Instant::now());
        assert_eq!(
            pool.count(),
            2,
            "the closed connection is swept, the open ones kept"
        );
    }
}
