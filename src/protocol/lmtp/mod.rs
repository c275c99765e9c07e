//! LMTP (RFC 2033) through the director: the MTA delivers here, and each recipient's mail goes
//! to the backend its user is routed to (sticky record, else the ring), the same backend as the
//! user's IMAP sessions.
//!
//! - `command`: the grammar (command lines, the end of DATA, backend replies, recipient →
//!   username). No I/O.
//! - `backend_conn`: one connection to a backend's LMTP service (greeting, loop check, LHLO,
//!   XCLIENT).
//! - `lookup`: where each recipient goes ([`RecipientLookup`]): the ring, or (`auth.mode:
//!   dovecot`) the user database, which may also say the user does not exist.
//! - `session`: one client connection, its transactions, and the rule that keeps mail safe:
//!   a recipient gets 250 only after its backend said 250; whatever goes wrong on our side or
//!   a backend's gives a 4xx, so the MTA keeps the message and retries.
//!
//! One backend connection per backend per transaction; it is closed (QUIT) when the
//! transaction ends (after DATA's replies, RSET, a new LHLO, or the client leaving), so no
//! backend connection is ever reused with stale state.

pub mod backend_conn;
pub mod command;
pub mod lookup;
#[cfg(test)]
mod lookup_tests;
pub mod session;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

pub use command::RecipientUsername;
pub use lookup::{RecipientLookup, RecipientRoute};

use crate::config::{LmtpConfig, RecipientUsernameName};
use crate::net::stream::ClientStream;
use crate::net::tls::BackendTlsContext;
use crate::protocol::decision::ClientIdentity;
use crate::state::router::Router;

/// Settings of the LMTP service (one per listener, or shared).
#[derive(Debug, Clone)]
pub struct LmtpSettings {
    /// Our name in the greeting (`220 <hostname> Director LMTP ready`) and in LHLO replies,
    /// and what we send as LHLO to backends. A backend greeting us with our own greeting is
    /// this director (a loop) and is refused.
    pub hostname: String,
    /// Which part of a recipient address is the username routing hashes. Use `LocalPart`
    /// when IMAP logins are bare names and `username_hash` keeps the domain (`%Lu`), so that
    /// deliveries and logins land on the same backend.
    pub recipient_username: RecipientUsername,
    /// The `+detail` separator removed from the local part (`user+box@x` → `user@x`); `None`:
    /// keep the local part whole. The backend still receives the address unchanged.
    pub recipient_delimiter: Option<char>,
    /// Largest message accepted, in bytes as sent (dot-stuffing included); advertised as
    /// `SIZE n`. `None`: no limit (`SIZE` without a number).
    pub max_message_size: Option<u64>,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line, CRLF included (RFC 5321 asks for at least 512).
    pub max_line_length: usize,
    /// Syntax errors and unknown commands tolerated before `421` and closing.
    pub max_bad_commands: u32,
    /// How long the client may stay silent (between commands and inside DATA) before `421`.
    pub client_timeout: Duration,
    /// How long a backend may take for its replies after the message's final dot (it is
    /// delivering). Other backend replies use the backend's `login_timeout`, connecting its
    /// `connect_timeout`.
    pub backend_data_timeout: Duration,
    /// How long a recipient waits while its user is being moved before it gets a 4xx.
    pub move_wait: Duration,
    /// TLS connectors for backends whose `tls` is `starttls` or `implicit` (the same as the
    /// other protocols use).
    pub backend_tls: Arc<BackendTlsContext>,
}

impl Default for LmtpSettings {
    fn default() -> Self {
        LmtpSettings {
            hostname: system_hostname(),
            recipient_username: RecipientUsername::WholeAddress,
            recipient_delimiter: Some('+'),
            max_message_size: None,
            max_recipients: 500,
            max_line_length: 4096,
            max_bad_commands: 20,
            // RFC 5321 section 4.5.3.2.7: the server waits at least 5 minutes for commands.
            client_timeout: Duration::from_secs(300),
            // RFC 5321 section 4.5.3.2.6: 10 minutes for the reply to the final dot.
            backend_data_timeout: Duration::from_secs(600),
            move_wait: Duration::from_secs(15),
            backend_tls: Arc::default(),
        }
    }
}

impl LmtpSettings {
    /// The settings the `lmtp` section gives, with the backends' TLS connectors.
    pub fn from_config(c: &LmtpConfig, backend_tls: Arc<BackendTlsContext>) -> Self {
        let d = LmtpSettings::default();
        LmtpSettings {
            hostname: c.hostname.clone().unwrap_or(d.hostname),
            recipient_username: match c.recipient_username {
                RecipientUsernameName::WholeAddress => RecipientUsername::WholeAddress,
                RecipientUsernameName::LocalPart => RecipientUsername::LocalPart,
            },
            recipient_delimiter: c.recipient_delimiter.chars().next(),
            max_message_size: c.max_message_size,
            max_recipients: c.max_recipients,
            client_timeout: c.client_timeout.into(),
            backend_data_timeout: c.backend_data_timeout.into(),
            backend_tls,
            ..d
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), or `localhost`.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Serves one LMTP client connection until it quits, times out or goes away. `identity` is
/// forwarded to backends with XCLIENT (or a PROXY v2 header, per backend `forward`); a
/// unix-socket client may give `0.0.0.0:0` as its address, and no address is forwarded then.
/// Errors are the client connection's I/O errors; every backend problem is answered in the
/// protocol.
pub async fn serve_connection(
    client: ClientStream,
    identity: ClientIdentity,
    router: Router,
    settings: Arc<LmtpSettings>,
    metrics: crate::metrics::Metrics,
) -> io::Result<()> {
    let lookup = router.clone();
    serve_connection_until(
        client,
        identity,
        router,
        lookup,
        settings,
        metrics,
        crate::net::shutdown::Shutdown::default(),
    )
    .await
}

/// [`serve_connection`] with `lookup` saying where each recipient goes, that also watches
/// the director's stop: between transactions the client gets `421` at once, a transaction
/// under way may finish within the grace. `router` keeps the users' records while their mail
/// is delivered.
pub async fn serve_connection_until<L: RecipientLookup>(
    client: ClientStream,
    identity: ClientIdentity,
    router: Router,
    lookup: L,
    settings: Arc<LmtpSettings>,
    metrics: crate::metrics::Metrics,
    shutdown: crate::net::shutdown::Shutdown,
) -> io::Result<()> {
    session::Session::new(
        client, identity, router, lookup, settings, metrics, shutdown,
    )
    .run()
    .await
}

/// Turns a client away (e.g. not in a TCP listener's `allow_from`): a `554` greeting, as RFC
/// 5321 section 3.1 allows, then close. The caller logs why.
pub async fn refuse_connection(
    mut client: ClientStream,
    settings: &LmtpSettings,
) -> io::Result<()> {
    let line = format!(
        "554 5.7.1 {} Access denied: this client may not deliver here\r\n",
        settings.hostname
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        client.write_all(line.as_bytes()).await?;
        client.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}
