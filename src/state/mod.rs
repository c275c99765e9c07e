//! The shared state of a director: backends (with weights and states), the rings built from
//! them, and the sticky records. One trait, so that the in-memory implementation
//! (`local`) can later be joined by one that several directors share (etcd). The
//! [`router`] reads it to send a user to a backend.

pub mod backend;
pub mod cluster;
pub mod file;
pub mod local;
pub mod moves;
pub mod router;
pub mod sessions;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::routing::ring::Ring;
use crate::routing::sticky::{PagedRecord, RecordCounts, RecordPage, StickyRecord};
use crate::state::backend::{AdminState, Backend, Health};

/// An immutable view of the backends and their rings, rebuilt on every change and swapped in
/// atomically: routing reads it without locking.
#[derive(Debug, Clone, Default)]
pub struct BackendSet {
    /// Every backend, by IP.
    pub backends: BTreeMap<IpAddr, Backend>,
    /// One ring per tag, over the backends of that tag that take new users, by tag (a route
    /// keeps a ring's place here, not a copy of its tag).
    rings: Vec<(String, Ring)>,
}

impl BackendSet {
    /// Builds the set and its rings.
    pub fn new(backends: impl IntoIterator<Item = Backend>) -> Self {
        let backends: BTreeMap<IpAddr, Backend> = backends.into_iter().map(|b| (b.ip, b)).collect();
        let mut by_tag: BTreeMap<String, Vec<(IpAddr, u32)>> = BTreeMap::new();
        for b in backends.values() {
            let points = by_tag.entry(b.tag.to_string()).or_default();
            if b.takes_new_users() {
                points.push((b.ip, b.weight));
            }
        }
        let rings = by_tag
            .into_iter()
            .map(|(tag, points)| (tag, Ring::build(points)))
            .collect();
        BackendSet { backends, rings }
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Backend> {
        self.backends.get(&ip)
    }

    /// The ring for `tag` (empty if no backend has that tag).
    pub fn ring(&self, tag: &str) -> Option<&Ring> {
        self.ring_at(self.ring_place(tag)?)
    }

    /// Where the ring for `tag` is, for [`BackendSet::ring_at`].
    pub fn ring_place(&self, tag: &str) -> Option<usize> {
        // A few tags at most, and most sites have only the untagged one: found without a
        // call to compare bytes when the lengths tell.
        self.rings
            .iter()
            .position(|(t, _)| t.len() == tag.len() && (tag.is_empty() || t == tag))
    }

    /// The ring at a place [`BackendSet::ring_place`] gave.
    pub fn ring_at(&self, place: usize) -> Option<&Ring> {
        self.rings.get(place).map(|(_, r)| r)
    }
}

/// Health checks paused by an administrator (`director checks pause [--for 30m]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksPause {
    pub since: std::time::SystemTime,
    /// When checks resume by themselves; `None`: at `checks resume`.
    pub until: Option<std::time::SystemTime>,
}

/// A backend in maintenance (`director maintenance HOST start`): what to restore at the end,
/// and the test users still routed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maintenance {
    /// The weight before maintenance set it to 0; `maintenance HOST stop` restores it.
    pub previous_weight: u32,
    /// Usernames still sent to this backend (compared case-insensitively), so that it can be
    /// tested through the director while nobody else lands there.
    pub allowed_users: Vec<String>,
    pub since: std::time::SystemTime,
    /// When the maintenance ends by itself; `None`: at `maintenance HOST stop`.
    pub until: Option<std::time::SystemTime>,
}

impl Maintenance {
    /// Whether `username` is one of the allowed test users.
    pub fn allows(&self, username: &str) -> bool {
        self.allowed_users
            .iter()
            .any(|u| u.eq_ignore_ascii_case(username))
    }
}

/// Why a state change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("no backend {0}")]
    NoSuchBackend(IpAddr),
    #[error("weight {0} is above the maximum {max}", max = crate::config::MAX_WEIGHT)]
    WeightTooLarge(u32),
    /// The shared state (etcd) could not be read or written: nothing was changed.
    #[error("the cluster state (etcd) is unreachable: {0}; nothing was changed")]
    Unavailable(String),
    /// This director lost its place in the cluster (its etcd lease) and serves nobody until
    /// it has one again.
    #[error("this director is cut off from the cluster (no etcd lease)")]
    Fenced,
}

/// What a state change returns: ready at once for the local state, after a round trip to
/// etcd for the cluster's.
pub type StateFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StateError>> + Send + 'a>>;

/// A change that is already done (the local state's writes).
pub fn done<'a, T: Send + 'a>(result: Result<T, StateError>) -> StateFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

/// A live director, for `director status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub id: String,
    pub address: String,
    pub version: String,
    /// Seconds since it took its lease.
    pub lease_age_secs: u64,
    pub sessions: u64,
    /// Whether it runs the health checks.
    pub checker: bool,
}

/// Where the state lives, for `director status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateMode {
    /// This director's memory (and its state file).
    Single,
    /// Shared by every director of a cluster through etcd.
    Cluster {
        director_id: String,
        /// Whether this director holds its etcd lease (serves logins).
        serving: bool,
        /// Whether this director runs the cluster's health checks.
        checker: bool,
    },
}

/// The director's shared state. Reads are local (the cluster keeps a replica) and never
/// wait; changes return a [`StateFuture`], since the cluster's go through etcd and may fail.
pub trait State: Send + Sync {
    /// The current backends and rings.
    fn backends(&self) -> Arc<BackendSet>;

    /// Adds a backend, or replaces the one with the same IP (keeping nobody's record from
    /// moving: records are untouched).
    fn upsert_backend(&self, backend: Backend) -> StateFuture<'_, ()>;

    /// Removes a backend. Records pointing to it stop binding their users.
    fn remove_backend(&self, ip: IpAddr) -> StateFuture<'_, ()>;

    /// Changes a backend's weight. Users with records stay; new users follow the new ring.
    fn set_weight(&self, ip: IpAddr, weight: u32) -> StateFuture<'_, ()>;

    /// Sets what an administrator decided.
    fn set_admin(&self, ip: IpAddr, admin: AdminState) -> StateFuture<'_, ()>;

    /// Sets what the health checker found.
    fn set_health(&self, ip: IpAddr, health: Health) -> StateFuture<'_, ()>;

    /// Replaces a backend's ports, TLS and forwarding (a reload of the configuration: local
    /// to this director, like its configuration). Sessions already relayed keep the
    /// connection they have.
    fn set_settings(
        &self,
        ip: IpAddr,
        settings: Arc<crate::config::BackendSettings>,
    ) -> Result<(), StateError>;

    /// The live record of a user hash.
    fn record(&self, hash: u32, now: Instant) -> Option<StickyRecord>;

    /// The backend the user is bound to: its live record's, or `proposed`, which is recorded.
    fn bind(&self, hash: u32, proposed: IpAddr, now: Instant) -> StateFuture<'_, IpAddr>;

    /// A login is about to use the user's record: in a cluster an old one is refreshed first,
    /// so that no purge drops it meanwhile. Alone, nothing to do.
    fn keep(&self, _hash: u32, _now: Instant) -> StateFuture<'_, ()> {
        done(Ok(()))
    }

    /// Points the user's record at `backend`. Callers must make sure the user has no live
    /// session elsewhere first (a user is never on two backends at once).
    fn rebind(&self, hash: u32, backend: IpAddr, now: Instant) -> StateFuture<'_, ()>;

    /// A session started on `backend`: the record is kept alive until it ends.
    fn session_started(&self, hash: u32, backend: IpAddr, now: Instant);

    /// A session ended: the record's `user_expire` clock starts when none are left.
    fn session_ended(&self, hash: u32, now: Instant);

    /// Calls `f` with every live record. `f` must not use the state (the local state holds
    /// a lock of its table meanwhile). For what the methods below do not cover.
    fn for_each_record(&self, now: Instant, f: &mut dyn FnMut(u32, StickyRecord));

    /// How many live records there are, in all and per backend (status, scrapes): counted,
    /// never listed.
    fn record_counts(&self, now: Instant) -> RecordCounts {
        let mut counts = RecordCounts::default();
        self.for_each_record(now, &mut |_, r| {
            counts.total += 1;
            *counts.by_backend.entry(r.backend).or_default() += 1;
        });
        counts
    }

    /// The user hashes of the live records on `backend` (moving its users off).
    fn records_on(&self, backend: IpAddr, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        self.for_each_record(now, &mut |h, r| {
            if r.backend == backend {
                out.push(h);
            }
        });
        out
    }

    /// One page of `map`: up to `limit` live records whose backend `wanted` accepts, with
    /// their usernames, starting after the record of hash `after`, and where the next page
    /// starts. The order is the state's own and lasts as long as the process, so that pages
    /// taken one after another list every record exactly once. By default, by hash (one pass
    /// over the records per page: fine for a cluster's replica, which etcd keeps small).
    fn records_page(
        &self,
        now: Instant,
        after: Option<u32>,
        limit: usize,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> RecordPage {
        let limit = limit.max(1);
        let mut found: Vec<(u32, StickyRecord)> = Vec::new();
        self.for_each_record(now, &mut |h, r| {
            if after.is_none_or(|a| h > a) && wanted(r.backend) {
                found.push((h, r));
            }
        });
        let more = found.len() > limit;
        if more {
            found.select_nth_unstable_by_key(limit - 1, |(h, _)| *h);
            found.truncate(limit);
        }
        found.sort_unstable_by_key(|(h, _)| *h);
        let next = if more {
            found.last().map(|(h, _)| *h)
        } else {
            None
        };
        RecordPage {
            records: found
                .into_iter()
                .map(|(hash, record)| PagedRecord {
                    hash,
                    record,
                    username: self.username(hash),
                })
                .collect(),
            next,
        }
    }

    /// Drops expired records; returns how many.
    fn purge_expired(&self, now: Instant) -> StateFuture<'_, usize>;

    /// Drops the record of a user hash (a forced flush, or nowhere left to move it).
    fn remove_record(&self, hash: u32) -> StateFuture<'_, ()>;

    /// Marks a user hash as being moved: its logins wait until [`State::finish_move`].
    /// Returns false if a move of that user is already under way. In a cluster every
    /// director sees the mark and ends its sessions of the user.
    fn begin_move(&self, hash: u32) -> StateFuture<'_, bool>;

    /// Ends a move started with [`State::begin_move`], once this director's sessions of the
    /// user are gone: points the record at `to`, or drops it (`None`). In a cluster it first
    /// waits until every other live director has ended its sessions of the user.
    fn finish_move(&self, hash: u32, to: Option<IpAddr>) -> StateFuture<'_, ()>;

    /// Whether a user hash is being moved.
    fn is_moving(&self, hash: u32) -> bool;

    /// The current pause of all health checks, if any (an expired pause is `None`).
    fn checks_pause(&self) -> Option<ChecksPause>;

    /// Pauses (`Some`) or resumes (`None`) all health checks.
    fn set_checks_pause(&self, pause: Option<ChecksPause>) -> StateFuture<'_, ()>;

    /// Backends in maintenance, with what to restore and their allowed users. Read on every
    /// login (routing sends allowed users to their backend), so without locking.
    fn maintenance(&self) -> Arc<BTreeMap<IpAddr, Maintenance>>;

    /// Starts (`Some`) or ends (`None`) the maintenance record of a backend. The caller sets
    /// the backend's admin state and weight.
    fn set_maintenance(&self, ip: IpAddr, maintenance: Option<Maintenance>) -> StateFuture<'_, ()>;

    /// Remembers the username behind a user hash, for admin output (records hold hashes).
    fn note_username(&self, _hash: u32, _username: &str) {}

    /// [`State::note_username`], then [`State::record`]: what every login does first, in one
    /// step where the two live in one table.
    fn noted_record(&self, hash: u32, username: &str, now: Instant) -> Option<StickyRecord> {
        self.note_username(hash, username);
        self.record(hash, now)
    }

    /// The last username seen for a user hash, if it is remembered.
    fn username(&self, _hash: u32) -> Option<String> {
        None
    }

    /// Whether this director may start backend sessions now: a cluster member that lost its
    /// etcd lease may not ([`StateError::Fenced`]).
    fn serving(&self) -> Result<(), StateError> {
        Ok(())
    }

    /// Whether this director runs the health checks (in a cluster, only the elected one).
    fn is_checker(&self) -> bool {
        true
    }

    /// Tells the cluster's checker that a real login found `ip` unresponsive (passive
    /// health). Single directors check at once themselves; this is for cluster members
    /// that do not run the checks.
    fn report_suspect(&self, _ip: IpAddr, _detail: &str) {}

    /// Where the state lives.
    fn mode(&self) -> StateMode {
        StateMode::Single
    }

    /// The live directors of the cluster (none for a single director).
    fn members(&self) -> Vec<MemberStatus> {
        Vec::new()
    }
}
