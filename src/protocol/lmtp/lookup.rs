//! [`RecipientLookup`]: where a recipient's mail goes, the one question an LMTP session asks
//! about each RCPT. Without an auth service the ring answers (the [`Router`] here: the
//! recipient's username routed as a login of that name would be). With one (`auth.mode:
//! dovecot`) a layer above answers from the user database, as Dovecot's LMTP proxy asks its
//! passdb: so a user the database pins or tags receives mail where it reads it, and a user it
//! does not know is refused as the backend would refuse it.

use std::future::Future;

use crate::protocol::decision::ClientIdentity;
use crate::state::router::{Route, Router};

/// The answer for one recipient.
#[derive(Debug, Clone)]
pub enum RecipientRoute {
    /// Deliver to `route.backend`, whose settings are this user's (an auth service's `port`
    /// or TLS for the user applied). `user` is the user as routed, for the log.
    Deliver { user: String, route: Route },
    /// The user database has no such user: `550 5.1.1`, what the backend would answer.
    Unknown,
    /// The user database could not tell (unreachable, silent, failing): `451 4.3.0`, and the
    /// MTA keeps the message.
    LookupFailed,
    /// No backend can take the user now (why, for the log): `451 4.4.0`.
    NoBackend(String),
}

/// Routes recipients. Implemented by [`Router`] (the ring) and, above this layer, by the
/// user-database lookup of listeners in `auth.mode: dovecot`.
pub trait RecipientLookup: Send + Sync {
    /// Where mail for `username` (the recipient's user, per `recipient_username` and
    /// `recipient_delimiter`) goes; `identity` is the MTA's connection, for the user
    /// database's logs and rules.
    fn lookup(
        &self,
        username: &str,
        identity: &ClientIdentity,
    ) -> impl Future<Output = RecipientRoute> + Send;
}

/// The ring, by the recipient's username (no tag), as before authentication existed.
impl RecipientLookup for Router {
    async fn lookup(&self, username: &str, _identity: &ClientIdentity) -> RecipientRoute {
        // The session logs a recipient without a backend.
        match self.route(username, "").await {
            Ok(route) => RecipientRoute::Deliver {
                user: username.to_owned(),
                route,
            },
            Err(error) => RecipientRoute::NoBackend(error.to_string()),
        }
    }
}
