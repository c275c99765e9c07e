//! Sticky records (Dovecot: user directory entries): user hash → backend. A record lives while
//! its user has sessions and for `user_expire` after the last one ends. While it lives, the
//! user goes to its backend whatever the ring says; only a move changes it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// One user's binding to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StickyRecord {
    pub backend: IpAddr,
    /// Live sessions of this user on this director.
    pub sessions: u32,
    /// When the record was created or a session of the user last started or ended.
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

/// The table of records, keyed by user hash.
#[derive(Debug)]
pub struct StickyTable {
    records: HashMap<u32, StickyRecord>,
    expire: Duration,
}

impl StickyTable {
    pub fn new(expire: Duration) -> Self {
        StickyTable {
            records: HashMap::new(),
            expire,
        }
    }

    /// The live record for `hash`, if any.
    pub fn get(&self, hash: u32, now: Instant) -> Option<StickyRecord> {
        self.records
            .get(&hash)
            .copied()
            .filter(|r| r.alive(now, self.expire))
    }

    /// The backend `hash` is bound to: its live record's, or else `proposed`, which becomes
    /// the record. Atomic under the caller's lock, so concurrent first logins agree.
    pub fn bind(&mut self, hash: u32, proposed: IpAddr, now: Instant) -> IpAddr {
        let expire = self.expire;
        let rec = self.records.entry(hash).or_insert(StickyRecord {
            backend: proposed,
            sessions: 0,
            touched: now,
        });
        if !rec.alive(now, expire) {
            *rec = StickyRecord {
                backend: proposed,
                sessions: 0,
                touched: now,
            };
        }
        rec.backend
    }

    /// Points `hash` at `backend` (a move, or a failover before any session started).
    pub fn set(&mut self, hash: u32, backend: IpAddr, now: Instant) {
        self.point(hash, backend, now);
    }

    /// A session of `hash` started on `backend`.
    pub fn session_started(&mut self, hash: u32, backend: IpAddr, now: Instant) {
        self.point(hash, backend, now).sessions += 1;
    }

    /// The record of `hash`, made if missing, pointed at `backend` and touched.
    fn point(&mut self, hash: u32, backend: IpAddr, now: Instant) -> &mut StickyRecord {
        let rec = self.records.entry(hash).or_insert(StickyRecord {
            backend,
            sessions: 0,
            touched: now,
        });
        rec.backend = backend;
        rec.touched = now;
        rec
    }

    /// A session of `hash` ended: the record's expiry clock starts when none are left.
    pub fn session_ended(&mut self, hash: u32, now: Instant) {
        if let Some(rec) = self.records.get_mut(&hash) {
            rec.sessions = rec.sessions.saturating_sub(1);
            rec.touched = now;
        }
    }

    /// Drops the record of `hash`.
    pub fn remove(&mut self, hash: u32) -> Option<StickyRecord> {
        self.records.remove(&hash)
    }

    /// Removes expired records; returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let before = self.records.len();
        let expire = self.expire;
        self.records.retain(|_, r| r.alive(now, expire));
        before - self.records.len()
    }

    /// All live records.
    pub fn live(&self, now: Instant) -> Vec<(u32, StickyRecord)> {
        self.records
            .iter()
            .filter(|(_, r)| r.alive(now, self.expire))
            .map(|(h, r)| (*h, *r))
            .collect()
    }

    pub fn expire(&self) -> Duration {
        self.expire
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lives_while_sessions_then_expires() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(900);
        let mut t = StickyTable::new(exp);
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
        assert_eq!(t.purge(t0 + exp * 14), 1);
    }
}
