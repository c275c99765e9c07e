//! `director`: the front door of a pool of IMAP, POP3, LMTP and ManageSieve backends that
//! share one mailbox store. Every user is sent to one backend and kept there.
//!
//! # Layout
//!
//! The folders follow one session, then the concerns around it. A module imports only from
//! modules of its own stage or earlier ones; `config` is a leaf that the runtime reads.
//!
//! 1. `net`: `net::listener` accepts connections (optional PROXY header, implicit TLS from
//!    `net::tls`); `net::admission` decides who may take a slot (a pool per listener, a cap
//!    per client address, the oldest pre-login connection dropped to make room) and
//!    `net::refusals` reports refusals at most once per interval. `net::stream` wraps plain
//!    and TLS sockets in one type; `config::network` parses address networks, `net::resolve`
//!    backend names.
//! 2. `protocol`: the pre-authentication dialogue. `protocol::preauth` is the one session
//!    core (buffer, limits, timeouts, STARTTLS, goodbyes, the SASL exchange, the login call);
//!    `protocol::imap`, `protocol::pop3` and `protocol::sieve` (ManageSieve) supply only their
//!    grammar and replies. It ends in a [`protocol::decision::Decision`]: who the user is,
//!    their credentials and the client's identity. `protocol::sasl` decodes SASL responses,
//!    `protocol::proxy_protocol` the HAProxy header.
//! 3. `login` turns a decision into a logged-in backend connection: `routing` picks the
//!    backend (`routing::sticky` record first, then `routing::ring`, keyed by
//!    `routing::user_hash`) and each protocol's `backend_login` speaks to it over
//!    `protocol::backend_dialogue` (reading replies, deadlines, STARTTLS).
//! 4. `net::relay` copies bytes both ways until a side closes or the session is kicked.
//! 5. `protocol::lmtp` is mail delivery (RFC 2033): each recipient routed like a login, the
//!    message streamed to every recipient's backend, one reply per recipient.
//!
//! Around the session:
//!
//! - `state`: the one trait for shared state (`state::backend`, weights, sticky records) and
//!   its in-memory implementation `state::local`; `state::file` keeps what admins changed
//!   across restarts; `state::sessions` knows every live session by user and backend;
//!   `state::moves` changes a user's backend safely (sessions ended first).
//! - `health`: `health::checker` keeps one verdict per backend (rise/fall; a login that finds
//!   its backend unresponsive before sending credentials only brings the next check
//!   forward); `health::probe` runs the checks of `checks/*.yaml`.
//! - `admin`: the admin API (HTTP+JSON on a unix socket, optionally TCP) behind the CLI's
//!   verbs (`admin::client`).
//! - `metrics`: the one catalogue of Prometheus metrics (name, help, labels), depending on no
//!   runtime module; `metrics::scrape` sets the gauges that mirror state at scrape time and
//!   `metrics::server` serves `/metrics`, `/healthz` and `/readyz`.
//! - `config` (YAML parsed only in `config::yaml`) is plain settings; `server` starts it all
//!   (`server::prepare` makes ready what a configuration needs from outside: names, files,
//!   sockets), `server::reload` swaps a new configuration in without dropping a session and
//!   `server::shutdown` is the graceful stop.
//! - `auth`: a client of Dovecot's auth service (authentication at the director).
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
