//! The connection a backend login talks over, and the steps the logins share. The protocols
//! (`imap`, `pop3`, `sieve` `::backend_login`) differ in their dialogue, not in how they read
//! a backend: here a reply is read whole into a buffer, or the backend is found closed, timed
//! out, or broken (a reply over the protocol's limits); each exchange runs under the request's
//! `reply_timeout` (if it has one); and STARTTLS refuses bytes that came before the handshake.
//!
//! Also here, the steps that POP3 and ManageSieve take alike, as Dovecot's proxies do:
//! STARTTLS by the protocol's command name, `XCLIENT` with the client's address, and the SASL
//! PLAIN initial response.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::stream::BackendStream;
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, StartTls,
};
use crate::protocol::decision::{ClientIdentity, Credentials};
use crate::protocol::sasl;

/// Longest reply line accepted from a backend, CRLF included, unless its protocol needs
/// longer ones (IMAP's CAPABILITY lines). Dovecot's are far shorter; the cap only stops a
/// broken backend from filling our memory.
pub const MAX_LINE: usize = 8192;

/// Most capability lines accepted in one listing, for the same reason.
pub const MAX_CAPABILITY_LINES: usize = 256;

/// Bytes read from the backend at most at once.
const READ_CHUNK: usize = 4096;

/// The `TTL` sent in `XCLIENT`. A Dovecot proxy starts at 5 (`LOGIN_PROXY_TTL`) and sends one
/// less at each hop, so a backend that proxies again stops loops; we are the first hop.
const XCLIENT_TTL: u32 = 4;

/// A backend's answer to a command that it may only take or refuse (STARTTLS, XCLIENT):
/// `Err` holds its text.
pub type Answer = Result<(), String>;

/// The backend connection during login: the stream and the bytes read but not yet used.
pub struct Dialogue {
    stream: BackendStream,
    buf: Vec<u8>,
    /// Time allowed for each exchange: a command and its reply, a reply the backend sends
    /// unasked, a TLS handshake. `None`: the caller bounds the whole dialogue.
    reply_timeout: Option<Duration>,
}

impl Dialogue {
    /// The dialogue on `stream` (connected; implicit TLS and any PROXY header done).
    pub fn new(stream: BackendStream, req: &BackendLoginRequest<'_>) -> Self {
        Dialogue {
            stream,
            buf: Vec::new(),
            reply_timeout: req.reply_timeout,
        }
    }

    /// Runs `step` (writes and/or reads) under the reply timeout, if there is one.
    pub async fn timed<T>(
        &mut self,
        step: impl AsyncFnOnce(&mut Self) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match self.reply_timeout {
            Some(limit) => tokio::time::timeout(limit, step(self))
                .await
                .map_err(|_| BackendError::Timeout(limit))?,
            None => step(self).await,
        }
    }

    /// Sends `line` (CRLF included) and reads its reply with `reply`, under the reply timeout.
    /// The line may hold credentials: it is never logged, and errors never quote it.
    pub async fn exchange<T>(
        &mut self,
        line: &[u8],
        reply: impl AsyncFnOnce(&mut Self) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.timed(async |c| {
            c.send(line).await?;
            reply(c).await
        })
        .await
    }

    /// Writes `data` and flushes it (no timeout of its own: callers time whole exchanges).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(data).await?;
        Ok(self.stream.flush().await?)
    }

    /// Takes the next unit (a reply line, or a line with its literals) off the buffer, reading
    /// from the backend until `frame` finds one. `frame` is given the whole buffer and says
    /// how long the unit at its front is, `None` if more must be read, or fails for a unit
    /// over the protocol's limits.
    pub async fn read_unit(
        &mut self,
        mut frame: impl FnMut(&[u8]) -> Result<Option<usize>, BackendError>,
    ) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(end) = frame(&self.buf)? {
                // The unit in a vector of its size; the buffer (and its room) kept for the
                // next reply.
                let unit = self.buf[..end].to_vec();
                self.buf.drain(..end);
                return Ok(unit);
            }
            self.fill().await?;
        }
    }

    /// Reads what the backend sent next onto the end of the buffer: straight into its spare
    /// room (no zeroed chunk, no second copy). The backend closing is an error.
    async fn fill(&mut self) -> Result<(), BackendError> {
        self.buf.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(BackendError::Closed);
        }
        Ok(())
    }

    /// The next line, without its line end (LF, or CRLF). A line longer than `max_line`
    /// bytes, line end included, fails with "`what` longer than `max_line` bytes".
    pub async fn read_line(
        &mut self,
        max_line: usize,
        what: &str,
    ) -> Result<Vec<u8>, BackendError> {
        self.read_line_where(max_line, what, |_| true).await
    }

    /// The next line that `wanted` takes, as [`Dialogue::read_line`] reads it; the lines
    /// before it (each within `max_line`) are passed over where they lie in the buffer,
    /// neither copied out nor checked as text: a login's backend sends several that it
    /// does not need (untagged data, the replies of pipelined commands).
    pub async fn read_line_where(
        &mut self,
        max_line: usize,
        what: &str,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, BackendError> {
        // Where the lines not yet passed over start.
        let mut start = 0;
        loop {
            let rest = &self.buf[start..];
            match memchr::memchr(b'\n', &rest[..rest.len().min(max_line)]) {
                Some(lf) => {
                    let end = start + lf + 1;
                    let line = &self.buf[start..end - 1];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if wanted(line) {
                        let line = line.to_vec();
                        self.buf.drain(..end);
                        return Ok(line);
                    }
                    start = end;
                }
                // Even if the next byte were LF, the line would be `max_line + 1` long.
                None if rest.len() >= max_line => {
                    return Err(BackendError::Protocol(format!(
                        "{what} longer than {max_line} bytes"
                    )))
                }
                None => {
                    self.buf.drain(..start);
                    start = 0;
                    self.fill().await?;
                }
            }
        }
    }

    /// Switches to TLS once the backend has agreed to STARTTLS. Bytes it sent after agreeing
    /// would pass for protected by TLS: they fail the login with `early_data` (the protocol's
    /// words for it).
    pub async fn start_tls(
        self,
        starttls: &StartTls,
        early_data: &str,
    ) -> Result<Self, BackendError> {
        if !self.buf.is_empty() {
            return Err(BackendError::Protocol(early_data.into()));
        }
        let Dialogue {
            stream,
            buf,
            reply_timeout,
        } = self;
        let handshake = stream.start_tls(&starttls.connector, starttls.server_name.clone());
        let stream = match reply_timeout {
            Some(limit) => tokio::time::timeout(limit, handshake)
                .await
                .map_err(|_| BackendError::Timeout(limit))??,
            None => handshake.await?,
        };
        Ok(Dialogue {
            stream,
            buf,
            reply_timeout,
        })
    }

    /// STARTTLS as POP3 (`STLS`) and ManageSieve (`STARTTLS`) do it: the backend must offer
    /// `command` and take it (`ask` sends a command and reads the answer).
    pub async fn start_tls_by(
        mut self,
        starttls: &StartTls,
        command: &str,
        offered: bool,
        ask: impl AsyncFnOnce(&mut Self, &[u8]) -> Result<Answer, BackendError>,
    ) -> Result<Self, BackendError> {
        if !offered {
            return Err(BackendError::Protocol(format!(
                "backend does not offer {command}, but starttls is configured for it"
            )));
        }
        if let Err(text) = ask(&mut self, format!("{command}\r\n").as_bytes()).await? {
            return Err(BackendError::Protocol(format!(
                "backend refused {command}: {text}"
            )));
        }
        let early_data =
            format!("backend sent data between its {command} reply and the TLS handshake");
        self.start_tls(starttls, &early_data).await
    }

    /// Tells the backend who the client really is with `XCLIENT` (`ask` sends it and reads
    /// the answer). A refusal fails the login: the backend does not trust the director.
    pub async fn xclient(
        &mut self,
        identity: &ClientIdentity,
        ask: impl AsyncFnOnce(&mut Self, &[u8]) -> Result<Answer, BackendError>,
    ) -> Result<(), BackendError> {
        let line = xclient_line(identity.client, &identity.session_id);
        match ask(self, line.as_bytes()).await? {
            Ok(()) => Ok(()),
            Err(text) => Err(BackendError::Protocol(format!(
                "backend refused XCLIENT (is the director in the backend's \
                 login_trusted_networks?): {text}"
            ))),
        }
    }

    /// The login succeeded: the stream, with the bytes the backend sent after its success
    /// reply (the relay passes them to the client first).
    pub fn logged_in(self, success_text: String) -> BackendLoginResult {
        BackendLoginResult::LoggedIn {
            stream: self.stream,
            success_text,
            // An empty buffer's room is not kept for the whole session.
            leftover: if self.buf.is_empty() {
                Vec::new()
            } else {
                self.buf
            },
        }
    }
}

/// The `XCLIENT` command that tells the backend who the client really is, as Dovecot's pop3
/// and managesieve proxies write it. The session id is ours; it is left out should it ever
/// hold a character that does not belong in one.
fn xclient_line(client: SocketAddr, session_id: &str) -> String {
    let mut line = format!(
        "XCLIENT ADDR={} PORT={}",
        client.ip().to_canonical(),
        client.port()
    );
    if !session_id.is_empty() && session_id.bytes().all(|b| b.is_ascii_graphic()) {
        line.push_str(" SESSION=");
        line.push_str(session_id);
    }
    line.push_str(&format!(" TTL={XCLIENT_TTL}\r\n"));
    line
}

/// The base64 SASL PLAIN initial response for `credentials`. Base64 carries any byte, but
/// PLAIN separates its fields with NUL, so a NUL inside one cannot be sent.
pub fn plain_response(credentials: &Credentials) -> Result<String, BackendError> {
    let fields = [
        &credentials.username,
        &credentials.auth_username,
        credentials.password.expose(),
    ];
    if fields.iter().any(|f| f.contains('\0')) {
        return Err(BackendError::Unsendable(
            "the username or password holds a NUL byte".into(),
        ));
    }
    Ok(sasl::encode_plain(credentials))
}

/// The start of what a backend sent, for an error message.
pub fn excerpt(unit: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(&unit[..unit.len().min(100)])
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn xclient_line_forms() {
        let v6: SocketAddr = "[2001:db8::1]:993".parse().unwrap();
        assert_eq!(
            xclient_line(v6, "s1"),
            "XCLIENT ADDR=2001:db8::1 PORT=993 SESSION=s1 TTL=4\r\n"
        );
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:1000".parse().unwrap();
        assert_eq!(
            xclient_line(mapped, "bad id\r\nX"),
            "XCLIENT ADDR=192.0.2.9 PORT=1000 TTL=4\r\n"
        );
    }
}
