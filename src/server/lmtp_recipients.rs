//! The recipients of an LMTP listener in `auth.mode: dovecot`: each is looked up in the user
//! database over the auth-master socket, as Dovecot's LMTP proxy does, and a user it knows is
//! routed as that user's login is ([`Login::route_verified`]): its `user` is what is hashed, a
//! `host` pins it, a `director_tag` picks its pool, its `port` and TLS apply. So mail lands
//! on the backend the user reads it from.

use crate::auth::lookups::{UserLookup, UserLookups};
use crate::login::Login;
use crate::protocol::decision::{ClientIdentity, Protocol};
use crate::protocol::lmtp::{RecipientLookup, RecipientRoute};
use crate::protocol::preauth::LoginFailure;

/// The [`RecipientLookup`] of one such listener, made for each connection.
pub struct DovecotRecipients<'a> {
    pub login: &'a Login,
    pub lookups: &'a UserLookups,
}

impl RecipientLookup for DovecotRecipients<'_> {
    async fn lookup(&self, username: &str, identity: &ClientIdentity) -> RecipientRoute {
        match self
            .lookups
            .lookup(username, Protocol::Lmtp, identity)
            .await
        {
            UserLookup::Found(verified) => {
                match self.login.route_verified(&verified, Protocol::Lmtp).await {
                    Ok(route) => RecipientRoute::Deliver {
                        user: verified.user,
                        route,
                    },
                    // Routing fails only as unavailable; its message says why (a tag's pool).
                    Err(
                        LoginFailure::Unavailable { message }
                        | LoginFailure::AuthFailed { message }
                        | LoginFailure::Referral { message, .. },
                    ) => RecipientRoute::NoBackend(message),
                }
            }
            UserLookup::NotFound => RecipientRoute::Unknown,
            UserLookup::Unavailable => RecipientRoute::LookupFailed,
        }
    }
}
