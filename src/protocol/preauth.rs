//! What every protocol front end shares: its settings, the login it calls once the client has
//! said who it is, and what it hands back when a session is established.
//!
//! A front end (`imap::frontend::run`, `pop3::frontend::run`) owns the pre-authentication
//! dialogue and nothing else: it never sees the ring or a backend address.

use std::future::Future;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::net::stream::{BackendStream, ClientStream};
use crate::protocol::decision::{ClientIdentity, Decision};
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
    pub shutdown: crate::server::shutdown::Shutdown,
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
}

/// Turns a front end's decision into a logged-in backend connection. Implemented by
/// [`crate::login::Login`]; tests may implement it to drive a front end alone.
pub trait Authenticator: Send + Sync {
    fn login(
        &self,
        decision: &Decision,
    ) -> impl Future<Output = Result<BackendLink, LoginFailure>> + Send;
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
