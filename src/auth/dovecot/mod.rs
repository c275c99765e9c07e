//! A client of Dovecot's auth service (the auth-client protocol, version 1.x), the one
//! Dovecot's login processes speak: the director relays each SASL step of a client to the
//! auth service and gets back `OK` or `FAIL` with the passdb's fields. And a client of its
//! auth-master protocol, which looks a user up without a password (an LMTP recipient).
//!
//! - [`client`]: [`AuthClient`], one connection shared by every request, reconnected on next
//!   use after a loss; [`Step`] and [`Challenge`] are the answers of a SASL exchange.
//! - [`connection`]: one connection: handshake, request ids, the reader and writer tasks.
//! - [`handshake`]: what the service announces ([`Mechanism`]s and their flags).
//! - [`request`]: [`RequestInfo`], what the `AUTH` line tells about the client.
//! - [`master`]: [`AuthMaster`], passdb and userdb lookups over an auth-master socket
//!   ([`Lookup`], [`LookupInfo`]).
//! - [`fields`]: [`AuthFields`], the fields of `OK` and `FAIL` (and of a lookup).
//! - [`wire`]: the line format (tab-escaping, capped lines, parsing the server's lines).
//! - [`error`]: [`AuthError`], why an authentication got no answer.
//!
//! # What Dovecot 2.3 sends and expects (seen in its source and on the wire)
//!
//! - The service announces `VERSION 1 2`, then every `MECH`, then `SPID`, `CUID`, `COOKIE`,
//!   `DONE` (not the order the protocol document lists).
//! - Dovecot *disconnects* a client that sends an unknown command, an `AUTH` for a mechanism it
//!   does not offer, an `AUTH` without `service=`, a duplicate id, anything after `resp=`, or a
//!   line longer than 16384 bytes (newline included). On a shared connection that would fail
//!   every request in flight, so [`AuthClient::start`] refuses such a request itself.
//! - The escape of LF is `\x01n` (the protocol document says `l`); `\x01` followed by any
//!   other byte is that byte.
//! - The socket's *name* sets its type: a name ending in `-login` (`login/login`, or an
//!   `inet_listener director-login`) is a login socket, which answers a successful `proxy`
//!   login with the user's password (`pass=`), as a proxy needs. Other names (`auth-client`)
//!   only authenticate and never send `pass`. On a login socket the client pid (`CPID`) must
//!   not be in use by another live connection.
//! - `FAIL` answers are held back by `auth_failure_delay` (checked every 500 ms, so a failure
//!   takes up to half a second even with `auth_failure_delay = 0`), and a failure from an
//!   address (`rip`) slows that address's later requests (the auth penalty) unless the request
//!   says `no-penalty`.
//! - `nologin` and `proxy` come back as bare flags in `OK` (any value is dropped: `proxy=n`
//!   still means proxy). A connection loss is a temporary failure; so is `FAIL` with `temp` or
//!   `code=temp_fail`.
//! - Without `final-resp-ok` (no 2.3 login process sends it), a mechanism's last server data
//!   (SCRAM's server-final-message) comes as one more `CONT`, answered with an empty `CONT`.
//! - A `CONT` for an id the service does not know is answered `FAIL <id> reason=Authentication
//!   request timed out`; the service drops a request silently after about 150 s.

pub mod client;
#[cfg(test)]
mod client_tests;
pub mod connection;
pub mod error;
pub mod fields;
pub mod handshake;
pub mod master;
#[cfg(test)]
mod master_tests;
pub mod request;
#[cfg(test)]
pub(super) mod test_socket;
pub mod wire;

pub use client::{AuthClient, AuthClientOptions, Challenge, Endpoint, Step};
pub use error::AuthError;
pub use fields::AuthFields;
pub use handshake::{Handshake, MechFlags, Mechanism};
pub use master::{AuthMaster, AuthMasterOptions, Lookup, LookupInfo};
pub use request::{RequestInfo, Transport};
