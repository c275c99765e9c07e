//! Backend login: the one place a front end's [`Decision`] becomes a logged-in backend
//! connection. Route the user, connect (PROXY header, implicit TLS), run the protocol's login
//! dialogue with the user's own credentials (the director checks no password: the backend
//! does), register the session. If the chosen backend cannot be reached and the user has no
//! live session, the next backend in ring order is tried and the record follows, and the
//! health checker is told (passive health: a failure to connect or to get a usable reply
//! counts as a failed check; a refused password does not).
//!
//! A later issue plugs authentication at the director and master-user logins in here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward, StartTls,
};
use crate::checker::HealthChecker;
use crate::config::BackendTls;
use crate::decision::{Decision, Protocol};
use crate::frontend::{Authenticator, BackendLink, LoginFailure};
use crate::metrics::{BackendLoginOutcome, LoginResult, Metrics};
use crate::probe::CheckCode;
use crate::routing::{RouteReason, Router};
use crate::sessions::{EndHook, Sessions};
use crate::stream::BackendStream;

/// What clients are told when no backend can take them.
pub const UNAVAILABLE_TEXT: &str = "Account is temporarily unavailable.";

/// TLS material for backends, prepared once at start.
#[derive(Clone, Default)]
pub struct BackendTlsContext {
    /// Connectors by (CA file, verify), built at start from the configuration.
    pub connectors: Vec<(Option<std::path::PathBuf>, bool, tokio_rustls::TlsConnector)>,
}

impl std::fmt::Debug for BackendTlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendTlsContext({} connectors)", self.connectors.len())
    }
}

impl BackendTlsContext {
    /// The connector for `backend`'s CA file and verification setting.
    pub fn connector(&self, backend: &Backend) -> Option<tokio_rustls::TlsConnector> {
        let s = &backend.settings;
        self.connectors
            .iter()
            .find(|(ca, verify, _)| *ca == s.tls_ca_file && *verify == s.tls_verify)
            .map(|(_, _, c)| c.clone())
    }
}

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
}

impl Login {
    /// Connects to `backend` and logs in. `Err` means the backend could not be used at all.
    async fn try_backend(
        &self,
        backend: &Backend,
        decision: &Decision,
    ) -> Result<BackendLoginResult, BackendError> {
        let settings = &backend.settings;
        let addr = backend.address(decision.protocol);
        let tcp =
            match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
                Err(_) => {
                    self.metrics.backend_connect_failure(backend);
                    self.passive(backend, CheckCode::ConnectTimeout, "connect timed out");
                    return Err(BackendError::Timeout(settings.connect_timeout));
                }
                Ok(Err(e)) => {
                    self.metrics.backend_connect_failure(backend);
                    self.passive(backend, CheckCode::ConnectionRefused, &e);
                    return Err(e.into());
                }
                Ok(Ok(tcp)) => tcp,
            };
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        if settings.forward == Forward::ProxyV2 {
            let header =
                crate::proxy_protocol::encode_v2(decision.identity.client, decision.identity.local);
            tcp.write_all(&header).await?;
        }
        let tls = match settings.tls {
            BackendTls::None => None,
            _ => {
                let connector = self
                    .tls
                    .connector(backend)
                    .ok_or_else(|| BackendError::Protocol("no TLS connector configured".into()))?;
                let server_name = crate::tls::server_name(&settings.tls_server_name)
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
                stream = tokio::time::timeout(
                    settings.login_timeout,
                    stream.start_tls(&t.connector, t.server_name),
                )
                .await
                .map_err(|_| BackendError::Timeout(settings.login_timeout))
                .and_then(|r| r.map_err(BackendError::from))
                .inspect_err(|e| self.passive(backend, CheckCode::TlsFailure, e))?;
            }
            (BackendTls::Starttls, t) => starttls = t,
            _ => {}
        }
        let req = BackendLoginRequest {
            credentials: &decision.credentials,
            identity: &decision.identity,
            forward: settings.forward,
            starttls,
            reply_timeout: settings.login_timeout,
        };
        let result = match decision.protocol {
            Protocol::Imap => crate::imap::backend_login::login(stream, &req).await,
            Protocol::Pop3 => crate::pop3::backend_login::login(stream, &req).await,
            Protocol::Sieve => crate::sieve::backend_login::login(stream, &req).await,
            other => {
                return Err(BackendError::Protocol(format!(
                    "{other} logins are not supported yet"
                )))
            }
        };
        if let Err(e) = &result {
            let code = match e {
                BackendError::Timeout(_) => Some(CheckCode::ResponseTimeout),
                BackendError::Closed | BackendError::Io(_) => Some(CheckCode::Closed),
                BackendError::Protocol(_) => Some(CheckCode::WrongResponse),
                BackendError::Unsendable(_) => None,
            };
            if let Some(code) = code {
                self.passive(backend, code, e);
            }
        }
        result
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
            let down = state
                .backends()
                .get(failed)
                .is_none_or(|b| !b.serves_existing());
            if down {
                let moved = state
                    .record(hash, Instant::now())
                    .is_none_or(|r| r.backend != failed);
                if moved && !state.is_moving(hash) && self.sessions.count_user(hash) == 0 {
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

    /// Passive health: tells the checker (if any) that a real login could not use `backend`.
    fn passive(&self, backend: &Backend, code: CheckCode, detail: impl std::fmt::Display) {
        if let Some(h) = &self.health {
            h.report_failure(backend.ip, code, detail.to_string());
        }
    }
}

impl Login {
    /// Whether `ip` may still take this login: it serves existing users, or it is in
    /// maintenance and the user is one of its allowed test users.
    fn still_serves(&self, ip: std::net::IpAddr, maintenance_user: bool) -> bool {
        let set = self.router.state().backends();
        set.get(ip).is_some_and(|b| {
            b.serves_existing()
                || (maintenance_user
                    && b.admin == crate::backend::AdminState::Maintenance
                    && b.health == crate::backend::Health::Up)
        })
    }

    /// Waits (a bounded time) until every live session of `hash` is on `ip`. True if so.
    async fn wait_sessions_only_on(&self, hash: u32, ip: std::net::IpAddr) -> bool {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.sessions.backend_ips_of(hash).iter().all(|b| *b == ip) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Authenticator for Login {
    /// Logs in, counting the login by result and its client-visible latency.
    async fn login(&self, decision: &Decision) -> Result<BackendLink, LoginFailure> {
        let started = Instant::now();
        let mut refused = false;
        let result = self.route_and_login(decision, &mut refused).await;
        let outcome = match &result {
            Ok(_) => LoginResult::Ok,
            Err(LoginFailure::AuthFailed { .. }) => LoginResult::AuthFailed,
            Err(LoginFailure::Unavailable { .. }) if refused => LoginResult::Refused,
            Err(LoginFailure::Unavailable { .. }) => LoginResult::Unavailable,
        };
        self.metrics
            .login(decision.protocol, outcome, started.elapsed());
        result
    }
}

impl Login {
    /// Routes the user and logs in on its backend (or the next ones in ring order).
    /// `refused` is set when the director itself turns the login away (the user's sessions
    /// are still on another backend).
    async fn route_and_login(
        &self,
        decision: &Decision,
        refused: &mut bool,
    ) -> Result<BackendLink, LoginFailure> {
        // The mailbox's user (a master login `user*master` is for `user`); the backend
        // still gets the credentials as the client sent them.
        let user = decision.credentials.mail_user(self.master_user_separator);
        let session_id = &decision.identity.session_id;
        'round: for round in 0..2 {
            let route = self.router.route(user, "").map_err(|e| {
                warn!(session = %session_id, user = %crate::untrusted::shown(user), error = %e, "no backend for login");
                LoginFailure::Unavailable {
                    message: UNAVAILABLE_TEXT.into(),
                }
            })?;
            let hash = route.user_hash;
            // A move of this user is under way (its sessions are being ended): wait for it, then
            // route again so the login follows the new record.
            let route = if self.router.state().is_moving(hash) {
                let deadline = Instant::now() + std::time::Duration::from_secs(15);
                while self.router.state().is_moving(hash) && Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                self.router
                    .route(user, "")
                    .map_err(|_| LoginFailure::Unavailable {
                        message: UNAVAILABLE_TEXT.into(),
                    })?
            } else {
                route
            };
            // The invariant: a user is never served by two backends at once. If the user still
            // has sessions on another backend (its backend went down or into maintenance and
            // the move that ends them is on its way), wait for them to end; if they do not,
            // the client is told to come back later.
            if !self.wait_sessions_only_on(hash, route.backend.ip).await {
                warn!(session = %session_id, user = %crate::untrusted::shown(user), backend = %route.backend.ip,
                      "user still has sessions on another backend: login refused for now");
                *refused = true;
                return Err(LoginFailure::Unavailable {
                    message: UNAVAILABLE_TEXT.into(),
                });
            }
            let mut candidates = vec![route.backend.clone()];
            candidates.extend(route.fallbacks.iter().cloned());
            for (attempt, backend) in candidates.iter().enumerate() {
                if attempt > 0 && self.sessions.count_user(hash) > 0 {
                    // The user is live on its backend through another session: moving it now
                    // could put it on two backends at once. If the health checker takes that
                    // backend down, it moves the user safely; then route again, once.
                    if round == 0 && self.wait_for_move_off(hash, route.backend.ip).await {
                        continue 'round;
                    }
                    break;
                }
                let addr: SocketAddr = backend.address(decision.protocol);
                // Reserve the user on this backend while the login is under way: a concurrent
                // login of the same user that is routed elsewhere (this backend just stopped
                // serving) then waits for this one instead of racing it.
                let pending = self.sessions.reserve(decision.protocol, user, hash, addr);
                let maintenance_user = route.reason == RouteReason::Maintenance;
                if !self.still_serves(backend.ip, maintenance_user) {
                    drop(pending);
                    if round == 0 {
                        continue 'round;
                    }
                    break;
                }
                let result = self.try_backend(backend, decision).await;
                let outcome = match &result {
                    Ok(BackendLoginResult::LoggedIn { .. }) => Some(BackendLoginOutcome::Ok),
                    Ok(BackendLoginResult::AuthFailed { .. }) => {
                        Some(BackendLoginOutcome::AuthFailed)
                    }
                    Ok(BackendLoginResult::TempFailed { .. }) => {
                        Some(BackendLoginOutcome::Unavailable)
                    }
                    Err(BackendError::Unsendable(_)) => None,
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
                        if !self.still_serves(backend.ip, maintenance_user) {
                            drop(stream);
                            drop(pending);
                            warn!(session = %session_id, user = %crate::untrusted::shown(user), backend = %addr,
                                  "backend stopped serving during the login");
                            if round == 0 {
                                continue 'round;
                            }
                            break;
                        }
                        let state = self.router.state().clone();
                        if attempt > 0 {
                            info!(session = %session_id, user = %crate::untrusted::shown(user), from = %route.backend.ip, to = %backend.ip,
                                  "user moved: its backend could not be reached");
                            state.rebind(hash, backend.ip, Instant::now());
                        }
                        state.session_started(hash, backend.ip, Instant::now());
                        let hook: EndHook = Arc::new(move |info| {
                            state.session_ended(info.user_hash, Instant::now())
                        });
                        let session =
                            self.sessions
                                .register(decision.protocol, user, hash, addr, Some(hook));
                        drop(pending);
                        info!(session = %session_id, user = %crate::untrusted::shown(user), backend = %addr, reason = %route.reason, "logged in");
                        return Ok(BackendLink {
                            stream,
                            success_text,
                            leftover,
                            session,
                        });
                    }
                    Ok(BackendLoginResult::AuthFailed { message }) => {
                        info!(session = %session_id, user = %crate::untrusted::shown(user), backend = %addr, "backend refused the credentials");
                        return Err(LoginFailure::AuthFailed { message });
                    }
                    Ok(BackendLoginResult::TempFailed { message }) => {
                        warn!(session = %session_id, user = %crate::untrusted::shown(user), backend = %addr, reply = %crate::untrusted::shown(&message), "backend login temporarily failed");
                        return Err(LoginFailure::Unavailable { message });
                    }
                    Err(BackendError::Unsendable(why)) => {
                        info!(session = %session_id, user = %crate::untrusted::shown(user), "credentials cannot be sent: {why}");
                        return Err(LoginFailure::AuthFailed {
                            message: "Authentication failed.".into(),
                        });
                    }
                    Err(e) => {
                        warn!(session = %session_id, user = %crate::untrusted::shown(user), backend = %addr, error = %e, "backend unusable for login");
                    }
                }
            }
            break;
        }
        Err(LoginFailure::Unavailable {
            message: UNAVAILABLE_TEXT.into(),
        })
    }
}
