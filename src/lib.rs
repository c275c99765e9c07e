//! `director`: the front door of a pool of IMAP, POP3, LMTP and ManageSieve backends that
//! share one mailbox store. Every user is sent to one backend and kept there.
//!
//! # Layout
//!
//! The flow of one session, and the file that holds each step:
//!
//! - `listener` accepts connections (optional PROXY header: `proxy_protocol`, implicit TLS:
//!   `tls`) and hands each one to its protocol's front end. `admission` decides first who may
//!   take a slot (a pool per listener, a cap per client address, the oldest connection before
//!   login dropped to make room); `refusals` names why a connection was turned away and
//!   reports refusals in the log at most once per interval.
//! - `imap::frontend`, `pop3::frontend`, `sieve::frontend` (ManageSieve): the
//!   pre-authentication dialogue (grammar in `imap::command`, `pop3::command`,
//!   `sieve::command`; SASL decoding in `sasl`). It ends in a [`decision::Decision`]:
//!   who the user is, their credentials and the client's identity.
//! - `login` turns a decision into a logged-in backend connection: `routing` picks the backend
//!   (`sticky` record first, then the `ring`, keyed by `user_hash`), `backend` knows where it
//!   listens, and `imap::backend_login` / `pop3::backend_login` / `sieve::backend_login` speak
//!   the protocol to it.
//! - `relay` copies bytes both ways until a side closes or the session is kicked; `sessions`
//!   knows every live session by user and backend.
//! - `state` is the one trait for shared state (backends, weights, sticky records);
//!   `local_state` is its in-memory implementation.
//! - `checker` is the health checker (rise/fall per backend; a login that finds its backend
//!   unresponsive before sending the user's credentials makes it suspect, which only brings
//!   the next check forward; users moved off a backend that goes down); `probe` runs the
//!   checks of `checks/*.yaml`.
//! - `moves` changes a user's backend safely (sessions ended first). `admin` is the admin API
//!   (HTTP+JSON on a unix socket, optionally TCP) behind the CLI's verbs (`admin_client`);
//!   `state_file` keeps what admins changed across restarts.
//! - `config` (YAML, parsed only in `yaml`) and `resolve` (DNS names of backends) build it all
//!   at start; `stream` wraps plain and TLS sockets in one type.
//! - `reload` re-reads the configuration (SIGHUP, `director reload`): everything prepared
//!   first, then swapped in without dropping a session; `shutdown` is the graceful stop
//!   (SIGTERM): the phases every connection watches.
//! - `lmtp`: mail delivery (RFC 2033): each recipient routed like a login, the message
//!   streamed to every recipient's backend, one reply per recipient (`lmtp::session`).
//! - `metrics` is the one catalogue of Prometheus metrics (name, help, labels);
//!   `metrics_server` serves `/metrics`, `/healthz` and `/readyz` on their own listener.
//! - `untrusted` shows client-chosen text in log lines (truncated, escaped);
//!   `fuzz_targets` drives every pre-login parser for the fuzzers in `fuzz/` and for
//!   `tests/fuzz_corpus.rs`.

pub mod admin;
pub mod auth;
pub mod config;
/// Property checks of the pre-login parsers, shared by the cargo-fuzz crate in `fuzz/` and
/// the corpus replay test `tests/fuzz_corpus.rs`; not an API.
#[doc(hidden)]
pub mod fuzz_targets;
pub mod health;
pub mod login;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod routing;
pub mod server;
pub mod state;
pub mod untrusted;
