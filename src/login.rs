//! Backend login: the one place a front end's [`Decision`] becomes a logged-in backend
//! connection. Route the user, connect (PROXY header, implicit TLS), run the protocol's login
//! dialogue with the user's own credentials (the director checks no password: the backend
//! does), register the session.
//!
//! Nothing a client sends may change what happens to other users, so a login keeps apart what
//! happens before the backend has seen the user's credentials and after:
//! - Before (connect refused or timed out, no greeting within `greeting_timeout`, a bad
//!   greeting, TLS failing): the backend knows nothing of the user. The next backend in ring
//!   order is tried if the user has no session anywhere (the record follows), and the health
//!   checker checks the backend at once; its check decides.
//! - After: the backend's answer is final (a refusal, a temporary failure). A closed
//!   connection or a timeout is the backend's view of these credentials as far as the client
//!   can tell, so it never counts against the backend: the checker checks the backend at once,
//!   and only if that check (not the client) takes the backend down does the login go on to
//!   the user's new backend (a crash in the middle of a login costs the client nothing);
//!   otherwise the client gets a temporary failure and the credentials go nowhere else.
//! - A login is called off whenever its user is moved or kicked or its backend stops serving
//!   (the checker took it down): it routes again and goes to the user's new backend at once.
//!
//! With an auth service (`auth.mode: dovecot`), the service has checked the client before any
//! of this: the login goes on with the credentials and the route it gave (a [`Verified`]):
//! its name for the user is what is routed, a `host` pins the user outside the ring, a
//! `director_tag` picks the pool, and `port`, TLS and `proxy_timeout` apply to this login.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::auth::service::{AuthService, Exchange};
use crate::config::{BackendSettings, BackendTls};
use crate::health::checker::HealthChecker;
use crate::health::probe::CheckCode;
use crate::metrics::{BackendLoginOutcome, LoginResult, Metrics};
use crate::net::stream::BackendStream;
use crate::net::tls::BackendTlsContext;
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward, StartTls,
};
use crate::protocol::decision::{Decision, Protocol, Verified};
use crate::protocol::preauth::{
    Authenticator, BackendLink, LoginFailure, Mechanisms, SaslClient, SaslStep,
};
use crate::state::backend::Backend;
use crate::state::router::{Route, RouteReason, Router};
use crate::state::sessions::{EndHook, SessionGuard, Sessions};

/// What clients are told when no backend can take them.
pub const UNAVAILABLE_TEXT: &str = "Account is temporarily unavailable.";

/// The [`Authenticator`] that front ends call.
#[derive(Clone)]
pub struct Login {
    pub router: Router,
    pub sessions: Sessions,
    pub tls: Arc<BackendTlsContext>,
    /// Told when a backend cannot be used for a login (passive health); `None`: no checker.
    pub health: Option<HealthChecker>,
    /// Counts logins (by result, per protocol and per backend) and their latency.
    pub metrics: Metrics,
    /// Dovecot's `auth_master_user_separator`: a login `user*master` is routed, registered
    /// and logged as `user`. `None`: logins are taken whole.
    pub master_user_separator: Option<char>,
    /// The settings of a backend that an auth service names (`host`) and the configuration
    /// does not: `backend_defaults`.
    pub default_settings: Arc<BackendSettings>,
    /// Turns for logins per backend (`max_logins_in_flight`), shared by every listener.
    pub gates: LoginGates,
}

/// Per backend, how many logins may be under way at once: a semaphore per backend address
/// and limit (a reload that changes the limit starts a new one). Shared by every listener's
/// [`Login`].
#[derive(Clone, Default)]
pub struct LoginGates(Arc<Mutex<GateMap>>);

/// A login gate per (backend address, `max_logins_in_flight`).
type GateMap = HashMap<(std::net::IpAddr, u32), Arc<Gate>>;

/// One backend's turns, and how many logins wait for one now.
struct Gate {
    turns: Arc<Semaphore>,
    limit: u32,
    waiting: AtomicI64,
}

/// Counts a login as waiting for a turn while it lives.
struct Waiting<'a>(&'a AtomicI64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl LoginGates {
    /// The gate of `backend`.
    fn of(&self, backend: &Backend) -> Arc<Gate> {
        let limit = backend.settings.max_logins_in_flight.max(1);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((backend.ip, limit))
            .or_insert_with(|| {
                Arc::new(Gate {
                    turns: Arc::new(Semaphore::new(limit as usize)),
                    limit,
                    waiting: AtomicI64::new(0),
                })
            })
            .clone()
    }

    /// Logins waiting for a turn now, per backend address. Gates of addresses `keep` refuses
    /// (removed backends) are dropped once nothing uses them.
    pub fn waiting(
        &self,
        keep: impl Fn(std::net::IpAddr) -> bool,
    ) -> HashMap<std::net::IpAddr, i64> {
        let mut gates = self.0.lock().unwrap_or_else(|e| e.into_inner());
        gates.retain(|(ip, _), g| {
            keep(*ip)
                || g.waiting.load(Ordering::Relaxed) > 0
                || g.turns.available_permits() < g.limit as usize
        });
        let mut out = HashMap::new();
        for ((ip, _), g) in gates.iter() {
            *out.entry(*ip).or_default() += g.waiting.load(Ordering::Relaxed);
        }
        out
    }
}

/// The authenticator of one listener: its auth service, if it has one, then the backend
/// login. Made on the stack for each connection.
pub struct ListenerAuth<'a> {
    pub login: &'a Login,
    pub service: Option<&'a AuthService>,
}

impl Authenticator for ListenerAuth<'_> {
    type Exchange = Exchange;

    async fn mechanisms(&self) -> Option<Mechanisms> {
        match self.service {
            Some(service) => Some(service.mechanisms().await),
            None => None,
        }
    }

    async fn sasl_start(
        &self,
        mechanism: &str,
        initial: Option<&[u8]>,
        client: &SaslClient<'_>,
    ) -> SaslStep<Exchange> {
        match self.service {
            Some(service) => service.start(mechanism, initial, client).await,
            None => SaslStep::Unsupported,
        }
    }

    async fn sasl_next(&self, exchange: Exchange, response: &[u8]) -> SaslStep<Exchange> {
        match self.service {
            Some(service) => service.next(exchange, response).await,
            None => SaslStep::Unsupported,
        }
    }

    async fn login(&self, decision: &Decision) -> Result<BackendLink, LoginFailure> {
        // Boxed: the backend login is the largest part of a connection's future, and the
        // front end's dialogue would otherwise carry (and copy at each await) its kilobytes
        // from the first byte of the connection, not only while it logs in.
        Box::pin(self.login.login(decision)).await
    }
}

/// How far one backend login got, told by [`Login::try_backend`] to the watch around it
/// ([`Login::attempt`]), which applies the deadline of each phase.
#[derive(Default)]
struct Progress {
    /// When the TCP connection was made, and when the user's credentials went out.
    times: Mutex<(Option<Instant>, Option<Instant>)>,
    /// Wakes the watch when a phase begins.
    changed: Notify,
}

impl Progress {
    fn connected(&self) {
        self.times.lock().unwrap().0 = Some(Instant::now());
        self.changed.notify_one();
    }

    fn committed(&self) {
        self.times.lock().unwrap().1 = Some(Instant::now());
        self.changed.notify_one();
    }

    fn get(&self) -> (Option<Instant>, Option<Instant>) {
        *self.times.lock().unwrap()
    }
}

/// The phase of one backend login, for its deadline.
#[derive(Clone, Copy)]
enum Phase {
    /// Connecting: `connect_timeout`.
    Connect,
    /// Connected, before the credentials go out: `greeting_timeout`.
    Greeting,
    /// The credentials went out: `login_timeout`.
    Answer,
}

/// Why one backend login gave no answer to pass on to the client.
#[derive(Debug)]
enum Failed {
    /// The backend failed before it was sent anything of the user: the user may still go to
    /// another backend, and the backend is suspect (the health checker checks it at once).
    BeforeCredentials {
        code: CheckCode,
        error: BackendError,
    },
    /// The backend has the user's credentials and did not answer usefully (closed, timed out,
    /// garbage). Nothing is concluded about its health (a client chooses its credentials), and
    /// the credentials go nowhere else: the client gets a temporary failure.
    AfterCredentials(BackendError),
    /// The credentials cannot be written in this protocol (NUL, CR, LF...): the client's doing.
    Unsendable(String),
    /// Called off: the backend stopped serving, the user was moved or kicked, or another
    /// login of the user sent its credentials to another backend. Route again.
    Cancelled,
    /// No turn among the backend's `max_logins_in_flight` logins within `login_timeout`:
    /// nothing was sent, and nothing is concluded about its health (it is busy, not broken);
    /// the client gets a temporary failure, and the user goes nowhere else.
    Busy(u32),
}

impl Login {
    /// Connects to `backend` and logs in, telling `progress` when it connects and when the
    /// credentials go out (`commit` says whether they may). Sets no deadline: the watch
    /// around it ([`Login::attempt`]) applies them all.
    async fn try_backend(
        &self,
        backend: &Backend,
        decision: &Decision,
        progress: &Progress,
        commit: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<BackendLoginResult, BackendError> {
        let settings = &backend.settings;
        let addr = backend.address(decision.protocol);
        let mut tcp = match crate::net::connect::connect(addr).await {
            Err(e) => {
                self.metrics.backend_connect_failure(backend);
                return Err(e.into());
            }
            Ok(tcp) => tcp,
        };
        progress.connected();
        if settings.forward == Forward::ProxyV2 {
            let header = crate::protocol::proxy_protocol::encode_v2(
                decision.identity.client,
                decision.identity.local,
            );
            tcp.write_all(&header).await?;
        }
        let tls = match settings.tls {
            BackendTls::None => None,
            _ => {
                let connector = self
                    .tls
                    .connector(backend)
                    .ok_or_else(|| BackendError::Protocol("no TLS connector configured".into()))?;
                let server_name = crate::net::tls::server_name(&settings.tls_server_name)
                    .map_err(|e| BackendError::Protocol(e.to_string()))?;
                Some(StartTls {
                    connector,
                    server_name,
                })
            }
        };
        let mut stream = BackendStream::Plain(tcp);
        let mut starttls = None;
        match (settings.tls, tls) {
            (BackendTls::Implicit, Some(t)) => {
                // Bounded by the greeting deadline that `attempt` applies.
                stream = stream.start_tls(&t.connector, t.server_name).await?;
            }
            (BackendTls::Starttls, t) => starttls = t,
            _ => {}
        }
        let commit = || {
            let ok = commit();
            if ok {
                progress.committed();
            }
            ok
        };
        let forward_fields = decision
            .verified
            .as_ref()
            .map_or(&[][..], |v| v.forward.as_slice());
        let req = BackendLoginRequest {
            credentials: &decision.credentials,
            identity: &decision.identity,
            forward: settings.forward,
            forward_fields,
            starttls,
            reply_timeout: None,
            commit: &commit,
        };
        match decision.protocol {
            Protocol::Imap => crate::protocol::imap::backend_login::login(stream, &req).await,
            Protocol::Pop3 => crate::protocol::pop3::backend_login::login(stream, &req).await,
            Protocol::Sieve => crate::protocol::sieve::backend_login::login(stream, &req).await,
            other => Err(BackendError::Protocol(format!(
                "{other} logins are not supported yet"
            ))),
        }
    }

    /// A turn to log in on `backend` (its `max_logins_in_flight`), held until the login ends.
    /// Waiting for one is not the backend's doing, so none of its deadlines (nor the
    /// hung-backend watch) runs yet; a kick of `pending` calls the wait off.
    async fn turn(
        &self,
        backend: &Backend,
        pending: &SessionGuard,
    ) -> Result<OwnedSemaphorePermit, Failed> {
        let gate = self.gates.of(backend);
        if let Ok(turn) = gate.turns.clone().try_acquire_owned() {
            return Ok(turn);
        }
        let _waiting = {
            gate.waiting.fetch_add(1, Ordering::Relaxed);
            Waiting(&gate.waiting)
        };
        let settings = &backend.settings;
        tokio::select! {
            turn = tokio::time::timeout(settings.login_timeout, gate.turns.clone().acquire_owned()) => {
                match turn {
                    Ok(Ok(turn)) => Ok(turn),
                    _ => {
                        self.metrics.login_turn_missed(backend);
                        Err(Failed::Busy(settings.max_logins_in_flight))
                    }
                }
            }
            _ = pending.kicked() => Err(Failed::Cancelled),
        }
    }

    /// One login on `backend`, watched: each phase has its deadline (connecting:
    /// `connect_timeout`; greeting, TLS and capabilities: `greeting_timeout` from the
    /// connection; the answer to the credentials: `login_timeout` from sending them, however
    /// slowly the backend trickles bytes), a kick of the reservation `pending` (a move of the
    /// user, the backend taken down) calls it off at once, and a backend that keeps the login
    /// waiting longer than the checker's `fast_interval` is checked at once. One timer serves
    /// them all (a login is a handful of round trips: timers are a fair part of its cost).
    ///
    /// The credentials go out only if `backend` still serves this login, the user's record
    /// still points there (or, for a `failover` from `primary`, still to `primary`), no move of
    /// the user is under way, and no other login of the user has committed elsewhere.
    async fn attempt(
        &self,
        backend: &Backend,
        route: &Route,
        failover: bool,
        decision: &Decision,
        pending: &SessionGuard,
    ) -> Result<BackendLoginResult, Failed> {
        let _turn = self.turn(backend, pending).await?;
        let hash = route.user_hash;
        let primary = route.backend.ip;
        let progress = Progress::default();
        let commit = || {
            if !self.still_serves(backend.ip, route.reason) {
                return false;
            }
            let state = self.router.state();
            if state.is_moving(hash) {
                return false;
            }
            if route.reason == RouteReason::Ring || route.reason == RouteReason::Sticky {
                let record = state.record(hash, Instant::now()).map(|r| r.backend);
                let expected =
                    record.is_none_or(|ip| ip == backend.ip || (failover && ip == primary));
                if !expected {
                    return false;
                }
            }
            self.sessions.commit(pending)
        };
        let settings = &backend.settings;
        let slow_after = self.health.as_ref().map(|h| h.fast_interval());
        let connecting = Instant::now();
        let login = self.try_backend(backend, decision, &progress, &commit);
        tokio::pin!(login);
        let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(
            connecting + settings.connect_timeout,
        ));
        tokio::pin!(timer);
        let mut suspected = false;
        let mut kicked = std::pin::pin!(pending.kicked());
        loop {
            let (connected, committed) = progress.get();
            let (phase, deadline) = match (connected, committed) {
                (_, Some(at)) => (Phase::Answer, at + settings.login_timeout),
                (Some(at), None) => (Phase::Greeting, at + settings.greeting_timeout),
                (None, None) => (Phase::Connect, connecting + settings.connect_timeout),
            };
            // The hung-backend watch runs from the connection on, once per login.
            let slow_at = match (committed.or(connected), slow_after) {
                (Some(at), Some(after)) if !suspected => Some(at + after),
                _ => None,
            };
            let slow = slow_at.is_some_and(|at| at < deadline);
            let wake = if slow {
                slow_at.unwrap_or(deadline)
            } else {
                deadline
            };
            let wake = tokio::time::Instant::from_std(wake);
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                biased;
                result = &mut login => {
                    return classify(result, connected.is_some(), progress.get().1.is_some());
                }
                _ = &mut kicked => return Err(Failed::Cancelled),
                _ = progress.changed.notified() => {}
                _ = &mut timer => {
                    if slow {
                        suspected = true;
                        self.suspect(backend, CheckCode::ResponseTimeout, "a login is waiting for it");
                        continue;
                    }
                    return Err(match phase {
                        Phase::Answer => Failed::AfterCredentials(BackendError::Timeout(settings.login_timeout)),
                        Phase::Greeting => Failed::BeforeCredentials {
                            code: CheckCode::ResponseTimeout,
                            error: BackendError::Timeout(settings.greeting_timeout),
                        },
                        Phase::Connect => {
                            self.metrics.backend_connect_failure(backend);
                            Failed::BeforeCredentials {
                                code: CheckCode::ConnectTimeout,
                                error: BackendError::Timeout(settings.connect_timeout),
                            }
                        }
                    });
                }
            }
        }
    }

    /// After a failed login on `failed`, for a user with a live session there: waits until
    /// the health checker has taken `failed` down and the user has been moved off it (its
    /// sessions ended, its record pointing elsewhere). False if that does not happen: no
    /// checker, the backend stays up, or it takes too long.
    async fn wait_for_move_off(&self, hash: u32, failed: std::net::IpAddr) -> bool {
        let Some(health) = &self.health else {
            return false;
        };
        let since = std::time::SystemTime::now();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let state = self.router.state();
        while Instant::now() < deadline {
            let set = state.backends();
            let backend = set.get(failed);
            let down = backend.is_none_or(|b| !b.serves_existing());
            // No check will come: an admin decided this backend's state, or checks are paused.
            let unchecked = backend
                .is_some_and(|b| b.admin != crate::state::backend::AdminState::Up)
                || state.checks_pause().is_some();
            if !down && unchecked {
                return false;
            }
            if down {
                let moved = state
                    .record(hash, Instant::now())
                    .is_none_or(|r| r.backend != failed);
                if moved && !state.is_moving(hash) && self.sessions.count_user_bound(hash) == 0 {
                    return true;
                }
            } else if health
                .last_result(failed)
                .is_some_and(|r| r.code.is_ok() && r.at > since)
            {
                // Checked since, and fine: this failure was the backend's passing trouble.
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    }

    /// Passive health: tells the checker (if any) that a real login found `backend`
    /// unresponsive before sending it anything of the user; it is checked at once.
    fn suspect(&self, backend: &Backend, code: CheckCode, detail: impl std::fmt::Display) {
        if let Some(h) = &self.health {
            h.suspect(backend.ip, code, detail);
        }
    }
}

/// Sorts the end of one backend login by whether the backend had the user's credentials.
fn classify(
    result: Result<BackendLoginResult, BackendError>,
    connected: bool,
    committed: bool,
) -> Result<BackendLoginResult, Failed> {
    match result {
        // A greeting that says "not now" (`* BYE`, `-ERR`) came before the credentials.
        Ok(BackendLoginResult::TempFailed { message }) if !committed => {
            Err(Failed::BeforeCredentials {
                code: CheckCode::WrongResponse,
                error: BackendError::Protocol(format!(
                    "not ready: {}",
                    crate::untrusted::shown(&message)
                )),
            })
        }
        Ok(r) => Ok(r),
        Err(BackendError::Cancelled) => Err(Failed::Cancelled),
        Err(BackendError::Unsendable(why)) => Err(Failed::Unsendable(why)),
        Err(e) if committed => Err(Failed::AfterCredentials(e)),
        Err(error) => {
            let code = match (&error, connected) {
                (BackendError::Timeout(_), false) => CheckCode::ConnectTimeout,
                (_, false) => CheckCode::ConnectionRefused,
                (BackendError::Timeout(_), true) => CheckCode::ResponseTimeout,
                (BackendError::Protocol(_), true) => CheckCode::WrongResponse,
                (_, true) => CheckCode::Closed,
            };
            Err(Failed::BeforeCredentials { code, error })
        }
    }
}

impl Login {
    /// Whether `ip` may still take this login: it serves existing users, or it is in
    /// maintenance and the user is one of its allowed test users, or it is a backend outside
    /// the director's pool that an auth service pinned the user to (its health is not ours
    /// to know).
    fn still_serves(&self, ip: std::net::IpAddr, reason: RouteReason) -> bool {
        let set = self.router.state().backends();
        match set.get(ip) {
            None => reason == RouteReason::Pinned,
            Some(b) => {
                b.serves_existing()
                    || (reason == RouteReason::Maintenance
                        && b.admin == crate::state::backend::AdminState::Maintenance
                        && b.health == crate::state::backend::Health::Up)
            }
        }
    }

    /// Routes the user, waiting (a bounded time) until every live session and committed
    /// login of the user is on the backend routed to: the route is taken again while waiting,
    /// so a record that another login moves is followed. `None`: they stayed elsewhere.
    async fn route_where_bound(
        &self,
        user: &str,
        verified: Option<&Verified>,
        moves_until: Instant,
    ) -> Result<Option<Route>, LoginFailure> {
        let deadline = Instant::now() + SESSIONS_ELSEWHERE_WAIT;
        loop {
            let route = self.route(user, verified, moves_until).await?;
            let ip = route.backend.ip;
            if self
                .sessions
                .bound_ips_of(route.user_hash)
                .iter()
                .all(|b| *b == ip)
            {
                return Ok(Some(route));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Routes the user; while a move of the user is under way (its sessions are being ended),
    /// waits for it (bounded), so that the login follows the new record.
    /// An auth service's `host` pins the user there, outside the ring; its `director_tag`
    /// picks the ring.
    async fn route(
        &self,
        user: &str,
        verified: Option<&Verified>,
        deadline: Instant,
    ) -> Result<Route, LoginFailure> {
        // In a cluster a record on a backend that no longer serves is a move to come (the
        // checker's or an admin's): wait for it before routing, rather than route alone.
        let hash = self.router.hash(user);
        while self.router.state().is_moving(hash) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let route = self.route_now(user, hash, verified).await?;
        if !self.router.state().is_moving(route.user_hash) {
            return Ok(route);
        }
        while self.router.state().is_moving(route.user_hash) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.route_now(user, hash, verified).await
    }

    /// Where a user an auth service looked up goes for `protocol` (an LMTP recipient): routed
    /// as its login would be (pinned, tagged or the ring), with its port and TLS applied to the
    /// backend. A move of the user under way is the caller's to wait for.
    pub async fn route_verified(
        &self,
        verified: &Verified,
        protocol: Protocol,
    ) -> Result<Route, LoginFailure> {
        let hash = self.router.hash(&verified.user);
        let mut route = self.route_now(&verified.user, hash, Some(verified)).await?;
        route.backend = for_user(&route.backend, Some(verified), protocol);
        route.fallbacks.clear();
        Ok(route)
    }

    /// Routes `user` (hashed: `hash`) once.
    async fn route_now(
        &self,
        user: &str,
        hash: u32,
        verified: Option<&Verified>,
    ) -> Result<Route, LoginFailure> {
        // A cluster member cut off from etcd starts no backend session, pinned or not.
        if let Err(e) = self.router.state().serving() {
            warn!(user = %crate::untrusted::shown(user), error = %e, "login refused: temporary failure");
            return Err(LoginFailure::Unavailable {
                message: UNAVAILABLE_TEXT.into(),
            });
        }
        if let Some(v) = verified.filter(|v| v.host.is_some() || v.hostip.is_some()) {
            // Boxed: DNS resolution makes a large future, and few logins are pinned.
            return Box::pin(self.pinned(user, hash, v)).await;
        }
        let tag = verified.and_then(|v| v.tag.as_deref()).unwrap_or_default();
        self.router
            .route_hashed(user, hash, tag)
            .await
            .map_err(|e| {
                warn!(user = %crate::untrusted::shown(user), error = %e, "no backend for login");
                let message = match e {
                    crate::state::router::RouteError::NoBackend(tag) if !tag.is_empty() => {
                        format!(
                            "{UNAVAILABLE_TEXT} (no server of pool {} is up)",
                            crate::untrusted::shown(&tag)
                        )
                    }
                    _ => UNAVAILABLE_TEXT.into(),
                };
                LoginFailure::Unavailable { message }
            })
    }

    /// The route to the backend an auth service named for the user (`host`, `hostip`). A
    /// configured backend is used with its settings and state (one that is down or in
    /// maintenance takes nobody); another address gets `backend_defaults`.
    async fn pinned(&self, user: &str, hash: u32, v: &Verified) -> Result<Route, LoginFailure> {
        let shown_user = crate::untrusted::shown(user);
        let host = v.host.clone().unwrap_or_default();
        let ip = match v.hostip {
            Some(ip) => ip,
            None => match resolve_host(&host).await {
                Ok(ip) => ip,
                Err(error) => {
                    warn!(user = %shown_user, host = %crate::untrusted::shown(&host), %error,
                          "the auth service's host for the user does not resolve");
                    return Err(LoginFailure::Unavailable {
                        message: UNAVAILABLE_TEXT.into(),
                    });
                }
            },
        };
        let set = self.router.state().backends();
        let backend = match set.get(ip) {
            Some(b) if b.serves_existing() => b.clone(),
            Some(b) => {
                warn!(user = %shown_user, backend = %ip, admin = b.admin.name(), health = b.health.name(),
                      "the auth service pins the user to a backend that takes nobody now");
                return Err(LoginFailure::Unavailable {
                    message: UNAVAILABLE_TEXT.into(),
                });
            }
            None => {
                let name = if host.is_empty() {
                    ip.to_string()
                } else {
                    host
                };
                let mut settings = (*self.default_settings).clone();
                settings.tls_server_name = name.clone();
                Backend {
                    ip,
                    host: name.into(),
                    weight: 0,
                    tag: "".into(),
                    admin: crate::state::backend::AdminState::Up,
                    health: crate::state::backend::Health::Up,
                    settings: Arc::new(settings),
                }
            }
        };
        Ok(Route {
            user_hash: hash,
            backend,
            reason: RouteReason::Pinned,
            fallbacks: Default::default(),
        })
    }
}

/// Logs a login's success at `info`: written directly in the text format
/// ([`crate::log_line::Direct`]: every session logs this line), else through tracing, with
/// the same text.
fn logged_in(session: &str, user: &str, backend: SocketAddr, reason: RouteReason) {
    if crate::log_line::direct() && tracing::enabled!(tracing::Level::INFO) {
        logged_in_line(session, user, backend, reason).write();
        return;
    }
    info!(session = %session, user = %crate::untrusted::shown(user),
          backend = %crate::addr_text::socket(backend), reason = %reason, "logged in");
}

fn logged_in_line(
    session: &str,
    user: &str,
    backend: SocketAddr,
    reason: RouteReason,
) -> crate::log_line::Direct {
    let mut line = crate::log_line::Direct::new(tracing::Level::INFO, module_path!(), "logged in");
    line.text("session", session)
        .shown("user", user)
        .text("backend", crate::addr_text::socket(backend).as_str())
        .text("reason", reason.name());
    line
}

/// The address of a host an auth service named: an IP literal, or the first address of a
/// name (bounded: a login does not wait long on DNS).
async fn resolve_host(host: &str) -> Result<std::net::IpAddr, String> {
    let lookup = crate::net::resolve::resolve_host(host);
    match tokio::time::timeout(Duration::from_secs(5), lookup).await {
        Ok(Ok(addresses)) => Ok(addresses[0]),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("DNS lookup timed out after 5s".into()),
    }
}

/// `backend` as this login uses it: the port, TLS and login timeout an auth service set for
/// the user, when it set any.
fn for_user(backend: &Backend, verified: Option<&Verified>, protocol: Protocol) -> Backend {
    let mut backend = backend.clone();
    let Some(v) =
        verified.filter(|v| v.port.is_some() || v.tls.is_some() || v.proxy_timeout.is_some())
    else {
        return backend;
    };
    let mut s = (*backend.settings).clone();
    if let Some(port) = v.port {
        let slot = match protocol {
            Protocol::Imap => &mut s.ports.imap,
            Protocol::Pop3 => &mut s.ports.pop3,
            Protocol::Lmtp => &mut s.ports.lmtp,
            Protocol::Sieve => &mut s.ports.sieve,
        };
        *slot = Some(port);
    }
    if let Some(tls) = v.tls {
        s.tls = tls.mode;
        s.tls_verify = tls.verify;
    }
    if let Some(timeout) = v.proxy_timeout {
        s.login_timeout = timeout;
    }
    backend.settings = Arc::new(s);
    backend
}

/// How long a login waits for a move of its user to end.
const MOVE_WAIT: Duration = Duration::from_secs(15);
/// How long a login waits for the user's sessions on another backend to end.
const SESSIONS_ELSEWHERE_WAIT: Duration = Duration::from_secs(10);
/// Routing rounds of one login: a login called off (its user moved, its backend taken down)
/// routes again, a bounded number of times: `continue 'round` after the last round ends the
/// login as unavailable.
const ROUNDS: usize = 4;

impl Login {
    /// Logs in, counting the login by result and its client-visible latency.
    pub async fn login(&self, decision: &Decision) -> Result<BackendLink, LoginFailure> {
        let started = Instant::now();
        let mut refused = false;
        let result = self.route_and_login(decision, &mut refused).await;
        let outcome = match &result {
            Ok(_) => LoginResult::Ok,
            Err(LoginFailure::AuthFailed { .. } | LoginFailure::Referral { .. }) => {
                LoginResult::AuthFailed
            }
            Err(LoginFailure::Unavailable { .. }) if refused => LoginResult::Refused,
            Err(LoginFailure::Unavailable { .. }) => LoginResult::Unavailable,
        };
        self.metrics
            .login(decision.protocol, outcome, started.elapsed());
        result
    }
}

impl Login {
    /// Routes the user and logs in on its backend. A backend that fails before it has seen
    /// anything of the user is passed over for the next one in ring order (if the user has no
    /// session anywhere, so moving it cannot put it on two backends); once the credentials
    /// went to a backend, its answer is final. `refused` is set when the director itself turns
    /// the login away (the user's sessions are still on another backend).
    async fn route_and_login(
        &self,
        decision: &Decision,
        refused: &mut bool,
    ) -> Result<BackendLink, LoginFailure> {
        // The mailbox's user (a master login `user*master` is for `user`); the backend
        // still gets the credentials as the client sent them.
        let user = decision.mail_user(self.master_user_separator);
        let verified = decision.verified.as_ref();
        let shown_user = crate::untrusted::shown(user);
        let session_id = &decision.identity.session_id;
        let unavailable = || LoginFailure::Unavailable {
            message: UNAVAILABLE_TEXT.into(),
        };
        // Waits for moves of the user are bounded for the whole login, not per round, so that
        // a move that lasts ends in a temporary failure before the client's timeout.
        let moves_until = Instant::now() + MOVE_WAIT;
        'round: for round in 0..ROUNDS {
            // The invariant: a user is never served by two backends at once. If the user still
            // has sessions on another backend (its backend went down or into maintenance and
            // the move that ends them is on its way), wait for them to end; if they do not,
            // the client is told to come back later.
            let Some(route) = self.route_where_bound(user, verified, moves_until).await? else {
                warn!(session = %session_id, user = %shown_user,
                      "user still has sessions on another backend: login refused for now");
                *refused = true;
                return Err(unavailable());
            };
            let hash = route.user_hash;
            let last_round = round + 1 == ROUNDS;
            // Fallbacks are made ready only when reached: most logins never are.
            let candidates = std::iter::once(&route.backend)
                .chain(route.fallbacks.iter())
                .map(|b| for_user(b, verified, decision.protocol));
            for (attempt, backend) in candidates.enumerate() {
                let backend = &backend;
                let clustered = matches!(
                    self.router.state().mode(),
                    crate::state::StateMode::Cluster { .. }
                );
                if attempt > 0 && (clustered || self.sessions.count_user_bound(hash) > 0) {
                    // The user is live on its backend through another session: moving it now
                    // could put it on two backends at once. If the health checker takes that
                    // backend down, it moves the user safely; then route again. In a cluster
                    // another director may hold such a session (or reach the backend this
                    // one cannot): only the checker's move may change the user's backend.
                    if !last_round && self.wait_for_move_off(hash, route.backend.ip).await {
                        continue 'round;
                    }
                    break;
                }
                let addr: SocketAddr = backend.address(decision.protocol);
                // Reserve the user on this backend while the login is under way: a move of the
                // user or the backend's evacuation kicks the reservation, which calls the login
                // off, and its commit keeps two logins of one user off two backends.
                let pending = self.sessions.reserve(decision.protocol, user, hash, addr);
                if !self.still_serves(backend.ip, route.reason) {
                    drop(pending);
                    continue 'round;
                }
                let result = self
                    .attempt(backend, &route, attempt > 0, decision, &pending)
                    .await;
                let outcome = match &result {
                    Ok(BackendLoginResult::LoggedIn { .. }) => Some(BackendLoginOutcome::Ok),
                    Ok(BackendLoginResult::AuthFailed { .. }) => {
                        Some(BackendLoginOutcome::AuthFailed)
                    }
                    Ok(BackendLoginResult::TempFailed { .. }) => {
                        Some(BackendLoginOutcome::Unavailable)
                    }
                    Err(Failed::Unsendable(_) | Failed::Cancelled | Failed::Busy(_)) => None,
                    Err(_) => Some(BackendLoginOutcome::Error),
                };
                if let Some(o) = outcome {
                    self.metrics.backend_login(backend, decision.protocol, o);
                }
                match result {
                    Ok(BackendLoginResult::LoggedIn {
                        stream,
                        success_text,
                        leftover,
                    }) => {
                        // The backend may have stopped serving while we logged in, and the
                        // move that ends its sessions may have run before ours existed: do
                        // not start a session there.
                        if !self.still_serves(backend.ip, route.reason) {
                            drop(stream);
                            drop(pending);
                            warn!(session = %session_id, user = %shown_user, backend = %addr,
                                  "backend stopped serving during the login");
                            continue 'round;
                        }
                        let state = self.router.state().clone();
                        if attempt > 0 {
                            info!(session = %session_id, user = %shown_user, from = %route.backend.ip, to = %backend.ip,
                                  "user moved: its backend did not answer before the login");
                            if let Err(e) = state.rebind(hash, backend.ip, Instant::now()).await {
                                warn!(session = %session_id, user = %shown_user, error = %e,
                                      "the user's new backend cannot be recorded: temporary failure");
                                return Err(unavailable());
                            }
                        }
                        // A user pinned to a backend of the pool has its record there, so
                        // that a login of the user without the pin follows it; a backend
                        // outside the pool has no records.
                        let in_pool = state.backends().get(backend.ip).is_some();
                        if route.reason == RouteReason::Pinned && in_pool {
                            let recorded = state.record(hash, Instant::now()).map(|r| r.backend);
                            if recorded != Some(backend.ip) {
                                if let Err(e) = state.rebind(hash, backend.ip, Instant::now()).await
                                {
                                    warn!(session = %session_id, user = %shown_user, error = %e,
                                          "the user's pinned backend cannot be recorded: temporary failure");
                                    return Err(unavailable());
                                }
                            }
                        }
                        let hook: Option<EndHook> = in_pool.then(|| {
                            state.session_started(hash, backend.ip, Instant::now());
                            Arc::new(move |info: &crate::state::sessions::SessionInfo| {
                                state.session_ended(info.user_hash, Instant::now())
                            }) as EndHook
                        });
                        let session = pending.into_session(hook);
                        logged_in(session_id, user, addr, route.reason);
                        return Ok(BackendLink {
                            stream,
                            success_text,
                            leftover,
                            session,
                        });
                    }
                    Ok(BackendLoginResult::AuthFailed { message }) => {
                        info!(session = %session_id, user = %shown_user, backend = %addr, "backend refused the credentials");
                        return Err(LoginFailure::AuthFailed { message });
                    }
                    Ok(BackendLoginResult::TempFailed { message }) => {
                        warn!(session = %session_id, user = %shown_user, backend = %addr,
                              reply = %crate::untrusted::shown(&message), "backend login temporarily failed");
                        return Err(LoginFailure::Unavailable { message });
                    }
                    Err(Failed::Unsendable(why)) => {
                        info!(session = %session_id, user = %shown_user, "credentials cannot be sent: {why}");
                        return Err(LoginFailure::AuthFailed {
                            message: "Authentication failed.".into(),
                        });
                    }
                    Err(Failed::Cancelled) => {
                        drop(pending);
                        debug!(session = %session_id, user = %shown_user, backend = %addr,
                               "login called off: the user's backend changed; routing again");
                        continue 'round;
                    }
                    Err(Failed::Busy(limit)) => {
                        warn!(session = %session_id, user = %shown_user, backend = %addr, max_logins_in_flight = limit,
                              "no turn to log in on the backend within login_timeout: temporary failure");
                        return Err(unavailable());
                    }
                    Err(Failed::BeforeCredentials { code, error }) => {
                        warn!(session = %session_id, user = %shown_user, backend = %addr, code = %code, error = %error,
                              "backend unusable before the login: trying the next backend");
                        self.suspect(backend, code, &error);
                    }
                    Err(Failed::AfterCredentials(error)) => {
                        // Said nothing about the backend's health by itself (a client chooses
                        // its credentials), but a backend that crashed looks just like this: let
                        // the checker decide. Only if it takes the backend down, and the user
                        // has been moved off it, does the login go on, to the new backend.
                        drop(pending);
                        self.suspect(backend, CheckCode::Closed, &error);
                        if !last_round && self.wait_for_move_off(hash, backend.ip).await {
                            info!(session = %session_id, user = %shown_user, backend = %addr, error = %error,
                                  "backend failed during the login and is down: routing again");
                            continue 'round;
                        }
                        info!(session = %session_id, user = %shown_user, backend = %addr, error = %error,
                              "backend gave no answer to the credentials: temporary failure");
                        return Err(unavailable());
                    }
                }
            }
            break;
        }
        Err(unavailable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line written directly is the line tracing writes.
    #[test]
    fn logged_in_reads_the_same_written_directly() {
        use crate::log_line::{logged, without_time};
        for (user, backend, reason) in [
            ("bob@example.org", "10.0.0.1:143", RouteReason::Sticky),
            (
                "evil\u{1b}]0;x\u{7}\"\\",
                "[2001:db8::2]:993",
                RouteReason::Pinned,
            ),
            (&*"long".repeat(40), "127.0.0.2:110", RouteReason::Ring),
        ] {
            let backend: SocketAddr = backend.parse().unwrap();
            let traced = logged(|| logged_in("feedc0de00000001", user, backend, reason));
            let direct = logged_in_line("feedc0de00000001", user, backend, reason).finish();
            assert_eq!(without_time(&direct), without_time(&traced));
        }
    }
}
