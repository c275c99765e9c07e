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

use crate::net::stream::ClientStream;
use crate::protocol::decision::{Credentials, Decision, Protocol};
use crate::protocol::pop3::command::{next_line, parse_line, Command, Line, Parse};
use crate::protocol::preauth::{Authenticator, Established, FrontendContext, LoginFailure};
use crate::protocol::sasl::{self, SaslError};

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
    let shutdown = ctx.shutdown.clone();
    let mut session = Session {
        ctx,
        auth,
        stream: Some(client),
        buf: Vec::new(),
        user: None,
        auth_failures: 0,
        bad_commands: 0,
    };
    let eviction = session.ctx.eviction.clone();
    tokio::select! {
        r = tokio::time::timeout(limit, session.dialogue()) => match r {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(
                    session = %session.ctx.identity.session_id,
                    "pop3: disconnected for inactivity before login"
                );
                session.farewell("-ERR Disconnected for inactivity.").await;
                Ok(None)
            }
        },
        _ = shutdown.draining() => {
            session.farewell("-ERR Server shutting down.").await;
            Ok(None)
        }
        _ = eviction.evicted() => {
            let line = format!("-ERR [SYS/TEMP] {}", crate::net::admission::EVICTED_TEXT);
            session.farewell(&line).await;
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
    /// A login succeeded. (Boxed: the other steps are empty.)
    Established(Box<Established>),
}

/// What reading a line gave.
enum Input<T> {
    /// A whole line (or the command it holds).
    Got(T),
    /// The client closed the connection.
    Closed,
    /// The line was over the limit.
    TooLong,
}

/// One client's pre-authentication state.
struct Session<'a, A> {
    ctx: FrontendContext,
    /// Turns credentials into a backend connection; the only judge of passwords.
    auth: &'a A,
    /// `None` only while a TLS handshake is running (it takes the plain stream), or if that
    /// handshake failed.
    stream: Option<ClientStream>,
    /// Bytes read but not yet parsed. After a login they are the client's pipelined commands.
    buf: Vec<u8>,
    /// The name given by `USER`, for the next `PASS`.
    user: Option<String>,
    /// Logins refused so far; at `limits.max_auth_failures` the client is sent away.
    auth_failures: u32,
    /// Invalid commands so far; at `limits.max_bad_commands` the client is sent away.
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
                Step::Established(established) => return Ok(Some(*established)),
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
                tracing::debug!(session = %self.ctx.identity.session_id, user = %crate::untrusted::shown(&username), "pop3: logged in");
                Ok(Step::Established(Box::new(Established {
                    client: self.take_stream()?,
                    client_leftover: std::mem::take(&mut self.buf),
                    backend: link,
                    username,
                    identity: self.ctx.identity.clone(),
                })))
            }
            Err(LoginFailure::AuthFailed { message }) => {
                tracing::debug!(session = %self.ctx.identity.session_id, user = %crate::untrusted::shown(&username), "pop3: login failed");
                let message = if message.is_empty() {
                    AUTH_FAILED
                } else {
                    &message
                };
                self.auth_failed(message).await
            }
            Err(LoginFailure::Unavailable { message }) => {
                tracing::debug!(session = %self.ctx.identity.session_id, user = %crate::untrusted::shown(&username), "pop3: no backend: {message}");
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_rustls::rustls;

    use super::*;
    use crate::net::stream::BackendStream;
    use crate::protocol::decision::ClientIdentity;
    use crate::protocol::preauth::{BackendLink, PreauthLimits};
    use crate::state::sessions::Sessions;

    /// What the fake authenticator answers to the next login.
    enum Answer {
        Ok(&'static str),
        AuthFailed(&'static str),
        Unavailable(&'static str),
    }

    /// Records every decision and answers from a script (a refused login once it runs out).
    #[derive(Default)]
    struct FakeAuth {
        answers: Mutex<VecDeque<Answer>>,
        decisions: Mutex<Vec<Decision>>,
        /// Keeps the fake backends' listeners open while the test runs.
        backends: Mutex<Vec<TcpListener>>,
    }

    impl FakeAuth {
        fn new(answers: impl IntoIterator<Item = Answer>) -> Arc<Self> {
            Arc::new(FakeAuth {
                answers: Mutex::new(answers.into_iter().collect()),
                ..FakeAuth::default()
            })
        }

        fn decisions(&self) -> Vec<Decision> {
            self.decisions.lock().unwrap().clone()
        }
    }

    impl Authenticator for FakeAuth {
        async fn login(&self, decision: &Decision) -> Result<BackendLink, LoginFailure> {
            self.decisions.lock().unwrap().push(decision.clone());
            let answer = self.answers.lock().unwrap().pop_front();
            match answer {
                Some(Answer::Ok(text)) => {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    let stream = TcpStream::connect(addr).await.unwrap();
                    self.backends.lock().unwrap().push(listener);
                    let user = &decision.credentials.username;
                    Ok(BackendLink {
                        stream: BackendStream::Plain(stream),
                        success_text: text.into(),
                        leftover: Vec::new(),
                        session: Sessions::new().register(Protocol::Pop3, user, 0, addr, None),
                    })
                }
                Some(Answer::Unavailable(message)) => Err(LoginFailure::Unavailable {
                    message: message.into(),
                }),
                Some(Answer::AuthFailed(message)) => Err(LoginFailure::AuthFailed {
                    message: message.into(),
                }),
                None => Err(LoginFailure::AuthFailed {
                    message: String::new(),
                }),
            }
        }
    }

    fn context() -> FrontendContext {
        FrontendContext {
            starttls: None,
            disable_plaintext_auth: false,
            trusted: false,
            limits: PreauthLimits {
                auth_failure_delay: Duration::from_millis(1),
                timeout: Duration::from_secs(30),
                ..PreauthLimits::default()
            },
            identity: ClientIdentity {
                client: "192.0.2.7:50123".parse().unwrap(),
                local: "198.51.100.1:110".parse().unwrap(),
                session_id: "dir-1".into(),
                session_ext_id: None,
            },
            greeting: "Director ready.".into(),
            shutdown: Default::default(),
            eviction: Default::default(),
        }
    }

    /// What `run` returned, in a form tests can compare.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Established { username: String, leftover: Vec<u8> },
        NoSession,
        Error,
    }

    /// The test's end of the connection.
    struct Client {
        rd: BufReader<OwnedReadHalf>,
        wr: OwnedWriteHalf,
        session: JoinHandle<Outcome>,
    }

    impl Client {
        /// Connects a client to a front end running `ctx` against `auth`.
        async fn start(ctx: FrontendContext, auth: &Arc<FakeAuth>) -> Client {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let sock = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let auth = auth.clone();
            // Spawned, which also proves the front end's future is `Send`.
            let session = tokio::spawn(async move {
                match run(ClientStream::Plain(server), ctx, &*auth).await {
                    Ok(Some(est)) => Outcome::Established {
                        username: est.username,
                        leftover: est.client_leftover,
                    },
                    Ok(None) => Outcome::NoSession,
                    Err(_) => Outcome::Error,
                }
            });
            let (rd, wr) = sock.into_split();
            Client {
                rd: BufReader::new(rd),
                wr,
                session,
            }
        }

        /// Connects and reads the greeting.
        async fn greeted(ctx: FrontendContext, auth: &Arc<FakeAuth>) -> Client {
            let mut client = Client::start(ctx, auth).await;
            client.expect("+OK Director ready.").await;
            client
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.wr.write_all(bytes).await.unwrap();
        }

        /// Reads one reply line, which must end in CRLF; `None` at end of stream.
        async fn line(&mut self) -> Option<String> {
            let mut line = String::new();
            if self.rd.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            let line = line.strip_suffix("\r\n").expect("reply ends in CRLF");
            Some(line.to_owned())
        }

        async fn expect(&mut self, want: &str) {
            assert_eq!(self.line().await.as_deref(), Some(want));
        }

        async fn expect_lines(&mut self, want: &[&str]) {
            for line in want {
                self.expect(line).await;
            }
        }

        /// Sends `command` (CRLF added) and expects `reply`.
        async fn command(&mut self, command: &str, reply: &str) {
            self.send(format!("{command}\r\n").as_bytes()).await;
            self.expect(reply).await;
        }

        /// Expects the server to close, and returns what the session came to.
        async fn finish(mut self) -> Outcome {
            assert_eq!(self.line().await, None, "connection should be closed");
            self.session.await.unwrap()
        }
    }

    fn b64(raw: &[u8]) -> String {
        sasl::encode_base64(raw)
    }

    const FULL_CAPA: &[&str] = &[
        "+OK",
        "CAPA",
        "TOP",
        "UIDL",
        "RESP-CODES",
        "PIPELINING",
        "AUTH-RESP-CODE",
        "USER",
        "SASL PLAIN LOGIN",
        ".",
    ];

    #[tokio::test]
    async fn greeting_capa_noop_quit() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.send(b"capa\r\n").await;
        c.expect_lines(FULL_CAPA).await;
        c.command("NOOP", "+OK").await;
        c.command("QUIT", "+OK Logging out").await;
        assert_eq!(c.finish().await, Outcome::NoSession);
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn plaintext_disallowed_on_an_insecure_connection() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut ctx = context();
        ctx.disable_plaintext_auth = true;
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(b"CAPA\r\n").await;
        c.expect_lines(&[
            "+OK",
            "CAPA",
            "TOP",
            "UIDL",
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
            ".",
        ])
        .await;
        c.command("USER alice", PLAINTEXT_DISALLOWED).await;
        c.command("PASS secret", PLAINTEXT_DISALLOWED).await;
        c.command("AUTH PLAIN AGFsaWNlAHB3", PLAINTEXT_DISALLOWED)
            .await;
        c.send(b"AUTH\r\n").await;
        c.expect_lines(&["+OK", "."]).await;
        c.command("QUIT", "+OK Logging out").await;
        assert_eq!(c.finish().await, Outcome::NoSession);
        assert!(auth.decisions().is_empty());

        // From a trusted network it is allowed.
        let mut ctx = context();
        ctx.disable_plaintext_auth = true;
        ctx.trusted = true;
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(b"CAPA\r\n").await;
        c.expect_lines(FULL_CAPA).await;
        c.command("USER alice", "+OK").await;
        c.command("PASS secret", "+OK Logged in.").await;
    }

    #[tokio::test]
    async fn user_pass_logs_in_with_spaces_in_the_password() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("USER alice", "+OK").await;
        c.command("PASS  correct horse ", "+OK Logged in.").await;
        assert_eq!(
            c.session.await.unwrap(),
            Outcome::Established {
                username: "alice".into(),
                leftover: Vec::new()
            }
        );
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1);
        let d = &decisions[0];
        assert_eq!(d.protocol, Protocol::Pop3);
        assert_eq!(
            d.credentials,
            Credentials::plain("alice", " correct horse ")
        );
        assert_eq!(d.identity, context().identity);
        assert!(!d.secured);
    }

    #[tokio::test]
    async fn pass_needs_user() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("PASS secret", "-ERR No username given.").await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn auth_plain_with_initial_response() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut c = Client::greeted(context(), &auth).await;
        let ir = b64(b"\0alice\0secret");
        c.command(&format!("AUTH PLAIN {ir}"), "+OK Logged in.")
            .await;
        assert!(matches!(
            c.session.await.unwrap(),
            Outcome::Established { .. }
        ));
        assert_eq!(
            auth.decisions()[0].credentials,
            Credentials::plain("alice", "secret")
        );
    }

    #[tokio::test]
    async fn auth_plain_with_a_continuation_and_authzid() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("auth plain", "+ ").await;
        c.command(&b64(b"bob\0master\0pw"), "+OK Logged in.").await;
        assert_eq!(
            c.session.await.unwrap(),
            Outcome::Established {
                username: "bob".into(),
                leftover: Vec::new()
            }
        );
        let creds = &auth.decisions()[0].credentials;
        assert_eq!(
            (creds.username.as_str(), creds.auth_username.as_str()),
            ("bob", "master")
        );
    }

    #[tokio::test]
    async fn auth_login() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("AUTH LOGIN", "+ VXNlcm5hbWU6").await;
        c.command(&b64(b"alice"), "+ UGFzc3dvcmQ6").await;
        c.command(&b64(b"secret"), "+OK Logged in.").await;
        assert!(matches!(
            c.session.await.unwrap(),
            Outcome::Established { .. }
        ));
        assert_eq!(
            auth.decisions()[0].credentials,
            Credentials::plain("alice", "secret")
        );
    }

    #[tokio::test]
    async fn auth_cancel_list_and_unknown_mechanism() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("AUTH PLAIN", "+ ").await;
        c.command("*", "-ERR Authentication aborted by client.")
            .await;
        c.command("AUTH LOGIN", "+ VXNlcm5hbWU6").await;
        c.command("*", "-ERR Authentication aborted by client.")
            .await;
        c.send(b"AUTH\r\n").await;
        c.expect_lines(&["+OK", "PLAIN", "LOGIN", "."]).await;
        c.command(
            "AUTH CRAM-MD5",
            "-ERR Unsupported authentication mechanism.",
        )
        .await;
        c.command("NOOP", "+OK").await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn failed_login_then_success() {
        let auth = FakeAuth::new([
            Answer::AuthFailed("Authentication failed."),
            Answer::Ok("Logged in."),
        ]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("USER alice", "+OK").await;
        c.command("PASS wrong", "-ERR [AUTH] Authentication failed.")
            .await;
        c.command("PASS right", "+OK Logged in.").await;
        assert!(matches!(
            c.session.await.unwrap(),
            Outcome::Established { .. }
        ));
        assert_eq!(auth.decisions().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_after_a_delay_each() {
        let auth = FakeAuth::new([Answer::AuthFailed("Password mismatch\r\n+OK fake")]);
        let mut ctx = context();
        ctx.limits.auth_failure_delay = Duration::from_secs(2);
        ctx.limits.max_auth_failures = 3;
        let mut c = Client::greeted(ctx, &auth).await;
        c.command("USER alice", "+OK").await;
        let started = tokio::time::Instant::now();
        // The backend's text cannot add a line of its own.
        c.command("PASS a", "-ERR [AUTH] Password mismatch  +OK fake")
            .await;
        assert!(started.elapsed() >= Duration::from_secs(2));
        c.command("PASS b", "-ERR [AUTH] Authentication failed.")
            .await;
        c.command("PASS c", "-ERR [AUTH] Authentication failed.")
            .await;
        assert_eq!(c.finish().await, Outcome::NoSession);
        assert_eq!(auth.decisions().len(), 3);
    }

    #[tokio::test]
    async fn unavailable_is_not_an_auth_failure() {
        let auth = FakeAuth::new([
            Answer::Unavailable("No backend available."),
            Answer::Unavailable(""),
            Answer::Ok("Logged in."),
        ]);
        let mut ctx = context();
        ctx.limits.max_auth_failures = 1;
        let mut c = Client::greeted(ctx, &auth).await;
        c.command("USER alice", "+OK").await;
        c.command("PASS pw", "-ERR [SYS/TEMP] No backend available.")
            .await;
        c.command(
            "PASS pw",
            "-ERR [SYS/TEMP] Temporary failure, try again later.",
        )
        .await;
        c.command("PASS pw", "+OK Logged in.").await;
    }

    #[tokio::test]
    async fn unknown_commands_until_too_many() {
        let auth = FakeAuth::new([]);
        let mut ctx = context();
        ctx.limits.max_bad_commands = 3;
        let mut c = Client::greeted(ctx, &auth).await;
        c.command("APOP alice 0123456789abcdef", "-ERR Unknown command.")
            .await;
        c.command("", "-ERR Unknown command.").await;
        c.command("STAT", "-ERR Too many invalid commands.").await;
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test]
    async fn bad_usernames_are_refused() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.send(b"USER \xff\xfe\r\n").await;
        c.expect("-ERR Invalid characters in argument.").await;
        c.command("USER ", "-ERR No username given.").await;
        c.command(
            &format!("AUTH PLAIN {}", b64(b"\0\0pw")),
            "-ERR [AUTH] Authentication failed.",
        )
        .await;
        c.command(
            &format!("AUTH PLAIN {}", b64(b"\0\xff\0pw")),
            "-ERR [AUTH] Authentication failed.",
        )
        .await;
        c.command("AUTH PLAIN !!!", "-ERR Invalid base64 data in response.")
            .await;
        c.command("AUTH LOGIN", "+ VXNlcm5hbWU6").await;
        c.command("=", "+ UGFzc3dvcmQ6").await;
        c.command("=", "-ERR [AUTH] Authentication failed.").await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn pipelined_commands_after_login_are_handed_over() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut c = Client::greeted(context(), &auth).await;
        c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\n")
            .await;
        c.expect_lines(&["+OK", "+OK Logged in."]).await;
        assert_eq!(
            c.session.await.unwrap(),
            Outcome::Established {
                username: "alice".into(),
                leftover: b"STAT\r\nLIST\r\n".to_vec()
            }
        );
    }

    #[tokio::test]
    async fn over_long_lines_close_the_connection() {
        let auth = FakeAuth::new([]);
        let mut ctx = context();
        ctx.limits.max_line = 64;
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(format!("USER {}", "a".repeat(100)).as_bytes()).await;
        c.expect("-ERR Input line too long.").await;
        assert_eq!(c.finish().await, Outcome::NoSession);

        // A SASL response is capped by max_literal.
        let mut ctx = context();
        ctx.limits.max_literal = 16;
        let mut c = Client::greeted(ctx, &auth).await;
        c.command("AUTH PLAIN", "+ ").await;
        c.command(&"A".repeat(40), "-ERR Input line too long.")
            .await;
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test(start_paused = true)]
    async fn inactivity_ends_the_dialogue() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("USER alice", "+OK").await;
        let started = tokio::time::Instant::now();
        c.expect("-ERR Disconnected for inactivity.").await;
        assert!(started.elapsed() >= Duration::from_secs(29));
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test]
    async fn client_leaving_is_no_session() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.send(b"USER alice\r\nPASS").await;
        c.expect("+OK").await;
        c.wr.shutdown().await.unwrap();
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    /// A TLS acceptor without a certificate: enough to offer STLS and start a handshake,
    /// which then fails.
    fn acceptor() -> tokio_rustls::TlsAcceptor {
        #[derive(Debug)]
        struct NoCertificate;
        impl rustls::server::ResolvesServerCert for NoCertificate {
            fn resolve(
                &self,
                _: rustls::server::ClientHello<'_>,
            ) -> Option<Arc<rustls::sign::CertifiedKey>> {
                None
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate));
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    #[tokio::test]
    async fn stls_offered_only_when_configured() {
        let auth = FakeAuth::new([]);
        let mut c = Client::greeted(context(), &auth).await;
        c.command("STLS", "-ERR TLS support isn't enabled.").await;

        let mut ctx = context();
        ctx.starttls = Some(acceptor());
        ctx.disable_plaintext_auth = true;
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(b"CAPA\r\n").await;
        c.expect_lines(&[
            "+OK",
            "CAPA",
            "TOP",
            "UIDL",
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
            "STLS",
            ".",
        ])
        .await;
    }

    #[tokio::test]
    async fn commands_pipelined_after_stls_are_discarded() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut ctx = context();
        ctx.starttls = Some(acceptor());
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(b"STLS\r\nUSER alice\r\nPASS secret\r\n").await;
        c.expect("+OK Begin TLS negotiation now.").await;
        // No reply to USER or PASS: they were thrown away, and the handshake then fails
        // on the client's silence.
        c.wr.shutdown().await.unwrap();
        assert_eq!(c.finish().await, Outcome::Error);
        assert!(auth.decisions().is_empty());
    }

    /// A P-256 key made for these tests (`openssl genpkey -algorithm EC`), base64 PKCS#8.
    const TEST_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzXfATwBL5DEnJj1i\
                            tM9QtoAd0J4xMKtYpvg1oR0clfOhRANCAASdx+NasDsci0SI/Hga81zpgCue9370\
                            791OIv/w+p9snJHOsMkXxJp+dhWFqf5QiHgJddLVvrPHNTbslUsTmtm7";

    /// A TLS acceptor that completes handshakes: it signs with [`TEST_KEY`] and presents a
    /// placeholder certificate, which only [`trusting_connector`] accepts.
    fn working_acceptor() -> tokio_rustls::TlsAcceptor {
        #[derive(Debug)]
        struct TestKey(Arc<rustls::sign::CertifiedKey>);
        impl rustls::server::ResolvesServerCert for TestKey {
            fn resolve(
                &self,
                _: rustls::server::ClientHello<'_>,
            ) -> Option<Arc<rustls::sign::CertifiedKey>> {
                Some(self.0.clone())
            }
        }
        let der = sasl::decode_base64(TEST_KEY.as_bytes()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(der.into());
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(b"placeholder".to_vec());
        let certified = rustls::sign::CertifiedKey::new(vec![cert], signer);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(TestKey(Arc::new(certified))));
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A TLS client that accepts any certificate and signature (tests only).
    fn trusting_connector() -> tokio_rustls::TlsConnector {
        use rustls::client::danger::{
            HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
        };
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        use rustls::{DigitallySignedStruct, SignatureScheme};

        #[derive(Debug)]
        struct TrustAnything;
        impl ServerCertVerifier for TrustAnything {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: UnixTime,
            ) -> Result<ServerCertVerified, rustls::Error> {
                Ok(ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustAnything))
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Reads one CRLF-terminated line a byte at a time, so that nothing after it (the TLS
    /// handshake) is consumed.
    async fn read_line_exactly<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(
                stream.read(&mut byte).await.unwrap(),
                1,
                "unexpected end of stream"
            );
            line.push(byte[0]);
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).unwrap()
    }

    #[tokio::test]
    async fn stls_discards_pipelined_commands_and_secures_the_login() {
        let auth = FakeAuth::new([Answer::Ok("Logged in.")]);
        let mut ctx = context();
        ctx.starttls = Some(working_acceptor());
        ctx.disable_plaintext_auth = true;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sock = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let auth2 = auth.clone();
        let session = tokio::spawn(async move {
            let est = run(ClientStream::Plain(server), ctx, &*auth2)
                .await
                .unwrap();
            est.map(|e| (e.client.is_tls(), e.username))
        });

        assert_eq!(read_line_exactly(&mut sock).await, "+OK Director ready.");
        // An attacker in the middle appends commands after STLS, in the clear.
        sock.write_all(b"STLS\r\nUSER mallory\r\nQUIT\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_line_exactly(&mut sock).await,
            "+OK Begin TLS negotiation now."
        );
        let name = rustls::pki_types::ServerName::try_from("director.example").unwrap();
        let mut tls = trusting_connector().connect(name, sock).await.unwrap();

        // Neither USER nor QUIT was executed: PASS has no user, the session is alive.
        tls.write_all(b"PASS secret\r\n").await.unwrap();
        assert_eq!(read_line_exactly(&mut tls).await, "-ERR No username given.");
        // Over TLS, plaintext logins are allowed and STLS is no longer offered.
        tls.write_all(b"CAPA\r\n").await.unwrap();
        let mut capa = Vec::new();
        loop {
            let line = read_line_exactly(&mut tls).await;
            if line == "." {
                break;
            }
            capa.push(line);
        }
        assert!(capa.contains(&"USER".to_owned()));
        assert!(!capa.contains(&"STLS".to_owned()));
        tls.write_all(b"STLS\r\n").await.unwrap();
        assert_eq!(
            read_line_exactly(&mut tls).await,
            "-ERR TLS is already active."
        );

        tls.write_all(b"USER alice\r\nPASS secret\r\n")
            .await
            .unwrap();
        assert_eq!(read_line_exactly(&mut tls).await, "+OK");
        assert_eq!(read_line_exactly(&mut tls).await, "+OK Logged in.");
        assert_eq!(session.await.unwrap(), Some((true, "alice".to_owned())));
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1);
        assert!(decisions[0].secured);
    }
}
