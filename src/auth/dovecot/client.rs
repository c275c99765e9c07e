//! [`AuthClient`]: authentications against a Dovecot auth service, one SASL step at a time.
//!
//! ```no_run
//! # async fn demo() -> Result<(), director::auth::dovecot::AuthError> {
//! use director::auth::dovecot::{AuthClient, AuthClientOptions, Endpoint, RequestInfo, Step};
//!
//! let auth = AuthClient::new(AuthClientOptions::new(Endpoint::parse("/run/dovecot/auth-client")));
//! let info = RequestInfo::new("imap");
//! match auth.start("PLAIN", Some(b"\0user0001\0secret"), &info).await? {
//!     Step::Ok(fields) => println!("welcome {:?}", fields.user()),
//!     Step::Fail(fields) => println!("refused, temporary: {}", fields.temp()),
//!     Step::Continue(challenge) => {
//!         // Relay challenge.data() to the client, then its answer:
//!         let _next = challenge.respond(b"client's response").await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! All requests share one connection. It is opened on first use and again on the first use
//! after it was lost; while the service cannot be reached, callers waiting together share
//! one connection attempt and its error.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use super::connection::Endpoint;
use super::connection::{Connection, Reply};
use super::error::AuthError;
use super::fields::AuthFields;
use super::handshake::Handshake;
use super::request::RequestInfo;
use crate::untrusted::shown;

/// How to reach the service and how long to wait for it.
#[derive(Debug, Clone)]
pub struct AuthClientOptions {
    pub endpoint: Endpoint,
    /// For connecting and reading the handshake.
    pub connect_timeout: Duration,
    /// For each answer. Keep it above the service's `auth_failure_delay` (2 s by default),
    /// by which it holds back every `FAIL`.
    pub request_timeout: Duration,
    /// The pid announced in `CPID`. On a login socket (a name ending in `-login`) Dovecot
    /// refuses a second live connection with the same pid.
    pub client_pid: u32,
}

impl AuthClientOptions {
    /// 5 s to connect, 30 s per answer, this process's pid.
    pub fn new(endpoint: Endpoint) -> Self {
        AuthClientOptions {
            endpoint,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            client_pid: std::process::id(),
        }
    }
}

/// A client of one auth service; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct AuthClient {
    inner: Arc<Inner>,
}

struct Inner {
    options: AuthClientOptions,
    /// The connection while it lives.
    current: Mutex<Option<Arc<Connection>>>,
    /// Held while connecting (cold path only): the last failed attempt, for the callers
    /// that waited on it and for the back-off.
    connecting: tokio::sync::Mutex<Option<Failure>>,
    /// Connection attempts finished so far.
    attempts: AtomicU64,
}

/// A failed connection attempt.
struct Failure {
    /// Its number (see `Inner::attempts`).
    attempt: u64,
    error: AuthError,
    /// No new attempt before this: callers get `error` at once meanwhile, so a service that
    /// is down costs each login nothing and gets no storm of connection attempts.
    retry_at: Instant,
    /// The pause after this failure; doubled (up to [`MAX_BACKOFF`]) by the next one.
    backoff: Duration,
}

/// The first pause after a failed connection attempt, and the longest.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The service's answer to one SASL step.
#[derive(Debug)]
pub enum Step {
    /// It wants more from the client.
    Continue(Challenge),
    /// The client is authenticated.
    Ok(AuthFields),
    /// It is not (see [`AuthFields::temp`] for a temporary failure, and `reason`).
    Fail(AuthFields),
}

/// A challenge to relay to the client; [`Challenge::respond`] sends the client's answer.
/// Dropping it gives the authentication up (the service is told, `CANCEL`).
pub struct Challenge {
    data: Vec<u8>,
    request: Request,
}

/// A request in flight on a connection; dropping it before the end gives it up.
struct Request {
    conn: Arc<Connection>,
    id: u32,
    timeout: Duration,
    finished: bool,
}

impl AuthClient {
    /// A client for `options.endpoint`. Nothing connects until the first use.
    pub fn new(options: AuthClientOptions) -> Self {
        AuthClient {
            inner: Arc::new(Inner {
                options,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(None),
                attempts: AtomicU64::new(0),
            }),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.options.endpoint
    }

    /// The service's handshake (its mechanisms), connecting first if needed.
    pub async fn handshake(&self) -> Result<Arc<Handshake>, AuthError> {
        Ok(Arc::clone(self.connection().await?.handshake()))
    }

    /// Whether a connection to the service is open now.
    pub fn is_connected(&self) -> bool {
        self.live().is_some()
    }

    /// How many requests are in flight on the current connection (0 when there is none).
    pub fn in_flight(&self) -> usize {
        self.live().map_or(0, |c| c.in_flight())
    }

    /// Starts an authentication with `mechanism` (any case; refused here, before anything is
    /// sent, unless the service offers it and not as private) and the client's initial
    /// response if it gave one (`Some(b"")` is an empty one).
    pub async fn start(
        &self,
        mechanism: &str,
        initial_response: Option<&[u8]>,
        info: &RequestInfo,
    ) -> Result<Step, AuthError> {
        let conn = self.connection().await?;
        let mech = conn
            .handshake()
            .mechanism(mechanism)
            .filter(|m| !m.flags.private)
            .ok_or_else(|| AuthError::UnsupportedMechanism(shown(mechanism).to_string()))?;
        let tail = info.auth_line_tail(&mech.name, initial_response);
        let (id, answer) = conn.begin(&tail)?;
        Request {
            conn,
            id,
            timeout: self.inner.options.request_timeout,
            finished: false,
        }
        .wait(answer)
        .await
    }

    /// The live connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>, AuthError> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let seen = self.inner.attempts.load(Ordering::Acquire);
        let mut last_failure = self.inner.connecting.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        if let Some(failure) = &*last_failure {
            if failure.attempt > seen || Instant::now() < failure.retry_at {
                return Err(failure.error.clone());
            }
        }
        let options = &self.inner.options;
        let result = Connection::open(
            &options.endpoint,
            options.client_pid,
            options.connect_timeout,
        )
        .await;
        let attempt = self.inner.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        match result {
            Ok(conn) => {
                let conn = Arc::new(conn);
                tracing::info!(auth = %options.endpoint, mechanisms = conn.handshake().mechanisms.len(),
                               server_pid = conn.handshake().server_pid, "connected to the auth service");
                *self.lock_current() = Some(Arc::clone(&conn));
                *last_failure = None;
                Ok(conn)
            }
            Err(error) => {
                let backoff = last_failure
                    .as_ref()
                    .map_or(MIN_BACKOFF, |f| (f.backoff * 2).min(MAX_BACKOFF));
                *last_failure = Some(Failure {
                    attempt,
                    error: error.clone(),
                    retry_at: Instant::now() + backoff,
                    backoff,
                });
                Err(error)
            }
        }
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.lock_current()
            .as_ref()
            .filter(|c| !c.is_closed())
            .cloned()
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Connection>>> {
        self.inner.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthClient")
            .field("endpoint", &self.inner.options.endpoint)
            .finish_non_exhaustive()
    }
}

impl Challenge {
    /// The challenge, decoded (an empty one asks the client to start).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The request's id on the connection (for logs).
    pub fn id(&self) -> u32 {
        self.request.id
    }

    /// Sends the client's response and waits for the next step.
    pub async fn respond(self, response: &[u8]) -> Result<Step, AuthError> {
        let request = self.request;
        let answer = request.conn.respond(request.id, response)?;
        request.wait(answer).await
    }
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenge")
            .field("id", &self.request.id)
            .field("data", &crate::untrusted::shown_bytes(&self.data))
            .finish()
    }
}

impl Request {
    async fn wait(
        mut self,
        answer: oneshot::Receiver<Result<Reply, AuthError>>,
    ) -> Result<Step, AuthError> {
        let reply = match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => {
                return Err(AuthError::Timeout {
                    endpoint: self.endpoint(),
                    timeout: self.timeout,
                })
            }
            // The connection dropped the request without a word: only when it ended.
            Ok(Err(_)) => {
                return Err(AuthError::ConnectionLost {
                    endpoint: self.endpoint(),
                    reason: "request dropped".into(),
                })
            }
            Ok(Ok(reply)) => reply,
        };
        match reply {
            Ok(Reply::Cont(data)) => Ok(Step::Continue(Challenge {
                data,
                request: self,
            })),
            Ok(Reply::Ok(fields)) => {
                self.finished = true;
                Ok(Step::Ok(fields))
            }
            Ok(Reply::Fail(fields)) => {
                self.finished = true;
                Ok(Step::Fail(fields))
            }
            Err(error) => {
                self.finished = true;
                Err(error)
            }
        }
    }

    fn endpoint(&self) -> String {
        self.conn.endpoint()
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.abandon(self.id);
        }
    }
}
