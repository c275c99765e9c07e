//! The admin API (Dovecot: `doveadm-connection`): HTTP and JSON, on a unix socket (owner-only)
//! and optionally on TCP (bearer token, `allow_from` networks). The `director` CLI verbs talk
//! to it (`admin_client`); scripts may too.
//!
//! - `POST /v1/command` takes one [`AdminRequest`] (`{"verb": "down", "host": "10.0.0.1"}`)
//!   and answers its reply as JSON, or `{"error": "..."}` with a 4xx status.
//! - `GET /v1/status` is the `status` verb.
//!
//! Every change is logged with who made it (the unix peer's uid, or the TCP peer's address)
//! and written to the state file. Users change backend only through [`Mover`]: their sessions
//! are ended before their record points elsewhere.

pub mod client;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tracing::{info, warn};

use crate::config::network::Network;
use crate::config::{Config, ConfigError, MAX_WEIGHT};
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::moves::{MoveReason, MoveReport, Mover};
use crate::state::router::Router;
use crate::state::sessions::Sessions;
use crate::state::{ChecksPause, Maintenance, State, StateMode};

/// The health checker's last result per backend: code (`ok`, `connect_refused`...) and
/// latency. The checker plugs it in with [`AdminContext::set_check_results`]; until then
/// `status` shows no check column values.
pub type CheckResults = Arc<dyn Fn() -> Vec<(IpAddr, String, Duration)> + Send + Sync>;

/// Reloads the configuration file (the `reload` verb): what was done, or why the file was
/// refused. The running director plugs it in with [`AdminContext::set_reload`].
pub type ReloadHook = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>
        + Send
        + Sync,
>;

/// One admin command, as the CLI sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Every backend.
    Status,
    /// One user: record, ring answer.
    UserStatus {
        user: String,
    },
    /// Users with records, optionally of one backend, one page at a time: up to `limit`
    /// (default [`MAP_PAGE`], at most [`MAP_PAGE_MAX`]) after the user hash `after` (the
    /// previous page's `next`).
    Map {
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        after: Option<u32>,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Adds a backend (every address of a name), or sets the weight/tag of an existing one.
    Add {
        host: String,
        #[serde(default)]
        weight: Option<u32>,
        #[serde(default)]
        tag: Option<String>,
    },
    Update {
        host: String,
        weight: u32,
    },
    Up {
        host: String,
    },
    Down {
        host: String,
    },
    Remove {
        host: String,
    },
    Move {
        user: String,
        host: String,
    },
    Kick {
        user: String,
    },
    /// `host: None` flushes every backend.
    Flush {
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        force: bool,
    },
    Dump,
    MaintenanceStart {
        host: String,
        #[serde(default)]
        for_secs: Option<u64>,
        #[serde(default)]
        allow_users: Vec<String>,
    },
    MaintenanceStop {
        host: String,
    },
    ChecksPause {
        #[serde(default)]
        for_secs: Option<u64>,
    },
    ChecksResume,
    /// Reloads the configuration file the director was started with (as SIGHUP does).
    Reload,
}

impl AdminRequest {
    /// Whether the request changes state (logged with its author, saved to the state file).
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            AdminRequest::Status
                | AdminRequest::UserStatus { .. }
                | AdminRequest::Map { .. }
                | AdminRequest::Dump
                | AdminRequest::Reload
        )
    }
}

/// The reply to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    pub backends: Vec<BackendStatus>,
    /// Set while all health checks are paused.
    pub checks_paused: Option<PauseStatus>,
    /// Live sticky records, all backends.
    pub records: usize,
    /// Live sessions on this director.
    pub sessions: usize,
    /// `single` or `cluster`.
    #[serde(default)]
    pub mode: String,
    /// This director's place in the cluster (cluster mode only).
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// A cluster member's view of the cluster, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub director_id: String,
    /// Whether this director holds its etcd lease and serves logins.
    pub serving: bool,
    /// Whether this director runs the cluster's health checks.
    pub checker: bool,
    /// The live directors (this one included while it holds its lease).
    pub members: Vec<crate::state::cluster::MemberStatus>,
}

/// One backend in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    pub ip: IpAddr,
    pub host: String,
    pub tag: String,
    pub weight: u32,
    pub admin: AdminState,
    pub health: Health,
    /// The health checker's last result (filled once the checker reports).
    pub check: Option<CheckStatus>,
    /// Users with a live record on this backend.
    pub users: usize,
    /// Live sessions relayed to it.
    pub sessions: usize,
    pub maintenance: Option<MaintenanceStatus>,
}

/// The last health check of a backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckStatus {
    pub code: String,
    pub latency_ms: f64,
}

/// A maintenance under way. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceStatus {
    pub previous_weight: u32,
    pub allowed_users: Vec<String>,
    pub since: u64,
    pub until: Option<u64>,
}

/// A pause of the health checks. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseStatus {
    pub since: u64,
    pub until: Option<u64>,
}

/// The reply to `status USER`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserReply {
    pub user: String,
    pub hash: u32,
    /// The backend of the user's live record.
    pub current: Option<IpAddr>,
    /// Where the ring sends the user now.
    pub hashed: Option<IpAddr>,
    /// A backend in maintenance that lets this user in.
    pub maintenance_backend: Option<IpAddr>,
    /// Live sessions of the user on this director.
    pub sessions: usize,
    /// Seconds until the record expires; `None` while sessions are live or without record.
    pub expires_in_secs: Option<u64>,
}

/// Users a `map` page lists when no limit is given: a screenful for a small director, a
/// reply of about 100 KB at most.
pub const MAP_PAGE: usize = 1000;

/// The largest page `map` gives: about 10 MB of JSON, under a second to make at 10 million
/// records.
pub const MAP_PAGE_MAX: usize = 100_000;

/// The reply to `map`: one page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapReply {
    pub users: Vec<MapEntry>,
    /// Where the next page starts (`after`); absent on the last page.
    #[serde(default)]
    pub next: Option<u32>,
}

/// One user with a record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapEntry {
    pub hash: u32,
    /// The username, when this director saw it log in (records hold only hashes).
    pub user: Option<String>,
    pub backend: IpAddr,
    pub sessions: u32,
    pub expires_in_secs: Option<u64>,
}

/// The reply to a change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChangeReply {
    /// What was done, for people.
    pub message: String,
    /// The backends concerned.
    pub backends: Vec<IpAddr>,
    /// Users moved, records dropped, sessions ended.
    pub moved: usize,
    pub dropped: usize,
    pub kicked: usize,
    /// Users left where they were (a flush whose ring answer is their backend already).
    pub stayed: usize,
    /// Users left as they were: a move of theirs was already under way.
    pub busy: usize,
    /// Users whose move failed: the cluster state (etcd) could not be changed.
    #[serde(default)]
    pub failed: usize,
}

impl ChangeReply {
    fn add(&mut self, r: &MoveReport) {
        self.moved += r.moved;
        self.dropped += r.dropped;
        self.kicked += r.kicked;
        self.busy += r.busy;
        self.failed += r.failed;
    }
}

/// The reply to `dump`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpReply {
    /// `director ...` command lines that recreate the admin state, in order.
    pub commands: Vec<String>,
}

/// A refused or failed request: an HTTP status and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    pub status: u16,
    pub message: String,
}

impl AdminError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AdminError {
            status: status.as_u16(),
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    /// The change could not be made now (the cluster state is unreachable): nothing queued.
    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// Who sent a request, for the log line of every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A unix socket peer, by uid when the kernel tells it (SO_PEERCRED).
    Unix {
        uid: Option<u32>,
    },
    Tcp(SocketAddr),
    /// The director itself (a maintenance that ends by itself).
    Timer,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { uid: Some(uid) } => write!(f, "unix uid {uid}"),
            Peer::Unix { uid: None } => f.write_str("unix"),
            Peer::Tcp(a) => write!(f, "tcp {a}"),
            Peer::Timer => f.write_str("timer"),
        }
    }
}

/// What the admin verbs act on.
pub struct AdminContext {
    state: Arc<dyn State>,
    mover: Mover,
    router: Router,
    /// The running configuration; a reload swaps in the new one.
    config: arc_swap::ArcSwap<Config>,
    /// One change at a time: a change reads the state, acts, then saves the state file.
    changes: tokio::sync::Mutex<()>,
    check_results: Mutex<Option<CheckResults>>,
    /// What the `reload` verb runs; `None` until the director plugs it in.
    reload: Mutex<Option<ReloadHook>>,
}

fn secs_until(t: Instant, now: Instant) -> u64 {
    t.saturating_duration_since(now).as_secs()
}

impl AdminContext {
    pub fn new(
        state: Arc<dyn State>,
        sessions: Sessions,
        router: Router,
        config: Arc<Config>,
    ) -> Self {
        AdminContext {
            mover: Mover::new(state.clone(), sessions),
            state,
            router,
            config: arc_swap::ArcSwap::new(config),
            changes: tokio::sync::Mutex::new(()),
            check_results: Mutex::new(None),
            reload: Mutex::new(None),
        }
    }

    /// Counts the moves and kicks of admin verbs on the director's `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.mover = self.mover.with_metrics(metrics);
        self
    }

    /// The moves of flushes, downs and maintenance run `n` at once.
    pub fn with_parallelism(mut self, n: usize) -> Self {
        self.mover = self.mover.with_parallelism(n);
        self
    }

    /// Plugs in the health checker's last results, shown by `status`.
    pub fn set_check_results(&self, results: CheckResults) {
        *self.check_results.lock().unwrap() = Some(results);
    }

    /// Plugs in what the `reload` verb runs.
    pub fn set_reload(&self, hook: ReloadHook) {
        *self.reload.lock().unwrap() = Some(hook);
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Swaps in a reloaded configuration (settings of backends added later, `user_expire`
    /// shown...). The caller keeps what needs a restart (e.g. `state_file`) as it was.
    pub fn set_config(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// A reload changed the configuration's backend list from `old` to `new`: a host no
    /// longer listed is removed (its users moved off first) and a new one added, as `remove`
    /// and `add` would; a listed host whose weight or tag changed gets the new one. Backends
    /// an admin added or removed, and what the configuration did not change, stay as they
    /// are. Not written to the state file: the configuration holds these changes.
    pub async fn apply_backend_list(&self, old: &Config, new: &Config) -> ChangeReply {
        let _one_at_a_time = self.changes.lock().await;
        let key = |h: &str| h.to_ascii_lowercase();
        let mut total = ChangeReply::default();
        let (mut added, mut changed, mut removed) = (0, 0, 0);
        for b in &new.backends {
            let before = old.backends.iter().find(|o| key(&o.host) == key(&b.host));
            let (weight, tag) = match before {
                None => (Some(b.weight), Some(b.tag.clone())),
                Some(o) => (
                    (o.weight != b.weight).then_some(b.weight),
                    (o.tag != b.tag).then(|| b.tag.clone()),
                ),
            };
            if before.is_some() && weight.is_none() && tag.is_none() {
                continue;
            }
            match self.add(&b.host, weight, tag).await {
                Ok(r) => {
                    info!(host = %b.host, backends = %join(&r.backends), weight = ?weight,
                          "reload: backend added or changed as the configuration says");
                    if before.is_none() {
                        added += 1;
                    } else {
                        changed += 1;
                    }
                    total.backends.extend(r.backends);
                }
                Err(e) => warn!(host = %b.host, error = %e, "reload: backend not added"),
            }
        }
        for o in &old.backends {
            if new.backends.iter().any(|b| key(&b.host) == key(&o.host)) {
                continue;
            }
            let req = AdminRequest::Remove {
                host: o.host.clone(),
            };
            match self.change(req).await {
                Ok(r) => {
                    info!(host = %o.host, backends = %join(&r.backends), moved = r.moved,
                          kicked = r.kicked, "reload: backend no longer configured: removed, users moved off");
                    removed += 1;
                    total.add(&MoveReport {
                        moved: r.moved,
                        dropped: r.dropped,
                        kicked: r.kicked,
                        busy: r.busy,
                        failed: r.failed,
                    });
                    total.backends.extend(r.backends);
                }
                // Already removed by an admin: nothing to do.
                Err(e) => {
                    info!(host = %o.host, error = %e, "reload: backend no longer configured and already gone")
                }
            }
        }
        total.message = format!("backends: {added} added, {changed} changed, {removed} removed");
        total
    }

    /// Runs one request on behalf of `who`.
    pub async fn execute(
        &self,
        req: AdminRequest,
        who: &Peer,
    ) -> Result<serde_json::Value, AdminError> {
        if req == AdminRequest::Reload {
            let hook = self.reload.lock().unwrap().clone();
            let Some(hook) = hook else {
                return Err(AdminError::conflict(
                    "this director has no configuration file to reload",
                ));
            };
            info!(who = %who, "configuration reload asked");
            return match hook().await {
                Ok(message) => Ok(json(ChangeReply {
                    message,
                    ..ChangeReply::default()
                })),
                Err(e) => Err(AdminError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("configuration refused, the running one stays in force: {e}"),
                )),
            };
        }
        if !req.is_change() {
            return match req {
                AdminRequest::Status => Ok(json(self.status())),
                AdminRequest::UserStatus { user } => Ok(json(self.user_status(&user))),
                AdminRequest::Map { host, after, limit } => {
                    Ok(json(self.map(host.as_deref(), after, limit).await?))
                }
                _ => Ok(json(self.dump())),
            };
        }
        let _one_at_a_time = self.changes.lock().await;
        let result = self.change(req.clone()).await;
        match &result {
            Ok(reply) => {
                info!(who = %who, request = ?req, result = %reply.message, "admin change");
                self.save();
            }
            Err(e) => warn!(who = %who, request = ?req, error = %e, "admin change refused"),
        }
        result.map(json)
    }

    /// Saves the state file, if one is configured.
    fn save(&self) {
        if let Some(path) = &self.config.load().state_file {
            let saved = crate::state::file::snapshot(&*self.state);
            if let Err(e) = crate::state::file::save(path, &saved) {
                warn!(error = %e, "admin state not saved: a restart would undo this change");
            }
        }
    }

    /// Ends the maintenances whose `--for` has passed. Called every second.
    pub async fn end_expired_maintenance(&self) {
        let now = SystemTime::now();
        let expired: Vec<IpAddr> = self
            .state
            .maintenance()
            .iter()
            .filter(|(_, m)| m.until.is_some_and(|u| u <= now))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in expired {
            let req = AdminRequest::MaintenanceStop {
                host: ip.to_string(),
            };
            let _ = self.execute(req, &Peer::Timer).await;
        }
    }

    fn status(&self) -> StatusReply {
        let now = Instant::now();
        let set = self.state.backends();
        let maintenance = self.state.maintenance();
        // Counted shard by shard, never listed: status stays cheap at millions of records.
        let records = self.state.record_counts(now);
        let checks = self
            .check_results
            .lock()
            .unwrap()
            .clone()
            .map(|f| f())
            .unwrap_or_default();
        let backends =
            set.backends
                .values()
                .map(|b| BackendStatus {
                    ip: b.ip,
                    host: b.host.to_string(),
                    tag: b.tag.to_string(),
                    weight: b.weight,
                    admin: b.admin,
                    health: b.health,
                    check: checks.iter().find(|(ip, _, _)| *ip == b.ip).map(
                        |(_, code, latency)| CheckStatus {
                            code: code.clone(),
                            latency_ms: latency.as_secs_f64() * 1000.0,
                        },
                    ),
                    users: records.by_backend.get(&b.ip).copied().unwrap_or(0),
                    sessions: self.mover.sessions.count_backend_ip(b.ip),
                    maintenance: maintenance.get(&b.ip).map(maintenance_status),
                })
                .collect();
        StatusReply {
            backends,
            checks_paused: self.state.checks_pause().map(|p| PauseStatus {
                since: crate::state::file::unix_secs(p.since),
                until: p.until.map(crate::state::file::unix_secs),
            }),
            records: records.total,
            sessions: self.mover.sessions.list().len(),
            mode: match self.state.mode() {
                StateMode::Single => "single".into(),
                StateMode::Cluster { .. } => "cluster".into(),
            },
            cluster: match self.state.mode() {
                StateMode::Single => None,
                StateMode::Cluster {
                    director_id,
                    serving,
                    checker,
                } => Some(ClusterStatus {
                    director_id,
                    serving,
                    checker,
                    members: self.state.members(),
                }),
            },
        }
    }

    fn user_status(&self, user: &str) -> UserReply {
        let now = Instant::now();
        let hash = self.router.hash(user);
        let record = self.state.record(hash, now);
        let set = self.state.backends();
        UserReply {
            user: user.to_owned(),
            hash,
            current: record.map(|r| r.backend),
            hashed: set.ring("").and_then(|r| r.lookup(hash)),
            maintenance_backend: self
                .state
                .maintenance()
                .iter()
                .find(|(_, m)| m.allows(user))
                .map(|(ip, _)| *ip),
            sessions: self.mover.sessions.count_user(hash),
            expires_in_secs: record
                .and_then(|r| r.expires_at(self.config.load().user_expire.into()))
                .map(|t| secs_until(t, now)),
        }
    }

    /// One page of users with records. The state pages its records (never a list of them
    /// all); usernames come with the records, and those it lacks from this director's live
    /// sessions, found in one pass over them.
    async fn map(
        &self,
        host: Option<&str>,
        after: Option<u32>,
        limit: Option<usize>,
    ) -> Result<MapReply, AdminError> {
        let limit = limit.unwrap_or(MAP_PAGE);
        if !(1..=MAP_PAGE_MAX).contains(&limit) {
            return Err(AdminError::bad(format!(
                "limit {limit}: a page holds 1 to {MAP_PAGE_MAX} users"
            )));
        }
        let only = match host {
            Some(h) => Some(self.existing(h).await?),
            None => None,
        };
        let now = Instant::now();
        let page = self.state.records_page(now, after, limit, &|ip| {
            only.as_ref().is_none_or(|ips| ips.contains(&ip))
        });
        let unnamed: HashSet<u32> = page
            .records
            .iter()
            .filter(|r| r.username.is_none())
            .map(|r| r.hash)
            .collect();
        let mut from_sessions = self.mover.sessions.usernames_of(&unnamed);
        let expire = self.config.load().user_expire.into();
        let mut users: Vec<MapEntry> = page
            .records
            .into_iter()
            .map(|r| MapEntry {
                hash: r.hash,
                user: r.username.or_else(|| from_sessions.remove(&r.hash)),
                backend: r.record.backend,
                sessions: r.record.sessions,
                expires_in_secs: r.record.expires_at(expire).map(|t| secs_until(t, now)),
            })
            .collect();
        users.sort_by(|a, b| (a.backend, &a.user, a.hash).cmp(&(b.backend, &b.user, b.hash)));
        Ok(MapReply {
            users,
            next: page.next,
        })
    }

    fn dump(&self) -> DumpReply {
        let set = self.state.backends();
        let maintenance = self.state.maintenance();
        let now = SystemTime::now();
        let mut commands = Vec::new();
        for b in set.backends.values() {
            let m = maintenance.get(&b.ip);
            let weight = m.map_or(b.weight, |m| m.previous_weight);
            let mut add = format!("director add {} {weight}", b.ip);
            if !b.tag.is_empty() {
                add += &format!(" --tag {}", quote_arg(&b.tag));
            }
            commands.push(add);
            if b.admin == AdminState::Down {
                commands.push(format!("director down {}", b.ip));
            }
            if let Some(m) = m {
                let mut line = format!("director maintenance {} start", b.ip);
                if let Some(until) = m.until {
                    let left = until.duration_since(now).unwrap_or_default().as_secs();
                    line += &format!(" --for {}s", left.max(1));
                }
                for u in &m.allowed_users {
                    line += &format!(" --allow-user {}", quote_arg(u));
                }
                commands.push(line);
            }
        }
        if let Some(p) = self.state.checks_pause() {
            let mut line = "director checks pause".to_owned();
            if let Some(until) = p.until {
                let left = until.duration_since(now).unwrap_or_default().as_secs();
                line += &format!(" --for {}s", left.max(1));
            }
            commands.push(line);
        }
        DumpReply { commands }
    }

    /// The backends `host` names (an IP, or the name they were configured or added with, or
    /// a DNS name that resolves to them).
    async fn existing(&self, host: &str) -> Result<Vec<IpAddr>, AdminError> {
        let set = self.state.backends();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return match set.get(ip) {
                Some(_) => Ok(vec![ip]),
                None => Err(AdminError::not_found(format!("no backend {ip}"))),
            };
        }
        let named: Vec<IpAddr> = set
            .backends
            .values()
            .filter(|b| b.host.eq_ignore_ascii_case(host))
            .map(|b| b.ip)
            .collect();
        if !named.is_empty() {
            return Ok(named);
        }
        let resolved = crate::net::resolve::resolve_host(host)
            .await
            .map_err(|e| AdminError::not_found(format!("{host}: {e}")))?;
        let ips: Vec<IpAddr> = resolved
            .into_iter()
            .filter(|ip| set.get(*ip).is_some())
            .collect();
        if ips.is_empty() {
            return Err(AdminError::not_found(format!("no backend {host}")));
        }
        Ok(ips)
    }

    /// The one backend `host` names.
    async fn one(&self, host: &str) -> Result<IpAddr, AdminError> {
        let ips = self.existing(host).await?;
        match ips[..] {
            [ip] => Ok(ip),
            _ => Err(AdminError::bad(format!(
                "{host} names several backends ({}): give one address",
                join(&ips)
            ))),
        }
    }

    async fn change(&self, req: AdminRequest) -> Result<ChangeReply, AdminError> {
        match req {
            AdminRequest::Add { host, weight, tag } => self.add(&host, weight, tag).await,
            AdminRequest::Update { host, weight } => {
                check_weight(weight)?;
                let ips = self.existing(&host).await?;
                for ip in &ips {
                    self.set_weight(*ip, weight).await?;
                }
                Ok(reply(format!("weight {weight}"), ips))
            }
            AdminRequest::Up { host } => {
                let ips = self.existing(&host).await?;
                for ip in &ips {
                    self.end_maintenance(*ip).await?;
                    self.state
                        .set_admin(*ip, AdminState::Up)
                        .await
                        .map_err(state_err)?;
                }
                Ok(reply("up".into(), ips))
            }
            AdminRequest::Down { host } => {
                let ips = self.existing(&host).await?;
                for ip in &ips {
                    self.end_maintenance(*ip).await?;
                }
                self.take_down(reply("down; users moved off".into(), ips.clone()))
                    .await
            }
            AdminRequest::Remove { host } => {
                let ips = self.existing(&host).await?;
                let r = self
                    .take_down(reply("removed; users moved off".into(), ips.clone()))
                    .await?;
                for ip in &ips {
                    self.state
                        .set_maintenance(*ip, None)
                        .await
                        .map_err(state_err)?;
                    self.state.remove_backend(*ip).await.map_err(state_err)?;
                }
                Ok(r)
            }
            AdminRequest::Move { user, host } => {
                let ip = self.one(&host).await?;
                let b = self.state.backends().get(ip).cloned();
                if b.is_some_and(|b| b.admin != AdminState::Up) {
                    return Err(AdminError::conflict(format!(
                        "{ip} is down or in maintenance: it would not serve {user}"
                    )));
                }
                let hash = self.router.hash(&user);
                let report = self
                    .mover
                    .move_user(hash, Some(ip), MoveReason::Admin)
                    .await;
                if report.busy > 0 {
                    return Err(AdminError::conflict(format!(
                        "{user} is being moved already; try again"
                    )));
                }
                if report.failed > 0 {
                    return Err(AdminError::unavailable(format!(
                        "{user} not moved: the cluster state cannot be changed now (see the log)"
                    )));
                }
                let mut r = reply(format!("{user} moved"), vec![ip]);
                r.add(&report);
                Ok(r)
            }
            AdminRequest::Kick { user } => {
                let hash = self.router.hash(&user);
                let kicked = self.mover.kick_everywhere(hash).await.map_err(state_err)?;
                self.mover.metrics.moved(MoveReason::Kick, 0, kicked);
                info!(user = %crate::untrusted::shown(&user), user_hash = hash, kicked, reason = %MoveReason::Kick, "user kicked");
                Ok(ChangeReply {
                    message: format!("{user}: {kicked} sessions ended"),
                    kicked,
                    ..ChangeReply::default()
                })
            }
            AdminRequest::Flush { host, force } => {
                let ips = match host.as_deref() {
                    None | Some("all") => self.state.backends().backends.keys().copied().collect(),
                    Some(h) => self.existing(h).await?,
                };
                let mut r = reply(
                    if force {
                        "records dropped".into()
                    } else {
                        "users sent where the ring sends them".into()
                    },
                    ips.clone(),
                );
                for ip in ips {
                    self.flush(ip, force, &mut r).await;
                }
                Ok(r)
            }
            AdminRequest::MaintenanceStart {
                host,
                for_secs,
                allow_users,
            } => {
                let ip = self.one(&host).await?;
                self.maintenance_start(ip, for_secs, allow_users).await
            }
            AdminRequest::MaintenanceStop { host } => {
                let ip = self.one(&host).await?;
                if !self.end_maintenance(ip).await? {
                    return Err(AdminError::conflict(format!("{ip} is not in maintenance")));
                }
                Ok(reply("maintenance ended".into(), vec![ip]))
            }
            AdminRequest::ChecksPause { for_secs } => {
                let since = SystemTime::now();
                let until = for_secs.map(|s| since + Duration::from_secs(s));
                self.state
                    .set_checks_pause(Some(ChecksPause { since, until }))
                    .await
                    .map_err(state_err)?;
                Ok(reply(
                    match for_secs {
                        Some(s) => format!("health checks paused for {s}s"),
                        None => "health checks paused".into(),
                    },
                    Vec::new(),
                ))
            }
            AdminRequest::ChecksResume => {
                self.state.set_checks_pause(None).await.map_err(state_err)?;
                Ok(reply("health checks resumed".into(), Vec::new()))
            }
            AdminRequest::Status
            | AdminRequest::UserStatus { .. }
            | AdminRequest::Map { .. }
            | AdminRequest::Dump
            | AdminRequest::Reload => Err(AdminError::bad("not a change")),
        }
    }

    async fn add(
        &self,
        host: &str,
        weight: Option<u32>,
        tag: Option<String>,
    ) -> Result<ChangeReply, AdminError> {
        if let Some(w) = weight {
            check_weight(w)?;
        }
        let ips = crate::net::resolve::resolve_host(host)
            .await
            .map_err(|e| AdminError::bad(format!("{host}: {e}")))?;
        let set = self.state.backends();
        for ip in &ips {
            match set.get(*ip) {
                Some(existing) => {
                    // Dovecot's `add` of a known host sets its weight (and here its tag).
                    if let Some(w) = weight {
                        self.set_weight(*ip, w).await?;
                    }
                    if let Some(t) = &tag {
                        let mut b = self
                            .state
                            .backends()
                            .get(*ip)
                            .cloned()
                            .unwrap_or_else(|| existing.clone());
                        b.tag = t.as_str().into();
                        self.state.upsert_backend(b).await.map_err(state_err)?;
                    }
                }
                None => self
                    .state
                    .upsert_backend(Backend {
                        ip: *ip,
                        host: host.into(),
                        weight: weight.unwrap_or(100),
                        tag: tag.as_deref().unwrap_or_default().into(),
                        admin: AdminState::Up,
                        health: Health::Up,
                        settings: Arc::new(self.config.load().settings_for_host(host)),
                    })
                    .await
                    .map_err(state_err)?,
            }
        }
        Ok(reply("added".into(), ips))
    }

    /// Sets a weight; in maintenance, the weight restored at its end.
    async fn set_weight(&self, ip: IpAddr, weight: u32) -> Result<(), AdminError> {
        if let Some(mut m) = self.state.maintenance().get(&ip).cloned() {
            m.previous_weight = weight;
            self.state.set_maintenance(ip, Some(m)).await
        } else {
            self.state.set_weight(ip, weight).await
        }
        .map_err(state_err)
    }

    /// Ends a maintenance: previous weight back, admin up. False if there was none.
    /// Sets the reply's backends down, then moves their users off, and adds each move's
    /// report to the reply.
    async fn take_down(&self, mut r: ChangeReply) -> Result<ChangeReply, AdminError> {
        let ips = r.backends.clone();
        for ip in &ips {
            self.state
                .set_admin(*ip, AdminState::Down)
                .await
                .map_err(state_err)?;
        }
        for ip in &ips {
            r.add(
                &self
                    .mover
                    .evacuate(*ip, MoveReason::Maintenance, false)
                    .await,
            );
        }
        Ok(r)
    }

    async fn end_maintenance(&self, ip: IpAddr) -> Result<bool, AdminError> {
        let Some(m) = self.state.maintenance().get(&ip).cloned() else {
            return Ok(false);
        };
        self.state
            .set_maintenance(ip, None)
            .await
            .map_err(state_err)?;
        self.state
            .set_weight(ip, m.previous_weight)
            .await
            .map_err(state_err)?;
        self.state
            .set_admin(ip, AdminState::Up)
            .await
            .map_err(state_err)?;
        Ok(true)
    }

    async fn maintenance_start(
        &self,
        ip: IpAddr,
        for_secs: Option<u64>,
        allow_users: Vec<String>,
    ) -> Result<ChangeReply, AdminError> {
        let since = SystemTime::now();
        let until = for_secs.map(|s| since + Duration::from_secs(s));
        let set = self.state.backends();
        let b = set
            .get(ip)
            .ok_or_else(|| AdminError::not_found(format!("no backend {ip}")))?;
        let previous_weight = match self.state.maintenance().get(&ip) {
            Some(m) => m.previous_weight,
            None => b.weight,
        };
        self.state
            .set_maintenance(
                ip,
                Some(Maintenance {
                    previous_weight,
                    allowed_users: allow_users.clone(),
                    since,
                    until,
                }),
            )
            .await
            .map_err(state_err)?;
        self.state.set_weight(ip, 0).await.map_err(state_err)?;
        self.state
            .set_admin(ip, AdminState::Maintenance)
            .await
            .map_err(state_err)?;
        let mut r = reply("maintenance started; users moved off".into(), vec![ip]);
        // Everyone but the allowed users leaves, to where the ring (without this backend)
        // sends them; the allowed users come here, their sessions elsewhere ended first.
        let allowed: HashSet<u32> = allow_users.iter().map(|u| self.router.hash(u)).collect();
        let now = Instant::now();
        let set = self.state.backends();
        let tag = set.get(ip).map(|b| b.tag.clone()).unwrap_or_default();
        let mut moves: Vec<(u32, Option<IpAddr>)> = self
            .state
            .records_on(ip, now)
            .into_iter()
            .filter(|hash| !allowed.contains(hash))
            .map(|hash| (hash, set.ring(&tag).and_then(|ring| ring.lookup(hash))))
            .collect();
        moves.extend(
            allowed
                .into_iter()
                .filter(|hash| {
                    self.state
                        .record(*hash, now)
                        .is_some_and(|rec| rec.backend != ip)
                })
                .map(|hash| (hash, Some(ip))),
        );
        r.add(&self.mover.move_many(moves, MoveReason::Maintenance).await);
        Ok(r)
    }

    /// Flush of one backend: every user with a record there goes where the ring now sends
    /// it (sessions ended first); users the ring sends there already stay. With `force`,
    /// the records are only dropped (Dovecot's `flush -F`): sessions go on.
    async fn flush(&self, ip: IpAddr, force: bool, r: &mut ChangeReply) {
        let set = self.state.backends();
        let tag = set.get(ip).map(|b| b.tag.clone()).unwrap_or_default();
        let users: Vec<u32> = self.state.records_on(ip, Instant::now());
        let mut moves = Vec::new();
        for hash in users {
            if force {
                match self.state.remove_record(hash).await {
                    Ok(()) => r.dropped += 1,
                    Err(e) => {
                        warn!(user_hash = hash, error = %e, "record not dropped");
                        r.failed += 1;
                    }
                }
                continue;
            }
            let to = set.ring(&tag).and_then(|ring| ring.lookup(hash));
            if to == Some(ip) {
                r.stayed += 1;
                continue;
            }
            moves.push((hash, to));
        }
        r.add(&self.mover.move_many(moves, MoveReason::Flush).await);
    }
}

fn maintenance_status(m: &Maintenance) -> MaintenanceStatus {
    MaintenanceStatus {
        previous_weight: m.previous_weight,
        allowed_users: m.allowed_users.clone(),
        since: crate::state::file::unix_secs(m.since),
        until: m.until.map(crate::state::file::unix_secs),
    }
}

fn json<T: Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).expect("admin replies serialise")
}

fn reply(message: String, backends: Vec<IpAddr>) -> ChangeReply {
    ChangeReply {
        message,
        backends,
        ..ChangeReply::default()
    }
}

fn check_weight(w: u32) -> Result<(), AdminError> {
    if w > MAX_WEIGHT {
        return Err(AdminError::bad(format!(
            "weight {w} is above the maximum {MAX_WEIGHT}"
        )));
    }
    Ok(())
}

fn state_err(e: crate::state::StateError) -> AdminError {
    use crate::state::StateError;
    match e {
        StateError::Unavailable(_) | StateError::Fenced => AdminError::unavailable(e.to_string()),
        StateError::NoSuchBackend(_) => AdminError::not_found(e.to_string()),
        StateError::WeightTooLarge(_) => AdminError::bad(e.to_string()),
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An argument as `dump` writes it: single-quoted when it holds anything but plain
/// characters (the CLI's `import` reads it back).
pub fn quote_arg(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._+-=:/%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The unix socket, with each peer's uid.
struct UnixAdmin(UnixListener);

impl Listener for UnixAdmin {
    type Io = UnixStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (UnixStream, Peer) {
        loop {
            match self.0.accept().await {
                Ok((s, _)) => {
                    let uid = s.peer_cred().ok().map(|c| c.uid());
                    return (s, Peer::Unix { uid });
                }
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer::Unix { uid: None })
    }
}

/// The TCP listener: peers outside `allow_from` are closed at once (and logged).
struct TcpAdmin {
    listener: TcpListener,
    allow_from: Vec<Network>,
}

impl Listener for TcpAdmin {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (TcpStream, Peer) {
        loop {
            match self.listener.accept().await {
                Ok((s, peer))
                    if crate::config::network::any_contains(&self.allow_from, peer.ip()) =>
                {
                    return (s, Peer::Tcp(peer));
                }
                Ok((_, peer)) => {
                    warn!(peer = %peer, "admin connection refused: not in admin.tcp.allow_from");
                }
                Err(e) => {
                    warn!(error = %e, "admin TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        self.listener.local_addr().map(Peer::Tcp)
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, UnixAdmin>> for Peer {
    fn connect_info(s: IncomingStream<'_, UnixAdmin>) -> Peer {
        s.remote_addr().clone()
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TcpAdmin>> for Peer {
    fn connect_info(s: IncomingStream<'_, TcpAdmin>) -> Peer {
        s.remote_addr().clone()
    }
}

/// Handler state: the context and the TCP bearer token.
#[derive(Clone)]
struct Api {
    ctx: Arc<AdminContext>,
    token: Option<Arc<String>>,
}

impl Api {
    /// Unix peers are trusted (the socket is owner-only); TCP peers need the token.
    fn authorise(&self, peer: &Peer, headers: &HeaderMap) -> Result<(), AdminError> {
        if !matches!(peer, Peer::Tcp(_)) {
            return Ok(());
        }
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let ok = match (given, &self.token) {
            (Some(g), Some(t)) => constant_time_eq(g.as_bytes(), t.as_bytes()),
            _ => false,
        };
        if ok {
            return Ok(());
        }
        warn!(peer = %peer, token_given = given.is_some(), "admin request refused: wrong or missing bearer token");
        Err(AdminError::new(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer ...)",
        ))
    }
}

/// The token of an `Authorization: Bearer TOKEN` value. The scheme is case-insensitive and
/// may be followed by several spaces (RFC 7235 §2.1), so `bearer TOKEN` from a client that
/// writes it in lower case is accepted too. `None` for another scheme or no token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn command(
    Extract(api): Extract<Api>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Json(req): Json<AdminRequest>,
) -> Result<Json<serde_json::Value>, AdminError> {
    api.authorise(&peer, &headers)?;
    api.ctx.execute(req, &peer).await.map(Json)
}

async fn status(
    Extract(api): Extract<Api>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, AdminError> {
    api.authorise(&peer, &headers)?;
    api.ctx.execute(AdminRequest::Status, &peer).await.map(Json)
}

fn routes(api: Api) -> axum::Router {
    axum::Router::new()
        .route("/v1/command", post(command))
        .route("/v1/status", get(status))
        .with_state(api)
}

/// The admin API, bound and ready to serve.
pub struct AdminServer {
    pub context: Arc<AdminContext>,
    unix: UnixListener,
    socket_path: PathBuf,
    tcp: Option<(TcpListener, Vec<Network>, String)>,
}

/// Removes the socket file when the server stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl AdminServer {
    /// Binds the unix socket (owner-only; parent directory created) and, if configured, the
    /// TCP listener, whose token file must be readable by its owner only.
    pub async fn bind(context: Arc<AdminContext>) -> Result<AdminServer, ConfigError> {
        let config = context.config();
        let path = &config.admin.socket;
        let unix = bind_unix(path)?;
        let tcp = match &config.admin.tcp {
            None => None,
            Some(t) => {
                let token = read_token(&t.token_file)?;
                let listener = TcpListener::bind(t.address).await.map_err(|e| {
                    ConfigError(format!(
                        "admin.tcp.address: cannot listen on {}: {e}",
                        t.address
                    ))
                })?;
                Some((listener, t.allow_from.clone(), token))
            }
        };
        Ok(AdminServer {
            context,
            unix,
            socket_path: path.clone(),
            tcp,
        })
    }

    /// The TCP listener's address, if there is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _, _)| l.local_addr().ok())
    }

    /// Serves until the returned future is dropped (the socket file is then removed); ends
    /// maintenances whose time is up.
    pub async fn serve(self) {
        let _socket = SocketFile(self.socket_path.clone());
        info!(socket = %self.socket_path.display(), "admin API listening");
        let ctx = self.context.clone();
        let timer = async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                ctx.end_expired_maintenance().await;
            }
        };
        let unix_api = Api {
            ctx: self.context.clone(),
            token: None,
        };
        let unix = axum::serve(
            UnixAdmin(self.unix),
            routes(unix_api).into_make_service_with_connect_info::<Peer>(),
        );
        let tcp = async move {
            let Some((listener, allow_from, token)) = self.tcp else {
                return std::future::pending::<()>().await;
            };
            if let Ok(a) = listener.local_addr() {
                info!(address = %a, "admin API listening on TCP");
            }
            let api = Api {
                ctx: self.context.clone(),
                token: Some(Arc::new(token)),
            };
            let _ = axum::serve(
                TcpAdmin {
                    listener,
                    allow_from,
                },
                routes(api).into_make_service_with_connect_info::<Peer>(),
            )
            .await;
        };
        tokio::select! {
            _ = timer => {},
            r = unix => if let Err(e) = r { warn!(error = %e, "admin API stopped") },
            _ = tcp => {},
        }
    }
}

/// Binds the unix socket under a temporary name, makes it owner-only, then renames it into
/// place, so that it is never reachable with wider permissions. A socket left by a director
/// that is gone is replaced; one that answers is another director's: an error.
fn bind_unix(path: &Path) -> Result<UnixListener, ConfigError> {
    let field = |e: String| ConfigError(format!("admin.socket: {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| field(format!("cannot create {}: {e}", dir.display())))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(field(
                "another director is serving this socket (stop it, or give this one another admin.socket)".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| field(format!("cannot remove the stale socket: {e}")))?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| field(format!("cannot listen: {e}")))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            field(format!("cannot set up: {e}"))
        })?;
    Ok(listener)
}

/// Reads the TCP bearer token; refuses a file that group or others may read or write, or a
/// token shorter than 16 characters. `serve` calls it before listening, `check-config` too, so
/// that a file `serve` would refuse is refused by `check-config` first.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    let field = |e: String| ConfigError(format!("admin.tcp.token_file: {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| field(format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(field(format!(
            "mode {mode:04o} lets group or others at the token: chmod 600 it"
        )));
    }
    let token = std::fs::read_to_string(path)
        .map_err(|e| field(format!("cannot read: {e}")))?
        .trim()
        .to_owned();
    if token.len() < 16 {
        return Err(field(
            "the token is shorter than 16 characters: use a long random one".into(),
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer tok",
            "bearer tok",
            "BEARER tok",
            "Bearer   tok ",
            " bEaReR tok",
        ] {
            assert_eq!(bearer_token(value), Some("tok"), "{value:?}");
        }
        for value in [
            "Basic dG9rOg==",
            "Bearer",
            "Bearer ",
            "Bearertok",
            "tok",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
