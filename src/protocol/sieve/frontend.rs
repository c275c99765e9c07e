//! The ManageSieve pre-authentication session, as Dovecot's managesieve-login runs it: the
//! capability greeting, CAPABILITY, NOOP, STARTTLS, LOGOUT and AUTHENTICATE "PLAIN" or "LOGIN"
//! (with or without an initial response). Once the client has given credentials it asks the
//! [`Authenticator`] for a logged-in backend and hands the session over as an [`Established`].
//!
//! The grammar lives in [`super::command`]; this file only holds behaviour. The whole dialogue
//! runs under [`PreauthLimits::timeout`], and the read buffer never holds more than
//! `max_line + max_literal` bytes.
//!
//! The capabilities offered before login are Dovecot's (Pigeonhole 0.5 on Debian 12), not the
//! backend's: the director has not picked a backend yet. They matter little: RFC 5804 §2.1
//! has clients forget them after login, and after `AUTHENTICATE` (no SASL security layer with
//! PLAIN) a client asks the backend itself with `CAPABILITY` if it needs them. Keeping the
//! real `SIEVE` list lets a client that judges a server by its greeting see what it will get.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::command::{quote, string_bytes, Command, CommandName, CommandParser, Parse, Token};
use crate::net::stream::ClientStream;
use crate::protocol::decision::{Credentials, Decision, Protocol};
use crate::protocol::preauth::{
    Authenticator, Established, FrontendContext, LoginFailure, PreauthLimits,
};
use crate::protocol::sasl;

/// The Sieve extensions announced before login: those of Dovecot's Pigeonhole on the
/// backends (see the module documentation).
const SIEVE_EXTENSIONS: &str = "fileinto reject envelope encoded-character vacation \
    subaddress comparator-i;ascii-numeric relational regex imap4flags copy include variables \
    body enotify environment mailbox date index ihave duplicate mime foreverypart extracttext";

/// How long a last `BYE` may take to write to a client that does not read.
const BYE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes read from the socket at most at once (on the stack).
const READ_CHUNK: usize = 2048;

/// Dovecot's answer to a command it cannot parse or does not know before login.
const COMMAND_ERROR: &str = "NO \"Error in MANAGESIEVE command received by server.\"";

const ENCRYPT_NEEDED: &str = "NO (ENCRYPT-NEEDED) \"Plaintext authentication disallowed on \
                              non-secure (SSL/TLS) connections.\"";

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
            session.bye(crate::net::admission::EVICTED_TEXT).await;
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
            // `+ 1`: room for the byte past a limit that shows it was crossed.
            buffer_cap: max_line + max_literal + 1,
            bad_commands: 0,
            auth_failures: 0,
            ctx,
        }
    }

    async fn dialogue<A: Authenticator>(&mut self, auth: &A) -> io::Result<Option<Established>> {
        let greeting = format!(
            "{}OK {}\r\n",
            self.capabilities(),
            quote(&self.ctx.greeting)
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

    /// Whether AUTHENTICATE (PLAIN, LOGIN: plaintext mechanisms) is allowed on this connection.
    fn plaintext_allowed(&self) -> bool {
        !self.ctx.disable_plaintext_auth || self.ctx.trusted || self.is_tls()
    }

    /// The capability lines (each ending in CRLF), without the final `OK`. Without plaintext
    /// authentication the SASL list is empty, as Dovecot sends it, until STARTTLS.
    fn capabilities(&self) -> String {
        let mut caps = String::from("\"IMPLEMENTATION\" \"Director\"\r\n");
        caps.push_str(&format!("\"SIEVE\" \"{SIEVE_EXTENSIONS}\"\r\n"));
        caps.push_str("\"NOTIFY\" \"mailto\"\r\n");
        if self.plaintext_allowed() {
            caps.push_str("\"SASL\" \"PLAIN LOGIN\"\r\n");
        } else {
            caps.push_str("\"SASL\" \"\"\r\n");
        }
        if self.ctx.starttls.is_some() && !self.is_tls() {
            caps.push_str("\"STARTTLS\"\r\n");
        }
        caps.push_str("\"VERSION\" \"1.0\"\r\n");
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

    async fn reply(&mut self, line: &str) -> io::Result<()> {
        self.send(format!("{line}\r\n").as_bytes()).await
    }

    /// Says goodbye before closing, without waiting long for a client that does not read.
    async fn bye(&mut self, text: &str) {
        let line = format!("BYE {}\r\n", quote(text));
        let _ = tokio::time::timeout(BYE_WRITE_TIMEOUT, self.send(line.as_bytes())).await;
    }

    /// Reads more bytes into the buffer. `false`: the client closed the connection.
    async fn fill(&mut self) -> io::Result<bool> {
        let room = self
            .buffer_cap
            .saturating_sub(self.buf.len())
            .min(READ_CHUNK);
        if room == 0 {
            // The parser stops before this; never buffer more anyway.
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
            match self.parser.command(&self.buf) {
                Parse::Incomplete => {
                    if !self.fill().await? {
                        return Ok(None);
                    }
                }
                Parse::Done { consumed, value } => {
                    self.buf.drain(..consumed);
                    return Ok(Some(value));
                }
                Parse::Error(error) => {
                    self.buf.drain(..error.consumed);
                    if error.fatal {
                        self.bye(error.message).await;
                        return Ok(None);
                    }
                    self.reply(COMMAND_ERROR).await?;
                    if !self.count_bad_command().await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Counts an invalid command. `false`: that was one too many, the client was told BYE.
    async fn count_bad_command(&mut self) -> bool {
        self.bad_commands += 1;
        if self.bad_commands >= self.ctx.limits.max_bad_commands {
            self.bye("Too many invalid MANAGESIEVE commands.").await;
            return false;
        }
        true
    }

    /// Answers a command whose arguments are wrong, and counts it.
    async fn invalid_arguments(&mut self, name: &CommandName) -> io::Result<Flow> {
        let text = format!("Error in MANAGESIEVE command {name}: Invalid arguments.");
        self.reply(&format!("NO {}", quote(&text))).await?;
        Ok(if self.count_bad_command().await {
            Flow::Continue
        } else {
            Flow::Close
        })
    }

    async fn execute<A: Authenticator>(&mut self, command: Command, auth: &A) -> io::Result<Flow> {
        match command.name {
            CommandName::Capability | CommandName::Logout | CommandName::Starttls
                if !command.args.is_empty() =>
            {
                self.invalid_arguments(&command.name).await
            }
            CommandName::Capability => {
                let text = format!("{}OK \"Capability completed.\"\r\n", self.capabilities());
                self.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Noop => match command.args.as_slice() {
                [] => {
                    self.reply("OK \"NOOP completed.\"").await?;
                    Ok(Flow::Continue)
                }
                // RFC 5804 §2.14: the tag comes back in a TAG response code.
                [Token::String(tag)] => {
                    let mut line = b"OK (TAG ".to_vec();
                    line.extend_from_slice(&string_bytes(tag));
                    line.extend_from_slice(b") \"Done\"\r\n");
                    self.send(&line).await?;
                    Ok(Flow::Continue)
                }
                _ => self.invalid_arguments(&command.name).await,
            },
            CommandName::Logout => {
                self.reply("OK \"Logout completed.\"").await?;
                Ok(Flow::Close)
            }
            CommandName::Starttls => self.starttls().await,
            CommandName::Authenticate => self.authenticate(&command, auth).await,
            CommandName::Other(_) => {
                self.reply(COMMAND_ERROR).await?;
                Ok(if self.count_bad_command().await {
                    Flow::Continue
                } else {
                    Flow::Close
                })
            }
        }
    }

    async fn starttls(&mut self) -> io::Result<Flow> {
        if self.is_tls() {
            self.reply("NO \"TLS is already active.\"").await?;
            return Ok(Flow::Continue);
        }
        let Some(acceptor) = self.ctx.starttls.clone() else {
            self.reply("NO \"TLS support isn't enabled.\"").await?;
            return Ok(Flow::Continue);
        };
        self.reply("OK \"Begin TLS negotiation now.\"").await?;
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
                // RFC 5804 §2.2: after the handshake the server sends its capabilities again.
                let text = format!(
                    "{}OK \"TLS negotiation successful.\"\r\n",
                    self.capabilities()
                );
                self.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            Err(error) => {
                tracing::debug!(session = %self.ctx.identity.session_id, %error, "STARTTLS handshake failed");
                Ok(Flow::Close)
            }
        }
    }

    /// `AUTHENTICATE "PLAIN" [initial-response]` or `AUTHENTICATE "LOGIN" [initial-response]`
    /// (RFC 5804 §2.1). Each challenge is a string of base64 (PLAIN: empty; LOGIN:
    /// `Username:`, then `Password:`; a LOGIN initial response is the username), answered
    /// with a string or a literal; `"*"` cancels.
    async fn authenticate<A: Authenticator>(
        &mut self,
        command: &Command,
        auth: &A,
    ) -> io::Result<Flow> {
        let (mechanism, initial) = match command.args.as_slice() {
            [mechanism] => (mechanism.as_string(), None),
            [mechanism, Token::String(initial)] => (mechanism.as_string(), Some(initial.clone())),
            _ => return self.invalid_arguments(&command.name).await,
        };
        let Some(mechanism) = mechanism else {
            return self.invalid_arguments(&command.name).await;
        };
        if !self.plaintext_allowed() {
            self.reply(ENCRYPT_NEEDED).await?;
            return Ok(Flow::Continue);
        }
        if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            let response = match initial {
                Some(initial) if initial == b"*" => return self.aborted().await,
                Some(initial) => initial,
                None => match self.challenge("").await? {
                    Ok(response) => response,
                    Err(flow) => return Ok(flow),
                },
            };
            let Ok(decoded) = sasl::decode_base64(&response) else {
                return self.invalid_base64().await;
            };
            match sasl::parse_plain(&decoded) {
                Ok(credentials) => self.login(credentials, auth).await,
                // Unusable (not UTF-8, empty user, malformed): answered like a failed login, so
                // a client cannot tell a malformed login from a wrong password.
                Err(_) => self.auth_failed("").await,
            }
        } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
            let user = match initial {
                Some(initial) if initial == b"*" => return self.aborted().await,
                Some(initial) if !initial.is_empty() => initial,
                _ => match self.challenge("VXNlcm5hbWU6").await? {
                    Ok(response) => response,
                    Err(flow) => return Ok(flow),
                },
            };
            let password = match self.challenge("UGFzc3dvcmQ6").await? {
                Ok(response) => response,
                Err(flow) => return Ok(flow),
            };
            let (Ok(user), Ok(password)) =
                (sasl::decode_base64(&user), sasl::decode_base64(&password))
            else {
                return self.invalid_base64().await;
            };
            match (String::from_utf8(user), String::from_utf8(password)) {
                (Ok(user), Ok(password)) if !user.is_empty() => {
                    self.login(Credentials::plain(user, password), auth).await
                }
                _ => self.auth_failed("").await,
            }
        } else {
            self.reply("NO \"Unsupported authentication mechanism.\"")
                .await?;
            Ok(Flow::Continue)
        }
    }

    /// Sends a SASL challenge (a string of base64) and reads the client's answer. `Err` holds
    /// what to do instead when there is no usable answer (cancelled, already answered, closed).
    async fn challenge(&mut self, challenge: &str) -> io::Result<Result<Vec<u8>, Flow>> {
        self.send(format!("\"{challenge}\"\r\n").as_bytes()).await?;
        match self.sasl_response().await? {
            Ok(response) if response == b"*" => Ok(Err(self.aborted().await?)),
            other => Ok(other),
        }
    }

    /// The client cancelled the authentication.
    async fn aborted(&mut self) -> io::Result<Flow> {
        self.reply("NO \"Authentication aborted by client.\"")
            .await?;
        Ok(Flow::Continue)
    }

    /// A SASL response that is not base64: counted as a bad command.
    async fn invalid_base64(&mut self) -> io::Result<Flow> {
        self.reply("NO \"Invalid base64 data in authentication response.\"")
            .await?;
        Ok(if self.count_bad_command().await {
            Flow::Continue
        } else {
            Flow::Close
        })
    }

    /// Reads the client's answer to the SASL challenge. `Err` holds what to do instead when
    /// there is no usable answer (already answered or told BYE).
    async fn sasl_response(&mut self) -> io::Result<Result<Vec<u8>, Flow>> {
        loop {
            match self.parser.sasl_response(&self.buf) {
                Parse::Incomplete => {
                    if !self.fill().await? {
                        return Ok(Err(Flow::Close));
                    }
                }
                Parse::Done { consumed, value } => {
                    self.buf.drain(..consumed);
                    return Ok(Ok(value));
                }
                Parse::Error(error) => {
                    self.buf.drain(..error.consumed);
                    if error.fatal {
                        self.bye(error.message).await;
                        return Ok(Err(Flow::Close));
                    }
                    // Not a string: the exchange is over.
                    self.reply("NO \"Invalid authentication response.\"")
                        .await?;
                    return Ok(Err(if self.count_bad_command().await {
                        Flow::Continue
                    } else {
                        Flow::Close
                    }));
                }
            }
        }
    }

    /// Logs in with the client's credentials through `auth` and answers the client.
    async fn login<A: Authenticator>(
        &mut self,
        credentials: Credentials,
        auth: &A,
    ) -> io::Result<Flow> {
        let decision = Decision {
            protocol: Protocol::Sieve,
            credentials,
            identity: self.ctx.identity.clone(),
            secured: self.is_tls(),
        };
        match auth.login(&decision).await {
            Ok(backend) => {
                let text = printable(&backend.success_text);
                let line = if text.is_empty() {
                    "OK\r\n".to_owned()
                } else {
                    format!("OK {text}\r\n")
                };
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
            Err(LoginFailure::AuthFailed { message }) => self.auth_failed(&message).await,
            Err(LoginFailure::Unavailable { message }) => {
                let message = match message.trim() {
                    "" => "Service temporarily unavailable.",
                    m => m,
                };
                self.reply(&format!("NO (TRYLATER) {}", quote(message)))
                    .await?;
                Ok(Flow::Continue)
            }
        }
    }

    /// Answers a failed login after the configured delay; closes after too many.
    async fn auth_failed(&mut self, message: &str) -> io::Result<Flow> {
        tokio::time::sleep(self.ctx.limits.auth_failure_delay).await;
        let message = match message.trim() {
            "" => "Authentication failed.",
            m => m,
        };
        self.reply(&format!("NO {}", quote(message))).await?;
        self.auth_failures += 1;
        if self.auth_failures >= self.ctx.limits.max_auth_failures {
            self.bye("Too many invalid authentication attempts.").await;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }
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

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_rustls::rustls;

    use super::*;
    use crate::net::stream::BackendStream;
    use crate::protocol::decision::ClientIdentity;
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

        /// (username, auth_username, password) of every decision.
        fn credentials(&self) -> Vec<(String, String, String)> {
            self.decisions()
                .into_iter()
                .map(|d| {
                    let c = d.credentials;
                    (c.username, c.auth_username, c.password.expose().to_owned())
                })
                .collect()
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
                            success_text: "\"Logged in.\"".into(),
                            leftover: Vec::new(),
                            session: self.sessions.register(
                                Protocol::Sieve,
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

    impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
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

        async fn expect_lines(&mut self, want: &[&str]) {
            for line in want {
                self.expect(line).await;
            }
        }

        async fn expect_closed(&mut self) {
            assert_eq!(self.line().await, None);
        }
    }

    type Session = JoinHandle<io::Result<Option<Established>>>;

    const IMPLEMENTATION: &str = "\"IMPLEMENTATION\" \"Director\"";
    const SIEVE: &str = "\"SIEVE\" \"fileinto reject envelope encoded-character vacation \
        subaddress comparator-i;ascii-numeric relational regex imap4flags copy include \
        variables body enotify environment mailbox date index ihave duplicate mime \
        foreverypart extracttext\"";
    const NOTIFY: &str = "\"NOTIFY\" \"mailto\"";
    const SASL_PLAIN: &str = "\"SASL\" \"PLAIN LOGIN\"";
    const VERSION: &str = "\"VERSION\" \"1.0\"";

    /// The capability lines of a plain connection that allows plaintext logins.
    const CAPS: [&str; 5] = [IMPLEMENTATION, SIEVE, NOTIFY, SASL_PLAIN, VERSION];

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

    /// Starts a session on a fresh connection, with `adjust` applied to the context. The
    /// greeting is left for the test to read.
    async fn start(adjust: impl FnOnce(&mut FrontendContext)) -> (Client, Session, Arc<FakeAuth>) {
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
        let client = Client {
            reader: BufReader::new(client),
        };
        (client, session, auth)
    }

    /// Like [`start`], and reads the usual greeting.
    async fn greeted() -> (Client, Session, Arc<FakeAuth>) {
        let (mut c, session, auth) = start(|_| {}).await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Director ready.\"").await;
        (c, session, auth)
    }

    async fn established(session: Session) -> Established {
        session
            .await
            .unwrap()
            .unwrap()
            .expect("session established")
    }

    async fn closed(session: Session) {
        assert!(session.await.unwrap().unwrap().is_none());
    }

    fn b64(raw: &[u8]) -> String {
        sasl::encode_base64(raw)
    }

    fn creds(user: &str, auth_user: &str, password: &str) -> (String, String, String) {
        (user.into(), auth_user.into(), password.into())
    }

    #[tokio::test]
    async fn capability_noop_and_logout() {
        let (mut c, session, auth) = greeted().await;
        c.send(b"capability\r\n").await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Capability completed.\"").await;
        c.send(b"NOOP\r\n").await;
        c.expect("OK \"NOOP completed.\"").await;
        c.send(b"NOOP \"STARTTLS-SYNC-42\"\r\n").await;
        c.expect("OK (TAG \"STARTTLS-SYNC-42\") \"Done\"").await;
        // A tag that cannot be quoted comes back as a literal.
        c.send(b"NOOP {3+}\r\na\r\n\r\n").await;
        c.expect_lines(&["OK (TAG {3}", "a", ") \"Done\""]).await;
        c.send(b"LOGOUT\r\n").await;
        c.expect("OK \"Logout completed.\"").await;
        c.expect_closed().await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn authenticate_with_initial_response_and_pipelined_bytes() {
        let (mut c, session, auth) = greeted().await;
        let line = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\nLISTSCRIPTS\r\n",
            b64(b"\0alice\0secret")
        );
        c.send(line.as_bytes()).await;
        c.expect("OK \"Logged in.\"").await;
        let est = established(session).await;
        assert_eq!(est.username, "alice");
        assert_eq!(est.client_leftover, b"LISTSCRIPTS\r\n");
        let decisions = auth.decisions();
        assert_eq!(decisions[0].protocol, Protocol::Sieve);
        assert!(!decisions[0].secured);
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_with_literals_of_both_forms() {
        let (mut c, session, auth) = greeted().await;
        let response = b64(b"bob\0master\0pw");
        // `{n}` as Dovecot takes it: no continuation, the bytes follow at once.
        let line = format!(
            "Authenticate {{5}}\r\nPLAIN {{{}+}}\r\n{response}\r\n",
            response.len()
        );
        c.send(line.as_bytes()).await;
        c.expect("OK \"Logged in.\"").await;
        assert_eq!(established(session).await.username, "bob");
        assert_eq!(auth.credentials(), vec![creds("bob", "master", "pw")]);
    }

    #[tokio::test]
    async fn authenticate_login_with_challenges() {
        let (mut c, session, auth) = greeted().await;
        c.send(b"AUTHENTICATE \"LOGIN\"\r\n").await;
        c.expect("\"VXNlcm5hbWU6\"").await;
        c.send(format!("\"{}\"\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("\"UGFzc3dvcmQ6\"").await;
        c.send(b"\"*\"\r\n").await;
        c.expect("NO \"Authentication aborted by client.\"").await;
        c.send(b"authenticate \"login\"\r\n").await;
        c.expect("\"VXNlcm5hbWU6\"").await;
        c.send(format!("\"{}\"\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("\"UGFzc3dvcmQ6\"").await;
        c.send(b"\"!!!\"\r\n").await;
        c.expect("NO \"Invalid base64 data in authentication response.\"")
            .await;
        // Answers as literals of both forms.
        c.send(b"AUTHENTICATE \"LOGIN\"\r\n").await;
        c.expect("\"VXNlcm5hbWU6\"").await;
        let (user, password) = (b64(b"alice"), b64(b"se cret"));
        c.send(format!("{{{}+}}\r\n{user}\r\n", user.len()).as_bytes())
            .await;
        c.expect("\"UGFzc3dvcmQ6\"").await;
        c.send(format!("{{{}}}\r\n{password}\r\n", password.len()).as_bytes())
            .await;
        c.expect("OK \"Logged in.\"").await;
        established(session).await;
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "se cret")]);
    }

    #[tokio::test]
    async fn authenticate_login_with_initial_response() {
        let (mut c, session, auth) = greeted().await;
        c.send(format!("AUTHENTICATE \"LOGIN\" \"{}\"\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("\"UGFzc3dvcmQ6\"").await;
        c.send(format!("\"{}\"\r\n", b64(b"wrong")).as_bytes())
            .await;
        c.expect("NO \"Authentication failed.\"").await;
        c.send(format!("AUTHENTICATE \"LOGIN\" \"{}\"\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("\"UGFzc3dvcmQ6\"").await;
        c.send(format!("\"{}\"\r\nLISTSCRIPTS\r\n", b64(b"secret")).as_bytes())
            .await;
        c.expect("OK \"Logged in.\"").await;
        let est = established(session).await;
        assert_eq!(est.client_leftover, b"LISTSCRIPTS\r\n");
        assert_eq!(
            auth.credentials(),
            vec![
                creds("alice", "alice", "wrong"),
                creds("alice", "alice", "secret")
            ]
        );
    }

    #[tokio::test]
    async fn authenticate_with_a_challenge() {
        let (mut c, session, auth) = greeted().await;
        c.send(b"AUTHENTICATE \"PLAIN\"\r\n").await;
        c.expect("\"\"").await;
        c.send(b"\"*\"\r\n").await;
        c.expect("NO \"Authentication aborted by client.\"").await;
        c.send(b"AUTHENTICATE \"PLAIN\"\r\n").await;
        c.expect("\"\"").await;
        c.send(b"bare-base64\r\n").await;
        c.expect("NO \"Invalid authentication response.\"").await;
        c.send(b"AUTHENTICATE \"PLAIN\"\r\n").await;
        c.expect("\"\"").await;
        let response = b64(b"\0alice\0secret");
        c.send(format!("{{{}+}}\r\n{response}\r\n", response.len()).as_bytes())
            .await;
        c.expect("OK \"Logged in.\"").await;
        established(session).await;
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn bad_authentications() {
        let (mut c, session, auth) = greeted().await;
        c.send(b"AUTHENTICATE \"CRAM-MD5\"\r\n").await;
        c.expect("NO \"Unsupported authentication mechanism.\"")
            .await;
        c.send(b"AUTHENTICATE \"PLAIN\" \"!!!\"\r\n").await;
        c.expect("NO \"Invalid base64 data in authentication response.\"")
            .await;
        // A malformed PLAIN response is a failed login, and no login is tried.
        c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("NO \"Authentication failed.\"").await;
        c.send(b"AUTHENTICATE\r\n").await;
        c.expect("NO \"Error in MANAGESIEVE command AUTHENTICATE: Invalid arguments.\"")
            .await;
        c.send(b"LOGOUT\r\n").await;
        c.expect("OK \"Logout completed.\"").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn plaintext_disabled_on_untrusted_plain_connections() {
        let (mut c, session, auth) = start(|ctx| ctx.disable_plaintext_auth = true).await;
        c.expect_lines(&[IMPLEMENTATION, SIEVE, NOTIFY, "\"SASL\" \"\"", VERSION])
            .await;
        c.expect("OK \"Director ready.\"").await;
        c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect(ENCRYPT_NEEDED).await;
        c.send(b"LOGOUT\r\n").await;
        c.expect("OK \"Logout completed.\"").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());

        let (mut c, session, _) = start(|ctx| {
            ctx.disable_plaintext_auth = true;
            ctx.trusted = true;
        })
        .await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Director ready.\"").await;
        c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect("OK \"Logged in.\"").await;
        established(session).await;
    }

    #[tokio::test]
    async fn failed_and_unavailable_logins_then_success() {
        let (mut c, session, auth) = greeted().await;
        for (password, reply) in [
            ("wrong", "NO \"Authentication failed.\""),
            ("unavail", "NO (TRYLATER) \"No backend available.\""),
            ("wrong", "NO \"Authentication failed.\""),
            ("secret", "OK \"Logged in.\""),
        ] {
            let response = b64(format!("\0alice\0{password}").as_bytes());
            c.send(format!("AUTHENTICATE \"PLAIN\" \"{response}\"\r\n").as_bytes())
                .await;
            c.expect(reply).await;
        }
        established(session).await;
        assert_eq!(auth.decisions().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_the_connection_after_a_delay() {
        let (mut c, session, _) = start(|ctx| {
            ctx.limits.auth_failure_delay = Duration::from_secs(2);
        })
        .await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Director ready.\"").await;
        let started = tokio::time::Instant::now();
        let response = b64(b"\0alice\0wrong");
        for _ in 0..3 {
            c.send(format!("AUTHENTICATE \"PLAIN\" \"{response}\"\r\n").as_bytes())
                .await;
            c.expect("NO \"Authentication failed.\"").await;
        }
        assert!(started.elapsed() >= Duration::from_secs(6));
        c.expect("BYE \"Too many invalid authentication attempts.\"")
            .await;
        c.expect_closed().await;
        closed(session).await;
    }

    #[tokio::test]
    async fn unknown_and_invalid_commands() {
        let (mut c, session, _) = start(|ctx| ctx.limits.max_bad_commands = 4).await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Director ready.\"").await;
        c.send(b"LISTSCRIPTS\r\n").await;
        c.expect(COMMAND_ERROR).await;
        c.send(b"NOOP \"open\r\n").await;
        c.expect(COMMAND_ERROR).await;
        c.send(b"CAPABILITY \"x\"\r\n").await;
        c.expect("NO \"Error in MANAGESIEVE command CAPABILITY: Invalid arguments.\"")
            .await;
        c.send(b"\"x\"\r\n").await;
        c.expect(COMMAND_ERROR).await;
        c.expect("BYE \"Too many invalid MANAGESIEVE commands.\"")
            .await;
        c.expect_closed().await;
        closed(session).await;
    }

    #[tokio::test]
    async fn oversized_input_is_refused() {
        let (mut c, session, _) = greeted().await;
        c.send(b"AUTHENTICATE \"PLAIN\" {1000+}\r\n").await;
        c.expect("BYE \"Literal too large.\"").await;
        c.expect_closed().await;
        closed(session).await;

        let (mut c, session, _) = greeted().await;
        c.send(b"AUTHENTICATE \"PLAIN\"\r\n").await;
        c.expect("\"\"").await;
        c.send(&[b'A'; 300]).await;
        c.expect("BYE \"Too long command line.\"").await;
        c.expect_closed().await;
        closed(session).await;
    }

    #[tokio::test(start_paused = true)]
    async fn preauth_timeout() {
        let (mut c, session, _) = greeted().await;
        let started = tokio::time::Instant::now();
        c.send(b"NOOP\r\n").await;
        c.expect("OK \"NOOP completed.\"").await;
        c.expect("BYE \"Disconnected for inactivity.\"").await;
        c.expect_closed().await;
        assert!(started.elapsed() >= Duration::from_secs(59));
        closed(session).await;
    }

    #[tokio::test]
    async fn starttls_without_certificate_is_refused() {
        let (mut c, session, _) = greeted().await;
        c.send(b"STARTTLS\r\n").await;
        c.expect("NO \"TLS support isn't enabled.\"").await;
        drop(c);
        closed(session).await;
    }

    /// A P-256 key made for these tests (`openssl genpkey -algorithm EC`), base64 PKCS#8.
    const TEST_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzXfATwBL5DEnJj1i\
                            tM9QtoAd0J4xMKtYpvg1oR0clfOhRANCAASdx+NasDsci0SI/Hga81zpgCue9370\
                            791OIv/w+p9snJHOsMkXxJp+dhWFqf5QiHgJddLVvrPHNTbslUsTmtm7";

    /// A TLS acceptor that signs with [`TEST_KEY`] behind a placeholder certificate, which only
    /// [`trusting_connector`] accepts.
    fn acceptor() -> tokio_rustls::TlsAcceptor {
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

    #[tokio::test]
    async fn starttls_discards_injected_commands_and_resends_capabilities() {
        let (mut c, session, auth) = start(|ctx| {
            ctx.starttls = Some(acceptor());
            ctx.disable_plaintext_auth = true;
        })
        .await;
        c.expect_lines(&[
            IMPLEMENTATION,
            SIEVE,
            NOTIFY,
            "\"SASL\" \"\"",
            "\"STARTTLS\"",
            VERSION,
        ])
        .await;
        c.expect("OK \"Director ready.\"").await;
        // A man in the middle appends a command after STARTTLS, in the same packet.
        let injected = format!(
            "STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            b64(b"\0mallory\0secret")
        );
        c.send(injected.as_bytes()).await;
        c.expect("OK \"Begin TLS negotiation now.\"").await;
        assert!(c.reader.buffer().is_empty());
        let tcp = c.reader.into_inner();
        let name = rustls::pki_types::ServerName::try_from("director.example").unwrap();
        let tls = trusting_connector().connect(name, tcp).await.unwrap();
        let mut c = Client {
            reader: BufReader::new(tls),
        };
        // RFC 5804 §2.2: the capabilities again, now with SASL and without STARTTLS.
        c.expect_lines(&CAPS).await;
        c.expect("OK \"TLS negotiation successful.\"").await;
        c.send(b"STARTTLS\r\n").await;
        c.expect("NO \"TLS is already active.\"").await;
        c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect("OK \"Logged in.\"").await;
        let est = established(session).await;
        assert!(est.client.is_tls());
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1, "the injected AUTHENTICATE ran");
        assert_eq!(decisions[0].credentials.username, "alice");
        assert!(decisions[0].secured);
    }
}
