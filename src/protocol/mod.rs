//! The mail protocols: each front end (`imap`, `pop3`, `sieve` for ManageSieve) speaks its
//! grammar on the common pre-authentication core (`preauth`) until it reaches a
//! [`decision::Decision`]; `literal` frames the literals IMAP and ManageSieve share. Each
//! backend login speaks the protocol to a backend (`backend_login` holds what they are given
//! and return, `backend_dialogue` the connection they talk over and the steps they share).
//! `lmtp` is mail delivery. `sasl` decodes SASL responses, `proxy_protocol` the HAProxy PROXY
//! header.

pub mod backend_dialogue;
pub mod backend_login;
pub mod decision;
#[cfg(test)]
mod fake_backend;
pub mod imap;
pub mod literal;
pub mod lmtp;
pub mod pop3;
pub mod preauth;
pub mod proxy_protocol;
pub mod sasl;
pub mod sieve;
