//! [`AuthMaster`]: passdb and userdb lookups by user name, without a password, over Dovecot's
//! auth-master protocol. Dovecot's LMTP proxy asks the passdb this way whether a recipient is
//! proxied, and where to (`proxy`, `host`, `port`, `destuser`...).
//!
//! ```no_run
//! # async fn demo() -> Result<(), director::auth::dovecot::AuthError> {
//! use director::auth::dovecot::{AuthMaster, AuthMasterOptions, Endpoint, Lookup, LookupInfo};
//!
//! let master = AuthMaster::new(AuthMasterOptions::new(Endpoint::parse("/run/dovecot/auth-master")));
//! match master.pass_lookup("user0001", &LookupInfo::new("lmtp")).await? {
//!     Lookup::Found(fields) => println!("proxy to {:?}:{:?}", fields.host(), fields.port()),
//!     Lookup::NotFound => println!("550 no such user"),
//! }
//! # Ok(()) }
//! ```
//!
//! # The protocol, as Dovecot 2.3 speaks it (`auth-master-connection.c`, `lib-auth/auth-master.c`)
//!
//! - On connect the service sends `VERSION 1 <minor>` and `SPID <pid>` at once, without
//!   waiting. The client's first line must be `VERSION 1 <minor>`; requests may follow in the
//!   same write.
//! - `PASS <id> <user> service=<s> [lip= rip= lport= rport= session= ...]` asks the passdbs.
//!   Answers: `PASS <id> user=<user> [<extra fields>]` (found), `NOTFOUND <id>` (unknown, also a
//!   disabled user or an expired password), `FAIL <id> [reason=<text>]` (an internal failure, or
//!   `reason=Configured passdbs don't support credentials lookups`). Dovecot's LMTP answers 451 to
//!   every `FAIL`. `USER` asks the userdbs the same way; its found answer is
//!   `USER <id> <user> [<fields>]`, the user positional.
//! - Every parameter is tab-escaped as in the auth-client protocol. The service unescapes into a
//!   C string, so a NUL would cut a name short there: a name holding one is answered
//!   [`Lookup::NotFound`] here without asking. (Dovecot's own client answers "not found" to a
//!   name with a TAB, CR or LF; escaped, such a name reaches the passdb whole and cannot add
//!   parameters or requests.)
//! - The service keeps at most 1024 bytes of a line, newline included, and drops a client that
//!   sends a longer one ([`MAX_REQUEST_LINE`]: refused here as [`AuthError::TooLong`]). It also
//!   drops a client that sends an unknown command, or `CPID` (what an auth client sends).
//! - The socket's name sets its type (`auth-master`, anything ending in `-master`; `-userdb` is
//!   a restricted variant), and its permissions are the only access control: an auth-master
//!   socket (unix or TCP) answers every lookup to whoever can connect. An auth-client socket
//!   greets with `MECH` lines instead; that is reported as pointing at the wrong socket.
//!
//! # One connection per lookup
//!
//! Each lookup connects, sends `VERSION` and its request in one write, reads the greeting and
//! the answer, and closes (so its id is always 1). A local connection costs the service next to
//! nothing (no process per connection), nothing needs reconnecting after the service restarts,
//! and a stuck lookup cannot hold up others. Dovecot's own client does the same when it has no
//! long-lived event loop. Bounds: at most [`AuthMasterOptions::max_connections`] lookups at
//! once (the others wait for a slot), each within [`AuthMasterOptions::request_timeout`] from
//! the call (waiting and connecting included), lines from the service kept up to
//! [`MAX_ANSWER_LINE`].

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tracing::debug;

use super::connection::{connect, BoxRead, Endpoint};
use super::error::AuthError;
use super::fields::AuthFields;
use super::request::{optional, param, push_addresses};
use super::wire::{escape_into, parse_fields, parse_u32, unescape, LineReader, ReadLine};
use crate::untrusted::{shown, shown_bytes};

/// The longest request line the service accepts, newline included (its input buffer).
pub const MAX_REQUEST_LINE: usize = 1024;

/// The most bytes of one line from the service that are kept (Dovecot's own client: 8192).
pub const MAX_ANSWER_LINE: usize = 16 * 1024;

/// The protocol version this client announces; the service checks the major only.
const MAJOR_VERSION: u32 = 1;
const MINOR_VERSION: u32 = 0;

/// The id of the one request on each connection.
const REQUEST_ID: u32 = 1;

/// How to reach the service, how long to wait, how many lookups at once.
#[derive(Debug, Clone)]
pub struct AuthMasterOptions {
    /// The auth-master socket (`/run/dovecot/auth-master`) or an `inet_listener` named
    /// `...-master`.
    pub endpoint: Endpoint,
    /// For connecting.
    pub connect_timeout: Duration,
    /// For the whole lookup, from the call: waiting for a slot, connecting, the answer.
    pub request_timeout: Duration,
    /// Lookups under way at once (connections open); at least 1.
    pub max_connections: usize,
}

impl AuthMasterOptions {
    /// 5 s to connect, 30 s per lookup, 16 at once.
    pub fn new(endpoint: Endpoint) -> Self {
        AuthMasterOptions {
            endpoint,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_connections: 16,
        }
    }
}

/// Who asks, as the lookup tells the service (the passdb's `%s`, `%{rip}`...; its log). The
/// fields mean what they mean in [`super::RequestInfo`], whose address rules apply too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupInfo {
    /// The protocol (`lmtp`). Required by the service.
    pub service: String,
    pub session_id: Option<String>,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub real_local: Option<SocketAddr>,
    pub real_remote: Option<SocketAddr>,
}

impl LookupInfo {
    /// A lookup for `service` with nothing else known.
    pub fn new(service: impl Into<String>) -> Self {
        LookupInfo {
            service: service.into(),
            ..LookupInfo::default()
        }
    }
}

/// The service's answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The user exists: `user` (as the database spells it) and the database's fields.
    Found(AuthFields),
    /// No such user (or a disabled one).
    NotFound,
}

/// A client of one auth-master socket; cheap to clone (clones share the connection limit).
#[derive(Clone)]
pub struct AuthMaster {
    inner: Arc<Inner>,
}

struct Inner {
    options: AuthMasterOptions,
    slots: Semaphore,
}

/// Which database a lookup asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pass,
    User,
}

impl Kind {
    /// The command, which the found answer repeats.
    fn command(self) -> &'static str {
        match self {
            Kind::Pass => "PASS",
            Kind::User => "USER",
        }
    }
}

impl AuthMaster {
    /// A client for `options.endpoint`. Nothing connects until a lookup.
    pub fn new(options: AuthMasterOptions) -> Self {
        let slots = Semaphore::new(options.max_connections.max(1));
        AuthMaster {
            inner: Arc::new(Inner { options, slots }),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.options.endpoint
    }

    /// Looks `user` up in the passdbs, as Dovecot's LMTP proxy does for a recipient.
    pub async fn pass_lookup(&self, user: &str, info: &LookupInfo) -> Result<Lookup, AuthError> {
        self.lookup(Kind::Pass, user, info).await
    }

    /// Looks `user` up in the userdbs (`uid`, `home`... and any extra fields).
    pub async fn user_lookup(&self, user: &str, info: &LookupInfo) -> Result<Lookup, AuthError> {
        self.lookup(Kind::User, user, info).await
    }

    async fn lookup(&self, kind: Kind, user: &str, info: &LookupInfo) -> Result<Lookup, AuthError> {
        if user.contains('\0') {
            return Ok(Lookup::NotFound);
        }
        let request = request_line(kind, user, info)?;
        let options = &self.inner.options;
        let result = tokio::time::timeout(options.request_timeout, self.exchange(kind, &request))
            .await
            .unwrap_or_else(|_| {
                Err(AuthError::Timeout {
                    endpoint: options.endpoint.to_string(),
                    timeout: options.request_timeout,
                })
            });
        let outcome = match &result {
            Ok(Lookup::Found(_)) => "found".to_owned(),
            Ok(Lookup::NotFound) => "not found".to_owned(),
            Err(e) => e.to_string(),
        };
        debug!(auth_master = %options.endpoint, lookup = kind.command(), user = %shown(user),
               outcome = %outcome, "auth-master lookup");
        result
    }

    /// Connects, sends the greeting and `request`, and reads the answer.
    async fn exchange(&self, kind: Kind, request: &[u8]) -> Result<Lookup, AuthError> {
        let options = &self.inner.options;
        // Never closed, so acquiring only waits.
        let _slot = self.inner.slots.acquire().await;
        let mut out = format!("VERSION\t{MAJOR_VERSION}\t{MINOR_VERSION}\n").into_bytes();
        out.extend_from_slice(request);
        let exchange = async {
            let connecting =
                tokio::time::timeout(options.connect_timeout, connect(&options.endpoint));
            let (reader, mut writer) = match connecting.await {
                Ok(Ok(halves)) => halves,
                Ok(Err(e)) => return Err(Broken::Connect(e.to_string())),
                Err(_) => {
                    let waited = options.connect_timeout;
                    return Err(Broken::Connect(format!("not connected within {waited:?}")));
                }
            };
            writer
                .write_all(&out)
                .await
                .map_err(|e| Broken::Lost(format!("write failed: {e}")))?;
            read_answer(kind, reader).await
        };
        exchange
            .await
            .map_err(|broken| broken.into_error(options.endpoint.to_string()))
    }
}

impl fmt::Debug for AuthMaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthMaster")
            .field("endpoint", &self.inner.options.endpoint)
            .finish_non_exhaustive()
    }
}

/// `PASS<TAB>1<TAB>user<TAB>service=...`, newline included, or `TooLong`.
fn request_line(kind: Kind, user: &str, info: &LookupInfo) -> Result<Vec<u8>, AuthError> {
    let mut line = format!("{}\t{REQUEST_ID}\t", kind.command()).into_bytes();
    escape_into(&mut line, user.as_bytes());
    param(&mut line, "service", &info.service);
    optional(&mut line, "session", &info.session_id);
    push_addresses(
        &mut line,
        [info.local, info.remote],
        [info.real_local, info.real_remote],
    );
    line.push(b'\n');
    if line.len() > MAX_REQUEST_LINE {
        return Err(AuthError::TooLong {
            len: line.len(),
            max: MAX_REQUEST_LINE,
        });
    }
    Ok(line)
}

/// Why a lookup got no usable answer, before the endpoint is named.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Broken {
    Connect(String),
    Lost(String),
    Version { major: u32, minor: u32 },
    Protocol(String),
    Failed(Option<String>),
}

impl Broken {
    fn into_error(self, endpoint: String) -> AuthError {
        match self {
            Broken::Connect(reason) => AuthError::Connect { endpoint, reason },
            Broken::Lost(reason) => AuthError::ConnectionLost { endpoint, reason },
            Broken::Version { major, minor } => AuthError::Version {
                endpoint,
                major,
                minor,
            },
            Broken::Protocol(detail) => AuthError::Protocol { endpoint, detail },
            Broken::Failed(reason) => AuthError::LookupFailed { endpoint, reason },
        }
    }
}

async fn read_answer(kind: Kind, reader: BoxRead) -> Result<Lookup, Broken> {
    let mut reader = LineReader::new(reader, MAX_ANSWER_LINE);
    let mut greeted = false;
    loop {
        let line = match reader.next().await {
            Ok(Some(ReadLine::Line(line))) => line,
            Ok(Some(ReadLine::Overlong { head, len })) => {
                return Err(Broken::Protocol(format!(
                    "{} line of {len} bytes, over the {MAX_ANSWER_LINE} kept",
                    shown_bytes(command_of(&head))
                )))
            }
            Ok(None) if greeted => return Err(Broken::Lost("closed without answering".into())),
            Ok(None) => {
                return Err(Broken::Lost(
                    "closed without a greeting (not an auth-master socket?)".into(),
                ))
            }
            Err(e) => return Err(Broken::Lost(format!("read failed: {e}"))),
        };
        if let Some(lookup) = heard(kind, &mut greeted, &line)? {
            return Ok(lookup);
        }
    }
}

/// Takes one line from the service: `Some` once it is the answer.
fn heard(kind: Kind, greeted: &mut bool, line: &[u8]) -> Result<Option<Lookup>, Broken> {
    let mut args = line.split(|&b| b == b'\t');
    let command = args.next().unwrap_or_default();
    if !*greeted {
        if command != b"VERSION" {
            return Err(Broken::Protocol(format!(
                "the service began with {}, not VERSION",
                shown_bytes(command)
            )));
        }
        let major = args.next().and_then(parse_u32);
        let minor = args.next().and_then(parse_u32);
        let (Some(major), Some(minor)) = (major, minor) else {
            return Err(Broken::Protocol(format!(
                "broken VERSION line: {}",
                shown_bytes(line)
            )));
        };
        if major != MAJOR_VERSION {
            return Err(Broken::Version { major, minor });
        }
        *greeted = true;
        return Ok(None);
    }
    match command {
        b"SPID" => return Ok(None),
        b"MECH" | b"CUID" | b"COOKIE" | b"DONE" => {
            return Err(Broken::Protocol(
                "this is an auth-client socket (it lists mechanisms), not an auth-master one"
                    .into(),
            ))
        }
        b"PASS" | b"USER" | b"NOTFOUND" | b"FAIL" => {}
        // The rest of the line may hold a password: only the command is shown.
        other => {
            return Err(Broken::Protocol(format!(
                "unexpected {} line",
                shown_bytes(other)
            )))
        }
    }
    let id = args.next().and_then(parse_u32).ok_or_else(|| {
        Broken::Protocol(format!(
            "{} answer without a request id",
            shown_bytes(command)
        ))
    })?;
    if id != REQUEST_ID {
        return Err(Broken::Protocol(format!(
            "{} answer for request {id}, not ours ({REQUEST_ID})",
            shown_bytes(command)
        )));
    }
    match command {
        b"NOTFOUND" => Ok(Some(Lookup::NotFound)),
        b"FAIL" => {
            let fields = AuthFields::new(parse_fields(args));
            let reason = fields.bytes("reason").map(|r| shown_bytes(r).to_string());
            Err(Broken::Failed(reason))
        }
        found if found == kind.command().as_bytes() => {
            let mut fields = Vec::new();
            if kind == Kind::User {
                let user = unescape(args.next().unwrap_or_default());
                if user.is_empty() {
                    return Err(Broken::Protocol("USER answer without a user".into()));
                }
                fields.push(("user".to_owned(), Some(user)));
            }
            fields.extend(parse_fields(args));
            Ok(Some(Lookup::Found(AuthFields::new(fields))))
        }
        other => Err(Broken::Protocol(format!(
            "{} answer to a {} lookup",
            shown_bytes(other),
            kind.command()
        ))),
    }
}

/// The first TAB-separated word of a line.
fn command_of(line: &[u8]) -> &[u8] {
    line.split(|&b| b == b'\t').next().unwrap_or_default()
}
