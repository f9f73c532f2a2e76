//! What the unit tests of the process's parts share.

use tokio::net::{TcpListener, TcpStream};

/// Both ends of a real loopback TCP connection: the connecting one, then the accepted one.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}
