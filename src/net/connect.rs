//! A TCP connection to a backend, opened as tokio's `TcpStream::connect` opens one but
//! without asking the socket for its error (`getsockopt(SO_ERROR)`) once it is writable:
//! a connect that failed says so in its readiness (error or hang-up), and only then is the
//! error fetched. One system call fewer per login.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Connects to `addr` (unbounded: the caller's deadline applies), with TCP_NODELAY set.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    // A non-blocking socket whose connect is under way (EINPROGRESS), as tokio's own.
    let started = mio::net::TcpStream::connect(addr)?;
    let tcp = TcpStream::from_std(std::net::TcpStream::from(OwnedFd::from(started)))?;
    let ready = tcp.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(tcp
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
    }
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connects_and_carries_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(connect(addr), listener.accept());
        let (mut client, (mut server, _)) = (client.unwrap(), accepted.unwrap());
        assert!(client.nodelay().unwrap());
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_refused_connect_is_the_socket_error() {
        // A port nobody listens on: bound, then closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = connect(addr).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
