//! What a protocol's backend login is given and what it returns. The protocol modules
//! (`imap::backend_login`, `pop3::backend_login`, `sieve::backend_login`) speak the dialogue,
//! over `backend_dialogue`; `login` connects the socket, writes any PROXY header and does
//! implicit TLS before calling them.

use std::time::Duration;

use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::net::stream::BackendStream;
use crate::protocol::decision::{ClientIdentity, Credentials};

/// How the backend learns the real client address: a value of the configuration (`forward`).
pub use crate::config::Forward;

/// STARTTLS to the backend, if configured. (Implicit TLS is done before the protocol starts.)
#[derive(Clone)]
pub struct StartTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// One login attempt on one connected backend.
pub struct BackendLoginRequest<'a> {
    pub credentials: &'a Credentials,
    pub identity: &'a ClientIdentity,
    pub forward: Forward,
    /// Fields an auth service asked to pass on (`forward_NAME`): IMAP `ID` `x-forward-NAME`.
    pub forward_fields: &'a [(String, String)],
    /// `Some`: issue STARTTLS/STLS after the greeting and fail if the backend does not offer it.
    pub starttls: Option<StartTls>,
    /// Time allowed for each reply from the backend. `None`: the caller bounds the whole
    /// login (the director's logins do: `greeting_timeout` until the credentials go out,
    /// `login_timeout` for their answer), and the dialogue sets no timer of its own.
    pub reply_timeout: Option<Duration>,
    /// Called right before the first byte of the user's credentials is written. `false` calls
    /// the login off ([`BackendError::Cancelled`]): the backend has then seen nothing of the
    /// user, so the caller may still send the user elsewhere. Everything that fails after a
    /// `true` is the backend's answer to this user's credentials, which says nothing about the
    /// backend's health.
    pub commit: &'a (dyn Fn() -> bool + Send + Sync),
}

impl BackendLoginRequest<'_> {
    /// Asks [`BackendLoginRequest::commit`] whether the credentials may go out now.
    pub fn may_send_credentials(&self) -> Result<(), BackendError> {
        if (self.commit)() {
            Ok(())
        } else {
            Err(BackendError::Cancelled)
        }
    }
}

/// A `commit` for callers that always send the credentials (health checks, tests).
pub fn always_commit() -> bool {
    true
}

/// The outcome of a login dialogue with a backend that answered.
pub enum BackendLoginResult {
    /// Logged in. `success_text` is the text after `<tag> OK ` (IMAP) or `+OK ` (POP3).
    /// `leftover` holds bytes the backend sent after its success line that were already read
    /// into a buffer: the relay passes them to the client first.
    LoggedIn {
        stream: BackendStream,
        success_text: String,
        leftover: Vec<u8>,
    },
    /// The backend refused the credentials; `message` is its text without tag or status.
    AuthFailed { message: String },
    /// The backend answered with a temporary failure (e.g. IMAP `[UNAVAILABLE]`,
    /// POP3 `[SYS/TEMP]`/`[IN-USE]`), or its greeting was not OK.
    TempFailed { message: String },
}

/// A backend that broke the dialogue: I/O error, timeout, garbage, closed connection, or no
/// STARTTLS where it was required. Routing treats it like an unreachable backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("backend closed the connection")]
    Closed,
    #[error("backend sent an unexpected reply: {0}")]
    Protocol(String),
    #[error("credentials cannot be sent to this backend: {0}")]
    Unsendable(String),
    /// The login was called off before the credentials were sent (see
    /// [`BackendLoginRequest::commit`]), or while waiting for the backend (its user moved).
    #[error("login called off: the user's backend changed")]
    Cancelled,
}
