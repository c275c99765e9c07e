//! `director`: the front door of a pool of IMAP, POP3, LMTP and ManageSieve backends that
//! share one mailbox store. Every user is sent to one backend and kept there.
//!
//! # Layout
//!
//! The folders are layers, listed from the bottom up: a folder imports only from the folders
//! before it in this list, so each can be read knowing only what comes before it, and no
//! import goes round in a circle.
//!
//! 1. `config` (YAML parsed only in `config::yaml`) is plain settings and imports nothing of
//!    the crate; its values (`config::Protocol`, `config::network` address networks) are
//!    what every layer passes around. `untrusted` shows client-chosen text in log lines
//!    (truncated, escaped) and is a leaf too, as are `addr_text` (an address as text, written on the stack),
//!    `flagged_wait` (a wait for an event that raises a flag, cheap to poll again),
//!    `log_line`, the text form of a log line, and `log_sink`, which writes log lines out in
//!    batches.
//! 2. `metrics`: the one catalogue of Prometheus metrics (name, help, labels), depending on no
//!    runtime module, so every layer above counts its events there.
//! 3. `routing`: the stateless arithmetic of where users go, compatible with Dovecot's
//!    director: `routing::user_hash`, the consistent-hash `routing::ring` and the
//!    `routing::sticky` records that keep a user where it is.
//! 4. `state`: the one trait for shared state (`state::backend`, weights, rings, sticky
//!    records) and its in-memory implementation `state::local`; `state::file` keeps what
//!    admins changed across restarts; `state::sessions` knows every live session by user and
//!    backend; `state::moves` changes a user's backend safely (sessions ended first);
//!    `state::router` picks a user's backend over the state (a live sticky record first, then
//!    the ring of the user's tag).
//! 5. `net`: sockets and bytes below any protocol. `net::admission` decides who may take a
//!    slot (a pool per listener, a cap per client address, the oldest pre-login connection
//!    dropped to make room) and `net::refusals` reports refusals at most once per interval;
//!    `net::stream` wraps plain and TLS sockets in one type (`net::tls`); `net::relay`
//!    copies bytes both ways until a side closes or the session is kicked;
//!    `net::shutdown` is the graceful stop every connection watches; `net::resolve` resolves
//!    backend names.
//! 6. `protocol`: the mail protocols. `protocol::preauth` is the one pre-authentication
//!    session core (buffer, limits, timeouts, STARTTLS, goodbyes, the SASL exchange, the
//!    login call); `protocol::imap`, `protocol::pop3` and `protocol::sieve` (ManageSieve)
//!    supply only their grammar and replies. It ends in a [`protocol::decision::Decision`]:
//!    who the user is, their credentials and the client's identity. Each protocol's
//!    `backend_login` speaks to a backend over `protocol::backend_dialogue` (reading replies,
//!    deadlines, STARTTLS). `protocol::lmtp` is mail delivery (RFC 2033): each recipient
//!    routed like a login, the message streamed to every recipient's backend, one reply per
//!    recipient. `protocol::sasl` decodes SASL responses, `protocol::proxy_protocol` the
//!    HAProxy header.
//! 7. `health`: `health::checker` keeps one verdict per backend (rise/fall; a login that finds
//!    its backend unresponsive before sending credentials only brings the next check
//!    forward); `health::probe` runs the checks of `checks/*.yaml`, speaking the protocols.
//! 8. `auth`: a client of Dovecot's auth service (authentication at the director, and LMTP
//!    recipients looked up over its auth-master socket: `auth::lookups`).
//! 9. `login` turns a decision into a logged-in backend connection: the router picks the
//!    backend, the protocol's `backend_login` logs in, the health checker hears of a backend
//!    that does not answer.
//! 10. `admin`: the admin API (HTTP+JSON on a unix socket, optionally TCP) behind the CLI's
//!     verbs (`admin::client`).
//! 11. `server` composes it all: `server::listener` accepts connections (optional PROXY
//!     header, implicit TLS) and takes each through admission, its protocol's front end,
//!     login and the relay; `server::metrics_server` serves `/metrics`, `/healthz` and
//!     `/readyz`, with `server::scrape` setting the gauges that mirror state at scrape time;
//!     `server::prepare` makes ready what a configuration needs from outside (names, files,
//!     sockets) and `server::reload` swaps a new configuration in without dropping a session.
//!
//! A session crosses the layers from the top down: `server::listener` accepts it,
//! `net::admission` gives it a slot, its protocol's front end speaks until the decision,
//! `login` routes it (`state::router`) and logs in, and `net::relay` carries its bytes until
//! it ends.
//!
//! `fuzz_targets` drives every pre-login parser for the fuzzers in `fuzz/` and for
//! `tests/fuzz_corpus.rs`.

pub mod addr_text;
pub mod admin;
pub mod auth;
pub mod config;
pub mod flagged_wait;
/// Property checks of the pre-login parsers, shared by the cargo-fuzz crate in `fuzz/` and
/// the corpus replay test `tests/fuzz_corpus.rs`; not an API.
#[doc(hidden)]
pub mod fuzz_targets;
pub mod health;
pub mod log_line;
pub mod log_sink;
pub mod login;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod routing;
pub mod server;
pub mod state;
pub mod untrusted;
