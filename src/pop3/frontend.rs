//! The POP3 pre-authentication dialogue, as Dovecot's pop3-login speaks it: greeting, `CAPA`,
//! `STLS`, `USER`/`PASS`, `AUTH PLAIN`/`AUTH LOGIN`, `NOOP`, `QUIT`. It ends when a login
//! succeeds (the session goes to the relay) or the client leaves or is sent away.
//!
//! The director checks no password: credentials go to [`Authenticator::login`], which lets the
//! backend decide. What this module guards is the director itself: the whole dialogue runs
//! under one timeout, lines are capped, bad commands and failed logins are counted, and bytes a
//! client pipelines after `STLS` are thrown away rather than read as if TLS protected them.
//! Passwords are never logged.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::decision::{Credentials, Decision, Protocol};
use crate::frontend::{Authenticator, Established, FrontendContext, LoginFailure};
use crate::pop3::command::{next_line, parse_line, Command, Line, Parse};
use crate::sasl::{self, SaslError};
use crate::stream::ClientStream;

/// Bytes asked of the socket per read. The buffer never holds more than one line's limit plus
/// this, whatever the client sends.
const READ_CHUNK: usize = 1024;

/// Time allowed to write a last `-ERR` to a client that is being sent away for inactivity
/// (it may not be reading at all).
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

const PLAINTEXT_DISALLOWED: &str =
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.";
const AUTH_FAILED: &str = "Authentication failed.";

/// Runs the pre-authentication dialogue on `client`. Returns the established session once a
/// login succeeded, `None` if the client quit or was disconnected before (inactivity, too many
/// failures or bad commands, over-long line), or an I/O error (including a failed TLS
/// handshake after `STLS`).
pub async fn run<A: Authenticator>(
    client: ClientStream,
    ctx: FrontendContext,
    auth: &A,
) -> io::Result<Option<Established>> {
    let limit = ctx.limits.timeout;
    let mut session = Session {
        ctx,
        auth,
        stream: Some(client),
        buf: Vec::new(),
        user: None,
        auth_failures: 0,
        bad_commands: 0,
    };
    match tokio::time::timeout(limit, session.dialogue()).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!(
                session = %session.ctx.identity.session_id,
                "pop3: disconnected for inactivity before login"
            );
            session.farewell("-ERR Disconnected for inactivity.").await;
            Ok(None)
        }
    }
}

/// What happens after a command.
enum Step {
    /// Read the next command.
    Continue,
    /// End the dialogue without a session (the reply has been sent).
    Close,
    /// A login succeeded.
    Established(Established),
}

/// What reading a line gave.
enum Input<T> {
    Got(T),
    /// The client closed the connection.
    Closed,
    /// The line was over the limit.
    TooLong,
}

/// One client's pre-authentication state.
struct Session<'a, A> {
    ctx: FrontendContext,
    auth: &'a A,
    /// `None` only while a TLS handshake is running (it takes the plain stream), or if that
    /// handshake failed.
    stream: Option<ClientStream>,
    /// Bytes read but not yet parsed. After a login they are the client's pipelined commands.
    buf: Vec<u8>,
    /// The name given by `USER`, for the next `PASS`.
    user: Option<String>,
    auth_failures: u32,
    bad_commands: u32,
}

impl<A: Authenticator> Session<'_, A> {
    async fn dialogue(&mut self) -> io::Result<Option<Established>> {
        let greeting = format!("+OK {}", printable(&self.ctx.greeting));
        self.send(&greeting).await?;
        loop {
            let max_line = self.ctx.limits.max_line;
            let command = match self.read_command(max_line).await? {
                Input::Got(command) => command,
                Input::Closed => return Ok(None),
                Input::TooLong => {
                    self.send("-ERR Input line too long.").await?;
                    return Ok(None);
                }
            };
            match self.execute(command).await? {
                Step::Continue => {}
                Step::Close => return Ok(None),
                Step::Established(established) => return Ok(Some(established)),
            }
        }
    }

    async fn execute(&mut self, command: Command) -> io::Result<Step> {
        match command {
            Command::Capa => {
                let capabilities = self.capabilities();
                self.send_raw(capabilities.as_bytes()).await?;
            }
            Command::Noop => self.send("+OK").await?,
            Command::Quit => {
                self.send("+OK Logging out").await?;
                return Ok(Step::Close);
            }
            Command::Stls => return self.starttls().await,
            Command::User(name) => {
                if !self.plaintext_allowed() {
                    self.send(PLAINTEXT_DISALLOWED).await?;
                } else if name.is_empty() {
                    return self.bad_command("No username given.").await;
                } else {
                    self.user = Some(name);
                    self.send("+OK").await?;
                }
            }
            Command::Pass(password) => {
                if !self.plaintext_allowed() {
                    self.send(PLAINTEXT_DISALLOWED).await?;
                } else if let Some(user) = self.user.clone() {
                    return self.login(Credentials::plain(user, password)).await;
                } else {
                    self.send("-ERR No username given.").await?;
                }
            }
            Command::AuthList => {
                let list = if self.plaintext_allowed() {
                    "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
                } else {
                    "+OK\r\n.\r\n"
                };
                self.send_raw(list.as_bytes()).await?;
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => return self.authenticate(&mechanism, initial_response).await,
            Command::NotUtf8 { keyword } => {
                tracing::debug!(session = %self.ctx.identity.session_id, keyword, "pop3: argument is not UTF-8");
                return self.bad_command("Invalid characters in argument.").await;
            }
            Command::Other(keyword) => {
                tracing::debug!(session = %self.ctx.identity.session_id, keyword, "pop3: unknown command");
                return self.bad_command("Unknown command.").await;
            }
        }
        Ok(Step::Continue)
    }

    /// Counts an invalid command and answers it, or sends the client away if there were too
    /// many.
    async fn bad_command(&mut self, message: &str) -> io::Result<Step> {
        self.bad_commands += 1;
        if self.bad_commands >= self.ctx.limits.max_bad_commands {
            self.send("-ERR Too many invalid commands.").await?;
            return Ok(Step::Close);
        }
        self.send(&format!("-ERR {message}")).await?;
        Ok(Step::Continue)
    }

    fn is_tls(&self) -> bool {
        self.stream.as_ref().is_some_and(ClientStream::is_tls)
    }

    /// Whether USER/PASS and the plaintext SASL mechanisms may be used on this connection
    /// (Dovecot's `disable_plaintext_auth`, `login_trusted_networks`).
    fn plaintext_allowed(&self) -> bool {
        !self.ctx.disable_plaintext_auth || self.ctx.trusted || self.is_tls()
    }

    /// The `CAPA` reply (RFC 2449), as Dovecot's pop3-login gives it before login.
    fn capabilities(&self) -> String {
        let mut capa = String::from(
            "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n",
        );
        if self.ctx.starttls.is_some() && !self.is_tls() {
            capa.push_str("STLS\r\n");
        }
        if self.plaintext_allowed() {
            capa.push_str("USER\r\nSASL PLAIN LOGIN\r\n");
        }
        capa.push_str(".\r\n");
        capa
    }

    /// `STLS` (RFC 2595).
    async fn starttls(&mut self) -> io::Result<Step> {
        if self.is_tls() {
            self.send("-ERR TLS is already active.").await?;
            return Ok(Step::Continue);
        }
        let Some(acceptor) = self.ctx.starttls.clone() else {
            self.send("-ERR TLS support isn't enabled.").await?;
            return Ok(Step::Continue);
        };
        self.send("+OK Begin TLS negotiation now.").await?;
        // Whatever the client sent after STLS was not protected by TLS: an attacker in the
        // middle could have added it. Throw it away, and forget a USER given in the clear.
        self.buf.clear();
        self.user = None;
        let plain = self.take_stream()?;
        self.stream = Some(plain.start_tls(&acceptor).await?);
        Ok(Step::Continue)
    }

    /// `AUTH <mechanism> [initial-response]` (RFC 5034).
    async fn authenticate(
        &mut self,
        mechanism: &str,
        initial_response: Option<String>,
    ) -> io::Result<Step> {
        if !self.plaintext_allowed() {
            self.send(PLAINTEXT_DISALLOWED).await?;
            return Ok(Step::Continue);
        }
        let credentials = match mechanism {
            "PLAIN" => {
                let response = match initial_response {
                    Some(ir) => ir.into_bytes(),
                    None => match self.sasl_response("+ ").await? {
                        Ok(response) => response,
                        Err(step) => return Ok(step),
                    },
                };
                decode_plain(&response)
            }
            "LOGIN" => {
                let user = match initial_response {
                    Some(ir) => ir.into_bytes(),
                    // "Username:"
                    None => match self.sasl_response("+ VXNlcm5hbWU6").await? {
                        Ok(response) => response,
                        Err(step) => return Ok(step),
                    },
                };
                // "Password:"
                let password = match self.sasl_response("+ UGFzc3dvcmQ6").await? {
                    Ok(response) => response,
                    Err(step) => return Ok(step),
                };
                decode_login(&user, &password)
            }
            _ => {
                self.send("-ERR Unsupported authentication mechanism.")
                    .await?;
                return Ok(Step::Continue);
            }
        };
        match credentials {
            Ok(credentials) => self.login(credentials).await,
            Err(SaslError::Base64) => self.bad_command("Invalid base64 data in response.").await,
            Err(_) => self.auth_failed(AUTH_FAILED).await,
        }
    }

    /// Sends a SASL challenge and reads the client's response line. `Err(step)` when there is
    /// none to use: the client cancelled with `*` (answered here), left, or sent too much.
    async fn sasl_response(&mut self, challenge: &str) -> io::Result<Result<Vec<u8>, Step>> {
        self.send(challenge).await?;
        // The response, base64, may be as long as the literal limit allows, plus CRLF.
        let max = self.ctx.limits.max_literal.saturating_add(2);
        match self.read_line(max).await? {
            Input::Got(line) if line == b"*" => {
                self.send("-ERR Authentication aborted by client.").await?;
                Ok(Err(Step::Continue))
            }
            Input::Got(line) => Ok(Ok(line)),
            Input::Closed => Ok(Err(Step::Close)),
            Input::TooLong => {
                self.send("-ERR Input line too long.").await?;
                Ok(Err(Step::Close))
            }
        }
    }

    /// Hands the credentials to the authenticator and answers the client.
    async fn login(&mut self, credentials: Credentials) -> io::Result<Step> {
        let username = credentials.username.clone();
        let decision = Decision {
            protocol: Protocol::Pop3,
            credentials,
            identity: self.ctx.identity.clone(),
            secured: self.is_tls(),
        };
        match self.auth.login(&decision).await {
            Ok(link) => {
                let reply = match printable(&link.success_text) {
                    text if text.is_empty() => "+OK".to_owned(),
                    text => format!("+OK {text}"),
                };
                self.send(&reply).await?;
                tracing::debug!(session = %self.ctx.identity.session_id, user = %username, "pop3: logged in");
                Ok(Step::Established(Established {
                    client: self.take_stream()?,
                    client_leftover: std::mem::take(&mut self.buf),
                    backend: link,
                    username,
                }))
            }
            Err(LoginFailure::AuthFailed { message }) => {
                tracing::debug!(session = %self.ctx.identity.session_id, user = %username, "pop3: login failed");
                let message = if message.is_empty() {
                    AUTH_FAILED
                } else {
                    &message
                };
                self.auth_failed(message).await
            }
            Err(LoginFailure::Unavailable { message }) => {
                tracing::debug!(session = %self.ctx.identity.session_id, user = %username, "pop3: no backend: {message}");
                let message = match printable(&message) {
                    m if m.is_empty() => "Temporary failure, try again later.".to_owned(),
                    m => m,
                };
                self.send(&format!("-ERR [SYS/TEMP] {message}")).await?;
                Ok(Step::Continue)
            }
        }
    }

    /// Answers a failed login after the delay that slows password guessing, and sends the
    /// client away once it has failed `max_auth_failures` times.
    async fn auth_failed(&mut self, message: &str) -> io::Result<Step> {
        tokio::time::sleep(self.ctx.limits.auth_failure_delay).await;
        self.auth_failures += 1;
        self.send(&format!("-ERR [AUTH] {}", printable(message)))
            .await?;
        if self.auth_failures >= self.ctx.limits.max_auth_failures {
            return Ok(Step::Close);
        }
        Ok(Step::Continue)
    }

    async fn read_command(&mut self, max_line: usize) -> io::Result<Input<Command>> {
        loop {
            match parse_line(&self.buf, max_line) {
                Parse::Line { consumed, command } => {
                    self.buf.drain(..consumed);
                    return Ok(Input::Got(command));
                }
                Parse::TooLong => return Ok(Input::TooLong),
                Parse::Incomplete => {
                    if !self.fill().await? {
                        return Ok(Input::Closed);
                    }
                }
            }
        }
    }

    /// Reads one raw line (a SASL response), without its line end.
    async fn read_line(&mut self, max_line: usize) -> io::Result<Input<Vec<u8>>> {
        loop {
            match next_line(&self.buf, max_line) {
                Line::Complete { consumed, line } => {
                    let line = line.to_vec();
                    self.buf.drain(..consumed);
                    return Ok(Input::Got(line));
                }
                Line::TooLong => return Ok(Input::TooLong),
                Line::Incomplete => {
                    if !self.fill().await? {
                        return Ok(Input::Closed);
                    }
                }
            }
        }
    }

    /// Reads what the client sent into the buffer; `false` at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.stream_mut()?.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Sends one reply line; CRLF is added.
    async fn send(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes).await
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.stream_mut()?;
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// Sends a last line to a client being disconnected, if it will take it soon.
    async fn farewell(&mut self, line: &str) {
        if self.stream.is_some() {
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.send(line)).await;
        }
    }

    fn stream_mut(&mut self) -> io::Result<&mut ClientStream> {
        self.stream.as_mut().ok_or_else(lost_stream)
    }

    fn take_stream(&mut self) -> io::Result<ClientStream> {
        self.stream.take().ok_or_else(lost_stream)
    }
}

fn lost_stream() -> io::Error {
    io::Error::other("the client connection was lost in a failed TLS handshake")
}

/// A decoded `AUTH PLAIN` response.
fn decode_plain(response: &[u8]) -> Result<Credentials, SaslError> {
    sasl::parse_plain(&sasl::decode_base64(response)?)
}

/// The two decoded `AUTH LOGIN` responses: user name, then password.
fn decode_login(user: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    let text = |b64: &[u8]| -> Result<String, SaslError> {
        String::from_utf8(sasl::decode_base64(b64)?).map_err(|_| SaslError::Utf8)
    };
    let (user, password) = (text(user)?, text(password)?);
    if user.is_empty() {
        return Err(SaslError::EmptyUser);
    }
    Ok(Credentials::plain(user, password))
}

/// Text safe to put in a reply line: control characters (a CR or LF would end the line and
/// start another) become spaces.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
