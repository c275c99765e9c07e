//! Why an authentication or a lookup got no answer from the auth service. A `FAIL` of an
//! authentication is not an error: it is an answer ([`super::Step::Fail`]). A `FAIL` of an
//! auth-master lookup is one ([`AuthError::LookupFailed`]): the service could not tell whether
//! the user exists.

use std::time::Duration;

/// An authentication that could not be carried out. [`AuthError::is_temporary`] tells a
/// front end whether to say "try again later" (the credentials were not judged) or to refuse
/// the request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The service could not be reached, or did not finish its handshake in time.
    #[error("auth service {endpoint}: cannot connect: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The service speaks another major version of the protocol.
    #[error("auth service {endpoint}: speaks auth protocol {major}.{minor}, this client 1.x")]
    Version {
        endpoint: String,
        major: u32,
        minor: u32,
    },
    /// The connection ended (or failed) while the request was in flight.
    #[error("auth service {endpoint}: connection lost: {reason}")]
    ConnectionLost { endpoint: String, reason: String },
    /// No answer within the request timeout.
    #[error("auth service {endpoint}: no answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    /// The service's answer (or handshake) did not parse; `detail` shows the line only
    /// through [`crate::untrusted::shown_bytes`].
    #[error("auth service {endpoint}: {detail}")]
    Protocol { endpoint: String, detail: String },
    /// The service does not offer this mechanism (or offers it only privately). Shown
    /// escaped: the name is the client's.
    #[error("mechanism {0} is not offered by the auth service")]
    UnsupportedMechanism(String),
    /// The request does not fit in one protocol line (a huge initial response, a huge user
    /// name in a lookup).
    #[error("auth request of {len} bytes does not fit in one line of at most {max}")]
    TooLong { len: usize, max: usize },
    /// An auth-master lookup answered `FAIL`: the passdb or userdb failed (a database down, a
    /// passdb that cannot look users up without a password). `reason` is the service's text,
    /// shown escaped.
    #[error("auth service {endpoint}: lookup failed: {}", .reason.as_deref().unwrap_or("no reason given"))]
    LookupFailed {
        endpoint: String,
        reason: Option<String>,
    },
}

impl AuthError {
    /// Whether the failure is the service's (or the way to it): the client's credentials were
    /// not judged, and trying again later may work. `UnsupportedMechanism` and `TooLong` are
    /// the client's own. `LookupFailed` counts as temporary even when a configuration is at
    /// fault, as Dovecot's LMTP proxy counts it (451): mail waits until the operator fixes it.
    pub fn is_temporary(&self) -> bool {
        !matches!(
            self,
            AuthError::UnsupportedMechanism(_) | AuthError::TooLong { .. }
        )
    }
}
