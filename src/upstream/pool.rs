//! Upstream connections: HTTP/1 keep-alive connections pooled by Sluice itself, new connections
//! and HTTP/2 through Pingora's connector.
//!
//! Why not Pingora's HTTP/1 pool: it parks every idle connection on a task of its own and hands
//! it back through a mutex and `Arc::try_unwrap`, which races with that task on a multi-threaded
//! runtime (cloudflare/pingora#998): about one reuse in twenty under steady load threw a healthy
//! connection away and dialled a new one, and every reuse paid a cross-task wake-up. Here an
//! idle connection is a plain value in a list: taking one is a lock, a pop and a non-blocking
//! read that proves it is still open; a background sweep closes the ones that expired or that
//! the upstream closed, so their descriptors do not linger.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::AsyncReadExt;

/// How often the sweep looks for expired or closed idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Connections to upstreams: pooled HTTP/1 connections first, otherwise Pingora's connector
/// (a new connection, or a shared HTTP/2 one).
pub struct UpstreamConnector {
    pingora: Connector,
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
            pingora: Connector::new(Some(options)),
            idle: IdlePool::new(pool_size, idle_timeout),
            idle_timeout,
        }
    }

    /// How long an idle upstream connection is kept for reuse.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// A session to `peer` and whether its connection was reused.
    pub async fn get(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        if let Some(stream) = self.idle.take(peer.reuse_hash()) {
            return Ok((
                HttpSession::H1(Http1Session::new_with_options(stream, peer)),
                true,
            ));
        }
        self.pingora.get_http_session(peer).await
    }

    /// Returns a finished session's connection for reuse, when its protocol state allows it;
    /// otherwise it is closed.
    pub async fn release(&self, session: HttpSession, peer: &HttpPeer) {
        match session {
            HttpSession::H1(mut h1) => {
                h1.respect_keepalive();
                if let Some(stream) = h1.reuse().await {
                    self.idle.put(peer.reuse_hash(), stream);
                }
            }
            other => {
                self.pingora
                    .release_http_session(other, peer, Some(self.idle_timeout))
                    .await
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

struct Idle {
    stream: Stream,
    since: Instant,
}

/// Idle HTTP/1 connections by upstream address (the peer's reuse hash: address, TLS, SNI, CA),
/// newest last: the most recently used connection is taken first, so the oldest expire.
struct IdlePool {
    by_peer: Mutex<HashMap<u64, VecDeque<Idle>>>,
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

    fn take(&self, key: u64) -> Option<Stream> {
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

    fn put(&self, key: u64, stream: Stream) {
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
    use pingora::protocols::l4;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
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
        pool.put(7, first);
        pool.put(7, second);
        assert_eq!(pool.take(7).map(|s| s.id()), Some(second_id));
        assert!(pool.take(8).is_none(), "another peer's key finds nothing");
        assert_eq!(pool.count(), 1);
    }

    #[tokio::test]
    async fn closed_expired_or_chatty_connections_are_not_reused() {
        let pool = IdlePool::new(4, Duration::from_secs(60));
        let (chatty, mut server) = tcp_pair().await;
        server.write_all(b"HTTP/1.1 408\r\n\r\n").await.unwrap();
        chatty.readable().await.unwrap();
        pool.put(1, closed().await);
        pool.put(1, wrap(chatty));
        assert!(pool.take(1).is_none());

        let (open, _server) = pair().await;
        pool.put(2, open);
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
            pool.put(1, stream);
        }
        assert_eq!(pool.count(), 2);
        pool.put(3, closed().await);
        pool.sweep(Instant::now());
        assert_eq!(
            pool.count(),
            2,
            "the closed connection is swept, the open ones kept"
        );
    }
}
