//! The byte relay between a logged-in client and its backend: copies both ways, untouched,
//! counting bytes, until the backend has closed (and all it sent reached the client), the
//! client has closed and the backend followed or lingered too long, or the session is kicked.
//!
//! Idle sessions are the common case (IMAP IDLE), so a direction holds a buffer only while it
//! has bytes in flight: the buffer is dropped whenever a read finds nothing to read. Between
//! two plain TCP sockets the bytes are spliced instead (`splice`): moved by the kernel, never
//! copied through a buffer here; the bytes read during login go out first the buffered way.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::splice::{self, PlainTcp, Spliced};

/// Size of a direction's buffer while data flows.
const BUF_SIZE: usize = 16 * 1024;

/// How a relayed session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client closed first (the backend then closed, or lingered too long).
    ClientClosed,
    /// The backend closed first.
    BackendClosed,
    /// The session was kicked.
    Kicked,
    /// The director is shutting down and the grace is over.
    Shutdown,
    /// A read or write failed; which side and why.
    Error(String),
}

/// What a relay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub end: RelayEnd,
}

/// A session ended from outside: how the end is reported, and the last line the client gets
/// (e.g. IMAP `* BYE ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kick<'a> {
    /// [`RelayEnd::Kicked`] or [`RelayEnd::Shutdown`].
    pub end: RelayEnd,
    pub message: &'a [u8],
}

/// One direction of the copy.
struct Direction {
    /// Present only while bytes are in flight.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// The reader reached end of stream.
    eof: bool,
    /// The writer was shut down after `eof`: this direction is finished.
    done: bool,
    /// Bytes were written since the last flush.
    dirty: bool,
    bytes: u64,
}

impl Direction {
    fn new(initial: Vec<u8>) -> Self {
        let end = initial.len();
        Direction {
            buf: (!initial.is_empty()).then(|| initial.into_boxed_slice()),
            start: 0,
            end,
            eof: false,
            done: false,
            dirty: false,
            bytes: 0,
        }
    }

    /// Whether nothing is in flight and nothing waits to be flushed: the moment a direction
    /// may change how it copies.
    fn idle(&self) -> bool {
        self.buf.is_none() && !self.dirty && !self.eof
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Write out what is buffered.
            while self.start < self.end {
                let buf = self.buf.as_ref().expect("buffer holds the bytes in flight");
                let n = ready!(writer.as_mut().poll_write(cx, &buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.bytes += n as u64;
                self.dirty = true;
            }
            if self.eof {
                if self.dirty {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.dirty = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            // Read more.
            let buf = self
                .buf
                .get_or_insert_with(|| vec![0u8; BUF_SIZE].into_boxed_slice());
            let mut read_buf = ReadBuf::new(buf);
            match reader.as_mut().poll_read(cx, &mut read_buf) {
                Poll::Ready(Ok(())) => {
                    let n = read_buf.filled().len();
                    self.start = 0;
                    self.end = n;
                    if n == 0 {
                        self.eof = true;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: give the buffer back and push out what was written.
                    self.buf = None;
                    self.start = 0;
                    self.end = 0;
                    if self.dirty {
                        match writer.as_mut().poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.dirty = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// One direction of a relay: buffered, or spliced between two plain TCP sockets.
enum Side {
    /// Copied through a buffer; `splice` once idle when both sockets are plain TCP.
    Buffered {
        copy: Direction,
        splice: bool,
    },
    Spliced(Spliced),
}

impl Side {
    /// A direction that first sends `leftover`; spliced when `splice` (both plain TCP).
    fn new(leftover: Vec<u8>, splice: bool) -> Side {
        if splice && leftover.is_empty() {
            Side::Spliced(Spliced::default())
        } else {
            Side::Buffered {
                copy: Direction::new(leftover),
                splice,
            }
        }
    }

    fn done(&self) -> bool {
        match self {
            Side::Buffered { copy, .. } => copy.done,
            Side::Spliced(s) => s.done,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Side::Buffered { copy, .. } => copy.bytes,
            Side::Spliced(s) => s.bytes,
        }
    }

    /// Copies while this direction is open and notes `closed` as the first end when its
    /// reader reaches the end of stream; an error ends the relay.
    fn poll_side<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        closed: RelayEnd,
        first_end: &mut Option<RelayEnd>,
    ) -> io::Result<()>
    where
        R: AsyncRead + PlainTcp + Unpin + ?Sized,
        W: AsyncWrite + PlainTcp + Unpin + ?Sized,
    {
        loop {
            if self.done() {
                return Ok(());
            }
            let polled = match self {
                Side::Buffered { copy, splice } => {
                    let p = copy.poll_copy(cx, Pin::new(&mut *reader), Pin::new(&mut *writer));
                    if p.is_pending() && *splice && copy.idle() {
                        // The login's leftovers are out: splice from now on.
                        *self = Side::Spliced(Spliced::resumed(copy.bytes));
                        continue;
                    }
                    p
                }
                Side::Spliced(s) => match (reader.plain_tcp(), writer.plain_tcp()) {
                    (Some(r), Some(w)) => s.poll_copy(cx, r, w),
                    _ => unreachable!("spliced only between plain TCP sockets"),
                },
            };
            match polled {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(())) => {
                    first_end.get_or_insert(closed);
                    return Ok(());
                }
                Poll::Ready(Err(e)) if splice::unavailable(&e) => {
                    // No pipe to be had (or the kernel does not splice these sockets):
                    // nothing is in flight, so copy this direction the buffered way.
                    let mut copy = Direction::new(Vec::new());
                    copy.bytes = self.bytes();
                    *self = Side::Buffered {
                        copy,
                        splice: false,
                    };
                }
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
    }
}

/// Relays between `client` and `backend` until the session ends. `client_leftover` goes to
/// the backend first and `backend_leftover` to the client first (bytes read during login).
/// `kicked` completes when the session must end, with the line then written to the client
/// (pinned by the caller: held in the caller's state once, not copied into the relay's).
/// After the client closes, the backend has `linger` to finish.
pub async fn relay<'k, C, B, K>(
    client: &mut C,
    client_leftover: Vec<u8>,
    backend: &mut B,
    backend_leftover: Vec<u8>,
    mut kicked: Pin<&mut K>,
    linger: Duration,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + PlainTcp + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + PlainTcp + Unpin + ?Sized,
    K: Future<Output = Kick<'k>> + ?Sized,
{
    let splice = client.plain_tcp().is_some() && backend.plain_tcp().is_some();
    let mut up = Side::new(client_leftover, splice);
    let mut down = Side::new(backend_leftover, splice);
    let mut first_end: Option<RelayEnd> = None;
    let mut error: Option<String> = None;
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let kick = poll_fn(|cx| {
        if let Poll::Ready(kick) = kicked.as_mut().poll(cx) {
            return Poll::Ready(Some(kick));
        }
        if let Some(d) = deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        // A client that vanishes mid-write is an error too.
        let copied = up
            .poll_side(
                cx,
                &mut *client,
                &mut *backend,
                RelayEnd::ClientClosed,
                &mut first_end,
            )
            .map_err(|e| format!("client to backend: {e}"))
            .and_then(|()| {
                down.poll_side(
                    cx,
                    &mut *backend,
                    &mut *client,
                    RelayEnd::BackendClosed,
                    &mut first_end,
                )
                .map_err(|e| format!("backend to client: {e}"))
            });
        if let Err(e) = copied {
            error = Some(e);
            return Poll::Ready(None);
        }
        // The backend has closed and everything it sent reached the client: nothing the
        // client still sends could be served, so the session is over (the client was sent
        // end of stream). Only a client that closes first gets `linger` to read the last
        // replies of its backend.
        if down.done() {
            return Poll::Ready(None);
        }
        if first_end.is_some() && deadline.is_none() {
            let mut d = Box::pin(tokio::time::sleep(linger));
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            deadline = Some(d);
        }
        Poll::Pending
    })
    .await;
    let end = if let Some(kick) = kick {
        use tokio::io::AsyncWriteExt;
        // Boxed: the goodbye is rare, and its future inline would make every idle session's
        // state larger.
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), async {
            let _ = client.write_all(kick.message).await;
            let _ = client.flush().await;
        }))
        .await;
        kick.end
    } else if let Some(e) = error {
        RelayEnd::Error(e)
    } else {
        first_end.unwrap_or(RelayEnd::ClientClosed)
    };
    RelayStats {
        client_to_backend: up.bytes(),
        backend_to_client: down.bytes(),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl PlainTcp for DuplexStream {
        fn plain_tcp(&mut self) -> Option<&mut tokio::net::TcpStream> {
            None
        }
    }

    #[tokio::test]
    async fn copies_both_ways_with_leftovers_and_ends_on_close() {
        let (mut client_far, mut client_near) = tokio::io::duplex(64);
        let (mut backend_far, mut backend_near) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            relay(
                &mut client_near,
                b"a1 NOOP\r\n".to_vec(),
                &mut backend_near,
                b"* 1 EXISTS\r\n".to_vec(),
                std::pin::pin!(std::future::pending()),
                Duration::from_secs(5),
            )
            .await
        });
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            client_far.write_all(&big).await.unwrap();
            client_far
        });
        let mut got = vec![0u8; 9 + expected.len()];
        backend_far.read_exact(&mut got).await.unwrap();
        let mut client_far = writer.await.unwrap();
        let big = expected;
        assert_eq!(&got[..9], b"a1 NOOP\r\n");
        assert_eq!(&got[9..], &big[..]);
        backend_far.write_all(b"a1 OK\r\n").await.unwrap();
        let mut got = vec![0u8; 12 + 7];
        client_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"* 1 EXISTS\r\na1 OK\r\n");
        drop(client_far);
        // The backend sees end of stream and closes in turn.
        let mut rest = Vec::new();
        backend_far.read_to_end(&mut rest).await.unwrap();
        drop(backend_far);
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::ClientClosed);
        assert_eq!(stats.client_to_backend, 9 + big.len() as u64);
        assert_eq!(stats.backend_to_client, 19);
    }

    #[tokio::test]
    async fn kick_writes_message_and_ends() {
        let (mut client_far, mut client_near) = tokio::io::duplex(64);
        let (_backend_far, mut backend_near) = tokio::io::duplex(64);
        let stats = relay(
            &mut client_near,
            Vec::new(),
            &mut backend_near,
            Vec::new(),
            std::pin::pin!(async {
                Kick {
                    end: RelayEnd::Kicked,
                    message: b"* BYE kicked\r\n",
                }
            }),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(stats.end, RelayEnd::Kicked);
        drop(client_near);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"* BYE kicked\r\n");
    }

    /// A relay with nothing left over from the login, never kicked, lingering 10 seconds.
    async fn relay_unkicked(client: &mut DuplexStream, backend: &mut DuplexStream) -> RelayStats {
        relay(
            client,
            Vec::new(),
            backend,
            Vec::new(),
            std::pin::pin!(std::future::pending()),
            Duration::from_secs(10),
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn linger_ends_a_half_closed_session() {
        let (client_far, mut client_near) = tokio::io::duplex(64);
        let (_backend_far, mut backend_near) = tokio::io::duplex(64);
        drop(client_far);
        let stats = relay_unkicked(&mut client_near, &mut backend_near).await;
        assert_eq!(stats.end, RelayEnd::ClientClosed);
    }

    #[tokio::test(start_paused = true)]
    async fn backend_close_ends_the_session_at_once() {
        let (mut client_far, mut client_near) = tokio::io::duplex(64);
        let (mut backend_far, mut backend_near) = tokio::io::duplex(64);
        backend_far
            .write_all(b"* BYE Logging out\r\n")
            .await
            .unwrap();
        drop(backend_far);
        let started = tokio::time::Instant::now();
        let stats = relay_unkicked(&mut client_near, &mut backend_near).await;
        // The client never closed, yet the relay ended without waiting for the linger.
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(stats.end, RelayEnd::BackendClosed);
        let mut got = vec![0u8; 19];
        client_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"* BYE Logging out\r\n");
    }
}
