//! The in-memory [`State`]: one director's backends and sticky records.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::MAX_WEIGHT;
use crate::routing::sticky::{Purged, RecordCounts, RecordPage, StickyRecord, StickyTable};
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::{done, BackendSet, ChecksPause, Maintenance, State, StateError, StateFuture};

/// State held in this process.
pub struct LocalState {
    /// Read on every login without locking; replaced whole on a change.
    backends: ArcSwap<BackendSet>,
    /// Serialises changes to the backend set (read-modify-swap).
    change: Mutex<()>,
    /// The records and the last username of each user; locks itself, shard by shard.
    sticky: StickyTable,
    /// User hashes being moved (sessions being ended before the record changes).
    moving: Mutex<HashSet<u32>>,
    checks_pause: Mutex<Option<ChecksPause>>,
    /// Backends in maintenance; read on every login, so swapped whole like `backends`.
    maintenance: ArcSwap<BTreeMap<IpAddr, Maintenance>>,
}

impl LocalState {
    pub fn new(backends: Vec<Backend>, user_expire: Duration) -> Self {
        LocalState {
            backends: ArcSwap::from_pointee(BackendSet::new(backends)),
            change: Mutex::new(()),
            sticky: StickyTable::new(user_expire),
            moving: Mutex::new(HashSet::new()),
            checks_pause: Mutex::new(None),
            maintenance: ArcSwap::from_pointee(BTreeMap::new()),
        }
    }

    /// Applies `f` to a copy of the backends and swaps the result in.
    fn modify(
        &self,
        f: impl FnOnce(&mut Vec<Backend>) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let _guard = self.change.lock().unwrap();
        let mut list: Vec<Backend> = self.backends.load().backends.values().cloned().collect();
        f(&mut list)?;
        self.backends.store(Arc::new(BackendSet::new(list)));
        Ok(())
    }

    fn modify_one(&self, ip: IpAddr, f: impl FnOnce(&mut Backend)) -> Result<(), StateError> {
        self.modify(|list| {
            let b = list
                .iter_mut()
                .find(|b| b.ip == ip)
                .ok_or(StateError::NoSuchBackend(ip))?;
            f(b);
            Ok(())
        })
    }
}

impl LocalState {
    /// Replaces every backend and the maintenance map at once (the cluster's replica,
    /// rebuilt from etcd).
    pub fn replace(&self, backends: Vec<Backend>, maintenance: BTreeMap<IpAddr, Maintenance>) {
        let _guard = self.change.lock().unwrap();
        self.backends.store(Arc::new(BackendSet::new(backends)));
        self.maintenance.store(Arc::new(maintenance));
    }
}

/// The changes, synchronous: the local state needs no round trip. Tests and the state file
/// use them directly; the rest of the director goes through [`State`].
impl LocalState {
    pub fn backends(&self) -> Arc<BackendSet> {
        self.backends.load_full()
    }

    pub fn upsert_backend(&self, backend: Backend) {
        let _ = self.modify(|list| {
            list.retain(|b| b.ip != backend.ip);
            list.push(backend);
            Ok(())
        });
    }

    pub fn remove_backend(&self, ip: IpAddr) -> Result<(), StateError> {
        self.modify(|list| {
            let before = list.len();
            list.retain(|b| b.ip != ip);
            if list.len() == before {
                return Err(StateError::NoSuchBackend(ip));
            }
            Ok(())
        })
    }

    pub fn set_weight(&self, ip: IpAddr, weight: u32) -> Result<(), StateError> {
        if weight > MAX_WEIGHT {
            return Err(StateError::WeightTooLarge(weight));
        }
        self.modify_one(ip, |b| b.weight = weight)
    }

    pub fn set_admin(&self, ip: IpAddr, admin: AdminState) -> Result<(), StateError> {
        self.modify_one(ip, |b| b.admin = admin)
    }

    pub fn set_health(&self, ip: IpAddr, health: Health) -> Result<(), StateError> {
        self.modify_one(ip, |b| b.health = health)
    }

    pub fn set_settings(
        &self,
        ip: IpAddr,
        settings: Arc<crate::config::BackendSettings>,
    ) -> Result<(), StateError> {
        self.modify_one(ip, |b| b.settings = settings)
    }

    pub fn record(&self, hash: u32, now: Instant) -> Option<StickyRecord> {
        self.sticky.get(hash, now)
    }

    pub fn bind(&self, hash: u32, proposed: IpAddr, now: Instant) -> IpAddr {
        self.sticky.bind(hash, proposed, now)
    }

    pub fn rebind(&self, hash: u32, backend: IpAddr, now: Instant) {
        self.sticky.set(hash, backend, now)
    }

    pub fn session_started(&self, hash: u32, backend: IpAddr, now: Instant) {
        self.sticky.session_started(hash, backend, now)
    }

    pub fn session_ended(&self, hash: u32, now: Instant) {
        self.sticky.session_ended(hash, now)
    }

    /// Drops expired records and usernames unused for `user_expire`, one shard at a time;
    /// says how many records and the longest a shard was locked.
    pub fn purge(&self, now: Instant) -> Purged {
        self.sticky.purge(now)
    }

    pub fn purge_expired(&self, now: Instant) -> usize {
        self.purge(now).records
    }

    /// Drops the usernames unused for `user_expire` whose hash `keep` refuses (a cluster
    /// member: the records live in etcd, this table holds only their usernames).
    pub fn forget_usernames(&self, now: Instant, keep: impl Fn(u32) -> bool) {
        self.sticky.purge_keeping(now, keep);
    }

    pub fn remove_record(&self, hash: u32) {
        self.sticky.remove(hash);
    }

    pub fn record_counts(&self, now: Instant) -> RecordCounts {
        self.sticky.counts(now)
    }

    pub fn records_on(&self, backend: IpAddr, now: Instant) -> Vec<u32> {
        self.sticky.on(backend, now)
    }

    pub fn records_page(
        &self,
        now: Instant,
        after: Option<u32>,
        limit: usize,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> RecordPage {
        self.sticky.page(now, after, limit, wanted)
    }

    pub fn begin_move(&self, hash: u32) -> bool {
        self.moving.lock().unwrap().insert(hash)
    }

    pub fn end_move(&self, hash: u32) {
        self.moving.lock().unwrap().remove(&hash);
    }

    pub fn is_moving(&self, hash: u32) -> bool {
        self.moving.lock().unwrap().contains(&hash)
    }

    pub fn checks_pause(&self) -> Option<ChecksPause> {
        let mut pause = self.checks_pause.lock().unwrap();
        if let Some(ChecksPause { until: Some(t), .. }) = *pause {
            if std::time::SystemTime::now() >= t {
                *pause = None;
            }
        }
        *pause
    }

    pub fn set_checks_pause(&self, pause: Option<ChecksPause>) {
        *self.checks_pause.lock().unwrap() = pause;
    }

    pub fn maintenance(&self) -> Arc<BTreeMap<IpAddr, Maintenance>> {
        self.maintenance.load_full()
    }

    pub fn set_maintenance(&self, ip: IpAddr, maintenance: Option<Maintenance>) {
        let _guard = self.change.lock().unwrap();
        let mut map = (**self.maintenance.load()).clone();
        match maintenance {
            Some(m) => map.insert(ip, m),
            None => map.remove(&ip),
        };
        self.maintenance.store(Arc::new(map));
    }

    pub fn note_username(&self, hash: u32, username: &str) {
        self.sticky.note_username(hash, username, Instant::now())
    }

    pub fn noted_record(&self, hash: u32, username: &str, now: Instant) -> Option<StickyRecord> {
        self.sticky.noted_get(hash, username, now)
    }

    pub fn username(&self, hash: u32) -> Option<String> {
        self.sticky.username(hash)
    }
}

impl State for LocalState {
    fn backends(&self) -> Arc<BackendSet> {
        LocalState::backends(self)
    }

    fn upsert_backend(&self, backend: Backend) -> StateFuture<'_, ()> {
        LocalState::upsert_backend(self, backend);
        done(Ok(()))
    }

    fn remove_backend(&self, ip: IpAddr) -> StateFuture<'_, ()> {
        done(LocalState::remove_backend(self, ip))
    }

    fn set_weight(&self, ip: IpAddr, weight: u32) -> StateFuture<'_, ()> {
        done(LocalState::set_weight(self, ip, weight))
    }

    fn set_admin(&self, ip: IpAddr, admin: AdminState) -> StateFuture<'_, ()> {
        done(LocalState::set_admin(self, ip, admin))
    }

    fn set_health(&self, ip: IpAddr, health: Health) -> StateFuture<'_, ()> {
        done(LocalState::set_health(self, ip, health))
    }

    fn set_settings(
        &self,
        ip: IpAddr,
        settings: Arc<crate::config::BackendSettings>,
    ) -> Result<(), StateError> {
        LocalState::set_settings(self, ip, settings)
    }

    fn record(&self, hash: u32, now: Instant) -> Option<StickyRecord> {
        LocalState::record(self, hash, now)
    }

    fn bind(&self, hash: u32, proposed: IpAddr, now: Instant) -> StateFuture<'_, IpAddr> {
        done(Ok(LocalState::bind(self, hash, proposed, now)))
    }

    fn rebind(&self, hash: u32, backend: IpAddr, now: Instant) -> StateFuture<'_, ()> {
        LocalState::rebind(self, hash, backend, now);
        done(Ok(()))
    }

    fn session_started(&self, hash: u32, backend: IpAddr, now: Instant) {
        LocalState::session_started(self, hash, backend, now)
    }

    fn session_ended(&self, hash: u32, now: Instant) {
        LocalState::session_ended(self, hash, now)
    }

    fn for_each_record(&self, now: Instant, f: &mut dyn FnMut(u32, StickyRecord)) {
        self.sticky.for_each(now, f)
    }

    fn record_counts(&self, now: Instant) -> RecordCounts {
        LocalState::record_counts(self, now)
    }

    fn records_on(&self, backend: IpAddr, now: Instant) -> Vec<u32> {
        LocalState::records_on(self, backend, now)
    }

    fn records_page(
        &self,
        now: Instant,
        after: Option<u32>,
        limit: usize,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> RecordPage {
        LocalState::records_page(self, now, after, limit, wanted)
    }

    fn purge_expired(&self, now: Instant) -> StateFuture<'_, usize> {
        done(Ok(LocalState::purge_expired(self, now)))
    }

    fn remove_record(&self, hash: u32) -> StateFuture<'_, ()> {
        LocalState::remove_record(self, hash);
        done(Ok(()))
    }

    fn begin_move(&self, hash: u32) -> StateFuture<'_, bool> {
        done(Ok(LocalState::begin_move(self, hash)))
    }

    fn finish_move(&self, hash: u32, to: Option<IpAddr>) -> StateFuture<'_, ()> {
        match to {
            Some(ip) => LocalState::rebind(self, hash, ip, Instant::now()),
            None => LocalState::remove_record(self, hash),
        }
        LocalState::end_move(self, hash);
        done(Ok(()))
    }

    fn is_moving(&self, hash: u32) -> bool {
        LocalState::is_moving(self, hash)
    }

    fn checks_pause(&self) -> Option<ChecksPause> {
        LocalState::checks_pause(self)
    }

    fn set_checks_pause(&self, pause: Option<ChecksPause>) -> StateFuture<'_, ()> {
        LocalState::set_checks_pause(self, pause);
        done(Ok(()))
    }

    fn maintenance(&self) -> Arc<BTreeMap<IpAddr, Maintenance>> {
        LocalState::maintenance(self)
    }

    fn set_maintenance(&self, ip: IpAddr, maintenance: Option<Maintenance>) -> StateFuture<'_, ()> {
        LocalState::set_maintenance(self, ip, maintenance);
        done(Ok(()))
    }

    fn note_username(&self, hash: u32, username: &str) {
        LocalState::note_username(self, hash, username)
    }

    fn noted_record(&self, hash: u32, username: &str, now: Instant) -> Option<StickyRecord> {
        LocalState::noted_record(self, hash, username, now)
    }

    fn username(&self, hash: u32) -> Option<String> {
        LocalState::username(self, hash)
    }
}
