//! Plain and TLS sockets behind one type each, so front ends, backend logins and the relay
//! work the same whether or not a connection is encrypted, and STARTTLS can swap one for the
//! other in place.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

impl super::splice::PlainTcp for ClientStream {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            ClientStream::Plain(s) => Some(s),
            _ => None,
        }
    }
}

impl super::splice::PlainTcp for BackendStream {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            BackendStream::Plain(s) => Some(s),
            BackendStream::Tls(_) => None,
        }
    }
}

/// A client's connection to the director.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A unix-socket listener (LMTP from a local MTA). Never TLS.
    Unix(UnixStream),
}

impl ClientStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Runs the server side of a TLS handshake on a plain connection (implicit TLS, or after
    /// the client's STARTTLS/STLS was answered). The caller must have discarded any bytes the
    /// client sent after the STARTTLS command: they were not protected by TLS.
    pub async fn start_tls(self, acceptor: &TlsAcceptor) -> io::Result<ClientStream> {
        match self {
            ClientStream::Plain(tcp) => {
                // The handshake's future is boxed: it is large, and it would otherwise swell
                // every future that may run it (moved by value at each await).
                let stream = Box::pin(acceptor.accept(tcp)).await?;
                Ok(ClientStream::Tls(Box::new(stream)))
            }
            _ => Err(io::Error::other(
                "TLS is already active or impossible on this connection",
            )),
        }
    }
}

/// The director's connection to a backend.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    /// Runs the client side of a TLS handshake (implicit TLS, or after the backend accepted
    /// STARTTLS/STLS). `server_name` is what the backend's certificate is checked against.
    pub async fn start_tls(
        self,
        connector: &TlsConnector,
        server_name: ServerName<'static>,
    ) -> io::Result<BackendStream> {
        match self {
            BackendStream::Plain(tcp) => {
                // Boxed, as on the client side: a large future most logins never run.
                let stream = Box::pin(connector.connect(server_name, tcp)).await?;
                Ok(BackendStream::Tls(Box::new(stream)))
            }
            BackendStream::Tls(_) => Err(io::Error::other("TLS is already active")),
        }
    }
}

macro_rules! delegate_io {
    ($ty:ident { $($variant:ident),* }) => {
        impl AsyncRead for $ty {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_read(cx, buf),)* }
            }
        }
        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_write(cx, buf),)* }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_flush(cx),)* }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() { $($ty::$variant(s) => Pin::new(s).poll_shutdown(cx),)* }
            }
        }
    };
}

delegate_io!(ClientStream { Plain, Tls, Unix });
delegate_io!(BackendStream { Plain, Tls });
