//! Sticky records (Dovecot: user directory entries): user hash → backend. A record lives while
//! its user has sessions and for `user_expire` after the last one ends. While it lives, the
//! user goes to its backend whatever the ring says; only a move changes it.
//!
//! The table is built for ten million records in well under a GiB, lookups of a fraction of a
//! microsecond, and purges that never stop logins for long:
//! - It is cut into [`SHARDS`] shards ([`shard`]), each behind its own lock with its own hash
//!   table. A purge, a count or a page of `map` holds one shard's lock at a time, so a login
//!   waits at most for one shard's pass (about 2,400 records at 10 million, tens of
//!   microseconds), and a growing table rehashes one small shard at a time, never ten
//!   million buckets at once. Such a pass yields the CPU before each lock, so that it is
//!   not preempted while holding one.
//! - Which shard a user is in comes from a hash keyed at random when the table is made (as is
//!   the hash table within it): users choose their names, and so could choose MD5 user hashes
//!   that all land in one shard or one bucket, but not keyed ones.
//! - A record is 24 bytes with its last username's place: the backend is an index into the
//!   addresses records point to ([`backends`]), the time a tick of the table's clock
//!   ([`clock`]); the username lives in its shard's byte arena rather than in a map of its own.

mod backends;
mod clock;
mod shard;

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::routing::sticky::backends::Backends;
use crate::routing::sticky::clock::Clock;
use crate::routing::sticky::shard::{Shard, Slot};

/// Shards of a table. At 10 million records, about 2,400 each: a purge holds one shard's
/// lock for a fraction of a millisecond. An empty shard costs about 80 bytes (320 KiB for a
/// table).
pub const SHARDS: usize = 4096;

/// One user's binding to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StickyRecord {
    pub backend: IpAddr,
    /// Live sessions of this user on this director.
    pub sessions: u32,
    /// When the record was created or a session of the user last started or ended (to the
    /// millisecond).
    pub touched: Instant,
}

impl StickyRecord {
    /// Whether the record still binds its user at `now`.
    pub fn alive(&self, now: Instant, expire: Duration) -> bool {
        self.sessions > 0 || now.saturating_duration_since(self.touched) < expire
    }

    /// When the record will expire if no session starts, or `None` while sessions are live.
    pub fn expires_at(&self, expire: Duration) -> Option<Instant> {
        (self.sessions == 0).then(|| self.touched + expire)
    }
}

/// How many live records there are, in all and per backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordCounts {
    pub total: usize,
    /// Backends without records are absent.
    pub by_backend: BTreeMap<IpAddr, usize>,
}

/// A live record with its user's last username, as a page of `map` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedRecord {
    pub hash: u32,
    pub record: StickyRecord,
    pub username: Option<String>,
}

/// One page of live records, and where the next one starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordPage {
    pub records: Vec<PagedRecord>,
    /// The hash to give as `after` for the next page; `None` on the last page.
    pub next: Option<u32>,
}

/// What a purge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Expired records dropped.
    pub records: usize,
    /// The longest time one shard's lock was held: the longest a login waited for it.
    pub longest_hold: Duration,
}

/// The table of records, keyed by user hash. Every method locks what it needs itself, one
/// shard at a time.
#[derive(Debug)]
pub struct StickyTable {
    shards: Box<[Mutex<Shard>]>,
    /// The random key of the shard choice and of the shards' hash tables (foldhash: a
    /// login hashes a user several times, and SipHash cost ~110 instructions a time).
    keys: RandomState,
    backends: Backends,
    clock: Clock,
    expire: Duration,
    /// `expire` in ticks of `clock`.
    expire_ticks: u64,
}

impl StickyTable {
    pub fn new(expire: Duration) -> Self {
        StickyTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            keys: RandomState::default(),
            backends: Backends::default(),
            clock: Clock::new(),
            expire,
            expire_ticks: u64::try_from(expire.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The keyed hash of `hash` and the number of its shard. The shard is taken from bits
    /// the shard's hash table does not use to place slots (it uses the lowest and the top 7).
    fn locate(&self, hash: u32) -> (u64, usize) {
        let keyed = self.keys.hash_one(hash);
        (keyed, (keyed >> 40) as usize % SHARDS)
    }

    /// Locks `shard` for one step of a pass over many shards (purge, count, page). The CPU
    /// is yielded first, so that the hold is more likely to start on a fresh time slice: the
    /// work under one lock takes tens of microseconds, but a thread preempted while holding
    /// it stalls that shard's logins for milliseconds (seen on 2 busy cores in
    /// `scripts/bench records`: 20 µs of work, 8 ms held).
    fn lock_in_turn<'a>(&self, shard: &'a Mutex<Shard>) -> MutexGuard<'a, Shard> {
        std::thread::yield_now();
        shard.lock().unwrap()
    }

    fn rehash(&self) -> impl Fn(&Slot) -> u64 + '_ {
        |s: &Slot| self.keys.hash_one(s.hash)
    }

    fn alive(&self, s: &Slot, now: u64) -> bool {
        s.is_record() && s.alive(now, self.expire_ticks)
    }

    /// The record a slot holds (which must hold one).
    fn record(&self, s: &Slot) -> StickyRecord {
        StickyRecord {
            backend: self.backends.ip(s.backend),
            sessions: s.sessions,
            touched: self.clock.instant(s.touched()),
        }
    }

    /// The live record for `hash`, if any.
    pub fn get(&self, hash: u32, now: Instant) -> Option<StickyRecord> {
        let now = self.clock.tick(now);
        let (keyed, i) = self.locate(hash);
        let shard = self.shards[i].lock().unwrap();
        shard
            .get(keyed, hash)
            .filter(|s| self.alive(s, now))
            .map(|s| self.record(s))
    }

    /// The backend `hash` is bound to: its live record's, or else `proposed`, which becomes
    /// the record. Atomic under the shard's lock, so concurrent first logins agree.
    pub fn bind(&self, hash: u32, proposed: IpAddr, now: Instant) -> IpAddr {
        let now = self.clock.tick(now);
        let (keyed, i) = self.locate(hash);
        let mut shard = self.shards[i].lock().unwrap();
        let slot = shard.slot(keyed, hash, now, self.rehash());
        if slot.is_record() && slot.alive(now, self.expire_ticks) {
            return self.backends.ip(slot.backend);
        }
        if let Some(b) = self.backends.hold(proposed) {
            self.backends.release(slot.backend, 1);
            slot.backend = b;
            slot.sessions = 0;
            slot.touch(now);
        }
        proposed
    }

    /// Points `hash` at `backend` (a move, or a failover before any session started).
    pub fn set(&self, hash: u32, backend: IpAddr, now: Instant) {
        self.point(hash, backend, now, false);
    }

    /// A session of `hash` started on `backend`.
    pub fn session_started(&self, hash: u32, backend: IpAddr, now: Instant) {
        self.point(hash, backend, now, true);
    }

    /// The record of `hash`, made if missing, pointed at `backend` and touched; with
    /// `session`, one more session counted.
    fn point(&self, hash: u32, backend: IpAddr, now: Instant, session: bool) {
        let now = self.clock.tick(now);
        let (keyed, i) = self.locate(hash);
        let mut shard = self.shards[i].lock().unwrap();
        let slot = shard.slot(keyed, hash, now, self.rehash());
        if !slot.is_record() || self.backends.ip(slot.backend) != backend {
            let Some(b) = self.backends.hold(backend) else {
                return;
            };
            self.backends.release(slot.backend, 1);
            slot.backend = b;
        }
        slot.touch(now);
        if session {
            slot.sessions += 1;
        }
    }

    /// A session of `hash` ended: the record's expiry clock starts when none are left.
    pub fn session_ended(&self, hash: u32, now: Instant) {
        let now = self.clock.tick(now);
        let (keyed, i) = self.locate(hash);
        let mut shard = self.shards[i].lock().unwrap();
        if let Some(slot) = shard.get_mut(keyed, hash).filter(|s| s.is_record()) {
            slot.sessions = slot.sessions.saturating_sub(1);
            slot.touch(now);
        }
    }

    /// Drops the record of `hash`, and the username with it.
    pub fn remove(&self, hash: u32) -> Option<StickyRecord> {
        let (keyed, i) = self.locate(hash);
        let mut shard = self.shards[i].lock().unwrap();
        let slot = shard.remove(keyed, hash).filter(Slot::is_record)?;
        let record = self.record(&slot);
        self.backends.release(slot.backend, 1);
        Some(record)
    }

    /// Remembers `username` as the last one seen for `hash` (for admin output). Without a
    /// record it is kept for `user_expire` from now, as a record would be.
    pub fn note_username(&self, hash: u32, username: &str, now: Instant) {
        let now = self.clock.tick(now);
        let (keyed, i) = self.locate(hash);
        let mut shard = self.shards[i].lock().unwrap();
        shard.note(keyed, hash, username, now, self.rehash());
    }

    /// [`StickyTable::note_username`] and then [`StickyTable::get`], under one lock: a
    /// login's first step (one look into the table, not two).
    pub fn noted_get(&self, hash: u32, username: &str, now: Instant) -> Option<StickyRecord> {
        let now = self.clock.tick(now);
        let (keyed, i) = self.locate(hash);
        let mut shard = self.shards[i].lock().unwrap();
        let slot = shard.note(keyed, hash, username, now, self.rehash());
        self.alive(&slot, now).then(|| self.record(&slot))
    }

    /// The last username seen for `hash`, if remembered.
    pub fn username(&self, hash: u32) -> Option<String> {
        let (keyed, i) = self.locate(hash);
        let shard = self.shards[i].lock().unwrap();
        let slot = shard.get(keyed, hash)?;
        shard.name(slot).map(str::to_owned)
    }

    /// Removes expired records (and usernames unused for `user_expire`), one shard at a time.
    pub fn purge(&self, now: Instant) -> Purged {
        self.purge_keeping(now, |_| false)
    }

    /// [`StickyTable::purge`], but a slot that `keep` accepts stays whatever its age (a
    /// cluster member keeps the usernames of records that live in etcd).
    pub fn purge_keeping(&self, now: Instant, keep: impl Fn(u32) -> bool) -> Purged {
        let now = self.clock.tick(now);
        let mut purged = Purged::default();
        let mut released: Vec<(u16, u32)> = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = self.lock_in_turn(shard);
            let held = Instant::now();
            if shard.is_empty() {
                continue;
            }
            shard.retain(
                |s| {
                    if s.alive(now, self.expire_ticks) || keep(s.hash) {
                        return true;
                    }
                    if s.is_record() {
                        purged.records += 1;
                        match released.iter_mut().find(|(b, _)| *b == s.backend) {
                            Some((_, n)) => *n += 1,
                            None => released.push((s.backend, 1)),
                        }
                    }
                    false
                },
                self.rehash(),
            );
            drop(shard);
            purged.longest_hold = purged.longest_hold.max(held.elapsed());
            for (b, n) in released.drain(..) {
                self.backends.release(b, n);
            }
        }
        purged
    }

    /// Calls `f` with every live record, one shard locked at a time. `f` must not use the
    /// table.
    pub fn for_each(&self, now: Instant, mut f: impl FnMut(u32, StickyRecord)) {
        let now = self.clock.tick(now);
        for shard in self.shards.iter() {
            let shard = self.lock_in_turn(shard);
            for s in shard.slots().filter(|s| self.alive(s, now)) {
                f(s.hash, self.record(s));
            }
        }
    }

    /// Every live record (small tables and tests: at scale, [`StickyTable::counts`],
    /// [`StickyTable::on`] and [`StickyTable::page`]).
    pub fn live(&self, now: Instant) -> Vec<(u32, StickyRecord)> {
        let mut out = Vec::new();
        self.for_each(now, |h, r| out.push((h, r)));
        out
    }

    /// How many live records there are, in all and per backend, without listing them.
    pub fn counts(&self, now: Instant) -> RecordCounts {
        let now = self.clock.tick(now);
        let mut counts = RecordCounts::default();
        let mut by_index: Vec<usize> = Vec::new();
        for shard in self.shards.iter() {
            let shard = self.lock_in_turn(shard);
            for s in shard.slots().filter(|s| self.alive(s, now)) {
                let i = usize::from(s.backend);
                if by_index.len() <= i {
                    by_index.resize(i + 1, 0);
                }
                by_index[i] += 1;
            }
            // Named while the shard's records hold their indices (an index is reused only
            // once no record holds it).
            let ips = self.backends.all();
            for (i, n) in by_index.iter_mut().enumerate().filter(|(_, n)| **n > 0) {
                *counts.by_backend.entry(ips[i]).or_default() += *n;
                counts.total += *n;
                *n = 0;
            }
        }
        counts
    }

    /// The hashes of the live records on `backend`.
    pub fn on(&self, backend: IpAddr, now: Instant) -> Vec<u32> {
        let now = self.clock.tick(now);
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = self.lock_in_turn(shard);
            let ips = self.backends.all();
            out.extend(
                shard
                    .slots()
                    .filter(|s| self.alive(s, now) && ips[usize::from(s.backend)] == backend)
                    .map(|s| s.hash),
            );
        }
        out
    }

    /// Up to `limit` live records whose backend `wanted` accepts, from just after the
    /// record of hash `after` (from the start without), and where the next page starts.
    ///
    /// The order is the table's own: shard by shard, by hash within a shard; it is the same
    /// for the life of the table, so pages taken one after the other list every record that
    /// lived throughout exactly once. A page costs a pass over the shards it reads, each
    /// locked on its own: never a list of every record.
    pub fn page(
        &self,
        now: Instant,
        after: Option<u32>,
        limit: usize,
        wanted: impl Fn(IpAddr) -> bool,
    ) -> RecordPage {
        let now = self.clock.tick(now);
        let limit = limit.max(1);
        let first = after.map_or(0, |h| self.locate(h).1);
        let mut page = RecordPage::default();
        for i in first..SHARDS {
            let shard = self.lock_in_turn(&self.shards[i]);
            let ips = self.backends.all();
            let mut found: Vec<&Slot> = shard
                .slots()
                .filter(|s| {
                    self.alive(s, now)
                        && (i != first || after.is_none_or(|a| s.hash > a))
                        && wanted(ips[usize::from(s.backend)])
                })
                .collect();
            if found.is_empty() {
                continue;
            }
            if page.records.len() == limit {
                // The page is full and more follow.
                page.next = page.records.last().map(|r| r.hash);
                return page;
            }
            let room = limit - page.records.len();
            let more = found.len() > room;
            if more {
                found.select_nth_unstable_by_key(room - 1, |s| s.hash);
                found.truncate(room);
            }
            found.sort_unstable_by_key(|s| s.hash);
            page.records.extend(found.into_iter().map(|s| PagedRecord {
                hash: s.hash,
                record: self.record(s),
                username: shard.name(s).map(str::to_owned),
            }));
            if more {
                page.next = page.records.last().map(|r| r.hash);
                return page;
            }
        }
        page
    }

    pub fn expire(&self) -> Duration {
        self.expire
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn record_lives_while_sessions_then_expires() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(900);
        let t = StickyTable::new(exp);
        // Two backends.
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(t.bind(1, a, t0), a);
        // A second login proposes another backend (the ring changed): the record wins.
        assert_eq!(t.bind(1, b, t0), a);
        t.session_started(1, a, t0);
        // With a live session the record never expires.
        assert!(t.get(1, t0 + exp * 10).is_some());
        t.session_ended(1, t0 + exp * 10);
        assert!(t.get(1, t0 + exp * 10 + exp / 2).is_some());
        assert!(t.get(1, t0 + exp * 11 + Duration::from_secs(1)).is_none());
        // After expiry, the next login follows the ring.
        assert_eq!(t.bind(1, b, t0 + exp * 12), b);
        assert_eq!(t.purge(t0 + exp * 14).records, 1);
    }

    #[test]
    fn expiry_to_the_millisecond() {
        // Tests run with `user_expire: 2s`; an expiry of 1.5 s must not wait for a second.
        let t = StickyTable::new(Duration::from_millis(1500));
        let t0 = Instant::now();
        t.bind(7, ip(1), t0);
        assert!(t.get(7, t0 + Duration::from_millis(1490)).is_some());
        assert!(t.get(7, t0 + Duration::from_millis(1502)).is_none());
        t.session_started(7, ip(1), t0 + Duration::from_millis(1600));
        t.session_ended(7, t0 + Duration::from_millis(1700));
        let r = t.get(7, t0 + Duration::from_millis(3190)).unwrap();
        // `touched` is kept to the millisecond.
        let touched = r.touched.duration_since(t0);
        assert!(
            touched.abs_diff(Duration::from_millis(1700)) <= Duration::from_millis(1),
            "{touched:?}"
        );
        assert!(t.get(7, t0 + Duration::from_millis(3202)).is_none());
        assert_eq!(t.purge(t0 + Duration::from_millis(3202)).records, 1);
        assert!(t.live(t0).is_empty());
    }

    #[test]
    fn many_backends_keep_their_addresses() {
        let t = StickyTable::new(Duration::from_secs(60));
        let now = Instant::now();
        // 3,000 backends, 10 users each; then every user of odd backends moves to a new one.
        for h in 1..=30_000u32 {
            t.bind(h, ip(h % 3000), now);
        }
        for h in (1..=30_000u32).filter(|h| h % 2 == 1) {
            t.set(h, ip(100_000 + h % 3000), now);
        }
        for h in 1..=30_000u32 {
            let want = if h % 2 == 1 {
                ip(100_000 + h % 3000)
            } else {
                ip(h % 3000)
            };
            assert_eq!(t.get(h, now).map(|r| r.backend), Some(want), "{h}");
        }
        // Backends nobody points to any more free their index.
        assert_eq!(t.backends.in_use(), 3000);
        let counts = t.counts(now);
        assert_eq!(counts.total, 30_000);
        assert_eq!(counts.by_backend.len(), 3000);
        assert!(counts.by_backend.values().all(|n| *n == 10));
        for h in 1..=30_000u32 {
            t.remove(h);
        }
        assert_eq!(t.backends.in_use(), 0);
        assert_eq!(t.counts(now), RecordCounts::default());
    }

    #[test]
    fn purge_in_shards_leaves_the_live_and_their_names() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(60);
        let t = StickyTable::new(exp);
        for h in 1..=50_000u32 {
            let at = if h % 2 == 0 { t0 } else { t0 + exp };
            t.note_username(h, &format!("user{h}@example.org"), at);
            t.bind(h, ip(h % 7), at);
        }
        // A user with a session outlives any expiry.
        t.session_started(2, ip(2), t0);
        let purged = t.purge(t0 + exp + exp / 2);
        assert_eq!(purged.records, 25_000 - 1);
        assert!(purged.longest_hold < Duration::from_secs(1));
        for h in 1..=50_000u32 {
            let live = h % 2 == 1 || h == 2;
            assert_eq!(t.get(h, t0 + exp).is_some(), live, "{h}");
            let name = live.then(|| format!("user{h}@example.org"));
            assert_eq!(t.username(h), name, "{h}");
        }
        assert_eq!(t.counts(t0 + exp).total, 25_001);
        // A name without record lives `user_expire` too.
        t.note_username(900_000, "nobody", t0);
        assert_eq!(t.username(900_000).as_deref(), Some("nobody"));
        assert!(t.get(900_000, t0).is_none());
        t.purge(t0 + exp / 2);
        assert_eq!(t.username(900_000).as_deref(), Some("nobody"));
        assert_eq!(t.purge(t0 + exp * 3).records, 25_000);
        assert_eq!(t.username(900_000), None);
        // Kept by the caller's word (a cluster's record in etcd).
        t.note_username(900_001, "kept", t0);
        t.purge_keeping(t0 + exp * 3, |h| h == 900_001);
        assert_eq!(t.username(900_001).as_deref(), Some("kept"));
    }

    #[test]
    fn a_name_noted_before_the_bind_stays_with_the_record() {
        let t = StickyTable::new(Duration::from_secs(60));
        let now = Instant::now();
        t.note_username(5, "alice", now);
        assert!(t.get(5, now).is_none());
        assert!(t.live(now).is_empty());
        assert_eq!(t.bind(5, ip(1), now), ip(1));
        assert_eq!(t.username(5).as_deref(), Some("alice"));
        assert_eq!(t.remove(5).map(|r| r.backend), Some(ip(1)));
        assert_eq!(t.username(5), None);
    }

    #[test]
    fn pages_list_every_record_once() {
        let t = StickyTable::new(Duration::from_secs(60));
        let start = Instant::now();
        let now = start + Duration::from_secs(61);
        for h in 1..=20_000u32 {
            t.bind(h, ip(h % 3), now);
        }
        // Not listed: a name alone, and an expired record.
        t.note_username(100_000, "no record", now);
        t.bind(100_001, ip(1), start);
        for limit in [1, 7, 1000, 20_000, 50_000] {
            let mut seen = std::collections::HashSet::new();
            let mut after = None;
            let mut pages = 0;
            loop {
                let page = t.page(now, after, limit, |_| true);
                assert!(page.records.len() <= limit);
                for r in &page.records {
                    assert!(seen.insert(r.hash), "{} twice", r.hash);
                }
                pages += 1;
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(seen.len(), 20_000, "limit {limit}");
            assert_eq!(pages, 20_000usize.div_ceil(limit), "limit {limit}");
        }
        // One backend's records only.
        let page = t.page(now, None, 50_000, |b| b == ip(1));
        assert_eq!(page.records.len(), 6667);
        assert!(page.records.iter().all(|r| r.record.backend == ip(1)));
        assert_eq!(page.next, None);
        assert_eq!(t.on(ip(1), now).len(), 6667);
    }
}
