//! The value a front end hands to the rest of the program once a client has said who it is.
//!
//! Routing and backend login never see protocol syntax: they see a [`Decision`].

use std::fmt;
use std::net::SocketAddr;

/// The mail protocols the director serves. Each has its own front end and backend login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Imap,
    Pop3,
    Lmtp,
    Sieve,
}

impl Protocol {
    /// Lower-case name used in configuration, logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Lmtp => "lmtp",
            Protocol::Sieve => "sieve",
        }
    }

    /// The port a backend listens on for this protocol unless configured otherwise.
    pub fn default_backend_port(self) -> u16 {
        match self {
            Protocol::Imap => 143,
            Protocol::Pop3 => 110,
            Protocol::Lmtp => 24,
            Protocol::Sieve => 4190,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A password. Its `Debug` never shows the value, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The password itself, for the one place that sends it to a backend.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// What the client gave to log in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user the session is for (IMAP LOGIN's user, SASL PLAIN's authorization identity
    /// if given, else its authentication identity). This is what routing hashes.
    pub username: String,
    /// The identity whose password this is (SASL PLAIN's authentication identity). Equal to
    /// `username` except when a client logs in as a master user on behalf of another user.
    pub auth_username: String,
    pub password: Secret,
}

impl Credentials {
    /// Credentials for a plain `user` + `password` login.
    pub fn plain(username: impl Into<String>, password: impl Into<String>) -> Self {
        let username = username.into();
        Credentials {
            auth_username: username.clone(),
            username,
            password: Secret::new(password),
        }
    }
}

/// Who the client is, as the backend should learn it (IMAP ID, XCLIENT or a PROXY header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The real client address: the TCP peer, or the source from a PROXY header.
    pub client: SocketAddr,
    /// The address the client connected to (our listener, or the PROXY header's destination).
    pub local: SocketAddr,
    /// A session id unique within this director, logged here and sent to the backend.
    pub session_id: String,
}

/// The end of a successful pre-authentication dialogue.
#[derive(Debug, Clone)]
pub struct Decision {
    pub protocol: Protocol,
    pub credentials: Credentials,
    pub identity: ClientIdentity,
    /// Whether the client connection is TLS (implicit or after STARTTLS).
    pub secured: bool,
}
