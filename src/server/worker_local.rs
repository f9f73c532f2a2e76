//! Each downstream connection is watched by the reactor of the worker thread that serves it.
//!
//! The proxy listeners run on Pingora's no-steal runtime: one single-threaded tokio runtime per
//! worker thread, a connection's task pinned to one of them. That keeps a request's work on one
//! thread (no work-stealing wake-ups of an idle worker on every event, which cost two system
//! calls and a context switch per request). But Pingora accepts every connection on the
//! listener's thread, which registers the socket with *that* thread's reactor, and then spawns
//! the connection's task on a random worker: for half of the connections every readiness event
//! was caught by the other thread and handed over with an eventfd write and a second wake-up.
//!
//! [`WorkerLocal`] sits in front of the listener's app: before the first request it moves the
//! socket to the current worker's reactor (a duplicate descriptor registered here, the original
//! deregistered and closed), then serves every request of the connection itself. For an HTTP
//! app the moved stream gets the small write buffer Pingora's listener gives its streams, so a
//! response head and a short body still leave in one segment.
//!
//! Pingora puts each new connection on a random worker, so a few connections can all land on
//! one thread while the other idles (no work stealing to even it out). [`WorkerLocal`] counts
//! the connections each worker serves and hands a new one to the worker with the fewest.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

/// The write buffer of a moved HTTP connection: Pingora's own default for accepted streams
/// (one TCP segment's payload).
const WRITE_BUFFER: usize = 1460;

/// A listener app whose connections are registered with the reactor of the thread serving them.
pub struct WorkerLocal<A> {
    app: Arc<A>,
    buffer_writes: bool,
    workers: Workers,
}

impl<A> WorkerLocal<A> {
    /// For an HTTP app: the moved stream gathers writes as Pingora's accepted streams do.
    pub fn http(app: A) -> Self {
        Self {
            app: Arc::new(app),
            buffer_writes: true,
            workers: Workers::default(),
        }
    }

    /// For an app that needs Pingora's own TCP stream type (the forward listener reads its
    /// CONNECT head from it and puts TLS on top, which gathers its own records).
    pub fn raw(app: A) -> Self {
        Self {
            app: Arc::new(app),
            buffer_writes: false,
            workers: Workers::default(),
        }
    }
}

impl<A: ServerApp + Send + Sync + 'static> WorkerLocal<A> {
    /// Serves the connection on this thread until it ends.
    async fn serve(&self, stream: Stream, shutdown: &ShutdownWatch, worker: &Worker) {
        let _serving = worker.serving();
        let Some(mut stream) = rehome(stream, self.buffer_writes) else {
            return;
        };
        // Served here rather than handed back to Pingora between requests: a connection
        // returned for reuse would come back through `process_new` and be moved again.
        while let Some(next) = ServerApp::process_new(&self.app, stream, shutdown).await {
            stream = next;
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for WorkerLocal<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let here = self.workers.current();
        let chosen = self.workers.least_busy(&here);
        if Arc::ptr_eq(&chosen, &here) {
            self.serve(stream, shutdown, &here).await;
        } else {
            // Handed over before its socket is moved, so it is registered where it is served.
            let (this, shutdown) = (self.clone(), shutdown.clone());
            let handle = chosen.handle.clone();
            handle.spawn(async move { this.serve(stream, &shutdown, &chosen).await });
        }
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// A worker thread's runtime and the connections it serves.
struct Worker {
    thread: std::thread::ThreadId,
    handle: tokio::runtime::Handle,
    connections: AtomicUsize,
}

impl Worker {
    /// Counts a connection for as long as the guard lives.
    fn serving(&self) -> impl Drop + '_ {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Serving(&self.connections)
    }
}

struct Serving<'a>(&'a AtomicUsize);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The workers seen so far: a worker is known once Pingora has given it a connection.
#[derive(Default)]
struct Workers(Mutex<Vec<Arc<Worker>>>);

impl Workers {
    /// The worker this runs on (registered on first sight).
    fn current(&self) -> Arc<Worker> {
        let thread = std::thread::current().id();
        let mut workers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(worker) = workers.iter().find(|w| w.thread == thread) {
            return worker.clone();
        }
        let worker = Arc::new(Worker {
            thread,
            handle: tokio::runtime::Handle::current(),
            connections: AtomicUsize::new(0),
        });
        workers.push(worker.clone());
        worker
    }

    /// The worker serving the fewest connections; `here` when it is among the fewest.
    fn least_busy(&self, here: &Arc<Worker>) -> Arc<Worker> {
        let workers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let load = |w: &Worker| w.connections.load(Ordering::Relaxed);
        let fewest = workers.iter().map(|w| load(w)).min().unwrap_or(0);
        if load(here) <= fewest {
            return here.clone();
        }
        workers
            .iter()
            .find(|w| load(w) == fewest)
            .cloned()
            .unwrap_or_else(|| here.clone())
    }
}

/// The same connection, registered with the current thread's reactor. A stream that is not a
/// TCP connection is left as it is; `None` when the connection could not be registered here
/// (the reactor could not grow), which closes it as a failed accept would.
fn rehome(stream: Stream, buffer_writes: bool) -> Option<Stream> {
    let Some(l4) = stream.as_any().downcast_ref::<L4Stream>() else {
        return Some(stream);
    };
    let peer = match l4.get_socket_digest().and_then(|d| d.peer_addr().cloned()) {
        Some(peer @ SocketAddr::Inet(_)) => peer,
        _ => return Some(stream),
    };
    // SAFETY: `F_DUPFD_CLOEXEC` on the stream's open descriptor returns a new descriptor (or -1)
    // and touches no memory.
    let duplicate = unsafe { libc::fcntl(l4.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        return Some(stream);
    }
    // Dropping the original deregisters it from the accepting thread's reactor (while its
    // descriptor is still open) and closes it; the socket lives on in the duplicate.
    drop(stream);
    // SAFETY: `duplicate` is a descriptor of a connected TCP socket that nothing else owns.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(duplicate) };
    let socket = match tokio::net::TcpStream::from_std(socket) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!("a connection could not be registered with its worker thread: {e}");
            return None;
        }
    };
    let mut moved = L4Stream::from(socket);
    let digest = SocketDigest::from_raw_fd(moved.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer));
    moved.set_socket_digest(digest);
    if buffer_writes {
        return Some(Box::new(Buffered(BufWriter::with_capacity(
            WRITE_BUFFER,
            moved,
        ))));
    }
    Some(Box::new(moved))
}

/// A moved connection with a write buffer; everything else is the TCP stream's own.
#[derive(Debug)]
struct Buffered(BufWriter<L4Stream>);

impl AsyncRead for Buffered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        // Flushes what is buffered, then shuts the connection down, as Pingora's stream does.
        let _ = AsyncWriteExt::shutdown(&mut self.0).await;
    }
}

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.0.get_ref().id()
    }
}

impl Ssl for Buffered {}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.0.get_ref().get_timing_digest()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.0.get_ref().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.get_mut().set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.0.get_ref().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.0.get_mut().set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Buffered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tcp_pair;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// An accepted connection as Pingora's listener hands it over (an L4 stream with its
    /// peer address), and the client's end.
    async fn accepted() -> (Stream, TcpStream, std::net::SocketAddr) {
        let (client, socket) = tcp_pair().await;
        let peer = socket.peer_addr().unwrap();
        let mut stream = L4Stream::from(socket);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        let _ = digest.peer_addr.set(Some(SocketAddr::Inet(peer)));
        stream.set_socket_digest(digest);
        (Box::new(stream), client, peer)
    }

    #[tokio::test]
    async fn a_moved_connection_keeps_its_peer_and_its_bytes() {
        let (stream, mut client, peer) = accepted().await;
        let before = stream.id();
        client.write_all(b"ping").await.unwrap();
        let mut moved = rehome(stream, false).unwrap();
        assert_ne!(moved.id(), before, "a new descriptor, registered here");
        assert!(
            moved.as_any().is::<L4Stream>(),
            "raw: still Pingora's stream type"
        );
        let digest = moved.get_socket_digest().unwrap();
        assert_eq!(digest.peer_addr(), Some(&SocketAddr::Inet(peer)));
        let mut got = [0u8; 4];
        moved.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"ping",
            "bytes sent before the move are read after it"
        );
        moved.write_all(b"pong").await.unwrap();
        moved.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(moved);
        assert_eq!(
            client.read(&mut got).await.unwrap(),
            0,
            "closed with the moved stream"
        );
    }

    #[tokio::test]
    async fn an_http_connection_gathers_its_writes_until_a_flush() {
        let (stream, mut client, _) = accepted().await;
        let mut moved = rehome(stream, true).unwrap();
        moved.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        moved.write_all(b"body").await.unwrap();
        let mut got = [0u8; 23];
        let early = tokio::time::timeout(Duration::from_millis(100), client.read(&mut got)).await;
        assert!(early.is_err(), "nothing leaves before the flush");
        moved.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\nbody");
        // Reads, the peek Pingora's HTTP/2 detection uses, and the digests pass through.
        client.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut peeked = [0u8; 3];
        assert!(moved.try_peek(&mut peeked).await.unwrap());
        let mut read = [0u8; 14];
        moved.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"PRI * HTTP/2.0", "the peeked bytes are read again");
        assert!(moved.get_socket_digest().unwrap().peer_addr().is_some());
        assert!(moved.get_timing_digest()[0].is_some());
    }

    #[tokio::test]
    async fn a_new_connection_goes_to_the_worker_serving_the_fewest() {
        let workers = Workers::default();
        let here = workers.current();
        assert!(
            Arc::ptr_eq(&here, &workers.current()),
            "one entry per thread"
        );
        // Another worker thread, known once it has run a connection.
        let other = std::thread::spawn({
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let workers = Arc::new(workers);
            let theirs = workers.clone();
            move || (runtime.block_on(async move { theirs.current() }), workers)
        });
        let (there, workers) = other.join().unwrap();
        let workers = Arc::try_unwrap(workers).ok().unwrap();
        assert!(
            Arc::ptr_eq(&workers.least_busy(&here), &here),
            "a tie stays here"
        );
        let busy = [here.serving(), here.serving()];
        assert!(Arc::ptr_eq(&workers.least_busy(&here), &there));
        let _theirs = [there.serving(), there.serving(), there.serving()];
        assert!(Arc::ptr_eq(&workers.least_busy(&there), &here));
        drop(busy);
        assert_eq!(
            here.connections.load(Ordering::Relaxed),
            0,
            "counted while served"
        );
    }

    #[tokio::test]
    async fn a_stream_that_is_not_tcp_is_left_alone() {
        let (one, _other) = tokio::net::UnixStream::pair().unwrap();
        let stream: Stream = Box::new(L4Stream::from(one));
        let id = stream.id();
        let kept = rehome(stream, true).unwrap();
        assert_eq!(kept.id(), id);
    }
}
