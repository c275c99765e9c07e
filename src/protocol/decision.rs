//! The value a front end hands to the rest of the program once a client has said who it is.
//!
//! Routing and backend login never see protocol syntax: they see a [`Decision`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::BackendTls;
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

/// What an auth service said about a client that passed its check (Dovecot's passdb fields):
/// who the user is, and how to reach the user's backend. Absent fields leave the listener's
/// and the backend's own settings in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// The user as the service names it (`user`: normalised, e.g. lower-cased or with its
    /// domain added): what routing hashes, and what records, sessions, kicks and logs use.
    pub user: String,
    /// `host`: a backend outside the ring for this user (a name, or an address).
    pub host: Option<String>,
    /// `hostip`: the address of `host`, saving a lookup.
    pub hostip: Option<IpAddr>,
    /// `port`: the backend's port for this protocol.
    pub port: Option<u16>,
    /// `ssl=yes|any-cert` (implicit TLS) or `starttls=yes|any-cert`: TLS to the backend for
    /// this user.
    pub tls: Option<UserTls>,
    /// `proxy_timeout`: how long the backend login may take, instead of the backend's own.
    pub proxy_timeout: Option<Duration>,
    /// `forward_NAME=VALUE`: sent on to the backend (IMAP `ID` field `x-forward-NAME`).
    pub forward: Vec<(String, String)>,
    /// `director_tag`: only backends of this tag take the user.
    pub tag: Option<String>,
}

/// TLS to the backend that an auth service asked for, for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserTls {
    /// [`BackendTls::Implicit`] or [`BackendTls::Starttls`].
    pub mode: BackendTls,
    /// `false` for `any-cert`: the backend's certificate is not checked.
    pub verify: bool,
}

/// The end of a successful pre-authentication dialogue.
#[derive(Debug, Clone)]
pub struct Decision {
    pub protocol: Protocol,
    /// What the backend login sends: the client's own credentials, or (after an auth
    /// service's check) those it said to use (`destuser`, `master`, `pass`).
    pub credentials: Credentials,
    pub identity: ClientIdentity,
    /// Whether the client connection is TLS (implicit or after STARTTLS).
    pub secured: bool,
    /// `Some` when an auth service checked the client (`auth.mode: dovecot`): its word on
    /// the user and the route. `None`: the backend is the judge of the credentials.
    pub verified: Option<Verified>,
}

impl Decision {
    /// The user whose mailbox this login opens (see [`Credentials::mail_user`]); the auth
    /// service's name for the user when it checked the login.
    pub fn mail_user(&self, separator: Option<char>) -> &str {
        match &self.verified {
            Some(v) => &v.user,
            None => self.credentials.mail_user(separator),
        }
    }
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
