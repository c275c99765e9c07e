//! The IMAP pre-authentication session, as Dovecot's imap-login runs it: greeting,
//! CAPABILITY, NOOP, ID, STARTTLS, LOGOUT, and LOGIN / AUTHENTICATE (PLAIN, LOGIN; SASL-IR).
//! Once the client has given credentials it asks the [`Authenticator`] for a logged-in backend
//! and hands the session over as an [`Established`].
//!
//! The grammar lives in [`super::command`]; this file only holds behaviour. The whole dialogue
//! runs under [`PreauthLimits::timeout`], and the read buffer never holds more than
//! `max_line + max_literal` bytes.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::command::{Arg, Command, CommandName, CommandParser, Parse, ParseError};
use crate::net::stream::ClientStream;
use crate::protocol::decision::{Credentials, Decision, Protocol};
use crate::protocol::preauth::{
    Authenticator, Established, FrontendContext, LoginFailure, PreauthLimits,
};
use crate::protocol::sasl;

/// Capabilities offered before login, whatever the connection. STARTTLS and the
/// authentication mechanisms (or LOGINDISABLED) follow, depending on the connection.
const BASE_CAPABILITIES: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+";

/// How long a last `* BYE` may take to write to a client that does not read.
const BYE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes read from the socket at most at once (on the stack).
const READ_CHUNK: usize = 2048;

const PRIVACY_REQUIRED: &str =
    "NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.";

/// Runs the pre-authentication dialogue with `client`. Returns the established session once
/// the client has logged in, or `None` when the client left, was disconnected (timeout, too
/// many errors or failed logins) or the TLS handshake failed.
pub async fn run<A: Authenticator>(
    client: ClientStream,
    ctx: FrontendContext,
    auth: &A,
) -> io::Result<Option<Established>> {
    let timeout = ctx.limits.timeout;
    let shutdown = ctx.shutdown.clone();
    let eviction = ctx.eviction.clone();
    let mut session = Session::new(client, ctx);
    tokio::select! {
        r = tokio::time::timeout(timeout, session.dialogue(auth)) => match r {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(session = %session.ctx.identity.session_id, "pre-auth timeout");
                session.bye("Disconnected for inactivity.").await;
                Ok(None)
            }
        },
        _ = shutdown.draining() => {
            session.bye("Server shutting down.").await;
            Ok(None)
        }
        _ = eviction.evicted() => {
            session
                .bye(&format!("[UNAVAILABLE] {}", crate::net::admission::EVICTED_TEXT))
                .await;
            Ok(None)
        }
    }
}

/// What to do after a command.
enum Flow {
    Continue,
    /// Close the connection (everything the client should read has been written).
    Close,
    /// Logged in: hand the session over.
    Established(Box<Established>),
}

/// One line a client sent in answer to a SASL challenge.
enum SaslResponse {
    Line(Vec<u8>),
    /// The client sent `*`.
    Cancel,
    /// The line is longer than `max_literal`.
    TooLong,
    /// The client closed the connection.
    Closed,
}

/// Credentials from a client, or why they cannot be used.
enum ClientCredentials {
    Valid(Credentials),
    /// Unusable (not UTF-8, empty user, malformed PLAIN): answered like a failed login, so a
    /// client cannot tell a malformed login from a wrong password.
    Invalid,
}

/// The state of one pre-authentication session.
struct Session {
    /// `None` only while STARTTLS swaps the stream, or once it was handed over.
    client: Option<ClientStream>,
    ctx: FrontendContext,
    /// Bytes read from the client and not yet consumed; at most `buffer_cap` bytes.
    buf: Vec<u8>,
    parser: CommandParser,
    /// The parser's limits bound what must be buffered: one command line and its literals.
    buffer_cap: usize,
    /// Invalid commands so far, against `max_bad_commands`.
    bad_commands: u32,
    /// Failed logins so far, against `max_auth_failures`.
    auth_failures: u32,
}

impl Session {
    fn new(client: ClientStream, ctx: FrontendContext) -> Self {
        let PreauthLimits {
            max_line,
            max_literal,
            ..
        } = ctx.limits;
        Session {
            client: Some(client),
            buf: Vec::new(),
            parser: CommandParser::new(max_line, max_literal),
            // `+ 2`: room for a SASL response line of `max_literal` bytes and its CRLF, and
            // for the byte past a limit that shows it was crossed.
            buffer_cap: max_line + max_literal + 2,
            bad_commands: 0,
            auth_failures: 0,
            ctx,
        }
    }

    async fn dialogue<A: Authenticator>(&mut self, auth: &A) -> io::Result<Option<Established>> {
        let greeting = format!(
            "* OK [CAPABILITY {}] {}\r\n",
            self.capabilities(),
            printable(&self.ctx.greeting)
        );
        self.send(greeting.as_bytes()).await?;
        loop {
            let Some(command) = self.next_command().await? else {
                return Ok(None);
            };
            match self.execute(command, auth).await? {
                Flow::Continue => {}
                Flow::Close => return Ok(None),
                Flow::Established(established) => return Ok(Some(*established)),
            }
        }
    }

    fn is_tls(&self) -> bool {
        self.client.as_ref().is_some_and(ClientStream::is_tls)
    }

    /// Whether LOGIN and AUTHENTICATE are allowed on this connection.
    fn plaintext_allowed(&self) -> bool {
        !self.ctx.disable_plaintext_auth || self.ctx.trusted || self.is_tls()
    }

    fn capabilities(&self) -> String {
        let mut caps = BASE_CAPABILITIES.to_owned();
        if self.ctx.starttls.is_some() && !self.is_tls() {
            caps.push_str(" STARTTLS");
        }
        if self.plaintext_allowed() {
            caps.push_str(" AUTH=PLAIN AUTH=LOGIN");
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }

    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| io::Error::other("client connection already handed over"))?;
        client.write_all(data).await?;
        client.flush().await
    }

    async fn reply(&mut self, tag: &str, text: &str) -> io::Result<()> {
        self.send(format!("{tag} {text}\r\n").as_bytes()).await
    }

    /// Says goodbye before closing, without waiting long for a client that does not read.
    async fn bye(&mut self, text: &str) {
        let line = format!("* BYE {text}\r\n");
        let _ = tokio::time::timeout(BYE_WRITE_TIMEOUT, self.send(line.as_bytes())).await;
    }

    /// Reads more bytes into the buffer. `false`: the client closed the connection.
    async fn fill(&mut self) -> io::Result<bool> {
        let room = self
            .buffer_cap
            .saturating_sub(self.buf.len())
            .min(READ_CHUNK);
        if room == 0 {
            // The parser and `sasl_response` stop before this; never buffer more anyway.
            return Err(io::Error::other("pre-auth read buffer full"));
        }
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| io::Error::other("client connection already handed over"))?;
        let mut chunk = [0u8; READ_CHUNK];
        let n = client.read(&mut chunk[..room]).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next command, answering syntax errors on the way. `None`: close the connection.
    async fn next_command(&mut self) -> io::Result<Option<Command>> {
        loop {
            match self.parser.parse(&self.buf) {
                Parse::Incomplete => {
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
                Parse::NeedContinuation => self.send(b"+ Ready for literal data\r\n").await?,
                Parse::Command { consumed, command } => {
                    self.buf.drain(..consumed);
                    return Ok(Some(command));
                }
                Parse::Error(error) => {
                    self.buf.drain(..error.consumed);
                    if !self.syntax_error(error).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Answers a parse error. `false`: close the connection.
    async fn syntax_error(&mut self, error: ParseError) -> io::Result<bool> {
        if error.fatal {
            if let (Some(tag), Some(code)) = (&error.tag, error.code) {
                let text = format!("BAD [{code}] {}", error.message);
                self.reply(&tag.clone(), &text).await?;
            }
            self.bye(&error.message).await;
            return Ok(false);
        }
        let line = match (&error.tag, error.code, &error.command) {
            (None, _, _) => "* BAD Error in IMAP command received by server.".to_owned(),
            (Some(tag), Some(code), _) => format!("{tag} BAD [{code}] {}", error.message),
            (Some(tag), None, Some(name)) => {
                format!("{tag} BAD Error in IMAP command {name}: {}", error.message)
            }
            (Some(tag), None, None) => {
                format!("{tag} BAD Error in IMAP command received by server.")
            }
        };
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.count_bad_command().await
    }

    /// Counts an invalid command. `false`: that was one too many, the client was told BYE.
    async fn count_bad_command(&mut self) -> io::Result<bool> {
        self.bad_commands += 1;
        if self.bad_commands >= self.ctx.limits.max_bad_commands {
            self.bye("Too many invalid IMAP commands.").await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Answers `tag BAD Error in IMAP command NAME: Invalid arguments.` and counts it.
    async fn invalid_arguments(&mut self, command: &Command) -> io::Result<Flow> {
        let text = format!(
            "BAD Error in IMAP command {}: Invalid arguments.",
            command.name
        );
        self.reply(&command.tag, &text).await?;
        self.continue_unless_too_many_bad().await
    }

    async fn continue_unless_too_many_bad(&mut self) -> io::Result<Flow> {
        Ok(if self.count_bad_command().await? {
            Flow::Continue
        } else {
            Flow::Close
        })
    }

    async fn execute<A: Authenticator>(&mut self, command: Command, auth: &A) -> io::Result<Flow> {
        let tag = command.tag.as_str();
        match command.name {
            CommandName::Capability
            | CommandName::Noop
            | CommandName::Logout
            | CommandName::Starttls
                if !command.args.is_empty() =>
            {
                self.invalid_arguments(&command).await
            }
            CommandName::Capability => {
                let text = format!(
                    "* CAPABILITY {}\r\n{tag} OK Pre-login capabilities listed, post-login \
                     capabilities have more.\r\n",
                    self.capabilities()
                );
                self.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Noop => {
                self.reply(tag, "OK NOOP completed.").await?;
                Ok(Flow::Continue)
            }
            CommandName::Logout => {
                let text = format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n");
                self.send(text.as_bytes()).await?;
                Ok(Flow::Close)
            }
            CommandName::Id => {
                if !valid_id_args(&command.args) {
                    return self.invalid_arguments(&command).await;
                }
                self.adopt_originating_client(&command.args);
                let text = format!("* ID (\"name\" \"director\")\r\n{tag} OK ID completed.\r\n");
                self.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Starttls => self.starttls(tag).await,
            CommandName::Login => {
                let [user, password] = command.args.as_slice() else {
                    return self.invalid_arguments(&command).await;
                };
                let (Some(user), Some(password)) = (user.astring(), password.astring()) else {
                    return self.invalid_arguments(&command).await;
                };
                if !self.plaintext_allowed() {
                    self.reply(tag, PRIVACY_REQUIRED).await?;
                    return Ok(Flow::Continue);
                }
                let credentials = match (text(user), text(password)) {
                    (Some(user), Some(password)) if !user.is_empty() => {
                        ClientCredentials::Valid(Credentials::plain(user, password))
                    }
                    _ => ClientCredentials::Invalid,
                };
                self.login(tag, credentials, auth).await
            }
            CommandName::Authenticate => self.authenticate(&command, auth).await,
            CommandName::Other(_) => {
                self.reply(tag, "BAD Unknown command.").await?;
                self.continue_unless_too_many_bad().await
            }
        }
    }

    async fn starttls(&mut self, tag: &str) -> io::Result<Flow> {
        if self.is_tls() {
            self.reply(tag, "BAD TLS is already active.").await?;
            return Ok(Flow::Continue);
        }
        let Some(acceptor) = self.ctx.starttls.clone() else {
            self.reply(tag, "BAD TLS support isn't enabled.").await?;
            return Ok(Flow::Continue);
        };
        self.reply(tag, "OK Begin TLS negotiation now.").await?;
        // Whatever the client sent after STARTTLS was not protected by TLS: it could have been
        // injected by a man in the middle, so it must not be executed.
        self.buf.clear();
        self.parser.reset();
        let Some(client) = self.client.take() else {
            return Ok(Flow::Close);
        };
        match client.start_tls(&acceptor).await {
            Ok(client) => {
                self.client = Some(client);
                Ok(Flow::Continue)
            }
            Err(error) => {
                tracing::debug!(session = %self.ctx.identity.session_id, %error, "STARTTLS handshake failed");
                Ok(Flow::Close)
            }
        }
    }

    async fn authenticate<A: Authenticator>(
        &mut self,
        command: &Command,
        auth: &A,
    ) -> io::Result<Flow> {
        let tag = command.tag.as_str();
        let (mechanism, initial) = match command.args.as_slice() {
            [Arg::Atom(mechanism)] => (mechanism, None),
            [Arg::Atom(mechanism), Arg::Atom(initial)] => (mechanism, Some(initial.as_bytes())),
            _ => return self.invalid_arguments(command).await,
        };
        if !self.plaintext_allowed() {
            self.reply(tag, PRIVACY_REQUIRED).await?;
            return Ok(Flow::Continue);
        }
        let credentials = if mechanism.eq_ignore_ascii_case("PLAIN") {
            let response = match initial {
                Some(initial) => initial.to_vec(),
                None => match self.challenge(tag, "").await? {
                    Ok(response) => response,
                    Err(flow) => return Ok(flow),
                },
            };
            let Ok(decoded) = sasl::decode_base64(&response) else {
                return self.invalid_base64(tag).await;
            };
            match sasl::parse_plain(&decoded) {
                Ok(credentials) => ClientCredentials::Valid(credentials),
                Err(_) => ClientCredentials::Invalid,
            }
        } else if mechanism.eq_ignore_ascii_case("LOGIN") {
            let user = match initial {
                Some(initial) => initial.to_vec(),
                None => match self.challenge(tag, "VXNlcm5hbWU6").await? {
                    Ok(response) => response,
                    Err(flow) => return Ok(flow),
                },
            };
            let password = match self.challenge(tag, "UGFzc3dvcmQ6").await? {
                Ok(response) => response,
                Err(flow) => return Ok(flow),
            };
            let (Ok(user), Ok(password)) =
                (sasl::decode_base64(&user), sasl::decode_base64(&password))
            else {
                return self.invalid_base64(tag).await;
            };
            match (text(&user), text(&password)) {
                (Some(user), Some(password)) if !user.is_empty() => {
                    ClientCredentials::Valid(Credentials::plain(user, password))
                }
                _ => ClientCredentials::Invalid,
            }
        } else {
            self.reply(tag, "NO Unsupported authentication mechanism.")
                .await?;
            return Ok(Flow::Continue);
        };
        self.login(tag, credentials, auth).await
    }

    async fn invalid_base64(&mut self, tag: &str) -> io::Result<Flow> {
        self.reply(tag, "BAD Invalid base64 data in authentication response.")
            .await?;
        self.continue_unless_too_many_bad().await
    }

    /// Sends a SASL challenge (`+ <base64>`) and reads the client's response line. `Err` holds
    /// what to do instead when there is no usable response (already answered).
    async fn challenge(&mut self, tag: &str, challenge: &str) -> io::Result<Result<Vec<u8>, Flow>> {
        self.send(format!("+ {challenge}\r\n").as_bytes()).await?;
        match self.sasl_response().await? {
            SaslResponse::Line(line) => Ok(Ok(line)),
            SaslResponse::Cancel => {
                self.reply(tag, "BAD Authentication aborted by client.")
                    .await?;
                Ok(Err(Flow::Continue))
            }
            SaslResponse::TooLong => {
                self.reply(tag, "BAD Authentication response too long.")
                    .await?;
                self.bye("Too long authentication response.").await;
                Ok(Err(Flow::Close))
            }
            SaslResponse::Closed => Ok(Err(Flow::Close)),
        }
    }

    /// Reads one SASL response line (at most `max_literal` bytes) from the buffer and socket.
    async fn sasl_response(&mut self) -> io::Result<SaslResponse> {
        let max = self.ctx.limits.max_literal;
        loop {
            if let Some(lf) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=lf).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(match line.as_slice() {
                    _ if line.len() > max => SaslResponse::TooLong,
                    b"*" => SaslResponse::Cancel,
                    _ => SaslResponse::Line(line),
                });
            }
            if self.buf.len() > max + 1 {
                return Ok(SaslResponse::TooLong);
            }
            if !self.fill().await? {
                return Ok(SaslResponse::Closed);
            }
        }
    }

    /// A trusted client (a webmail front end) tells in `ID` who its user really is: its
    /// `x-originating-ip`/`-port` become the client address from then on (the backend's `ID`,
    /// the logs) and its `x-session-ext-id` goes to the backend, as Dovecot does for its
    /// `login_trusted_networks`. From other clients these fields are ignored.
    fn adopt_originating_client(&mut self, args: &[Arg]) {
        let fields = super::command::originating_fields(args);
        let session = self.ctx.identity.session_id.clone();
        if !self.ctx.trusted {
            if fields != super::command::OriginatingFields::default() {
                tracing::debug!(session = %session, client = %self.ctx.identity.client,
                    "ID originating-client fields from an untrusted client ignored");
            }
            return;
        }
        for (key, value) in &fields.rejected {
            tracing::debug!(session = %session, field = key, value = %crate::untrusted::shown_bytes(value),
                "ID field from a trusted client ignored: not a valid value");
        }
        let identity = &mut self.ctx.identity;
        let before = identity.client;
        if let Some(ip) = fields.ip {
            identity.client.set_ip(ip);
        }
        if let Some(port) = fields.port {
            identity.client.set_port(port);
        }
        if let Some(ext) = fields.session_ext_id {
            tracing::debug!(session = %session, session_ext_id = %crate::untrusted::shown(&ext),
                "session id of the trusted client");
            identity.session_ext_id = Some(ext);
        }
        if identity.client != before {
            tracing::debug!(session = %session, peer = %before, client = %identity.client,
                "client address from a trusted client's ID");
        }
    }

    /// Logs in with the client's credentials through `auth` and answers the client.
    async fn login<A: Authenticator>(
        &mut self,
        tag: &str,
        credentials: ClientCredentials,
        auth: &A,
    ) -> io::Result<Flow> {
        let ClientCredentials::Valid(credentials) = credentials else {
            return self.auth_failed(tag, "").await;
        };
        let decision = Decision {
            protocol: Protocol::Imap,
            credentials,
            identity: self.ctx.identity.clone(),
            secured: self.is_tls(),
        };
        match auth.login(&decision).await {
            Ok(backend) => {
                let line = format!("{tag} OK {}\r\n", printable(&backend.success_text));
                self.send(line.as_bytes()).await?;
                let client = self
                    .client
                    .take()
                    .ok_or_else(|| io::Error::other("client connection already handed over"))?;
                Ok(Flow::Established(Box::new(Established {
                    client,
                    client_leftover: std::mem::take(&mut self.buf),
                    backend,
                    username: decision.credentials.username,
                    identity: self.ctx.identity.clone(),
                })))
            }
            Err(LoginFailure::AuthFailed { message }) => self.auth_failed(tag, &message).await,
            Err(LoginFailure::Unavailable { message }) => {
                let message = match printable(&message) {
                    m if m.trim().is_empty() => "Service temporarily unavailable.".to_owned(),
                    m => m,
                };
                self.reply(tag, &format!("NO [UNAVAILABLE] {message}"))
                    .await?;
                Ok(Flow::Continue)
            }
        }
    }

    /// Answers a failed login after the configured delay; closes after too many.
    async fn auth_failed(&mut self, tag: &str, message: &str) -> io::Result<Flow> {
        tokio::time::sleep(self.ctx.limits.auth_failure_delay).await;
        let message = match printable(message) {
            m if m.trim().is_empty() => "Authentication failed.".to_owned(),
            m => m,
        };
        self.reply(tag, &format!("NO [AUTHENTICATIONFAILED] {message}"))
            .await?;
        self.auth_failures += 1;
        if self.auth_failures >= self.ctx.limits.max_auth_failures {
            self.bye("Too many invalid authentication attempts.").await;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }
}

/// ID's argument: NIL, or a list of field/value pairs (field a string, value a string or NIL).
fn valid_id_args(args: &[Arg]) -> bool {
    match args {
        [Arg::Nil] => true,
        [Arg::List(items)] => {
            items.len() % 2 == 0
                && items.chunks(2).all(|pair| {
                    matches!(pair[0].nstring(), Some(Some(_))) && pair[1].nstring().is_some()
                })
        }
        _ => false,
    }
}

/// A client's string as text; `None` if it is not UTF-8.
fn text(bytes: &[u8]) -> Option<String> {
    String::from_utf8(bytes.to_vec()).ok()
}

/// `text` with control characters replaced by spaces, safe to put in a reply line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::net::stream::BackendStream;
    use crate::protocol::decision::{ClientIdentity, Secret};
    use crate::protocol::preauth::BackendLink;
    use crate::state::sessions::Sessions;

    /// An authenticator that records every decision. Password "wrong" fails, "unavail" finds
    /// no backend; anything else logs in to a local listener.
    struct FakeAuth {
        decisions: Mutex<Vec<Decision>>,
        backend: TcpListener,
        sessions: Sessions,
    }

    impl FakeAuth {
        async fn new() -> Arc<Self> {
            Arc::new(FakeAuth {
                decisions: Mutex::new(Vec::new()),
                backend: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                sessions: Sessions::new(),
            })
        }

        fn decisions(&self) -> Vec<Decision> {
            self.decisions.lock().unwrap().clone()
        }
    }

    impl Authenticator for FakeAuth {
        fn login(
            &self,
            decision: &Decision,
        ) -> impl std::future::Future<Output = Result<BackendLink, LoginFailure>> + Send {
            self.decisions.lock().unwrap().push(decision.clone());
            let password = decision.credentials.password.expose().to_owned();
            let username = decision.credentials.username.clone();
            async move {
                match password.as_str() {
                    "wrong" => Err(LoginFailure::AuthFailed {
                        message: "Authentication failed.".into(),
                    }),
                    "unavail" => Err(LoginFailure::Unavailable {
                        message: "No backend available.".into(),
                    }),
                    _ => {
                        let addr = self.backend.local_addr().unwrap();
                        let tcp = TcpStream::connect(addr).await.unwrap();
                        Ok(BackendLink {
                            stream: BackendStream::Plain(tcp),
                            success_text: "[CAPABILITY IMAP4rev1 IDLE] Logged in".into(),
                            leftover: Vec::new(),
                            session: self.sessions.register(
                                Protocol::Imap,
                                &username,
                                0,
                                addr,
                                None,
                            ),
                        })
                    }
                }
            }
        }
    }

    /// The test's side of the connection (plain, or TLS after STARTTLS).
    struct Client<S = TcpStream> {
        reader: BufReader<S>,
    }

    impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
        async fn send(&mut self, data: &[u8]) {
            self.reader.get_mut().write_all(data).await.unwrap();
            self.reader.get_mut().flush().await.unwrap();
        }

        /// The next line, without CRLF; `None` at end of stream.
        async fn line(&mut self) -> Option<String> {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.unwrap();
            if n == 0 {
                return None;
            }
            assert!(line.ends_with("\r\n"), "line without CRLF: {line:?}");
            line.truncate(line.len() - 2);
            Some(line)
        }

        async fn expect(&mut self, want: &str) {
            assert_eq!(self.line().await.as_deref(), Some(want));
        }

        async fn expect_closed(&mut self) {
            assert_eq!(self.line().await, None);
        }
    }

    type Session = JoinHandle<io::Result<Option<Established>>>;

    fn context(client: SocketAddr, local: SocketAddr) -> FrontendContext {
        FrontendContext {
            starttls: None,
            disable_plaintext_auth: false,
            trusted: false,
            limits: PreauthLimits {
                auth_failure_delay: Duration::ZERO,
                max_line: 256,
                max_literal: 256,
                ..PreauthLimits::default()
            },
            identity: ClientIdentity {
                client,
                local,
                session_id: "s1".into(),
                session_ext_id: None,
            },
            greeting: "Director ready.".into(),
            shutdown: Default::default(),
            eviction: Default::default(),
        }
    }

    /// Starts a session on a fresh connection, with `adjust` applied to the context, and reads
    /// the greeting.
    async fn start(
        adjust: impl FnOnce(&mut FrontendContext),
    ) -> (Client, Session, Arc<FakeAuth>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let mut ctx = context(peer, server.local_addr().unwrap());
        adjust(&mut ctx);
        let auth = FakeAuth::new().await;
        let auth2 = auth.clone();
        let session =
            tokio::spawn(async move { run(ClientStream::Plain(server), ctx, &*auth2).await });
        let mut client = Client {
            reader: BufReader::new(client),
        };
        let greeting = client.line().await.unwrap();
        (client, session, auth, greeting)
    }

    const CAPS: &str =
        "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN";

    async fn established(session: Session) -> Established {
        session.await.unwrap().unwrap().expect("a session")
    }

    fn credentials(auth: &FakeAuth) -> Vec<(String, String, String)> {
        auth.decisions()
            .iter()
            .map(|d| {
                let c = &d.credentials;
                (
                    c.username.clone(),
                    c.auth_username.clone(),
                    c.password.expose().to_owned(),
                )
            })
            .collect()
    }

    fn creds(user: &str, auth_user: &str, password: &str) -> (String, String, String) {
        (user.into(), auth_user.into(), password.into())
    }

    fn b64(raw: &[u8]) -> String {
        sasl::encode_base64(raw)
    }

    #[tokio::test]
    async fn greeting_capability_noop_id_logout() {
        let (mut c, session, auth, greeting) = start(|_| {}).await;
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {CAPS}] Director ready.")
        );
        c.send(b"a CAPABILITY\r\n").await;
        c.expect(&format!("* CAPABILITY {CAPS}")).await;
        c.expect("a OK Pre-login capabilities listed, post-login capabilities have more.")
            .await;
        c.send(b"b noop\r\nc ID (\"name\" \"test\" \"version\" NIL)\r\nd ID NIL\r\n")
            .await;
        c.expect("b OK NOOP completed.").await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("c OK ID completed.").await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("d OK ID completed.").await;
        c.send(b"e ID (\"name\")\r\n").await;
        c.expect("e BAD Error in IMAP command ID: Invalid arguments.")
            .await;
        c.send(b"f LOGOUT\r\n").await;
        c.expect("* BYE Logging out").await;
        c.expect("f OK Logout completed.").await;
        c.expect_closed().await;
        assert!(session.await.unwrap().unwrap().is_none());
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn id_from_a_trusted_client_changes_its_address() {
        const ID: &[u8] = b"i ID (\"name\" \"webmail\" \"x-originating-ip\" \"192.0.2.9\" \
            \"X-Originating-Port\" \"51234\" \"x-session-ext-id\" \"abc123\")\r\n";
        let (mut c, session, auth, _) = start(|ctx| ctx.trusted = true).await;
        c.send(ID).await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("i OK ID completed.").await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        let d = &auth.decisions()[0];
        assert_eq!(d.identity.client, "192.0.2.9:51234".parse().unwrap());
        assert_eq!(d.identity.session_ext_id.as_deref(), Some("abc123"));
        assert_eq!(d.identity.session_id, "s1", "our own id stays");
        assert_eq!(
            est.identity, d.identity,
            "the session's log line uses it too"
        );

        // From an untrusted client the same ID is answered alike and changes nothing.
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(ID).await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("i OK ID completed.").await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        let d = &auth.decisions()[0];
        let peer = d.identity.client;
        assert_eq!(peer.ip().to_string(), "127.0.0.1", "the TCP peer stays");
        assert_ne!(peer.port(), 51234);
        assert_eq!(d.identity.session_ext_id, None);

        // Invalid values from a trusted client are ignored, valid ones next to them kept.
        let (mut c, session, auth, _) = start(|ctx| ctx.trusted = true).await;
        c.send(
            b"i ID (\"x-originating-ip\" \"192.0.2.999\" \"x-originating-port\" \"70000\" \
            \"x-session-ext-id\" \"a\\\"b c\")\r\nj ID (\"x-originating-port\" \"4000\")\r\n",
        )
        .await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("i OK ID completed.").await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("j OK ID completed.").await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        let d = &auth.decisions()[0];
        assert_eq!(d.identity.client, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(d.identity.session_ext_id, None);
    }

    #[tokio::test]
    async fn login_with_atoms() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        assert_eq!(est.username, "alice");
        assert!(est.client_leftover.is_empty());
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1);
        let d = &decisions[0];
        assert_eq!(d.protocol, Protocol::Imap);
        assert_eq!(d.credentials, Credentials::plain("alice", "secret"));
        assert_eq!(d.identity.session_id, "s1");
        assert!(!d.secured);
    }

    #[tokio::test]
    async fn login_with_quoted_strings() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a login \"al ice\" \"p\\\"w\\\\d\"\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(
            credentials(&auth),
            vec![creds("al ice", "al ice", "p\"w\\d")]
        );
    }

    #[tokio::test]
    async fn login_with_synchronising_literals() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN {5}\r\n").await;
        c.expect("+ Ready for literal data").await;
        c.send(b"alice {7}\r\n").await;
        c.expect("+ Ready for literal data").await;
        c.send(b"se\"c\r\nt\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(
            credentials(&auth),
            vec![creds("alice", "alice", "se\"c\r\nt")]
        );
    }

    #[tokio::test]
    async fn login_with_non_synchronising_literals_and_pipelined_bytes() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb SELECT INBOX\r\nc NOOP\r\n")
            .await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        assert_eq!(est.client_leftover, b"b SELECT INBOX\r\nc NOOP\r\n");
        assert_eq!(credentials(&auth), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_plain_with_initial_response() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        let line = format!("a AUTHENTICATE PLAIN {}\r\n", b64(b"bob\0master\0pw"));
        c.send(line.as_bytes()).await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        assert_eq!(established(session).await.username, "bob");
        assert_eq!(credentials(&auth), vec![creds("bob", "master", "pw")]);
    }

    #[tokio::test]
    async fn authenticate_plain_with_continuation() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a authenticate plain\r\n").await;
        c.expect("+ ").await;
        c.send(format!("{}\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(credentials(&auth), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_login() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a AUTHENTICATE LOGIN\r\n").await;
        c.expect("+ VXNlcm5hbWU6").await;
        c.send(format!("{}\r\n", b64(b"alice")).as_bytes()).await;
        c.expect("+ UGFzc3dvcmQ6").await;
        c.send(format!("{}\r\n", b64(b"secret")).as_bytes()).await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(credentials(&auth), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_cancelled_and_bad_responses() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a AUTHENTICATE PLAIN\r\n").await;
        c.expect("+ ").await;
        c.send(b"*\r\n").await;
        c.expect("a BAD Authentication aborted by client.").await;
        c.send(b"b AUTHENTICATE PLAIN !!!\r\n").await;
        c.expect("b BAD Invalid base64 data in authentication response.")
            .await;
        c.send(b"c AUTHENTICATE CRAM-MD5\r\n").await;
        c.expect("c NO Unsupported authentication mechanism.").await;
        // A malformed PLAIN response is a failed login, not a crash.
        c.send(format!("d AUTHENTICATE PLAIN {}\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("d NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"e AUTHENTICATE PLAIN =\r\n").await;
        c.expect("e NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"f LOGOUT\r\n").await;
        c.expect("* BYE Logging out").await;
        c.expect("f OK Logout completed.").await;
        assert!(session.await.unwrap().unwrap().is_none());
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn plaintext_disabled_on_untrusted_plain_connections() {
        let (mut c, session, auth, greeting) = start(|ctx| ctx.disable_plaintext_auth = true).await;
        let caps = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ LOGINDISABLED";
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {caps}] Director ready.")
        );
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect(&format!("a {PRIVACY_REQUIRED}")).await;
        c.send(format!("b AUTHENTICATE PLAIN {}\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect(&format!("b {PRIVACY_REQUIRED}")).await;
        c.send(b"c LOGOUT\r\n").await;
        c.expect("* BYE Logging out").await;
        c.expect("c OK Logout completed.").await;
        assert!(session.await.unwrap().unwrap().is_none());
        assert!(auth.decisions().is_empty());

        let (mut c, session, _, greeting) = start(|ctx| {
            ctx.disable_plaintext_auth = true;
            ctx.trusted = true;
        })
        .await;
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {CAPS}] Director ready.")
        );
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
    }

    #[tokio::test]
    async fn failed_login_then_success() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN alice wrong\r\n").await;
        c.expect("a NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"b LOGIN alice unavail\r\n").await;
        c.expect("b NO [UNAVAILABLE] No backend available.").await;
        c.send(b"c LOGIN alice wrong\r\n").await;
        c.expect("c NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"d LOGIN alice secret\r\n").await;
        c.expect("d OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(auth.decisions().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_the_connection_after_a_delay() {
        let (mut c, session, _, _) = start(|ctx| {
            ctx.limits.auth_failure_delay = Duration::from_secs(2);
        })
        .await;
        let started = tokio::time::Instant::now();
        for tag in ["a", "b", "c"] {
            c.send(format!("{tag} LOGIN alice wrong\r\n").as_bytes())
                .await;
            c.expect(&format!(
                "{tag} NO [AUTHENTICATIONFAILED] Authentication failed."
            ))
            .await;
        }
        assert!(started.elapsed() >= Duration::from_secs(6));
        c.expect("* BYE Too many invalid authentication attempts.")
            .await;
        c.expect_closed().await;
        assert!(session.await.unwrap().unwrap().is_none());
    }

    #[tokio::test]
    async fn invalid_usernames_fail_without_a_login() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN {2+}\r\n\xff\xfe secret\r\n").await;
        c.expect("a NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"b LOGIN \"\" secret\r\n").await;
        c.expect("b NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"c LOGIN alice\r\n").await;
        c.expect("c BAD Error in IMAP command LOGIN: Invalid arguments.")
            .await;
        c.send(b"d LOGOUT\r\n").await;
        c.expect("* BYE Logging out").await;
        c.expect("d OK Logout completed.").await;
        assert!(session.await.unwrap().unwrap().is_none());
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn unknown_and_invalid_commands() {
        let (mut c, session, _, _) = start(|ctx| ctx.limits.max_bad_commands = 4).await;
        c.send(b"a SELECT INBOX\r\n").await;
        c.expect("a BAD Unknown command.").await;
        c.send(b"garbage\r\n").await;
        c.expect("garbage BAD Error in IMAP command received by server.")
            .await;
        c.send(b"* x\r\n").await;
        c.expect("* BAD Error in IMAP command received by server.")
            .await;
        c.send(b"b LOGIN \"open\r\n").await;
        c.expect("b BAD Error in IMAP command LOGIN: Missing '\"'.")
            .await;
        c.expect("* BYE Too many invalid IMAP commands.").await;
        c.expect_closed().await;
        assert!(session.await.unwrap().unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_input_is_refused() {
        let (mut c, session, _, _) = start(|_| {}).await;
        c.send(b"a LOGIN {1000}\r\n").await;
        c.expect("a BAD [TOOBIG] Literal too large.").await;
        c.send(b"b AUTHENTICATE PLAIN\r\n").await;
        c.expect("+ ").await;
        c.send(&[b'A'; 300]).await;
        c.expect("b BAD Authentication response too long.").await;
        c.expect("* BYE Too long authentication response.").await;
        c.expect_closed().await;
        assert!(session.await.unwrap().unwrap().is_none());

        let (mut c, session, _, _) = start(|_| {}).await;
        c.send(&[b'a'; 400]).await;
        c.expect("* BYE Too long command line.").await;
        c.expect_closed().await;
        assert!(session.await.unwrap().unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn preauth_timeout() {
        let (mut c, session, _, _) = start(|_| {}).await;
        let started = tokio::time::Instant::now();
        c.send(b"a NOOP\r\n").await;
        c.expect("a OK NOOP completed.").await;
        c.expect("* BYE Disconnected for inactivity.").await;
        c.expect_closed().await;
        assert!(started.elapsed() >= Duration::from_secs(59));
        assert!(session.await.unwrap().unwrap().is_none());
    }

    #[tokio::test]
    async fn starttls_without_certificate_is_refused() {
        let (mut c, session, _, _) = start(|_| {}).await;
        c.send(b"a STARTTLS\r\n").await;
        c.expect("a BAD TLS support isn't enabled.").await;
        drop(c);
        assert!(session.await.unwrap().unwrap().is_none());
    }

    /// A CA and a certificate for "localhost" signed by it, made with openssl in a temporary
    /// directory: (server acceptor, client connector).
    fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
        use std::process::Command;
        use tokio_rustls::rustls;
        let dir = std::env::temp_dir().join(format!("director-imap-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "openssl {args:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-subj", "/CN=Test CA", "-days", "2"],
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-subj", "/CN=localhost"],
                &["-keyout", "leaf.key", "-out", "leaf.csr"],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ]);
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let certs = |name: &str| {
            rustls_pemfile::certs(&mut read(name).as_slice())
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        let key = rustls_pemfile::private_key(&mut read("leaf.key").as_slice())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs("leaf.pem"), key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certs("ca.pem").remove(0)).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let _ = std::fs::remove_dir_all(&dir);
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    #[tokio::test]
    async fn starttls_discards_injected_commands_and_enables_login() {
        let (acceptor, connector) = tls_pair();
        let (mut c, session, auth, greeting) = start(|ctx| {
            ctx.starttls = Some(acceptor);
            ctx.disable_plaintext_auth = true;
        })
        .await;
        let plain_caps =
            "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED";
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {plain_caps}] Director ready.")
        );
        // A man in the middle appends a command after STARTTLS, in the same packet.
        c.send(b"a STARTTLS\r\nx LOGIN mallory secret\r\n").await;
        c.expect("a OK Begin TLS negotiation now.").await;
        assert!(c.reader.buffer().is_empty());
        let tcp = c.reader.into_inner();
        let tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client {
            reader: BufReader::new(tls),
        };
        c.send(b"b CAPABILITY\r\n").await;
        c.expect(&format!("* CAPABILITY {CAPS}")).await;
        c.expect("b OK Pre-login capabilities listed, post-login capabilities have more.")
            .await;
        c.send(b"c STARTTLS\r\n").await;
        c.expect("c BAD TLS is already active.").await;
        c.send(b"d LOGIN alice secret\r\n").await;
        c.expect("d OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        assert!(est.client.is_tls());
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1, "the injected LOGIN ran");
        assert_eq!(decisions[0].credentials.username, "alice");
        assert!(decisions[0].secured);
    }

    #[test]
    fn secrets_stay_hidden() {
        assert!(!format!("{:?}", Secret::new("hunter2")).contains("hunter2"));
    }
}
