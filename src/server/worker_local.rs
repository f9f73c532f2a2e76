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
//! deregistered and closed), then serves every request of the connection itself.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora::server::ShutdownWatch;

/// A listener app whose connections are registered with the reactor of the thread serving them.
pub struct WorkerLocal<A>(pub Arc<A>);

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for WorkerLocal<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = rehome(stream)?;
        // Served here rather than handed back to Pingora between requests: a connection
        // returned for reuse would come back through `process_new` and be moved again.
        loop {
            stream = ServerApp::process_new(&self.0, stream, shutdown).await?;
        }
    }

    async fn cleanup(&self) {
        self.0.cleanup().await;
    }
}

/// The same connection, registered with the current thread's reactor. A stream that is not a
/// TCP connection is left as it is; `None` when the connection could not be registered here
/// (the reactor could not grow), which closes it as a failed accept would.
fn rehome(stream: Stream) -> Option<Stream> {
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
    Some(Box::new(moved))
}
