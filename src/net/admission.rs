//! Who may take a connection slot, so that no single host can fill them.
//!
//! - Each listener has its own [`ConnectionPool`] (`limits.max_connections`, or the
//!   listener's own `max_connections`): a flood of IMAP connections cannot starve LMTP, POP3
//!   or the admin API (which has listeners of its own and takes no slot).
//! - One client address may hold at most `limits.max_preauth_per_ip` connections that have not
//!   logged in yet ([`PerIpLimit`], one count over all listeners). The address is the real
//!   client's (after a trusted PROXY header); IPv6 addresses are counted by /64, the block one
//!   host usually gets, so a host cannot dodge the cap by changing its interface id.
//! - When a pool is full, the oldest connection in it that has not logged in yet is dropped to
//!   make room (what Dovecot's login processes do); logged-in (relayed) sessions are never
//!   dropped for this. A pool that holds only logged-in sessions turns the newcomer away.
//!
//! A connection's [`Slot`] is its place in its pool; [`Eviction`] is how the connection
//! learns that it was chosen to make room: the front end then says the protocol's BYE and
//! closes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::config::Protocol;
use crate::flagged_wait::Signal;

/// The key a client address is counted under: IPv4 as it is (IPv4-mapped IPv6 too), IPv6 by
/// its /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6Prefix64(u64),
}

impl ClientKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6Prefix64((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Caps the connections before login per client address, over all listeners.
pub struct PerIpLimit {
    /// `limits.max_preauth_per_ip`; a reload changes it (the counts stay).
    max: std::sync::atomic::AtomicUsize,
    /// Hashed with foldhash, randomly keyed (clients choose their addresses, within reason).
    counts: Mutex<HashMap<ClientKey, usize, foldhash::fast::RandomState>>,
}

impl PerIpLimit {
    /// At most `max` connections before login per address.
    pub fn new(max: usize) -> Arc<PerIpLimit> {
        Arc::new(PerIpLimit {
            max: std::sync::atomic::AtomicUsize::new(max),
            counts: Mutex::new(HashMap::default()),
        })
    }

    /// A place for one more connection from `ip`, or `None` when it has `max` already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpGuard> {
        let key = ClientKey::of(ip);
        let mut counts = self.counts.lock().unwrap();
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            limit: self.clone(),
            key,
        })
    }

    /// A new cap (reload): connections over it stay, new ones wait until the count is below.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Connections before login from `ip`'s address (or /64) now.
    pub fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap();
        counts.get(&ClientKey::of(ip)).copied().unwrap_or(0)
    }
}

/// One connection counted against its address; dropping it (at login, or at close) frees
/// the place.
pub struct PerIpGuard {
    limit: Arc<PerIpLimit>,
    key: ClientKey,
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut counts = self.limit.counts.lock().unwrap();
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What a connection learns when it is chosen to make room. Clones wait for the same event.
/// The default never fires (a connection that cannot be dropped, or a test's front end).
#[derive(Clone, Default)]
pub struct Eviction(Option<Arc<Signal>>);

impl Eviction {
    /// Whether the connection was chosen to make room.
    pub fn is_evicted(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_fired())
    }

    /// Completes when the connection is chosen to make room; never for the default.
    pub async fn evicted(&self) {
        let Some(s) = &self.0 else {
            return std::future::pending().await;
        };
        s.fired().await
    }
}

/// The connections of one listener: at most `capacity` at once.
pub struct ConnectionPool {
    /// The listener's `max_connections`; a reload changes it (connections over a lower
    /// capacity stay until they end).
    capacity: std::sync::atomic::AtomicUsize,
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    /// Slots held (including connections told to go that have not closed yet).
    held: usize,
    /// Connections told to go, still holding their slot until they close: their slots are
    /// already promised to the newcomers that displaced them.
    leaving: usize,
    /// Connections before login, oldest first (by admission order).
    preauth: BTreeMap<u64, Arc<Signal>>,
    /// The next admission number.
    next: u64,
}

/// What [`ConnectionPool::admit`] decided.
pub enum Admitted {
    /// A slot; `made_room` tells that the oldest connection before login was told to go.
    Slot { slot: Slot, made_room: bool },
    /// The pool is full of connections that may not be dropped.
    Full,
}

impl ConnectionPool {
    /// A pool of `capacity` slots.
    pub fn new(capacity: usize) -> Arc<ConnectionPool> {
        Arc::new(ConnectionPool {
            capacity: std::sync::atomic::AtomicUsize::new(capacity),
            inner: Mutex::new(PoolInner {
                held: 0,
                leaving: 0,
                preauth: BTreeMap::new(),
                next: 0,
            }),
        })
    }

    /// A new capacity (reload).
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// Takes a slot for a new connection, dropping the oldest connection before login when
    /// the pool is full. `droppable`: the new connection may itself be dropped later to make
    /// room, until it logs in (false for LMTP: a delivery is never cut for a newcomer).
    pub fn admit(self: &Arc<Self>, droppable: bool) -> Admitted {
        let mut p = self.inner.lock().unwrap();
        let mut made_room = false;
        if p.held - p.leaving >= self.capacity.load(Ordering::Relaxed) {
            let Some((_, oldest)) = p.preauth.pop_first() else {
                return Admitted::Full;
            };
            oldest.fire();
            p.leaving += 1;
            made_room = true;
        }
        p.held += 1;
        let seq = p.next;
        p.next += 1;
        let signal = if droppable {
            let s = Arc::new(Signal::default());
            p.preauth.insert(seq, s.clone());
            Some(s)
        } else {
            None
        };
        Admitted::Slot {
            slot: Slot {
                pool: self.clone(),
                seq,
                phase: if droppable {
                    Phase::Preauth
                } else {
                    Phase::Kept
                },
                signal,
            },
            made_room,
        }
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.inner.lock().unwrap().held
    }
}

/// Whether a slot's connection may still be dropped to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before login: may be chosen.
    Preauth,
    /// Logged in, or never droppable: never chosen.
    Kept,
}

/// A connection's place in its pool, freed when dropped.
pub struct Slot {
    pool: Arc<ConnectionPool>,
    seq: u64,
    phase: Phase,
    signal: Option<Arc<Signal>>,
}

impl Slot {
    /// How this connection learns it was chosen to make room.
    pub fn eviction(&self) -> Eviction {
        Eviction(self.signal.clone())
    }

    /// The connection has logged in: it will never be dropped to make room. (If it was
    /// chosen in the instant before, it stays, and counts as an ordinary slot again.)
    pub fn logged_in(&mut self) {
        if self.phase != Phase::Preauth {
            return;
        }
        self.phase = Phase::Kept;
        let mut p = self.pool.inner.lock().unwrap();
        if p.preauth.remove(&self.seq).is_none() {
            p.leaving -= 1;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut p = self.pool.inner.lock().unwrap();
        p.held -= 1;
        if self.phase == Phase::Preauth && p.preauth.remove(&self.seq).is_none() {
            p.leaving -= 1;
        }
    }
}

/// The line that turns a connection away before anything else was said: `per_ip` for an
/// address over `limits.max_preauth_per_ip`, else a listener full of logged-in sessions.
/// `lmtp_host` is the name LMTP replies carry.
pub fn refusal_line(protocol: Protocol, per_ip: bool, lmtp_host: &str) -> String {
    let text = if per_ip {
        "Too many connections from your address."
    } else {
        "Too many connections, try again later."
    };
    match protocol {
        Protocol::Imap => format!("* BYE {text}\r\n"),
        Protocol::Pop3 => format!("-ERR [SYS/TEMP] {text}\r\n"),
        Protocol::Sieve => format!("BYE \"{text}\"\r\n"),
        Protocol::Lmtp => format!("421 4.3.2 {lmtp_host} {text}\r\n"),
    }
}

/// The text of the BYE a connection before login gets when it is dropped to make room.
pub const EVICTED_TEXT: &str = "Connection queue full.";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn slot(a: Admitted) -> (Slot, bool) {
        match a {
            Admitted::Slot { slot, made_room } => (slot, made_room),
            Admitted::Full => panic!("pool full"),
        }
    }

    #[test]
    fn per_ip_counts_by_address_and_ipv6_by_64() {
        let l = PerIpLimit::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g1 = l.try_acquire(a).unwrap();
        let _g2 = l.try_acquire("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert!(l.try_acquire(a).is_none(), "third from one address");
        assert!(l.try_acquire("192.0.2.2".parse().unwrap()).is_some());
        drop(g1);
        assert_eq!(l.count(a), 1);
        let _g3 = l.try_acquire(a).unwrap();
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _h1 = l.try_acquire(v6a).unwrap();
        let _h2 = l.try_acquire(v6b).unwrap();
        assert!(l.try_acquire(v6a).is_none(), "one /64 is one client");
        assert!(l.try_acquire("2001:db8:1:3::1".parse().unwrap()).is_some());
    }

    #[tokio::test]
    async fn a_full_pool_drops_its_oldest_connection_before_login() {
        let pool = ConnectionPool::new(2);
        let (first, room) = slot(pool.admit(true));
        assert!(!room);
        let (second, _) = slot(pool.admit(true));
        let (third, room) = slot(pool.admit(true));
        assert!(room);
        assert!(first.eviction().is_evicted());
        assert!(!second.eviction().is_evicted());
        tokio::time::timeout(Duration::from_secs(1), first.eviction().evicted())
            .await
            .expect("the oldest learns it must go");
        // Until the oldest closes, its slot is promised to the third: the fourth evicts the
        // second, not the third.
        let (fourth, _) = slot(pool.admit(true));
        assert!(second.eviction().is_evicted());
        assert!(!third.eviction().is_evicted());
        assert_eq!(pool.held(), 4);
        drop((first, second));
        assert_eq!(pool.held(), 2);
        drop((third, fourth));
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn logged_in_sessions_are_never_dropped() {
        let pool = ConnectionPool::new(2);
        let (mut a, _) = slot(pool.admit(true));
        let (mut b, _) = slot(pool.admit(true));
        a.logged_in();
        b.logged_in();
        assert!(matches!(pool.admit(true), Admitted::Full));
        assert!(!a.eviction().is_evicted() && !b.eviction().is_evicted());
        drop(a);
        let (c, _) = slot(pool.admit(true));
        // Not droppable (LMTP): a pool of it and a logged-in session is full.
        drop(c);
        let (_lmtp, _) = slot(pool.admit(false));
        assert!(matches!(pool.admit(true), Admitted::Full));
    }

    #[test]
    fn a_login_in_the_instant_of_its_eviction_keeps_the_count_right() {
        let pool = ConnectionPool::new(1);
        let (mut a, _) = slot(pool.admit(true));
        let (b, made_room) = slot(pool.admit(true));
        assert!(made_room && a.eviction().is_evicted());
        a.logged_in(); // it stays: the pool is over by one until someone leaves
        assert_eq!(pool.held(), 2);
        drop(b);
        drop(a);
        assert_eq!(pool.held(), 0);
        let (_c, made_room) = slot(pool.admit(true));
        assert!(!made_room);
        assert!(matches!(pool.admit(false), Admitted::Slot { .. }));
    }

    #[test]
    fn refusal_lines_per_protocol() {
        for (protocol, per_ip, host, line) in [
            (
                Protocol::Imap,
                true,
                "h",
                "* BYE Too many connections from your address.\r\n",
            ),
            (
                Protocol::Pop3,
                true,
                "h",
                "-ERR [SYS/TEMP] Too many connections from your address.\r\n",
            ),
            (
                Protocol::Sieve,
                false,
                "h",
                "BYE \"Too many connections, try again later.\"\r\n",
            ),
            (
                Protocol::Lmtp,
                true,
                "mx.example",
                "421 4.3.2 mx.example Too many connections from your address.\r\n",
            ),
        ] {
            assert_eq!(refusal_line(protocol, per_ip, host), line, "{protocol}");
        }
    }

    #[test]
    fn a_reload_changes_the_caps_and_keeps_the_counts() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let limit = PerIpLimit::new(2);
        let a = limit.try_acquire(ip).unwrap();
        let _b = limit.try_acquire(ip).unwrap();
        assert!(limit.try_acquire(ip).is_none());
        limit.set_max(3);
        let _c = limit.try_acquire(ip).expect("room under the new cap");
        limit.set_max(1);
        assert_eq!(limit.count(ip), 3, "connections over a lowered cap stay");
        drop(a);
        assert!(
            limit.try_acquire(ip).is_none(),
            "still over the lowered cap"
        );

        let pool = ConnectionPool::new(1);
        let Admitted::Slot { slot: _held, .. } = pool.admit(false) else {
            panic!("a slot");
        };
        assert!(matches!(pool.admit(false), Admitted::Full));
        pool.set_capacity(2);
        assert!(matches!(pool.admit(false), Admitted::Slot { .. }));
    }
}
