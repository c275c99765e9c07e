//! Relaying between two plain TCP sockets with `splice(2)`: the kernel moves the bytes from
//! one socket into a pipe and from the pipe into the other socket, and they are never copied
//! into the director's memory (HAProxy does the same). TLS sessions cannot: their bytes must
//! be decrypted here, so they keep the buffered copy of `relay`.
//!
//! A burst starts with one read of up to 16 KiB through a buffer on the stack, written straight
//! on: most of a session's traffic is short commands and replies, and for those two `splice`
//! calls through a pipe cost the kernel more than a copy does (HAProxy splices only what
//! would fill its buffer, for the same reason). A read that fills the buffer is a bulk
//! transfer, and the rest of that burst is spliced.
//!
//! A direction holds a pipe (two descriptors, a 64 KiB kernel buffer) only while it has bytes
//! in flight, as the buffered copy holds its buffer: idle sessions hold none. Pipes that come
//! back empty are kept in a small pool for the next burst. When no pipe can be had (the
//! process is out of descriptors), [`unavailable`] tells the relay to copy that direction the
//! buffered way instead: a session never fails for want of a pipe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

/// A relayed stream that may be a plain TCP socket, whose bytes can then be spliced.
pub trait PlainTcp {
    /// The socket, when the stream is plain TCP (no TLS, no unix socket).
    fn plain_tcp(&mut self) -> Option<&mut TcpStream>;
}

/// Most bytes one `splice` call moves: what a default pipe holds.
const CHUNK: usize = 64 * 1024;

/// A read of at most this many bytes at the start of a burst goes through a buffer on the
/// stack (`recv`, then `send`): commands and their replies are mostly short, and for a few
/// bytes two `splice` calls through a pipe cost the kernel more than a copy does. A read that
/// fills it is a bulk transfer: the rest of the burst is spliced.
const SMALL: usize = 16 * 1024;

/// Empty pipes kept for reuse; more are closed when they come back.
const POOL_MAX: usize = 128;

/// Empty pipes, ready for the next burst.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A pipe: bytes written into `write` come out of `read`.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pipe from the pool, or a new one.
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if r != 0 {
            return Err(unavailable_error(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        unsafe {
            Ok(Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            })
        }
    }

    /// Returns an empty pipe to the pool (or closes it when the pool is full).
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

/// The marker of an error that means "splice cannot be used here, copy instead".
#[derive(Debug)]
struct Unavailable(io::Error);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "splice unavailable: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

fn unavailable_error(e: io::Error) -> io::Error {
    io::Error::other(Unavailable(e))
}

/// Whether `e` says that this direction must be copied the buffered way (no pipe could be
/// had, or the kernel does not splice these sockets); nothing was lost when it is.
pub fn unavailable(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unavailable>())
}

/// `recv(from)` into `buf`, non-blocking; the bytes read, now initialised at its start.
fn recv(from: RawFd, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; recv initialises what it reports.
    let n = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `splice(from, to, len)`, non-blocking; the bytes moved.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and no offsets (both are pipes or sockets).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction of a relay between two plain TCP sockets.
#[derive(Debug, Default)]
pub struct Spliced {
    /// Present only while bytes are in flight.
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet written out.
    in_pipe: usize,
    /// The source reached end of stream.
    eof: bool,
    /// The destination was shut down after `eof`: this direction is finished.
    pub done: bool,
    /// The burst under way filled a [`SMALL`] read: its bytes are spliced until the source
    /// has nothing more to read.
    bulk: bool,
    /// Bytes of a [`SMALL`] read that the destination did not take at once (held only
    /// until it does).
    rest: Option<Box<[u8]>>,
    /// Bytes written to the destination.
    pub bytes: u64,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pipe({}, {})",
            self.read.as_raw_fd(),
            self.write.as_raw_fd()
        )
    }
}

impl Spliced {
    /// A direction that has already moved `bytes` (the buffered copy's count so far).
    pub fn resumed(bytes: u64) -> Spliced {
        Spliced {
            bytes,
            ..Spliced::default()
        }
    }

    /// Moves bytes from `src` to `dst` until neither can go on (`Pending`, no pipe held
    /// then unless bytes wait for `dst`), or `src` ended and `dst` was shut down.
    pub fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while let Some(rest) = &self.rest {
                ready!(dst.poll_write_ready(cx))?;
                match dst.try_write(rest) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.bytes += n as u64;
                        self.rest = (n < rest.len()).then(|| rest[n..].into());
                    }
                    // Readiness was cleared: the next poll_write_ready waits.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            while self.in_pipe > 0 {
                ready!(dst.poll_write_ready(cx))?;
                let pipe = self
                    .pipe
                    .as_ref()
                    .expect("a pipe holds the bytes in flight");
                let (from, to) = (pipe.read.as_raw_fd(), dst.as_raw_fd());
                match dst.try_io(Interest::WRITABLE, || splice(from, to, self.in_pipe)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.bytes += n as u64;
                    }
                    // Readiness was cleared: the next poll_write_ready waits.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
                self.release();
                return Poll::Ready(Ok(()));
            }
            if src.poll_read_ready(cx)?.is_pending() {
                self.release();
                self.bulk = false;
                return Poll::Pending;
            }
            if !self.bulk {
                self.copy_small(src, dst)?;
                continue;
            }
            if self.pipe.is_none() {
                self.pipe = Some(Pipe::take()?);
            }
            let pipe = self.pipe.as_ref().expect("taken above");
            let (from, to) = (src.as_raw_fd(), pipe.write.as_raw_fd());
            match src.try_io(Interest::READABLE, || splice(from, to, CHUNK)) {
                Ok(0) => self.eof = true,
                Ok(n) => self.in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The kernel does not splice from this socket: nothing was read, copy instead.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.release();
                    return Poll::Ready(Err(unavailable_error(e)));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads at most [`SMALL`] bytes from `src` and writes them to `dst`; what `dst` does not
    /// take at once is kept in [`Spliced::rest`] until it does. A full read starts the
    /// splicing of the burst. A read that would block clears `src`'s readiness (the caller
    /// waits for the next).
    fn copy_small(&mut self, src: &mut TcpStream, dst: &mut TcpStream) -> io::Result<()> {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); SMALL];
        let from = src.as_raw_fd();
        let n = match src.try_io(Interest::READABLE, || recv(from, &mut buf)) {
            Ok(0) => {
                self.eof = true;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        // SAFETY: recv initialised the first `n` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
        self.bulk = n == SMALL;
        let written = match dst.try_write(bytes) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        self.bytes += written as u64;
        if written < n {
            self.rest = Some(bytes[written..].into());
        }
        Ok(())
    }

    /// Gives an empty pipe back to the pool.
    fn release(&mut self) {
        if self.in_pipe == 0 {
            if let Some(p) = self.pipe.take() {
                p.give_back();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of plain TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn moves_a_large_stream_byte_exact_and_passes_on_the_end() {
        let (mut sender, mut src) = pair().await;
        let (mut dst, mut receiver) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            sender.write_all(&data).await.unwrap();
            sender.shutdown().await.unwrap();
            sender
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut s = Spliced::default();
        std::future::poll_fn(|cx| s.poll_copy(cx, &mut src, &mut dst))
            .await
            .unwrap();
        assert!(s.done);
        assert_eq!(s.bytes, expected.len() as u64);
        assert!(s.pipe.is_none(), "a finished direction holds no pipe");
        let _sender = writer.await.unwrap();
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn an_idle_direction_holds_no_pipe() {
        let (mut sender, mut src) = pair().await;
        let (mut dst, mut receiver) = pair().await;
        let mut s = Spliced::default();
        sender.write_all(b"a NOOP\r\n").await.unwrap();
        let mut got = [0u8; 8];
        // Copy until the line went through; then the direction is idle.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while s.bytes < 8 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the line never went through"
            );
            copy_once(&mut s, &mut src, &mut dst).await;
            tokio::task::yield_now().await;
        }
        receiver.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a NOOP\r\n");
        copy_once(&mut s, &mut src, &mut dst).await;
        assert!(s.pipe.is_none(), "an idle direction still holds its pipe");
        assert!(!s.done);
    }

    /// Shrinks a socket's kernel buffer (`SO_SNDBUF` or `SO_RCVBUF`).
    fn shrink(sock: &TcpStream, option: libc::c_int) {
        let size: libc::c_int = 4096;
        // SAFETY: a valid socket and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt");
    }

    #[tokio::test]
    async fn short_reads_that_the_destination_cannot_take_are_kept_until_it_can() {
        let (mut sender, mut src) = pair().await;
        let (mut dst, mut receiver) = pair().await;
        shrink(&dst, libc::SO_SNDBUF);
        shrink(&receiver, libc::SO_RCVBUF);
        let mut s = Spliced::default();
        let mut sent = Vec::new();
        // Short messages (copied, not spliced) while nobody reads at the far end: the
        // destination fills up and a read's bytes wait in `rest`.
        for i in 0..400u32 {
            let msg: Vec<u8> = (0..1000u32).map(|j| ((i * 7 + j) % 251) as u8).collect();
            sender.write_all(&msg).await.unwrap();
            sent.extend_from_slice(&msg);
            // Until this message went out or was kept back.
            for _ in 0..100 {
                tokio::task::yield_now().await;
                copy_once(&mut s, &mut src, &mut dst).await;
                if s.rest.is_some() || s.bytes == sent.len() as u64 {
                    break;
                }
            }
            if s.rest.is_some() {
                break;
            }
        }
        assert!(s.rest.is_some(), "the destination never pushed back");
        sender.shutdown().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        std::future::poll_fn(|cx| s.poll_copy(cx, &mut src, &mut dst))
            .await
            .unwrap();
        assert!(s.rest.is_none() && s.done);
        assert_eq!(s.bytes, sent.len() as u64);
        assert_eq!(reader.await.unwrap(), sent);
    }

    async fn copy_once(s: &mut Spliced, src: &mut TcpStream, dst: &mut TcpStream) {
        std::future::poll_fn(|cx| {
            let _ = s.poll_copy(cx, src, dst);
            Poll::Ready(())
        })
        .await;
    }

    #[test]
    fn unavailable_is_told_apart_from_other_errors() {
        assert!(unavailable(&unavailable_error(
            io::Error::from_raw_os_error(libc::EMFILE)
        )));
        assert!(!unavailable(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!unavailable(&io::ErrorKind::WriteZero.into()));
    }
}
