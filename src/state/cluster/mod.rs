//! The [`State`] that several directors share through etcd (DESIGN.md, "Cluster mode").
//!
//! Reads come from this director's replica ([`replica`]), kept current by one watch, so a
//! login with a record costs no round trip. Writes are etcd transactions that compare the
//! revision the replica holds (never read-then-write); a writer then waits until its write is
//! in the replica. A sticky record is created by a "create if absent" transaction: of two
//! directors racing on a new user, the loser takes the winner's backend.
//!
//! A move (kick, move, flush, evacuation): the record is marked `moving` (logins of the user
//! wait on every director); every other director sees the mark, ends its sessions of the
//! user and writes an acknowledgement under its lease; the mover, having ended its own,
//! waits for an acknowledgement from every live director (one whose lease expired is no
//! longer a member), then writes the record's new backend. Fencing ([`lease`]) makes that
//! safe against a director that cannot hear of the move: before its lease can expire it
//! has stopped serving and ended its sessions.
//!
//! Health: one director at a time runs the checks, elected through the `checker` key
//! under its lease; others pass their logins' failures to it (`suspects/`).

pub mod etcd;
pub mod keys;
pub mod lease;
pub mod replica;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, DeleteOptions, EventType, TxnOp, TxnOpResponse};
use tracing::{debug, info, warn};

use crate::config::{BackendSettings, ClusterConfig, Config, ConfigError};
use crate::metrics::Metrics;
use crate::routing::sticky::StickyRecord;
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::local::LocalState;
use crate::state::sessions::Sessions;
pub use crate::state::MemberStatus;
use crate::state::{
    BackendSet, ChecksPause, Maintenance, State, StateError, StateFuture, StateMode,
};

use self::etcd::Etcd;
use self::keys::{
    encode, now_ms, BackendValue, HealthValue, Keys, MaintenanceValue, MoveMark, PauseValue,
    SuspectValue, UserValue,
};
use self::replica::{Effect, Replica, Versioned};

/// How long an acknowledging director waits for its sessions of a moved user to end
/// (the local mover's limit too).
const SESSION_END_WAIT: Duration = Duration::from_secs(10);
/// Transactions retried after a conflict (another director wrote the key meanwhile).
const CAS_TRIES: usize = 5;
/// How often, and how much, of etcd's history the checker compacts.
const COMPACT_EVERY: Duration = Duration::from_secs(600);
/// Keys per page of a full read of the state.
const LOAD_PAGE: i64 = 10_000;
/// Record refreshes in flight at once.
const REFRESHES_AT_ONCE: usize = 32;
/// The least time between two suspicions of one backend sent by this director.
const SUSPECT_EVERY: Duration = Duration::from_secs(1);

/// The cluster's state, as one director holds it.
#[derive(Clone)]
pub struct ClusterState {
    inner: Arc<Inner>,
}

struct Inner {
    me: String,
    keys: Keys,
    etcd: Etcd,
    cluster: ClusterConfig,
    user_expire: Duration,
    refresh: Duration,
    /// Backends with health, maintenance and the checks pause, rebuilt from the replica:
    /// read on every login without locking.
    local: Arc<LocalState>,
    replica: Replica,
    /// The configuration's settings per host name, for backends the replica names.
    config: Mutex<Arc<Config>>,
    /// Settings a reload gave a backend.
    settings: Mutex<HashMap<IpAddr, Arc<BackendSettings>>>,
    sessions: Sessions,
    metrics: Metrics,
    /// This director's lease (0: none).
    lease: AtomicI64,
    /// Whether this director may start backend sessions (holds its lease, replica fresh).
    serving: AtomicBool,
    /// This director's sessions per user, for refreshes.
    usage: Mutex<HashMap<u32, Usage>>,
    /// Moves this director runs, from before their mark is written until they are finished
    /// or have failed: a mark of this director that is not here is one that nothing runs
    /// (see [`ClusterState::orphaned`]).
    own_moves: Mutex<OwnMoves>,
    /// Moves of others this director has acknowledged or is acknowledging.
    acking: Mutex<HashSet<String>>,
    move_counter: AtomicU64,
    awaiting_acks: AtomicUsize,
    /// Called on the checker when another director suspects a backend.
    on_suspect: OnceLock<Box<dyn Fn(IpAddr) + Send + Sync>>,
    suspects_sent: Mutex<HashMap<IpAddr, Instant>>,
    started_ms: u64,
    /// Revisions sampled for compaction, oldest first.
    history: Mutex<std::collections::VecDeque<(Instant, i64)>>,
    /// [`NO_ACKS_ENV`] was set: moves neither end other directors' sessions nor wait.
    no_acks: bool,
}

/// Set to `1` in a director's environment, it takes no part in the move protocol: it ends
/// no sessions for other directors' moves and does not wait for acknowledgements of its
/// own. Unsafe (users end up on two backends); it exists so that the chaos test can prove
/// that its oracle catches exactly that.
pub const NO_ACKS_ENV: &str = "DIRECTOR_UNSAFE_NO_MOVE_ACKS";

/// The moves this director runs.
#[derive(Debug, Default)]
struct OwnMoves {
    /// (user hash, move id) of marks being written.
    starting: HashSet<(u32, String)>,
    /// The move id of each user whose mark is written, until the move is finished or failed.
    running: HashMap<u32, String>,
}

impl OwnMoves {
    /// Whether this director runs move `id` of user `hash`.
    fn runs(&self, hash: u32, id: &str) -> bool {
        self.running.get(&hash).is_some_and(|r| r == id)
            || self.starting.contains(&(hash, id.to_owned()))
    }
}

/// This director's use of one user's record.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    sessions: u32,
    /// The last session ended since the record was last refreshed: refresh it once more
    /// so that its expiry counts from the end.
    ended: bool,
}

fn unavailable(what: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(what.to_string())
}

/// The revision a transaction's answer carries.
fn revision_of(r: &etcd_client::TxnResponse) -> i64 {
    r.header().map_or(0, |h| h.revision())
}

/// The key-values a transaction's `get` branch returned.
fn got(r: &etcd_client::TxnResponse) -> Vec<etcd_client::KeyValue> {
    r.op_responses()
        .into_iter()
        .filter_map(|o| match o {
            TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

impl ClusterState {
    /// Connects to etcd, adds the configured backends if the cluster has none yet, loads the
    /// replica and starts the watch, the lease (membership, election, fencing) and the
    /// record refresher. Fails when etcd cannot be reached: a director does not start
    /// without its shared state.
    pub async fn start(
        config: &Config,
        cluster: &ClusterConfig,
        configured: Vec<Backend>,
        sessions: Sessions,
        metrics: Metrics,
    ) -> Result<ClusterState, ConfigError> {
        let etcd = Etcd::connect(&cluster.etcd, metrics.clone()).await?;
        let keys = Keys::new(&cluster.etcd.prefix);
        let user_expire: Duration = config.user_expire.into();
        let inner = Arc::new(Inner {
            me: cluster.director_id.clone(),
            replica: Replica::new(keys.clone(), &cluster.director_id),
            keys,
            etcd,
            cluster: cluster.clone(),
            user_expire,
            refresh: cluster.record_refresh_for(user_expire),
            local: Arc::new(LocalState::new(Vec::new(), user_expire)),
            config: Mutex::new(Arc::new(config.clone())),
            settings: Mutex::new(HashMap::new()),
            sessions,
            metrics,
            lease: AtomicI64::new(0),
            serving: AtomicBool::new(false),
            usage: Mutex::new(HashMap::new()),
            own_moves: Mutex::new(OwnMoves::default()),
            acking: Mutex::new(HashSet::new()),
            move_counter: AtomicU64::new(0),
            awaiting_acks: AtomicUsize::new(0),
            on_suspect: OnceLock::new(),
            suspects_sent: Mutex::new(HashMap::new()),
            started_ms: now_ms(),
            no_acks: std::env::var(NO_ACKS_ENV).is_ok_and(|v| v == "1"),
            history: Mutex::new(std::collections::VecDeque::new()),
        });
        if inner.no_acks {
            warn!("{NO_ACKS_ENV}=1: this director ignores the move protocol: users WILL end up on two backends");
        }
        inner.metrics.cluster_mode(true);
        let state = ClusterState { inner };
        let fail = |e: StateError| {
            ConfigError(format!(
                "cluster.etcd: {e} (endpoints {})",
                cluster.etcd.endpoints.join(", ")
            ))
        };
        state.seed(&configured).await.map_err(fail)?;
        let revision = state.load().await.map_err(fail)?;
        tokio::spawn(state.clone().watch_loop(revision));
        lease::start(state.clone()).await;
        tokio::spawn(state.clone().refresh_loop());
        info!(director_id = %state.inner.me, prefix = %state.inner.keys.prefix(),
              backends = state.inner.local.backends().backends.len(),
              records = state.inner.replica.contents.lock().unwrap().users.len(),
              "cluster: joined; state in etcd");
        Ok(state)
    }

    /// The replica's backends, maintenance and pause as a [`LocalState`] (read-only use:
    /// changes made to it directly do not reach etcd).
    pub fn local(&self) -> Arc<LocalState> {
        self.inner.local.clone()
    }

    /// How long a move may wait for acknowledgements (`cluster.move_timeout`).
    pub fn move_timeout(&self) -> Duration {
        self.inner.cluster.move_timeout
    }

    /// The elected checker's housekeeping of etcd: every [`COMPACT_EVERY`], the history
    /// older than [`COMPACT_EVERY`] is dropped (a director whose watch is further behind
    /// than that reads the state afresh). Called from the janitor.
    pub async fn compact_history(&self) {
        let now = Instant::now();
        let revision = self.inner.replica.applied();
        let due = {
            let mut samples = self.inner.history.lock().unwrap();
            if samples
                .back()
                .is_none_or(|(at, _)| now >= *at + COMPACT_EVERY)
            {
                samples.push_back((now, revision));
            }
            let mut due = None;
            while samples
                .front()
                .is_some_and(|(at, _)| now >= *at + COMPACT_EVERY)
            {
                due = samples.pop_front().map(|(_, r)| r);
            }
            due
        };
        if let Some(r) = due.filter(|r| *r > 0) {
            match self.inner.etcd.compact(r).await {
                Ok(()) => debug!(revision = r, "cluster: etcd history compacted"),
                Err(e) => debug!(revision = r, error = %e, "cluster: etcd history not compacted"),
            }
        }
    }

    /// Whether a director is moving user `hash` now (its record carries a move mark).
    pub fn being_moved(&self, hash: u32) -> bool {
        self.user(hash).is_some_and(|r| r.value.moving.is_some())
    }

    /// Sets what the checker does when another director suspects a backend.
    pub fn on_suspect(&self, f: impl Fn(IpAddr) + Send + Sync + 'static) {
        let _ = self.inner.on_suspect.set(Box::new(f));
    }

    /// A new configuration (reload): settings of backends the replica names come from it.
    pub fn set_config(&self, config: Arc<Config>) {
        *self.inner.config.lock().unwrap() = config;
        self.inner.settings.lock().unwrap().clear();
        self.rebuild_backends();
    }

    /// The live directors.
    pub fn members(&self) -> Vec<MemberStatus> {
        let c = self.inner.replica.contents.lock().unwrap();
        let now = now_ms();
        c.members
            .iter()
            .map(|(id, m)| MemberStatus {
                id: id.clone(),
                address: m.value.address.clone(),
                version: m.value.version.clone(),
                lease_age_secs: now.saturating_sub(m.value.since) / 1000,
                sessions: m.value.sessions,
                checker: c.checker.as_deref() == Some(id.as_str()),
            })
            .collect()
    }

    /// When the configured backends are the first: adds each that etcd lacks, but only if
    /// etcd has no backend at all (afterwards admins own the list, as with the state file).
    async fn seed(&self, configured: &[Backend]) -> Result<(), StateError> {
        let i = &self.inner;
        let existing = i
            .etcd
            .get_prefix(&format!("{}backends/", i.keys.prefix()))
            .await?;
        if !existing.kvs().is_empty() {
            return Ok(());
        }
        for b in configured {
            let key = i.keys.backend(b.ip);
            let value = BackendValue {
                host: b.host.to_string(),
                weight: b.weight,
                tag: b.tag.to_string(),
                admin: b.admin,
                maintenance: None,
            };
            i.etcd
                .txn(
                    vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                    vec![TxnOp::put(key, encode(&value), None)],
                    vec![],
                )
                .await?;
        }
        info!(
            backends = configured.len(),
            "cluster: etcd had no backends: added the configured ones"
        );
        Ok(())
    }

    /// Loads the whole prefix into the replica; returns its revision.
    async fn load(&self) -> Result<i64, StateError> {
        let i = &self.inner;
        let prefix = i.keys.prefix();
        let mut loading = i.replica.start_load();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let page = i.etcd.get_page(prefix, from, revision, LOAD_PAGE).await?;
            if revision == 0 {
                // Every later page is read as of the first one's revision.
                revision = page.header().map_or(0, |h| h.revision());
            }
            i.replica.load_page(&mut loading, page.kvs());
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        let effects = i.replica.finish_load(loading, revision);
        for e in effects {
            self.act(e);
        }
        Ok(revision)
    }

    /// Keeps the replica current: one watch from `revision`; when it breaks, a full load
    /// and a new watch.
    async fn watch_loop(self, mut revision: i64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .inner
                .etcd
                .watch(self.inner.keys.prefix(), revision + 1)
                .await
            {
                Ok(mut stream) => {
                    backoff = Duration::from_millis(100);
                    loop {
                        match stream.message().await {
                            Ok(Some(resp)) => {
                                if resp.canceled() || resp.compact_revision() > 0 {
                                    warn!(reason = %resp.cancel_reason(), "cluster: watch cancelled: reloading the state");
                                    break;
                                }
                                let mut lag = None;
                                for ev in resp.events() {
                                    let Some(kv) = ev.kv() else { continue };
                                    if ev.event_type() == EventType::Put {
                                        if let Some(v) = keys::decode::<UserValue>(kv.value()) {
                                            lag = Some(now_ms().saturating_sub(v.refreshed));
                                        }
                                    }
                                    if let Some(e) = self.inner.replica.apply(ev.event_type(), kv) {
                                        self.act(e);
                                    }
                                    revision = revision.max(kv.mod_revision());
                                }
                                // A progress notification (no events) vouches that every
                                // change up to its header's revision was sent. The answer
                                // that creates a watch carries the current revision before
                                // the older events it will replay: it vouches for nothing.
                                if resp.events().is_empty() && !resp.created() {
                                    if let Some(h) = resp.header() {
                                        revision = revision.max(h.revision());
                                    }
                                }
                                self.inner
                                    .metrics
                                    .cluster_watch_lag(Duration::from_millis(lag.unwrap_or(0)));
                                self.inner.replica.set_applied(revision);
                            }
                            Ok(None) => {
                                warn!("cluster: the etcd watch ended: watching again");
                                break;
                            }
                            Err(e) => {
                                warn!(error = %e, "cluster: the etcd watch failed: watching again");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, "cluster: cannot watch etcd");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            // The watch may have missed changes (a compaction): read everything again.
            match self.load().await {
                Ok(r) => revision = r,
                Err(e) => {
                    debug!(error = %e, "cluster: cannot reload the state");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Acts on what a change calls for.
    fn act(&self, effect: Effect) {
        match effect {
            Effect::Backends => self.rebuild_backends(),
            Effect::Pause(p) => self
                .inner
                .local
                .set_checks_pause(p.as_ref().map(PauseValue::restore)),
            Effect::MoveStarted { hash, move_id } => self.acknowledge(hash, move_id),
            Effect::CheckerGone => {
                if self.inner.serving.load(Ordering::Acquire) {
                    tokio::spawn(lease::campaign(self.clone()));
                }
                self.members_changed();
            }
            Effect::Suspect(ip) => {
                if self.is_checker() {
                    if let Some(f) = self.inner.on_suspect.get() {
                        f(ip);
                    }
                }
            }
            Effect::Members => self.members_changed(),
        }
    }

    fn members_changed(&self) {
        let (n, checker) = {
            let c = self.inner.replica.contents.lock().unwrap();
            (c.members.len(), c.checker.clone())
        };
        self.inner.metrics.cluster_members(n);
        self.inner
            .metrics
            .cluster_checker(self.is_serving() && checker.as_deref() == Some(&*self.inner.me));
    }

    /// Rebuilds the backend set (and rings) and the maintenance map from the replica.
    fn rebuild_backends(&self) {
        let i = &self.inner;
        let (list, maintenance) = {
            let c = i.replica.contents.lock().unwrap();
            let config = i.config.lock().unwrap().clone();
            let settings = i.settings.lock().unwrap();
            let mut list = Vec::new();
            let mut maintenance = BTreeMap::new();
            for (ip, b) in &c.backends {
                let v = &b.value;
                list.push(Backend {
                    ip: *ip,
                    host: v.host.as_str().into(),
                    weight: v.weight,
                    tag: v.tag.as_str().into(),
                    admin: v.admin,
                    health: c.health.get(ip).copied().unwrap_or(Health::Up),
                    settings: settings
                        .get(ip)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(config.settings_for_host(&v.host))),
                });
                if let Some(m) = &v.maintenance {
                    maintenance.insert(*ip, m.restore());
                }
            }
            (list, maintenance)
        };
        i.local.replace(list, maintenance);
    }

    /// Acknowledges every move of another director that the replica shows under way. The
    /// lease holder calls it on taking a lease: a move seen while this director had none (at
    /// its start, or while fenced) could not be acknowledged then, and its mover, counting
    /// this director as a member again, would wait for it until `move_timeout`.
    pub(super) fn acknowledge_moves_under_way(&self) {
        let moves: Vec<(u32, String)> = {
            let c = self.inner.replica.contents.lock().unwrap();
            c.users
                .iter()
                .filter_map(|(hash, r)| {
                    let m = r.value.moving.as_ref()?;
                    (m.by != self.inner.me).then(|| (*hash, m.id.clone()))
                })
                .collect()
        };
        for (hash, move_id) in moves {
            self.acknowledge(hash, move_id);
        }
    }

    /// Another director is moving user `hash`: ends this director's sessions of the user
    /// (logins of the user already wait: the replica shows the move), then acknowledges.
    fn acknowledge(&self, hash: u32, move_id: String) {
        if self.inner.no_acks {
            return;
        }
        if !self.inner.acking.lock().unwrap().insert(move_id.clone()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let i = &me.inner;
            let kicked = i.sessions.kick_user(hash);
            let deadline = Instant::now() + SESSION_END_WAIT;
            while i.sessions.count_user(hash) > 0 {
                if Instant::now() >= deadline {
                    warn!(user_hash = hash, move_id = %move_id, "cluster: sessions still open after a kick for another director's move");
                    break;
                }
                i.sessions.kick_user(hash);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let lease = i.lease.load(Ordering::Acquire);
            if lease == 0 {
                // No lease: this director is fenced and serves nobody; the mover does not
                // wait for it once its lease has expired.
                i.acking.lock().unwrap().remove(&move_id);
                return;
            }
            match i
                .etcd
                .put(&i.keys.ack(&move_id, &i.me), Vec::new(), lease)
                .await
            {
                Ok(_) => {
                    debug!(user_hash = hash, move_id = %move_id, kicked, "cluster: move acknowledged")
                }
                Err(e) => {
                    warn!(user_hash = hash, move_id = %move_id, error = %e, "cluster: cannot acknowledge a move");
                    i.acking.lock().unwrap().remove(&move_id);
                }
            }
        });
    }

    fn is_serving(&self) -> bool {
        self.inner.serving.load(Ordering::Acquire)
    }

    /// The replica's record of `hash`.
    fn user(&self, hash: u32) -> Option<Versioned<UserValue>> {
        self.inner
            .replica
            .contents
            .lock()
            .unwrap()
            .users
            .get(&hash)
            .cloned()
    }

    /// Waits until the replica holds `revision`; an error if the watch is behind.
    async fn caught_up(&self, revision: i64) -> Result<(), StateError> {
        if self
            .inner
            .replica
            .wait_for(revision, self.inner.etcd.timeout())
            .await
        {
            Ok(())
        } else {
            Err(unavailable(
                "this director's copy of the cluster state is behind etcd",
            ))
        }
    }

    /// Waits until the replica holds no record of `hash`.
    async fn gone(&self, hash: u32) -> Result<(), StateError> {
        let deadline = tokio::time::Instant::now() + self.inner.etcd.timeout();
        loop {
            let notified = self.inner.replica.changed.notified();
            if self.user(hash).is_none() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(unavailable(
                    "this director's copy of the cluster state is behind etcd",
                ));
            }
        }
    }

    /// Writes the user's record if it still is at `expected` (its mod revision; 0: absent).
    /// `Ok(true)`: written, and in the replica. `Ok(false)`: it changed meanwhile; the
    /// replica now shows how.
    async fn cas_user(
        &self,
        hash: u32,
        expected: i64,
        value: Option<&UserValue>,
    ) -> Result<bool, StateError> {
        let i = &self.inner;
        let key = i.keys.user(hash);
        let compare = if expected == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, expected)
        };
        let op = match value {
            Some(v) => TxnOp::put(key.clone(), encode(v), None),
            None => TxnOp::delete(key.clone(), None),
        };
        let r = i
            .etcd
            .txn(vec![compare], vec![op], vec![TxnOp::get(key, None)])
            .await?;
        if r.succeeded() {
            self.caught_up(revision_of(&r)).await?;
            return Ok(true);
        }
        match got(&r).first() {
            Some(kv) => self.caught_up(kv.mod_revision()).await?,
            // Deleted meanwhile: wait until the replica has seen the deletion.
            None => self.gone(hash).await?,
        }
        Ok(false)
    }

    /// Changes backend `ip`'s value with `f`, compared against the replica's revision.
    async fn update_backend(
        &self,
        ip: IpAddr,
        f: impl Fn(&mut BackendValue) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let i = &self.inner;
        for _ in 0..CAS_TRIES {
            let Some(current) = i
                .replica
                .contents
                .lock()
                .unwrap()
                .backends
                .get(&ip)
                .cloned()
            else {
                return Err(StateError::NoSuchBackend(ip));
            };
            let mut value = current.value.clone();
            f(&mut value)?;
            let key = i.keys.backend(ip);
            let r = i
                .etcd
                .txn(
                    vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        current.mod_rev,
                    )],
                    vec![TxnOp::put(key.clone(), encode(&value), None)],
                    vec![TxnOp::get(key, None)],
                )
                .await?;
            let revision = if r.succeeded() {
                revision_of(&r)
            } else {
                match got(&r).first() {
                    Some(kv) => kv.mod_revision(),
                    None => return Err(StateError::NoSuchBackend(ip)),
                }
            };
            self.caught_up(revision).await?;
            if r.succeeded() {
                return Ok(());
            }
        }
        Err(unavailable(format!(
            "backend {ip} kept changing under this change"
        )))
    }

    /// The refresher: every few seconds, rewrites the records of users with sessions here
    /// whose last refresh is `record_refresh` old, and once more those whose last session
    /// here ended since. The elected checker also drops expired records and finishes moves
    /// whose director died.
    async fn refresh_loop(self) {
        let tick = (self.inner.refresh / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            if !self.is_serving() {
                continue;
            }
            self.refresh_once().await;
            self.clone().finish_own_orphaned_moves().await;
        }
    }

    async fn refresh_once(&self) {
        let i = &self.inner;
        let refresh_ms = i.refresh.as_millis() as u64;
        let now = now_ms();
        let due: Vec<(u32, Versioned<UserValue>, bool)> = {
            let mut usage = i.usage.lock().unwrap();
            let c = i.replica.contents.lock().unwrap();
            // Users without a session here whose record is gone need nothing more.
            usage.retain(|hash, u| u.sessions > 0 || c.users.contains_key(hash));
            usage
                .iter()
                .filter_map(|(hash, u)| {
                    let rec = c.users.get(hash)?;
                    if rec.value.moving.is_some() {
                        return None;
                    }
                    let age = now.saturating_sub(rec.value.refreshed);
                    let due = (u.sessions > 0 && age >= refresh_ms)
                        || (u.ended && age >= refresh_ms / 10);
                    due.then(|| (*hash, rec.clone(), u.ended))
                })
                .collect()
        };
        // Many at once (each is a round trip), without waiting for the watch: the next
        // refresh compares against whatever revision the replica then holds.
        let limit = Arc::new(tokio::sync::Semaphore::new(REFRESHES_AT_ONCE));
        let mut running = tokio::task::JoinSet::new();
        for (hash, rec, ended) in due {
            let permit = limit.clone().acquire_owned().await.expect("never closed");
            let me = self.clone();
            running.spawn(async move {
                let _permit = permit;
                let mut value = rec.value.clone();
                value.refreshed = now_ms();
                let key = me.inner.keys.user(hash);
                let r = me
                    .inner
                    .etcd
                    .txn(
                        vec![Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            rec.mod_rev,
                        )],
                        vec![TxnOp::put(key, encode(&value), None)],
                        vec![],
                    )
                    .await;
                match r {
                    Ok(_) if ended => {
                        let mut usage = me.inner.usage.lock().unwrap();
                        if let Some(u) = usage.get_mut(&hash) {
                            u.ended = false;
                            if u.sessions == 0 {
                                usage.remove(&hash);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => debug!(user_hash = hash, error = %e, "cluster: record not refreshed"),
                }
            });
        }
        while running.join_next().await.is_some() {}
    }

    /// A unique move id: this director, its start, a counter.
    fn move_id(&self) -> String {
        let n = self.inner.move_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{:x}-{n}", self.inner.me, self.inner.started_ms)
    }

    /// Whether nothing runs the move of user `hash` marked `m` any more: its director is not
    /// a member (it died), or it is this director and this director does not run it (begun
    /// before a crash and a restart under the same id, or its end failed on an etcd error).
    /// Such a mark would hold the user's logins for ever; it is taken over.
    fn orphaned(
        &self,
        members: &BTreeMap<String, Versioned<keys::MemberValue>>,
        hash: u32,
        m: &MoveMark,
    ) -> bool {
        if m.by == self.inner.me {
            !self.inner.own_moves.lock().unwrap().runs(hash, &m.id)
        } else {
            !members.contains_key(&m.by)
        }
    }

    async fn begin_move_inner(&self, hash: u32) -> Result<bool, StateError> {
        self.serving()?;
        for _ in 0..CAS_TRIES {
            let current = self.user(hash);
            let mut taken_over = None;
            let id = self.move_id();
            let mark = Some(Box::new(MoveMark {
                id: id.clone(),
                by: self.inner.me.clone(),
            }));
            let (expected, value) = match &current {
                Some(rec) => {
                    if let Some(m) = &rec.value.moving {
                        let members = self.inner.replica.contents.lock().unwrap().members.clone();
                        if !self.orphaned(&members, hash, m) {
                            return Ok(false);
                        }
                        // Nothing runs that move (its director died, or it is an unfinished
                        // one of this director's): this move takes over (every live director
                        // acknowledges again, under the new id).
                        taken_over = Some(m.clone());
                    }
                    let mut v = rec.value.clone();
                    v.moving = mark;
                    v.refreshed = now_ms();
                    (rec.mod_rev, v)
                }
                None => (
                    0,
                    UserValue {
                        backend: None,
                        refreshed: now_ms(),
                        moving: mark,
                    },
                ),
            };
            // Ours before the mark can be seen: a mark of ours not in `own_moves` is orphaned.
            let own = (hash, id);
            self.inner
                .own_moves
                .lock()
                .unwrap()
                .starting
                .insert(own.clone());
            let written = self.cas_user(hash, expected, Some(&value)).await;
            {
                let mut own_moves = self.inner.own_moves.lock().unwrap();
                own_moves.starting.remove(&own);
                if matches!(written, Ok(true)) {
                    own_moves.running.insert(hash, own.1);
                    if let Some(m) = taken_over {
                        warn!(user_hash = hash, mover = %m.by, move_id = %m.id, "cluster: took over a move that nothing ran");
                    }
                    return Ok(true);
                }
            }
            // Not written, or written with the answer lost: then nothing runs the mark, and
            // it is taken over as an orphan.
            written?;
        }
        Err(unavailable("the user's record kept changing"))
    }

    async fn finish_move_inner(&self, hash: u32, to: Option<IpAddr>) -> Result<(), StateError> {
        let i = &self.inner;
        let Some(id) = i.own_moves.lock().unwrap().running.get(&hash).cloned() else {
            return Err(unavailable("no move of this user was begun here"));
        };
        // However it ends, this director no longer runs the move: if its mark stays (an
        // etcd error), it is an orphan, taken over by the next round of the refresher.
        let finished = self.finish_own_move(hash, &id, to).await;
        let mut own_moves = i.own_moves.lock().unwrap();
        if own_moves.running.get(&hash) == Some(&id) {
            own_moves.running.remove(&hash);
        }
        finished
    }

    /// Waits for the acknowledgements of move `id` of user `hash`, then writes the record's
    /// new backend `to` (or drops it).
    async fn finish_own_move(
        &self,
        hash: u32,
        id: &str,
        to: Option<IpAddr>,
    ) -> Result<(), StateError> {
        let i = &self.inner;
        i.awaiting_acks.fetch_add(1, Ordering::Relaxed);
        i.metrics
            .cluster_moves_awaiting_acks(i.awaiting_acks.load(Ordering::Relaxed));
        let waited = self.wait_for_acks(id).await;
        i.awaiting_acks.fetch_sub(1, Ordering::Relaxed);
        i.metrics
            .cluster_moves_awaiting_acks(i.awaiting_acks.load(Ordering::Relaxed));
        if let Err(missing) = waited {
            warn!(user_hash = hash, move_id = %id, missing = %missing.join(","),
                  timeout = ?i.cluster.move_timeout,
                  "cluster: directors did not acknowledge the move in time: going on (their leases must have expired)");
        }
        let Some(rec) = self.user(hash) else {
            return Err(unavailable("the moved user's record vanished"));
        };
        if rec.value.moving.as_ref().map(|m| m.id.as_str()) != Some(id) {
            return Err(unavailable("another director took the move over"));
        }
        let key = i.keys.user(hash);
        let op = match to {
            Some(ip) => TxnOp::put(
                key.clone(),
                encode(&UserValue {
                    backend: Some(ip),
                    refreshed: now_ms(),
                    moving: None,
                }),
                None,
            ),
            None => TxnOp::delete(key.clone(), None),
        };
        let acks = TxnOp::delete(i.keys.acks(id), Some(DeleteOptions::new().with_prefix()));
        let r = i
            .etcd
            .txn(
                vec![Compare::mod_revision(key, CompareOp::Equal, rec.mod_rev)],
                vec![op, acks],
                vec![],
            )
            .await?;
        if !r.succeeded() {
            return Err(unavailable(
                "the moved user's record changed during the move",
            ));
        }
        self.caught_up(revision_of(&r)).await
    }

    /// Waits until every live director but this one has acknowledged move `id`, at most
    /// `move_timeout`. Err: those that did not.
    async fn wait_for_acks(&self, id: &str) -> Result<(), Vec<String>> {
        let i = &self.inner;
        if i.no_acks {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + i.cluster.move_timeout;
        loop {
            let notified = i.replica.changed.notified();
            let missing: Vec<String> = {
                let c = i.replica.contents.lock().unwrap();
                let acked = c.acks.get(id);
                c.members
                    .keys()
                    .filter(|m| **m != i.me && !acked.is_some_and(|a| a.contains(*m)))
                    .cloned()
                    .collect()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(missing);
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(250)),
                notified,
            )
            .await;
        }
    }

    async fn bind_inner(&self, hash: u32, proposed: IpAddr) -> Result<IpAddr, StateError> {
        self.serving()?;
        for _ in 0..CAS_TRIES {
            match self.user(hash) {
                Some(rec) => {
                    let Some(backend) = rec.value.backend else {
                        // A user without a record being moved: its login waits.
                        return Ok(proposed);
                    };
                    // A record near its expiry is refreshed first, so that the checker cannot
                    // drop it while this login starts a session on its backend.
                    let age = now_ms().saturating_sub(rec.value.refreshed);
                    if rec.value.moving.is_some()
                        || age < (self.inner.user_expire / 2).as_millis() as u64
                    {
                        return Ok(backend);
                    }
                    let mut v = rec.value.clone();
                    v.refreshed = now_ms();
                    if self.cas_user(hash, rec.mod_rev, Some(&v)).await? {
                        return Ok(backend);
                    }
                }
                None => {
                    let v = UserValue {
                        backend: Some(proposed),
                        refreshed: now_ms(),
                        moving: None,
                    };
                    if self.cas_user(hash, 0, Some(&v)).await? {
                        return Ok(proposed);
                    }
                }
            }
        }
        Err(unavailable("the user's record kept changing"))
    }

    /// Points the record at `backend` outside a move (a pinned user).
    async fn rebind_inner(&self, hash: u32, backend: IpAddr) -> Result<(), StateError> {
        self.serving()?;
        for _ in 0..CAS_TRIES {
            let current = self.user(hash);
            if current.as_ref().is_some_and(|r| r.value.moving.is_some()) {
                return Err(unavailable("the user is being moved"));
            }
            let v = UserValue {
                backend: Some(backend),
                refreshed: now_ms(),
                moving: None,
            };
            if self
                .cas_user(hash, current.map_or(0, |r| r.mod_rev), Some(&v))
                .await?
            {
                return Ok(());
            }
        }
        Err(unavailable("the user's record kept changing"))
    }

    async fn remove_record_inner(&self, hash: u32) -> Result<(), StateError> {
        for _ in 0..CAS_TRIES {
            let Some(rec) = self.user(hash) else {
                return Ok(());
            };
            if rec.value.moving.is_some() {
                return Err(unavailable("the user is being moved"));
            }
            if self.cas_user(hash, rec.mod_rev, None).await? {
                return Ok(());
            }
        }
        Err(unavailable("the user's record kept changing"))
    }

    /// The checker's housekeeping: drops records unrefreshed for `user_expire`, and
    /// finishes moves whose director died (dropping the record once everyone acknowledged:
    /// the user's next login goes where the ring says).
    async fn purge_inner(&self) -> Result<usize, StateError> {
        if !self.is_checker() {
            return Ok(0);
        }
        let expire_ms = self.inner.user_expire.as_millis() as u64;
        let now = now_ms();
        let expired: Vec<(u32, i64)> = {
            let c = self.inner.replica.contents.lock().unwrap();
            c.users
                .iter()
                .filter(|(_, r)| {
                    r.value.moving.is_none() && now.saturating_sub(r.value.refreshed) > expire_ms
                })
                .map(|(h, r)| (*h, r.mod_rev))
                .take(1000)
                .collect()
        };
        let mut n = 0;
        for (hash, rev) in expired {
            if self.inner.usage.lock().unwrap().contains_key(&hash) {
                continue;
            }
            if self.cas_user(hash, rev, None).await? {
                n += 1;
            }
        }
        self.take_over_orphaned_moves(false).await?;
        Ok(n)
    }

    /// Finishes moves that nothing runs any more ([`ClusterState::orphaned`]), each as a move
    /// of its own that every live director acknowledges, dropping the record: the user's next
    /// login goes where the ring says. `only_mine`: this director's own.
    async fn take_over_orphaned_moves(&self, only_mine: bool) -> Result<(), StateError> {
        let orphaned: Vec<u32> = {
            let c = self.inner.replica.contents.lock().unwrap();
            c.users
                .iter()
                .filter(|(hash, r)| {
                    r.value.moving.as_ref().is_some_and(|m| {
                        (!only_mine || m.by == self.inner.me)
                            && self.orphaned(&c.members, **hash, m)
                    })
                })
                .map(|(h, _)| *h)
                .take(100)
                .collect()
        };
        for hash in orphaned {
            if self.begin_move_inner(hash).await? {
                self.inner.sessions.kick_user(hash);
                self.finish_move_inner(hash, None).await?;
                info!(
                    user_hash = hash,
                    "cluster: finished a move that nothing ran (record dropped)"
                );
            }
        }
        Ok(())
    }

    /// [`ClusterState::take_over_orphaned_moves`] of this director's own marks, logging a
    /// failure (the next refresh round tries again).
    pub(super) async fn finish_own_orphaned_moves(self) {
        if let Err(e) = self.take_over_orphaned_moves(true).await {
            warn!(error = %e, "cluster: a move of this director that nothing runs is not finished yet");
        }
    }

    async fn set_health_inner(&self, ip: IpAddr, health: Health) -> Result<(), StateError> {
        let i = &self.inner;
        let value = HealthValue {
            health,
            by: i.me.clone(),
            at: now_ms(),
        };
        // Only the director holding the checker's seat writes verdicts.
        let r = i
            .etcd
            .txn(
                vec![Compare::value(
                    i.keys.checker(),
                    CompareOp::Equal,
                    i.me.clone(),
                )],
                vec![TxnOp::put(i.keys.health(ip), encode(&value), None)],
                vec![],
            )
            .await?;
        if !r.succeeded() {
            return Err(unavailable(
                "this director is no longer the cluster's checker",
            ));
        }
        self.caught_up(revision_of(&r)).await
    }

    async fn upsert_backend_inner(&self, backend: Backend) -> Result<(), StateError> {
        let i = &self.inner;
        let maintenance = i
            .replica
            .contents
            .lock()
            .unwrap()
            .backends
            .get(&backend.ip)
            .and_then(|b| b.value.maintenance.clone());
        let value = BackendValue {
            host: backend.host.to_string(),
            weight: backend.weight,
            tag: backend.tag.to_string(),
            admin: backend.admin,
            maintenance,
        };
        i.settings
            .lock()
            .unwrap()
            .insert(backend.ip, backend.settings.clone());
        let revision = i
            .etcd
            .put(&i.keys.backend(backend.ip), encode(&value), 0)
            .await?;
        self.caught_up(revision).await
    }

    async fn remove_backend_inner(&self, ip: IpAddr) -> Result<(), StateError> {
        let i = &self.inner;
        let key = i.keys.backend(ip);
        let r = i
            .etcd
            .txn(
                vec![Compare::create_revision(key.clone(), CompareOp::Greater, 0)],
                vec![
                    TxnOp::delete(key, None),
                    TxnOp::delete(i.keys.health(ip), None),
                ],
                vec![],
            )
            .await?;
        if !r.succeeded() {
            return Err(StateError::NoSuchBackend(ip));
        }
        self.caught_up(revision_of(&r)).await
    }

    async fn set_checks_pause_inner(&self, pause: Option<ChecksPause>) -> Result<(), StateError> {
        let i = &self.inner;
        let key = i.keys.checks_pause();
        let revision = match pause {
            Some(p) => {
                let v = PauseValue::of(p);
                i.etcd.put(&key, encode(&v), 0).await?
            }
            None => {
                if i.local.checks_pause().is_none() {
                    return Ok(());
                }
                let r = i
                    .etcd
                    .txn(vec![], vec![TxnOp::delete(key, None)], vec![])
                    .await?;
                let deleted = r
                    .op_responses()
                    .iter()
                    .any(|o| matches!(o, TxnOpResponse::Delete(d) if d.deleted() > 0));
                if !deleted {
                    return Ok(());
                }
                revision_of(&r)
            }
        };
        self.caught_up(revision).await
    }

    /// Tells the checker that a login found `ip` unresponsive (at most once a second).
    async fn report_suspect_inner(&self, ip: IpAddr, detail: String) {
        let i = &self.inner;
        let lease = i.lease.load(Ordering::Acquire);
        if lease == 0 {
            return;
        }
        let value = SuspectValue {
            detail: crate::untrusted::shown(&detail).to_string(),
            at: now_ms(),
        };
        if let Err(e) = i
            .etcd
            .put(&i.keys.suspect(ip, &i.me), encode(&value), lease)
            .await
        {
            debug!(backend = %ip, error = %e, "cluster: cannot report a suspect backend");
        }
    }
}

impl State for ClusterState {
    fn backends(&self) -> Arc<BackendSet> {
        self.inner.local.backends()
    }

    fn upsert_backend(&self, backend: Backend) -> StateFuture<'_, ()> {
        Box::pin(self.upsert_backend_inner(backend))
    }

    fn remove_backend(&self, ip: IpAddr) -> StateFuture<'_, ()> {
        Box::pin(self.remove_backend_inner(ip))
    }

    fn set_weight(&self, ip: IpAddr, weight: u32) -> StateFuture<'_, ()> {
        Box::pin(async move {
            if weight > crate::config::MAX_WEIGHT {
                return Err(StateError::WeightTooLarge(weight));
            }
            self.update_backend(ip, |b| {
                b.weight = weight;
                Ok(())
            })
            .await
        })
    }

    fn set_admin(&self, ip: IpAddr, admin: AdminState) -> StateFuture<'_, ()> {
        Box::pin(self.update_backend(ip, move |b| {
            b.admin = admin;
            Ok(())
        }))
    }

    fn set_health(&self, ip: IpAddr, health: Health) -> StateFuture<'_, ()> {
        Box::pin(self.set_health_inner(ip, health))
    }

    fn set_settings(&self, ip: IpAddr, settings: Arc<BackendSettings>) -> Result<(), StateError> {
        self.inner.settings.lock().unwrap().insert(ip, settings);
        self.rebuild_backends();
        Ok(())
    }

    fn record(&self, hash: u32, now: Instant) -> Option<StickyRecord> {
        let rec = self.user(hash)?;
        let sessions = self
            .inner
            .usage
            .lock()
            .unwrap()
            .get(&hash)
            .map_or(0, |u| u.sessions);
        let age = Duration::from_millis(now_ms().saturating_sub(rec.value.refreshed));
        Some(StickyRecord {
            backend: rec.value.backend?,
            sessions,
            touched: now.checked_sub(age).unwrap_or(now),
        })
    }

    fn bind(&self, hash: u32, proposed: IpAddr, _now: Instant) -> StateFuture<'_, IpAddr> {
        Box::pin(self.bind_inner(hash, proposed))
    }

    fn keep(&self, hash: u32, _now: Instant) -> StateFuture<'_, ()> {
        Box::pin(async move {
            match self.user(hash).and_then(|r| r.value.backend) {
                // `bind` refreshes a record near its expiry and returns it as it is otherwise.
                Some(backend) => self.bind_inner(hash, backend).await.map(|_| ()),
                None => Ok(()),
            }
        })
    }

    fn rebind(&self, hash: u32, backend: IpAddr, _now: Instant) -> StateFuture<'_, ()> {
        Box::pin(self.rebind_inner(hash, backend))
    }

    fn session_started(&self, hash: u32, _backend: IpAddr, _now: Instant) {
        self.inner
            .usage
            .lock()
            .unwrap()
            .entry(hash)
            .or_default()
            .sessions += 1;
    }

    fn session_ended(&self, hash: u32, _now: Instant) {
        if let Some(u) = self.inner.usage.lock().unwrap().get_mut(&hash) {
            u.sessions = u.sessions.saturating_sub(1);
            if u.sessions == 0 {
                u.ended = true;
            }
        }
    }

    fn for_each_record(&self, now: Instant, f: &mut dyn FnMut(u32, StickyRecord)) {
        let hashes: Vec<u32> = self
            .inner
            .replica
            .contents
            .lock()
            .unwrap()
            .users
            .keys()
            .copied()
            .collect();
        for h in hashes {
            if let Some(r) = self.record(h, now) {
                f(h, r);
            }
        }
    }

    /// Every member forgets the usernames it noted for records no longer in etcd (after
    /// `user_expire`); the checker purges the records themselves.
    fn purge_expired(&self, now: Instant) -> StateFuture<'_, usize> {
        self.inner.local.forget_usernames(now, |h| {
            self.inner
                .replica
                .contents
                .lock()
                .unwrap()
                .users
                .contains_key(&h)
        });
        Box::pin(self.purge_inner())
    }

    fn remove_record(&self, hash: u32) -> StateFuture<'_, ()> {
        Box::pin(self.remove_record_inner(hash))
    }

    fn begin_move(&self, hash: u32) -> StateFuture<'_, bool> {
        Box::pin(self.begin_move_inner(hash))
    }

    fn finish_move(&self, hash: u32, to: Option<IpAddr>) -> StateFuture<'_, ()> {
        Box::pin(self.finish_move_inner(hash, to))
    }

    /// A move under way, or a record whose backend no longer serves (the checker or an
    /// admin moves such users; their logins wait for it rather than move them alone).
    fn is_moving(&self, hash: u32) -> bool {
        let Some(rec) = self.user(hash) else {
            return false;
        };
        if rec.value.moving.is_some() {
            return true;
        }
        let Some(ip) = rec.value.backend else {
            return true;
        };
        let set = self.inner.local.backends();
        match set.get(ip) {
            None => true,
            Some(b) => !b.serves_existing() && b.admin != AdminState::Maintenance,
        }
    }

    fn checks_pause(&self) -> Option<ChecksPause> {
        self.inner.local.checks_pause()
    }

    fn set_checks_pause(&self, pause: Option<ChecksPause>) -> StateFuture<'_, ()> {
        Box::pin(self.set_checks_pause_inner(pause))
    }

    fn maintenance(&self) -> Arc<BTreeMap<IpAddr, Maintenance>> {
        self.inner.local.maintenance()
    }

    fn set_maintenance(&self, ip: IpAddr, maintenance: Option<Maintenance>) -> StateFuture<'_, ()> {
        let value = maintenance.as_ref().map(MaintenanceValue::of);
        Box::pin(self.update_backend(ip, move |b| {
            b.maintenance = value.clone();
            Ok(())
        }))
    }

    fn note_username(&self, hash: u32, username: &str) {
        self.inner.local.note_username(hash, username)
    }

    fn username(&self, hash: u32) -> Option<String> {
        self.inner.local.username(hash)
    }

    fn serving(&self) -> Result<(), StateError> {
        if self.is_serving() {
            Ok(())
        } else {
            Err(StateError::Fenced)
        }
    }

    fn is_checker(&self) -> bool {
        self.is_serving()
            && self
                .inner
                .replica
                .contents
                .lock()
                .unwrap()
                .checker
                .as_deref()
                == Some(self.inner.me.as_str())
    }

    fn report_suspect(&self, ip: IpAddr, detail: &str) {
        {
            let mut sent = self.inner.suspects_sent.lock().unwrap();
            let now = Instant::now();
            if sent.get(&ip).is_some_and(|t| now < *t + SUSPECT_EVERY) {
                return;
            }
            sent.insert(ip, now);
        }
        tokio::spawn(self.clone().report_owned(ip, detail.to_owned()));
    }

    fn members(&self) -> Vec<MemberStatus> {
        ClusterState::members(self)
    }

    fn mode(&self) -> StateMode {
        StateMode::Cluster {
            director_id: self.inner.me.clone(),
            serving: self.is_serving(),
            checker: self.is_checker(),
        }
    }
}

impl ClusterState {
    async fn report_owned(self, ip: IpAddr, detail: String) {
        self.report_suspect_inner(ip, detail).await
    }
}
