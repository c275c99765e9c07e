//! The pre-authentication core every protocol front end runs on: it owns the client's
//! connection, the read buffer, the limits (timeout, line and literal sizes, invalid commands,
//! failed logins and their delay), STARTTLS with the discard of bytes sent before TLS, the
//! goodbye on timeout, shutdown and eviction, the SASL exchange (PLAIN, LOGIN) and the one
//! call to the [`Authenticator`]. A protocol (`imap::frontend`, `pop3::frontend`,
//! `sieve::frontend`) supplies only its grammar and its replies, as a `Dialect`; it never
//! sees the ring or a backend address.
//!
//! `run` drives one dialogue: the `Session` holds the state and reads the client's bytes,
//! the dialect parses them and runs each command through the session's steps. Nothing here allocates per line beyond the
//! replies themselves, and the whole session is dropped when it hands an [`Established`] over
//! to the relay.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::flagged_wait::FlaggedWait;
use crate::net::stream::{BackendStream, ClientStream};
use crate::protocol::decision::{ClientIdentity, Credentials, Decision, Protocol, Verified};
use crate::protocol::sasl::{self, SaslError};
use crate::state::sessions::SessionGuard;

/// Limits that protect the director from clients before they have logged in.
#[derive(Debug, Clone)]
pub struct PreauthLimits {
    /// The whole pre-authentication dialogue must end within this time.
    pub timeout: Duration,
    /// Longest command line accepted before login (bytes, CRLF included).
    pub max_line: usize,
    /// Largest literal (IMAP `{n}`) or SASL response accepted before login.
    pub max_literal: usize,
    /// Failed logins on one connection: the one that reaches this count is answered, then
    /// the connection is closed.
    pub max_auth_failures: u32,
    /// Pause before answering a failed login, to slow down password guessing.
    pub auth_failure_delay: Duration,
    /// Invalid commands on one connection: the one that reaches this count closes it.
    pub max_bad_commands: u32,
}

impl Default for PreauthLimits {
    fn default() -> Self {
        PreauthLimits {
            timeout: Duration::from_secs(60),
            max_line: 8192,
            max_literal: 8192,
            max_auth_failures: 3,
            auth_failure_delay: Duration::from_secs(2),
            max_bad_commands: 10,
        }
    }
}

/// Everything a front end needs to know about the connection it serves.
pub struct FrontendContext {
    /// For STARTTLS/STLS; `None` means the listener offers no STARTTLS (no certificate, or the
    /// connection is already TLS).
    pub starttls: Option<TlsAcceptor>,
    /// Refuse plaintext authentication (IMAP `LOGINDISABLED`, POP3 `-ERR`) unless the
    /// connection is TLS or `trusted` (Dovecot's `disable_plaintext_auth`).
    pub disable_plaintext_auth: bool,
    /// The client is in a trusted network (Dovecot's `login_trusted_networks`).
    pub trusted: bool,
    pub limits: PreauthLimits,
    pub identity: ClientIdentity,
    /// Greeting text after `* OK` / `+OK`, e.g. "Director ready.".
    pub greeting: String,
    /// The director's stop: when it starts, the client gets the protocol's goodbye
    /// (`* BYE Server shutting down.`) and the dialogue ends.
    pub shutdown: crate::net::shutdown::Shutdown,
    /// Fires when the listener is full and this connection, the oldest not logged in, must
    /// make room: the front end says BYE ([`crate::net::admission::EVICTED_TEXT`]) and closes.
    pub eviction: crate::net::admission::Eviction,
}

/// A backend connection that has logged in, ready for the relay.
pub struct BackendLink {
    pub stream: BackendStream,
    /// The backend's success text, for the front end to pass on: IMAP, what followed
    /// `<tag> OK ` (e.g. `[CAPABILITY IMAP4rev1 ...] Logged in`); POP3, what followed `+OK `.
    pub success_text: String,
    /// Bytes the backend sent after its success line, already read: relayed to the client
    /// right after the success reply.
    pub leftover: Vec<u8>,
    /// The registered live session; dropping it ends the session.
    pub session: SessionGuard,
}

/// Why a login did not produce a backend connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginFailure {
    /// The backend refused the credentials; the client may try again. `message` is the
    /// backend's human-readable text (no tag, no status code), for the client.
    AuthFailed { message: String },
    /// No backend could take the session (none usable, unreachable, timed out, or it answered
    /// with a temporary error). Not the client's fault: IMAP `[UNAVAILABLE]`,
    /// POP3 `-ERR [SYS/TEMP]`.
    Unavailable { message: String },
    /// The user is served elsewhere: the auth service said `nologin` with a `host`. IMAP
    /// answers with a `REFERRAL` (RFC 2221) to `host`; the others refuse with `message`.
    Referral {
        user: String,
        host: String,
        message: String,
    },
}

/// Turns a front end's decision into a logged-in backend connection, and, where an auth
/// service checks credentials at the director, runs the SASL exchange with it. Implemented by
/// [`crate::login::Login`]; tests may implement it to drive a front end alone.
pub trait Authenticator: Send + Sync {
    /// A SASL exchange under way at the auth service, between two steps. Dropping it gives
    /// the exchange up.
    type Exchange: Send;

    /// The mechanisms the auth service offers (not the private ones), asked once a
    /// connection, before the greeting. `None`: no auth service, the director checks no
    /// password and offers PLAIN and LOGIN, whose credentials go to the backend.
    fn mechanisms(&self) -> impl Future<Output = Option<Mechanisms>> + Send;

    /// Starts an authentication at the auth service with `mechanism` (as the service spells
    /// it) and the client's decoded initial response, if any.
    fn sasl_start(
        &self,
        mechanism: &str,
        initial: Option<&[u8]>,
        client: &SaslClient<'_>,
    ) -> impl Future<Output = SaslStep<Self::Exchange>> + Send;

    /// Sends the client's decoded answer to the last challenge.
    fn sasl_next(
        &self,
        exchange: Self::Exchange,
        response: &[u8],
    ) -> impl Future<Output = SaslStep<Self::Exchange>> + Send;

    fn login(
        &self,
        decision: &Decision,
    ) -> impl Future<Output = Result<BackendLink, LoginFailure>> + Send;
}

/// The mechanisms an auth service offers, shared by every connection that offers them.
pub type Mechanisms = std::sync::Arc<[SaslMechanism]>;

/// A SASL mechanism an auth service offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslMechanism {
    /// As the service spells it (`PLAIN`, `SCRAM-SHA-256`).
    pub name: String,
    /// It sends the password in clear (PLAIN, LOGIN): offered only where plaintext logins are.
    pub plaintext: bool,
}

/// Who is authenticating, for the auth service's request (its log, its penalty, passdbs that
/// look at addresses).
#[derive(Debug, Clone, Copy)]
pub struct SaslClient<'a> {
    pub protocol: Protocol,
    pub identity: &'a ClientIdentity,
    /// The client's connection is TLS.
    pub tls: bool,
    /// The client is in a trusted network.
    pub trusted: bool,
}

/// The auth service's answer to one step of a SASL exchange.
pub enum SaslStep<X> {
    /// Relay this challenge (decoded) to the client, then its answer with the exchange.
    Challenge(Vec<u8>, X),
    /// The client passed: log in to the backend with `credentials`, as `verified` says.
    Verified {
        credentials: Credentials,
        verified: Verified,
    },
    /// The client did not pass, or the service could not tell (temporary).
    Failed(LoginFailure),
    /// The service does not offer this mechanism.
    Unsupported,
}

/// A session handed from a front end to the relay.
pub struct Established {
    pub client: ClientStream,
    /// Bytes the client sent after its login command (pipelined), to forward to the backend
    /// before anything else.
    pub client_leftover: Vec<u8>,
    pub backend: BackendLink,
    pub username: String,
    /// Who the client is at the end of the login, for the session's log line: what the
    /// listener knew, or what a trusted client said in IMAP `ID` (its user's address).
    pub identity: ClientIdentity,
}

/// How long a last goodbye may take to write to a client that does not read.
const BYE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The SASL challenges of LOGIN, base64: "Username:" and "Password:".
const USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
const PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// A protocol's grammar and replies before login. The [`Session`] calls it to read and run
/// commands and to word the replies of the steps it owns; the dialect's own state (its parser,
/// a `USER` name) lives in [`Session::dialect`].
pub(crate) trait Dialect: Sized + Send {
    /// The protocol the logins are for.
    const PROTOCOL: Protocol;
    /// The debug message when the pre-auth timeout ends a dialogue.
    const TIMEOUT_LOG: &'static str = "pre-auth timeout";
    /// What comes before the eviction text in its goodbye (a response code and a space).
    const EVICTED_CODE: &'static str = "";
    /// The goodbye text after the last invalid command allowed.
    const TOO_MANY_COMMANDS: &'static str;
    /// Whether a limit (invalid commands, failed logins) ends the dialogue with a goodbye of
    /// its own after the reply (IMAP's and ManageSieve's `BYE`). POP3 has none: there the
    /// reply is the last word, and the last invalid command is answered with the goodbye text.
    const BYE_ON_LIMITS: bool = true;

    /// What [`Dialect::parse`] finds at the front of the buffer.
    type Parse: Parsed;
    /// Where a read from the socket lands (`[u8; N]`: at most `N` bytes a read), on the
    /// stack of the dialogue's future.
    type ReadChunk: ReadChunk;

    /// The dialect's state at the start of a dialogue.
    fn new(limits: &PreauthLimits) -> Self;
    /// The most bytes the read buffer may hold: what the parser needs for one command (or
    /// SASL response), plus one byte that shows a limit was crossed.
    fn buffer_cap(limits: &PreauthLimits) -> usize;
    /// The greeting, CRLF included.
    fn greeting(s: &Session<Self>) -> String;
    /// The goodbye line saying `text`, CRLF included.
    fn bye(text: &str) -> String;
    /// A reply of the core's steps, CRLF included.
    fn reply(s: &Session<Self>, reply: Reply<'_>) -> String;
    /// A SASL challenge line (`challenge` is base64), CRLF included.
    fn challenge(challenge: &str) -> String {
        format!("+ {challenge}\r\n")
    }

    /// The grammar: looks for a command at the front of `buf`.
    fn parse(&mut self, buf: &[u8]) -> Self::Parse;
    /// Runs what [`Dialect::parse`] found (a command, or a syntax error to answer).
    fn execute<A: Authenticator>(
        s: &mut Session<Self>,
        parsed: <Self::Parse as Parsed>::Found,
        auth: &A,
    ) -> impl Future<Output = io::Result<Flow>> + Send;
    /// Reads the client's answer to a SASL challenge.
    fn sasl_response(s: &mut Session<Self>) -> impl Future<Output = io::Result<Answer>> + Send;
    /// STARTTLS begins: forget what was parsed of the plaintext bytes (they were thrown away)
    /// and anything else the client said in the clear.
    fn tls_started(&mut self);

    /// What an initial response (sent with the mechanism) stands for; `None`: there is none,
    /// send the first challenge.
    fn initial_response(_mechanism: &str, response: Vec<u8>) -> Option<Answer> {
        Some(Answer::Response(response))
    }
    /// The credentials in the client's SASL responses.
    fn credentials(responses: Responses) -> ClientCredentials {
        responses.decode()
    }
    /// Told the outcome of every login, for a dialect that logs it.
    fn logged(_s: &Session<Self>, _user: &str, _outcome: Result<(), &LoginFailure>) {}
}

/// A read buffer of a fixed size, for [`Dialect::ReadChunk`].
pub(crate) trait ReadChunk: Send {
    fn zeroed() -> Self;
    fn bytes(&mut self) -> &mut [u8];
}

impl<const N: usize> ReadChunk for [u8; N] {
    fn zeroed() -> Self {
        [0; N]
    }

    fn bytes(&mut self) -> &mut [u8] {
        self
    }
}

/// The replies of the steps the core runs; each dialect words them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reply<'a> {
    /// STARTTLS on a connection that is already TLS.
    TlsActive,
    /// STARTTLS where the listener offers none.
    TlsDisabled,
    /// STARTTLS accepted: the handshake follows.
    TlsBegin,
    /// A plaintext login on a connection that must be TLS first.
    PlaintextDisallowed,
    UnsupportedMechanism,
    /// The client cancelled a SASL exchange.
    Aborted,
    /// A SASL response that is not base64 (counted as an invalid command).
    NotBase64,
    /// The backend's success text.
    LoggedIn(&'a str),
    /// The backend's refusal text (maybe empty).
    LoginFailed(&'a str),
    /// Why no backend could take the session (maybe empty).
    Unavailable(&'a str),
    /// The user is served at `host` (maybe empty `message`).
    Referral {
        user: &'a str,
        host: &'a str,
        message: &'a str,
    },
}

/// What to do after a command.
pub(crate) enum Flow {
    Continue,
    /// Close the connection (everything the client should read has been written).
    Close,
    /// Logged in: hand the session over.
    Established(Box<Established>),
}

/// The client's answer to a SASL challenge.
pub(crate) enum Answer {
    Response(Vec<u8>),
    /// The client cancelled (`*`).
    Cancel,
    /// No answer to use (the client left, or sent something the dialect already answered):
    /// the exchange ends with this flow.
    Stop(Flow),
}

/// The SASL mechanisms offered before login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism of that name (any case), if offered.
    pub(crate) fn named(name: &[u8]) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    /// The first challenge, when the client sent no initial response.
    fn first_challenge(self) -> &'static str {
        match self {
            Mechanism::Plain => "",
            Mechanism::Login => USERNAME_CHALLENGE,
        }
    }
}

/// The client's responses of one SASL exchange, base64 as sent.
pub(crate) enum Responses {
    Plain(Vec<u8>),
    Login { user: Vec<u8>, password: Vec<u8> },
}

impl Responses {
    /// Both LOGIN responses must be base64 before either is read as text.
    pub(crate) fn decode(self) -> ClientCredentials {
        match self {
            Responses::Plain(response) => sasl::decode_base64(&response)
                .and_then(|decoded| sasl::parse_plain(&decoded))
                .into(),
            Responses::Login { user, password } => {
                let (Ok(user), Ok(password)) =
                    (sasl::decode_base64(&user), sasl::decode_base64(&password))
                else {
                    return ClientCredentials::NotBase64;
                };
                match (String::from_utf8(user), String::from_utf8(password)) {
                    (Ok(user), Ok(password)) if !user.is_empty() => {
                        ClientCredentials::Valid(Credentials::plain(user, password))
                    }
                    _ => ClientCredentials::Invalid,
                }
            }
        }
    }
}

/// Credentials from a client, or why they cannot be used.
pub(crate) enum ClientCredentials {
    Valid(Credentials),
    /// Unusable (not UTF-8, empty user, malformed PLAIN): answered like a failed login, so a
    /// client cannot tell a malformed login from a wrong password.
    Invalid,
    /// A SASL response was not base64: answered as an invalid command.
    NotBase64,
}

impl From<Result<Credentials, SaslError>> for ClientCredentials {
    fn from(decoded: Result<Credentials, SaslError>) -> Self {
        match decoded {
            Ok(credentials) => ClientCredentials::Valid(credentials),
            Err(SaslError::Base64) => ClientCredentials::NotBase64,
            Err(_) => ClientCredentials::Invalid,
        }
    }
}

/// How a STARTTLS ended.
pub(crate) enum Tls {
    /// Refused (TLS already on, or not offered) and answered.
    Refused,
    /// The connection is TLS now.
    Secured,
    /// The handshake failed; the connection is gone.
    Failed(io::Error),
}

/// What a parser found at the front of the read buffer, as [`Session::parse`] needs to know it.
pub(crate) trait Parsed {
    type Found;
    /// `None`: more bytes are needed. Else how many bytes at the front of the buffer the
    /// result stands for (dropped before it is handed over), and the result.
    fn found(self) -> Option<(usize, Self::Found)>;
}

/// A value and the bytes it took; `None` while more bytes are needed.
impl<T> Parsed for Option<(usize, T)> {
    type Found = T;

    fn found(self) -> Option<(usize, T)> {
        self
    }
}

/// Runs the pre-authentication dialogue of dialect `D` with `client`. Returns the established
/// session once the client has logged in, or `None` when the client left, was disconnected
/// (timeout, shutdown, eviction, too many errors or failed logins) or the TLS handshake failed.
pub(crate) async fn run<D: Dialect, A: Authenticator>(
    client: ClientStream,
    ctx: FrontendContext,
    auth: &A,
) -> io::Result<Option<Established>> {
    let timeout = ctx.limits.timeout;
    let shutdown = ctx.shutdown.clone();
    let eviction = ctx.eviction.clone();
    let mut session = Session::<D>::new(client, ctx);
    // Polled at each of the connection's wake-ups (a login is some ten): checked by their
    // flags between, not re-registered (crate::flagged_wait).
    let (draining, evicted) = (pin!(shutdown.draining()), pin!(eviction.evicted()));
    let draining = FlaggedWait::new(|| shutdown.is_stopping(), draining);
    let evicted = FlaggedWait::new(|| eviction.is_evicted(), evicted);
    tokio::select! {
        r = tokio::time::timeout(timeout, session.dialogue(auth)) => match r {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(session = %session.ctx.identity.session_id, "{}", D::TIMEOUT_LOG);
                session.bye("Disconnected for inactivity.").await;
                Ok(None)
            }
        },
        _ = draining => {
            session.bye("Server shutting down.").await;
            Ok(None)
        }
        _ = evicted => {
            let text = format!("{}{}", D::EVICTED_CODE, crate::net::admission::EVICTED_TEXT);
            session.bye(&text).await;
            Ok(None)
        }
    }
}

/// The state of one pre-authentication dialogue.
pub(crate) struct Session<D> {
    /// `None` only while STARTTLS swaps the stream, or once it was handed over.
    client: Option<ClientStream>,
    pub(crate) ctx: FrontendContext,
    /// Bytes read from the client and not yet consumed; at most `buffer_cap` bytes. After a
    /// login they are the client's pipelined commands.
    pub(crate) buf: Vec<u8>,
    buffer_cap: usize,
    /// Invalid commands so far, against `max_bad_commands`.
    bad_commands: u32,
    /// Failed logins so far, against `max_auth_failures`.
    auth_failures: u32,
    /// The auth service's mechanisms; `None`: no auth service (see
    /// [`Authenticator::mechanisms`]).
    offered: Option<Mechanisms>,
    pub(crate) dialect: D,
}

fn handed_over() -> io::Error {
    io::Error::other("client connection already handed over")
}

impl<D: Dialect> Session<D> {
    fn new(client: ClientStream, ctx: FrontendContext) -> Self {
        Session {
            client: Some(client),
            buf: Vec::new(),
            buffer_cap: D::buffer_cap(&ctx.limits),
            bad_commands: 0,
            auth_failures: 0,
            offered: None,
            dialect: D::new(&ctx.limits),
            ctx,
        }
    }

    async fn dialogue<A: Authenticator>(&mut self, auth: &A) -> io::Result<Option<Established>> {
        self.offered = auth.mechanisms().await;
        let greeting = D::greeting(self);
        self.send(greeting.as_bytes()).await?;
        loop {
            let Some(parsed) = self.parse(D::parse).await? else {
                return Ok(None);
            };
            match D::execute(self, parsed, auth).await? {
                Flow::Continue => {}
                Flow::Close => return Ok(None),
                Flow::Established(established) => return Ok(Some(*established)),
            }
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.client.as_ref().is_some_and(ClientStream::is_tls)
    }

    /// Whether plaintext logins (LOGIN, USER/PASS, SASL PLAIN and LOGIN) are allowed on this
    /// connection (Dovecot's `disable_plaintext_auth`, `login_trusted_networks`).
    pub(crate) fn plaintext_allowed(&self) -> bool {
        !self.ctx.disable_plaintext_auth || self.ctx.trusted || self.is_tls()
    }

    /// The SASL mechanisms to advertise now (IMAP `AUTH=`, POP3 `SASL`, ManageSieve
    /// `"SASL"`): PLAIN and LOGIN where plaintext logins are allowed, or, with an auth
    /// service, what it offers, its plaintext ones only where plaintext logins are allowed (as
    /// Dovecot's login processes decide).
    pub(crate) fn advertised_mechanisms(&self) -> impl Iterator<Item = &str> {
        let plaintext = self.plaintext_allowed();
        let local: &[&str] = match self.offered {
            None if plaintext => &["PLAIN", "LOGIN"],
            _ => &[],
        };
        let offered = self.offered.as_deref().unwrap_or_default();
        local.iter().copied().chain(
            offered
                .iter()
                .filter(move |m| plaintext || !m.plaintext)
                .map(|m| m.name.as_str()),
        )
    }

    /// [`Session::advertised_mechanisms`] separated by spaces (POP3 `SASL`, ManageSieve).
    pub(crate) fn advertised_mechanism_list(&self) -> String {
        let mut list = String::new();
        for mechanism in self.advertised_mechanisms() {
            if !list.is_empty() {
                list.push(' ');
            }
            list.push_str(mechanism);
        }
        list
    }

    /// Whether STARTTLS is offered to this client now.
    pub(crate) fn offers_starttls(&self) -> bool {
        self.ctx.starttls.is_some() && !self.is_tls()
    }

    pub(crate) async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let client = self.client.as_mut().ok_or_else(handed_over)?;
        client.write_all(data).await?;
        client.flush().await
    }

    /// Sends one of the core's replies.
    pub(crate) async fn answer(&mut self, reply: Reply<'_>) -> io::Result<()> {
        let line = D::reply(self, reply);
        self.send(line.as_bytes()).await
    }

    /// Says goodbye before closing, without waiting long for a client that does not read.
    pub(crate) async fn bye(&mut self, text: &str) {
        let line = D::bye(text);
        let _ = tokio::time::timeout(BYE_WRITE_TIMEOUT, self.send(line.as_bytes())).await;
    }

    /// Reads more bytes into the buffer. `false`: the client closed the connection.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = D::ReadChunk::zeroed();
        let chunk = chunk.bytes();
        let room = self
            .buffer_cap
            .saturating_sub(self.buf.len())
            .min(chunk.len());
        if room == 0 {
            // The parsers stop before this; never buffer more anyway.
            return Err(io::Error::other("pre-auth read buffer full"));
        }
        let client = self.client.as_mut().ok_or_else(handed_over)?;
        let n = client.read(&mut chunk[..room]).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Runs `parse` over the dialect and the buffer, reading more bytes while it finds too
    /// little, and drops the bytes of what it found. `None`: the client closed the connection
    /// first.
    pub(crate) async fn parse<P: Parsed>(
        &mut self,
        mut parse: impl FnMut(&mut D, &[u8]) -> P + Send,
    ) -> io::Result<Option<P::Found>> {
        loop {
            if let Some((consumed, found)) = parse(&mut self.dialect, &self.buf).found() {
                self.buf.drain(..consumed);
                return Ok(Some(found));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Answers an invalid command with `reply` and counts it; the one that reaches
    /// `max_bad_commands` ends the dialogue.
    pub(crate) async fn bad_command(&mut self, reply: &[u8]) -> io::Result<Flow> {
        self.bad_commands += 1;
        if self.bad_commands < self.ctx.limits.max_bad_commands {
            self.send(reply).await?;
            return Ok(Flow::Continue);
        }
        if D::BYE_ON_LIMITS {
            self.send(reply).await?;
            self.bye(D::TOO_MANY_COMMANDS).await;
        } else {
            self.send(D::bye(D::TOO_MANY_COMMANDS).as_bytes()).await?;
        }
        Ok(Flow::Close)
    }

    /// Answers STARTTLS and, if TLS is offered, runs the handshake.
    pub(crate) async fn starttls(&mut self) -> io::Result<Tls> {
        if self.is_tls() {
            self.answer(Reply::TlsActive).await?;
            return Ok(Tls::Refused);
        }
        let Some(acceptor) = self.ctx.starttls.clone() else {
            self.answer(Reply::TlsDisabled).await?;
            return Ok(Tls::Refused);
        };
        self.answer(Reply::TlsBegin).await?;
        // Whatever the client sent after STARTTLS was not protected by TLS: it could have been
        // injected by a man in the middle, so it must not be executed.
        self.buf.clear();
        self.dialect.tls_started();
        let client = self.client.take().ok_or_else(handed_over)?;
        match client.start_tls(&acceptor).await {
            Ok(client) => {
                self.client = Some(client);
                Ok(Tls::Secured)
            }
            Err(error) => Ok(Tls::Failed(error)),
        }
    }

    /// Closes after a failed STARTTLS handshake, noting why.
    pub(crate) fn handshake_failed(&self, error: &io::Error) -> Flow {
        tracing::debug!(session = %self.ctx.identity.session_id, %error, "STARTTLS handshake failed");
        Flow::Close
    }

    /// A SASL authentication with `mechanism` and, if the client sent one with it, an initial
    /// response: the challenges, the client's responses, then the login.
    pub(crate) async fn authenticate<A: Authenticator>(
        &mut self,
        mechanism: &[u8],
        initial: Option<Vec<u8>>,
        auth: &A,
    ) -> io::Result<Flow> {
        if self.offered.is_some() {
            // Boxed: the auth service's exchange would double the size of every session's
            // pre-login future (memory moved at each call), and passthrough never runs it.
            return Box::pin(self.authenticate_at_service(mechanism, initial, auth)).await;
        }
        if !self.plaintext_allowed() {
            self.answer(Reply::PlaintextDisallowed).await?;
            return Ok(Flow::Continue);
        }
        let Some(mechanism) = Mechanism::named(mechanism) else {
            self.answer(Reply::UnsupportedMechanism).await?;
            return Ok(Flow::Continue);
        };
        let name = match mechanism {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        };
        let first = match initial.and_then(|r| D::initial_response(name, r)) {
            Some(answer) => self.response(answer).await?,
            None => self.challenge(mechanism.first_challenge()).await?,
        };
        let first = match first {
            Ok(response) => response,
            Err(flow) => return Ok(flow),
        };
        let responses = match mechanism {
            Mechanism::Plain => Responses::Plain(first),
            Mechanism::Login => match self.challenge(PASSWORD_CHALLENGE).await? {
                Ok(password) => Responses::Login {
                    user: first,
                    password,
                },
                Err(flow) => return Ok(flow),
            },
        };
        self.login_with(D::credentials(responses), auth).await
    }

    /// A SASL authentication relayed to the auth service: its challenges go to the client and
    /// the client's answers to it, whatever the mechanism, until it says yes or no.
    async fn authenticate_at_service<A: Authenticator>(
        &mut self,
        mechanism: &[u8],
        initial: Option<Vec<u8>>,
        auth: &A,
    ) -> io::Result<Flow> {
        let offered = self.offered.as_deref().unwrap_or_default();
        let Some(mech) = offered
            .iter()
            .find(|m| m.name.as_bytes().eq_ignore_ascii_case(mechanism))
            .cloned()
        else {
            self.answer(Reply::UnsupportedMechanism).await?;
            return Ok(Flow::Continue);
        };
        if mech.plaintext && !self.plaintext_allowed() {
            self.answer(Reply::PlaintextDisallowed).await?;
            return Ok(Flow::Continue);
        }
        let first = match initial.and_then(|r| D::initial_response(&mech.name, r)) {
            None => None,
            Some(answer) => match self.response(answer).await? {
                Err(flow) => return Ok(flow),
                Ok(response) => match self.decoded(&response).await? {
                    Ok(decoded) => Some(decoded),
                    Err(flow) => return Ok(flow),
                },
            },
        };
        let client = self.sasl_client();
        let step = auth.sasl_start(&mech.name, first.as_deref(), &client).await;
        self.sasl_exchange(step, auth).await
    }

    /// Who the client is, for the auth service.
    fn sasl_client(&self) -> SaslClient<'_> {
        SaslClient {
            protocol: D::PROTOCOL,
            identity: &self.ctx.identity,
            tls: self.is_tls(),
            trusted: self.ctx.trusted,
        }
    }

    /// Relays the auth service's challenges and the client's answers from `step` on, then
    /// logs in (or answers why not).
    async fn sasl_exchange<A: Authenticator>(
        &mut self,
        mut step: SaslStep<A::Exchange>,
        auth: &A,
    ) -> io::Result<Flow> {
        loop {
            match step {
                SaslStep::Challenge(data, exchange) => {
                    let challenge = sasl::encode_base64(&data);
                    let response = match self.challenge(&challenge).await? {
                        Ok(response) => response,
                        // Dropping the exchange cancels it at the service.
                        Err(flow) => return Ok(flow),
                    };
                    let decoded = match self.decoded(&response).await? {
                        Ok(decoded) => decoded,
                        Err(flow) => return Ok(flow),
                    };
                    step = auth.sasl_next(exchange, &decoded).await;
                }
                SaslStep::Verified {
                    credentials,
                    verified,
                } => return self.login_as(credentials, Some(verified), auth).await,
                // The service already held its failures back (its `auth_failure_delay`), as it
                // does for Dovecot's own login processes: no second delay here.
                SaslStep::Failed(LoginFailure::AuthFailed { message }) => {
                    return self.count_failed_login(&message).await;
                }
                SaslStep::Failed(failure) => return self.refused("", failure).await,
                SaslStep::Unsupported => {
                    self.answer(Reply::UnsupportedMechanism).await?;
                    return Ok(Flow::Continue);
                }
            }
        }
    }

    /// A client's base64 SASL response, decoded; one that is not base64 is answered as an
    /// invalid command, and `Err` holds what to do then.
    async fn decoded(&mut self, response: &[u8]) -> io::Result<Result<Vec<u8>, Flow>> {
        match sasl::decode_base64(response) {
            Ok(decoded) => Ok(Ok(decoded)),
            Err(_) => {
                let reply = D::reply(self, Reply::NotBase64);
                Ok(Err(self.bad_command(reply.as_bytes()).await?))
            }
        }
    }

    /// Sends a SASL challenge and reads the client's response. `Err` holds what to do instead
    /// when there is no response to use (already answered).
    async fn challenge(&mut self, challenge: &str) -> io::Result<Result<Vec<u8>, Flow>> {
        self.send(D::challenge(challenge).as_bytes()).await?;
        let answer = D::sasl_response(self).await?;
        self.response(answer).await
    }

    /// The response in `answer`, or what to do instead (a cancel is answered here).
    async fn response(&mut self, answer: Answer) -> io::Result<Result<Vec<u8>, Flow>> {
        Ok(match answer {
            Answer::Response(response) => Ok(response),
            Answer::Cancel => {
                self.answer(Reply::Aborted).await?;
                Err(Flow::Continue)
            }
            Answer::Stop(flow) => Err(flow),
        })
    }

    /// Logs in with what the client gave, or answers why it cannot be used.
    pub(crate) async fn login_with<A: Authenticator>(
        &mut self,
        credentials: ClientCredentials,
        auth: &A,
    ) -> io::Result<Flow> {
        match credentials {
            ClientCredentials::Valid(credentials) => self.login(credentials, auth).await,
            ClientCredentials::Invalid => self.login_failed("").await,
            ClientCredentials::NotBase64 => {
                let reply = D::reply(self, Reply::NotBase64);
                self.bad_command(reply.as_bytes()).await
            }
        }
    }

    /// The one place a front end's login goes through: asks `auth` for a logged-in backend
    /// for this client's credentials and answers the client.
    /// With an auth service, the user and password are checked there first (as SASL PLAIN,
    /// which is what Dovecot's login processes make of IMAP `LOGIN` and POP3 `USER`/`PASS`).
    pub(crate) async fn login<A: Authenticator>(
        &mut self,
        credentials: Credentials,
        auth: &A,
    ) -> io::Result<Flow> {
        if self.offered.is_none() {
            return self.login_as(credentials, None, auth).await;
        }
        // Boxed, as in `authenticate`.
        Box::pin(self.login_at_service(credentials, auth)).await
    }

    /// [`Session::login`] with an auth service: the credentials as SASL PLAIN.
    async fn login_at_service<A: Authenticator>(
        &mut self,
        credentials: Credentials,
        auth: &A,
    ) -> io::Result<Flow> {
        let plain = sasl::plain_response(&credentials);
        let client = self.sasl_client();
        let step = auth.sasl_start("PLAIN", Some(&plain), &client).await;
        if let SaslStep::Challenge(..) = step {
            // PLAIN with its response has nothing more to ask: a service that asks is broken.
            return self
                .refused(
                    &credentials.username,
                    LoginFailure::Unavailable {
                        message: String::new(),
                    },
                )
                .await;
        }
        self.sasl_exchange(step, auth).await
    }

    /// Asks `auth` for a logged-in backend with `credentials` and answers the client.
    async fn login_as<A: Authenticator>(
        &mut self,
        credentials: Credentials,
        verified: Option<Verified>,
        auth: &A,
    ) -> io::Result<Flow> {
        let decision = Decision {
            protocol: D::PROTOCOL,
            credentials,
            identity: self.ctx.identity.clone(),
            secured: self.is_tls(),
            verified,
        };
        let result = auth.login(&decision).await;
        let shown_user = decision.mail_user(None);
        D::logged(self, shown_user, result.as_ref().map(|_| ()));
        match result {
            Ok(backend) => {
                self.answer(Reply::LoggedIn(&backend.success_text)).await?;
                let client = self.client.take().ok_or_else(handed_over)?;
                let username = match decision.verified {
                    Some(v) => v.user,
                    None => decision.credentials.username,
                };
                Ok(Flow::Established(Box::new(Established {
                    client,
                    client_leftover: std::mem::take(&mut self.buf),
                    backend,
                    username,
                    identity: self.ctx.identity.clone(),
                })))
            }
            Err(failure) => {
                let user = shown_user.to_owned();
                self.refused(&user, failure).await
            }
        }
    }

    /// Answers a login that got no backend session.
    async fn refused(&mut self, user: &str, failure: LoginFailure) -> io::Result<Flow> {
        match failure {
            LoginFailure::AuthFailed { message } => self.login_failed(&message).await,
            LoginFailure::Unavailable { message } => {
                self.answer(Reply::Unavailable(&message)).await?;
                Ok(Flow::Continue)
            }
            LoginFailure::Referral {
                user: referred,
                host,
                message,
            } => {
                let user = if referred.is_empty() { user } else { &referred };
                self.answer(Reply::Referral {
                    user,
                    host: &host,
                    message: &message,
                })
                .await?;
                Ok(Flow::Continue)
            }
        }
    }

    /// Answers a failed login after the delay that slows password guessing; the one that
    /// reaches `max_auth_failures` ends the dialogue.
    pub(crate) async fn login_failed(&mut self, message: &str) -> io::Result<Flow> {
        tokio::time::sleep(self.ctx.limits.auth_failure_delay).await;
        self.count_failed_login(message).await
    }

    /// Answers a failed login at once; the one that reaches `max_auth_failures` ends the
    /// dialogue.
    async fn count_failed_login(&mut self, message: &str) -> io::Result<Flow> {
        self.answer(Reply::LoginFailed(message)).await?;
        self.auth_failures += 1;
        if self.auth_failures < self.ctx.limits.max_auth_failures {
            return Ok(Flow::Continue);
        }
        if D::BYE_ON_LIMITS {
            self.bye("Too many invalid authentication attempts.").await;
        }
        Ok(Flow::Close)
    }
}

/// Defines a protocol's `CommandName`: the commands its front end answers before login, each
/// with its upper-case name, and `Other` for any other, kept by name (upper-cased) so the
/// session can answer it as unknown. Gives `from_atom` (case-insensitive), `as_str` (the name
/// as replies show it) and `Display`.
macro_rules! command_names {
    ($(#[$meta:meta])* $($variant:ident = $name:literal,)*) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum CommandName {
            $($variant,)*
            /// Any other command name, upper-cased.
            Other(String),
        }

        impl CommandName {
            /// Recognises a command name, case-insensitively.
            pub fn from_atom(atom: &str) -> CommandName {
                let upper = atom.to_ascii_uppercase();
                match upper.as_str() {
                    $($name => CommandName::$variant,)*
                    _ => CommandName::Other(upper),
                }
            }

            /// The upper-case name, as used in replies.
            pub fn as_str(&self) -> &str {
                match self {
                    $(CommandName::$variant => $name,)*
                    CommandName::Other(name) => name,
                }
            }
        }

        impl std::fmt::Display for CommandName {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use command_names;

/// `text` with control characters replaced by spaces, safe to put in a reply line (a CR or LF
/// would end the line and start another).
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    // Usually nothing to replace (a backend's capability list): no copy then.
    if !crate::untrusted::may_hold_controls(text.as_bytes()) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
#[test]
fn printable_replaces_control_characters_only() {
    assert!(matches!(
        printable("Logged in"),
        std::borrow::Cow::Borrowed("Logged in")
    ));
    assert_eq!(printable("a\r\nb\u{7f}c\u{85}d\te"), "a  b c d e");
    // U+00A0 and U+00E9 share their first bytes with C1 and are kept.
    assert_eq!(printable("x\u{a0}y\u{e9}"), "x\u{a0}y\u{e9}");
}

/// Fakes and helpers the front ends' tests share: an authenticator, the client's end of a
/// dialogue, a context and TLS.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, OnceLock};

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::{
        run, Authenticator, BackendLink, Dialect, Established, FrontendContext, LoginFailure,
        Mechanisms, PreauthLimits, SaslClient, SaslMechanism, SaslStep,
    };
    use crate::net::stream::{BackendStream, ClientStream};
    use crate::protocol::decision::{ClientIdentity, Decision};
    use crate::state::sessions::Sessions;

    /// What [`FakeAuth::scripted`] answers to a login.
    pub(crate) enum Scripted {
        /// Logged in, with this success text.
        Ok(&'static str),
        AuthFailed(&'static str),
        Unavailable(&'static str),
    }

    /// An authenticator that records every decision and answers from a script, or by the
    /// password.
    pub(crate) struct FakeAuth {
        /// `Some`: the answers in turn (a refused login with no text once they run out).
        script: Option<Mutex<VecDeque<Scripted>>>,
        /// Without a script: the success text of a login.
        success_text: &'static str,
        decisions: Mutex<Vec<Decision>>,
        /// `Some`: an auth service is in front (see [`FakeAuth::with_service`]).
        service: Option<Mechanisms>,
        /// What the fake auth service was sent: (mechanism or "", decoded data).
        sasl: Mutex<Vec<(String, Vec<u8>)>>,
        /// The fake backend logins connect to (never accepted: the queue holds them).
        backend: std::net::TcpListener,
        sessions: Sessions,
    }

    impl FakeAuth {
        fn new(script: Option<Vec<Scripted>>, success_text: &'static str) -> Arc<Self> {
            Arc::new(FakeAuth {
                script: script.map(|answers| Mutex::new(answers.into())),
                success_text,
                decisions: Mutex::new(Vec::new()),
                service: None,
                sasl: Mutex::new(Vec::new()),
                backend: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
                sessions: Sessions::new(),
            })
        }

        /// Password "wrong" fails, "unavail" finds no backend; anything else logs in with
        /// `success_text`.
        pub(crate) fn by_password(success_text: &'static str) -> Arc<Self> {
            FakeAuth::new(None, success_text)
        }

        /// Answers the logins with `answers`, in turn.
        pub(crate) fn scripted(answers: impl IntoIterator<Item = Scripted>) -> Arc<Self> {
            FakeAuth::new(Some(answers.into_iter().collect()), "")
        }

        /// Like [`FakeAuth::by_password`], behind a fake auth service that offers PLAIN,
        /// LOGIN (plaintext) and CRAM-MD5. PLAIN passes with password "right" (user
        /// normalised to lower case); CRAM-MD5 challenges with `<1.2@fake>` and passes on the
        /// response `alice 0123` as user "alice" with the passdb's password "frompassdb";
        /// user "moved" gets a referral to `new.example`; user "busy" a temporary failure.
        pub(crate) fn with_service() -> Arc<Self> {
            let mut auth = Arc::into_inner(FakeAuth::new(None, "Logged in")).unwrap();
            let mech = |name: &str, plaintext| SaslMechanism {
                name: name.into(),
                plaintext,
            };
            auth.service = Some(
                vec![
                    mech("PLAIN", true),
                    mech("LOGIN", true),
                    mech("CRAM-MD5", false),
                ]
                .into(),
            );
            Arc::new(auth)
        }

        /// What the fake auth service was sent: (mechanism, initial response) for a start,
        /// ("", response) for each next step.
        pub(crate) fn sasl(&self) -> Vec<(String, Vec<u8>)> {
            self.sasl.lock().unwrap().clone()
        }

        fn judge_plain(&self, response: &[u8]) -> SaslStep<String> {
            let Ok(c) = crate::protocol::sasl::parse_plain(response) else {
                return SaslStep::Failed(LoginFailure::AuthFailed {
                    message: String::new(),
                });
            };
            let user = c.username.to_lowercase();
            match (user.as_str(), c.password.expose()) {
                ("moved", _) => SaslStep::Failed(LoginFailure::Referral {
                    user,
                    host: "new.example".into(),
                    message: "Moved".into(),
                }),
                ("busy", _) => SaslStep::Failed(LoginFailure::Unavailable {
                    message: "Auth busy".into(),
                }),
                (_, "right") => SaslStep::Verified {
                    credentials: crate::protocol::decision::Credentials::plain(&user, "right"),
                    verified: crate::protocol::decision::Verified {
                        user,
                        ..Default::default()
                    },
                },
                _ => SaslStep::Failed(LoginFailure::AuthFailed {
                    message: String::new(),
                }),
            }
        }

        pub(crate) fn decisions(&self) -> Vec<Decision> {
            self.decisions.lock().unwrap().clone()
        }

        /// (username, auth_username, password) of every decision.
        pub(crate) fn credentials(&self) -> Vec<(String, String, String)> {
            self.decisions()
                .into_iter()
                .map(|d| {
                    let c = d.credentials;
                    (c.username, c.auth_username, c.password.expose().to_owned())
                })
                .collect()
        }

        fn answer(&self, password: &str) -> Scripted {
            match &self.script {
                Some(script) => script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Scripted::AuthFailed("")),
                None => match password {
                    "wrong" => Scripted::AuthFailed("Authentication failed."),
                    "unavail" => Scripted::Unavailable("No backend available."),
                    _ => Scripted::Ok(self.success_text),
                },
            }
        }
    }

    impl Authenticator for FakeAuth {
        /// The mechanism of the exchange.
        type Exchange = String;

        async fn mechanisms(&self) -> Option<Mechanisms> {
            self.service.clone()
        }

        async fn sasl_start(
            &self,
            mechanism: &str,
            initial: Option<&[u8]>,
            _client: &SaslClient<'_>,
        ) -> SaslStep<String> {
            self.sasl
                .lock()
                .unwrap()
                .push((mechanism.into(), initial.unwrap_or_default().to_vec()));
            match (mechanism, initial) {
                ("PLAIN", Some(response)) => self.judge_plain(response),
                ("PLAIN", None) => SaslStep::Challenge(Vec::new(), "PLAIN".into()),
                ("CRAM-MD5", _) => SaslStep::Challenge(b"<1.2@fake>".to_vec(), "CRAM-MD5".into()),
                _ => SaslStep::Unsupported,
            }
        }

        async fn sasl_next(&self, mechanism: String, response: &[u8]) -> SaslStep<String> {
            self.sasl
                .lock()
                .unwrap()
                .push((String::new(), response.to_vec()));
            match mechanism.as_str() {
                "PLAIN" => self.judge_plain(response),
                _ if response == b"alice 0123" => SaslStep::Verified {
                    credentials: crate::protocol::decision::Credentials::plain(
                        "alice",
                        "frompassdb",
                    ),
                    verified: crate::protocol::decision::Verified {
                        user: "alice".into(),
                        ..Default::default()
                    },
                },
                _ => SaslStep::Failed(LoginFailure::AuthFailed {
                    message: "Wrong.".into(),
                }),
            }
        }

        async fn login(&self, decision: &Decision) -> Result<BackendLink, LoginFailure> {
            self.decisions.lock().unwrap().push(decision.clone());
            match self.answer(decision.credentials.password.expose()) {
                Scripted::Ok(text) => {
                    let addr = self.backend.local_addr().unwrap();
                    let stream = TcpStream::connect(addr).await.unwrap();
                    let user = &decision.credentials.username;
                    Ok(BackendLink {
                        stream: BackendStream::Plain(stream),
                        success_text: text.into(),
                        leftover: Vec::new(),
                        session: self
                            .sessions
                            .register(decision.protocol, user, 0, addr, None),
                    })
                }
                Scripted::AuthFailed(message) => Err(LoginFailure::AuthFailed {
                    message: message.into(),
                }),
                Scripted::Unavailable(message) => Err(LoginFailure::Unavailable {
                    message: message.into(),
                }),
            }
        }
    }

    /// The test's side of the connection (plain, or TLS after STARTTLS).
    pub(crate) struct Client<S = TcpStream> {
        pub(crate) reader: BufReader<S>,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
        pub(crate) fn new(stream: S) -> Self {
            Client {
                reader: BufReader::new(stream),
            }
        }

        pub(crate) async fn send(&mut self, data: &[u8]) {
            self.reader.get_mut().write_all(data).await.unwrap();
            self.reader.get_mut().flush().await.unwrap();
        }

        /// Ends what the client sends (the connection stays open for reading).
        pub(crate) async fn close_write(&mut self) {
            self.reader.get_mut().shutdown().await.unwrap();
        }

        /// The next line, which must end in CRLF, without it; `None` at end of stream.
        pub(crate) async fn line(&mut self) -> Option<String> {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.unwrap();
            if n == 0 {
                return None;
            }
            assert!(line.ends_with("\r\n"), "line without CRLF: {line:?}");
            line.truncate(line.len() - 2);
            Some(line)
        }

        pub(crate) async fn expect(&mut self, want: &str) {
            assert_eq!(self.line().await.as_deref(), Some(want));
        }

        pub(crate) async fn expect_lines(&mut self, want: &[&str]) {
            for line in want {
                self.expect(line).await;
            }
        }

        pub(crate) async fn expect_closed(&mut self) {
            assert_eq!(self.line().await, None, "connection should be closed");
        }

        /// Sends `command` (CRLF added) and expects `reply`.
        pub(crate) async fn command(&mut self, command: &str, reply: &str) {
            self.send(format!("{command}\r\n").as_bytes()).await;
            self.expect(reply).await;
        }
    }

    /// A dialogue running in its own task.
    pub(crate) type Running = JoinHandle<std::io::Result<Option<Established>>>;

    /// Connects a client to a dialogue of `D` against `auth`, in a [`context`] of the
    /// connection's addresses with `adjust` applied. The dialogue is spawned, which also
    /// proves its future is `Send`.
    pub(crate) async fn start<D: Dialect + 'static>(
        auth: &Arc<FakeAuth>,
        adjust: impl FnOnce(&mut FrontendContext),
    ) -> (Client, Running) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let mut ctx = context(peer, server.local_addr().unwrap());
        adjust(&mut ctx);
        let auth = auth.clone();
        let session =
            tokio::spawn(
                async move { run::<D, _>(ClientStream::Plain(server), ctx, &*auth).await },
            );
        (Client::new(client), session)
    }

    /// No STARTTLS, plaintext logins allowed, lines and literals of 256 bytes, no delay after
    /// a failed login; session id "s1".
    pub(crate) fn context(client: SocketAddr, local: SocketAddr) -> FrontendContext {
        FrontendContext {
            starttls: None,
            disable_plaintext_auth: false,
            trusted: false,
            limits: PreauthLimits {
                auth_failure_delay: std::time::Duration::ZERO,
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

    /// What the dialogue established; it must have.
    pub(crate) async fn established(session: Running) -> Established {
        session
            .await
            .unwrap()
            .unwrap()
            .expect("session established")
    }

    /// The dialogue ended without a session (and without an error).
    pub(crate) async fn closed(session: Running) {
        assert!(session.await.unwrap().unwrap().is_none());
    }

    pub(crate) fn b64(raw: &[u8]) -> String {
        crate::protocol::sasl::encode_base64(raw)
    }

    /// (username, auth_username, password), as [`FakeAuth::credentials`] lists them.
    pub(crate) fn creds(user: &str, auth_user: &str, password: &str) -> (String, String, String) {
        (user.into(), auth_user.into(), password.into())
    }

    /// A TLS acceptor with a self-signed certificate for `localhost` (made once, with
    /// openssl), and a connector that trusts that certificate.
    pub(crate) fn tls_pair() -> (TlsAcceptor, TlsConnector) {
        static PAIR: OnceLock<(TlsAcceptor, TlsConnector)> = OnceLock::new();
        PAIR.get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("director-preauth-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let out = std::process::Command::new("openssl")
                .args("req -x509 -nodes -days 2 -subj /CN=localhost".split(' '))
                .args("-newkey ec -pkeyopt ec_paramgen_curve:P-256".split(' '))
                // CA:FALSE: webpki refuses a CA certificate as the server's own.
                .args("-addext subjectAltName=DNS:localhost".split(' '))
                .args("-addext basicConstraints=critical,CA:FALSE".split(' '))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let acceptor =
                crate::net::tls::acceptor(crate::net::tls::server_config(&cert, &key).unwrap());
            let connector = crate::net::tls::connector(Some(&cert), true).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            (acceptor, connector)
        })
        .clone()
    }
}
