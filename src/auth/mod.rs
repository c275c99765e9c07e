//! Authentication at the director: checking a client's credentials before it is routed.
//!
//! Today the director checks no password itself: it routes a user to a backend and lets the
//! backend accept or refuse the login. Authenticating at the director means asking a password
//! service first, while the client still talks to the director, and routing only clients that
//! passed. The answer can also carry routing hints (Dovecot's passdb extra fields: `proxy`,
//! `host`, `port`, `destuser`, `nologin` with a `reason`...) that a deployment already keeps in
//! its user database.
//!
//! Modes (the first one is the building block here; configuration and front-end use come next):
//! - none (today's behaviour): the backend is the only judge of the credentials;
//! - Dovecot (`dovecot`): the director is an auth client of a Dovecot auth service, exactly as
//!   Dovecot's own `imap-login` is: SASL steps relayed over the auth-client protocol, the
//!   result's fields used for routing;
//! - later, perhaps: both (the auth service's answer first, the backend's login as today).

pub mod dovecot;
pub mod lookups;
pub mod passdb;
pub mod reachability;
pub mod service;
