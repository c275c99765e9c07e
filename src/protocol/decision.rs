//! The value a front end hands to the rest of the program once a client has said who it is.
//!
//! Routing and backend login never see protocol syntax: they see a [`Decision`].

use std::fmt;
use std::net::SocketAddr;

pub use crate::config::Protocol;

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

    /// The user whose mailbox this login opens, for routing, sticky records, sessions, kicks
    /// and logs. A master-user login written `user*master` (Dovecot's
    /// `auth_master_user_separator`, here `separator`) is for `user`, and must land where
    /// `user`'s own logins do. As in Dovecot, the name is cut at the first separator, and only
    /// when the client gave no separate authorization identity (SASL PLAIN's authzid already
    /// names the user). The backend still gets the credentials exactly as the client sent them.
    pub fn mail_user(&self, separator: Option<char>) -> &str {
        match separator {
            Some(sep) if self.username == self.auth_username => self
                .username
                .split_once(sep)
                .map_or(self.username.as_str(), |(user, _master)| user),
            _ => &self.username,
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
    /// The session id of a trusted front end (webmail) that connects for its user, from its
    /// IMAP `ID` `x-session-ext-id`: sent on to the backend, so one session can be followed
    /// through the three logs. `None` unless a trusted client gave a valid one.
    pub session_ext_id: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_user_cuts_a_master_login_at_the_separator() {
        let c = Credentials::plain("user0101*master", "pw");
        assert_eq!(c.mail_user(Some('*')), "user0101");
        assert_eq!(c.mail_user(None), "user0101*master");
        assert_eq!(c.mail_user(Some('%')), "user0101*master");
        // Cut at the first separator, as Dovecot does.
        assert_eq!(Credentials::plain("a*b*c", "").mail_user(Some('*')), "a");
        assert_eq!(
            Credentials::plain("plain", "").mail_user(Some('*')),
            "plain"
        );
    }

    #[test]
    fn mail_user_keeps_a_plain_authorization_identity() {
        // SASL PLAIN authzid "user0101", authcid "master": the login is for user0101.
        let c = Credentials {
            username: "user0101".into(),
            auth_username: "master".into(),
            password: Secret::new("pw"),
        };
        assert_eq!(c.mail_user(Some('*')), "user0101");
        // An authzid holding the separator is taken whole, as Dovecot takes it.
        let c = Credentials {
            username: "x*y".into(),
            auth_username: "master".into(),
            password: Secret::new("pw"),
        };
        assert_eq!(c.mail_user(Some('*')), "x*y");
    }
}
