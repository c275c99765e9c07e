//! Every live session of this director, by user and backend, so that a session can be found,
//! counted and kicked. Local to one director (the sticky records are what directors share).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Protocol;
use crate::flagged_wait::Signal;

/// What is known about one live session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub protocol: Protocol,
    pub username: String,
    pub user_hash: u32,
    /// The backend's socket address the session is relayed to.
    pub backend: SocketAddr,
    pub started: Instant,
    /// A login still under way (a reservation, see `login`): it counts for the invariant
    /// (one backend per user) but is not yet a session that people or metrics see.
    pub pending: bool,
    /// A reservation whose credentials went to the backend ([`Sessions::commit`]): the backend
    /// may have logged the user in, so it binds the user to this backend like a live session.
    /// A reservation that is not committed yet has shown the backend nothing of the user.
    pub committed: bool,
}

impl SessionInfo {
    /// Whether the user may be logged in on this entry's backend: a live session, or a login
    /// whose credentials were sent.
    fn binds(&self) -> bool {
        !self.pending || self.committed
    }
}

struct Entry {
    info: SessionInfo,
    /// Fired to end the session (kick, move).
    kick: Arc<Signal>,
}

/// Called when a session ends, with its info: lets the state refresh the sticky record.
pub type EndHook = Arc<dyn Fn(&SessionInfo) + Send + Sync>;

/// The sessions by id, and the ids of each user's: a login asks about its user's sessions
/// (the invariant checks), which must not cost a walk over every idle session of the
/// director.
/// The registry's hasher: foldhash, randomly keyed (user hashes come from names clients
/// choose), at a tenth of SipHash's cost; a login hashes a dozen times here.
type FastHash = foldhash::fast::RandomState;

#[derive(Default)]
struct Registry {
    entries: HashMap<u64, Entry, FastHash>,
    by_user: HashMap<u32, Vec<u64>, FastHash>,
}

impl Registry {
    fn insert(&mut self, entry: Entry) {
        self.by_user
            .entry(entry.info.user_hash)
            .or_default()
            .push(entry.info.id);
        self.entries.insert(entry.info.id, entry);
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        let hash = entry.info.user_hash;
        if let Some(ids) = self.by_user.get_mut(&hash) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_user.remove(&hash);
            }
        }
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&id)
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The sessions and logins of users with this hash.
    fn of_user(&self, user_hash: u32) -> impl Iterator<Item = &Entry> {
        self.by_user
            .get(&user_hash)
            .into_iter()
            .flatten()
            .filter_map(|id| self.entries.get(id))
    }
}

/// The registry of live sessions.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<Registry>>,
    next_id: Arc<AtomicU64>,
}

impl Sessions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves `backend` for a login of this user that is under way: it counts for the
    /// invariant checks (`count_user`, `backend_ips_of`, `users_on`) but is left out of
    /// [`Sessions::list`] and [`Sessions::count_backend_ip`]. A login that succeeds turns it
    /// into its session ([`SessionGuard::into_session`]); it stays registered until the
    /// guard is dropped, which then calls the session's `on_end` (if any).
    pub fn reserve(
        &self,
        protocol: Protocol,
        username: &str,
        user_hash: u32,
        backend: SocketAddr,
    ) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = SessionInfo {
            id,
            protocol,
            username: username.to_owned(),
            user_hash,
            backend,
            started: Instant::now(),
            pending: true,
            committed: false,
        };
        let kick = Arc::new(Signal::default());
        self.inner.lock().unwrap().insert(Entry {
            info: info.clone(),
            kick: kick.clone(),
        });
        SessionGuard {
            sessions: self.clone(),
            info,
            kick,
            on_end: None,
        }
    }

    /// For tests: a live session at once (a reservation made its session).
    #[cfg(test)]
    pub fn register(
        &self,
        protocol: Protocol,
        username: &str,
        user_hash: u32,
        backend: SocketAddr,
        on_end: Option<EndHook>,
    ) -> SessionGuard {
        self.reserve(protocol, username, user_hash, backend)
            .into_session(on_end)
    }

    /// All live sessions (not logins under way).
    pub fn list(&self) -> Vec<SessionInfo> {
        self.inner
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.info.pending)
            .map(|e| e.info.clone())
            .collect()
    }

    /// How many live sessions (not logins under way) there are, without copying them.
    pub fn count(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.info.pending)
            .count()
    }

    /// All live sessions and logins under way.
    pub fn list_with_pending(&self) -> Vec<SessionInfo> {
        self.inner
            .lock()
            .unwrap()
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    /// Commits a reservation made by [`Sessions::reserve`]: its login is about to send the
    /// user's credentials to its backend. Refused (false) when the user has a live session or a
    /// committed login on another backend: the user would then be on two backends. Atomic, so
    /// of two logins of one user racing to different backends at most one commits.
    pub fn commit(&self, guard: &SessionGuard) -> bool {
        let mut map = self.inner.lock().unwrap();
        let me = &guard.info;
        let elsewhere = map.of_user(me.user_hash).any(|e| {
            e.info.id != me.id && e.info.binds() && e.info.backend.ip() != me.backend.ip()
        });
        if elsewhere {
            return false;
        }
        if let Some(e) = map.get_mut(me.id) {
            e.info.committed = true;
        }
        true
    }

    /// Live sessions and committed logins of users with this hash: what ties the user to a
    /// backend (reservations that sent nothing yet are left out).
    pub fn count_user_bound(&self, user_hash: u32) -> usize {
        let map = self.inner.lock().unwrap();
        map.of_user(user_hash).filter(|e| e.info.binds()).count()
    }

    /// The backend IPs that users with this hash have live sessions or committed logins on.
    pub fn bound_ips_of(&self, user_hash: u32) -> Vec<std::net::IpAddr> {
        let map = self.inner.lock().unwrap();
        let mut ips: Vec<std::net::IpAddr> = map
            .of_user(user_hash)
            .filter(|e| e.info.binds())
            .map(|e| e.info.backend.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// The username of a live session of each of these user hashes that has one, found
    /// through the index by user (`map`: names its table does not hold).
    pub fn usernames_of(&self, hashes: &std::collections::HashSet<u32>) -> HashMap<u32, String> {
        let map = self.inner.lock().unwrap();
        hashes
            .iter()
            .filter_map(|h| Some((*h, map.of_user(*h).next()?.info.username.clone())))
            .collect()
    }

    /// Live sessions of users with this hash.
    pub fn count_user(&self, user_hash: u32) -> usize {
        let map = self.inner.lock().unwrap();
        map.of_user(user_hash).count()
    }

    /// The backend IPs that users with this hash have live sessions on.
    pub fn backend_ips_of(&self, user_hash: u32) -> Vec<std::net::IpAddr> {
        let map = self.inner.lock().unwrap();
        let mut ips: Vec<std::net::IpAddr> = map
            .of_user(user_hash)
            .map(|e| e.info.backend.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Live sessions relayed to this backend address (any protocol port on that IP).
    pub fn count_backend_ip(&self, ip: std::net::IpAddr) -> usize {
        let map = self.inner.lock().unwrap();
        map.values()
            .filter(|e| e.info.backend.ip() == ip && !e.info.pending)
            .count()
    }

    /// Hashes of the users with live sessions relayed to this backend IP.
    pub fn users_on(&self, ip: std::net::IpAddr) -> Vec<u32> {
        let map = self.inner.lock().unwrap();
        let mut hashes: Vec<u32> = map
            .values()
            .filter(|e| e.info.backend.ip() == ip)
            .map(|e| e.info.user_hash)
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// Ends the sessions of users with this hash that are relayed to `ip`; returns how many
    /// were told to end.
    pub fn kick_user_on(&self, user_hash: u32, ip: std::net::IpAddr) -> usize {
        let map = self.inner.lock().unwrap();
        let mut n = 0;
        for e in map.of_user(user_hash).filter(|e| e.info.backend.ip() == ip) {
            e.kick.fire();
            n += 1;
        }
        n
    }

    /// Ends every session and login under way (a cluster member cut off from etcd);
    /// returns how many were told to end.
    pub fn kick_all(&self) -> usize {
        let map = self.inner.lock().unwrap();
        for e in map.values() {
            e.kick.fire();
        }
        map.len()
    }

    /// Ends every session of users with this hash; returns how many were told to end.
    pub fn kick_user(&self, user_hash: u32) -> usize {
        let map = self.inner.lock().unwrap();
        let mut n = 0;
        for e in map.of_user(user_hash) {
            e.kick.fire();
            n += 1;
        }
        n
    }
}

/// A registered live session. Dropping it unregisters the session.
pub struct SessionGuard {
    sessions: Sessions,
    info: SessionInfo,
    kick: Arc<Signal>,
    on_end: Option<EndHook>,
}

impl SessionGuard {
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// Completes when the session is kicked, also for a kick that came before (a kicked
    /// session stays kicked). Cheap to poll again: until the kick, a poll checks a flag.
    pub async fn kicked(&self) {
        self.kick.fired().await
    }

    /// The login this reservation ([`Sessions::reserve`]) held is done: its entry becomes
    /// the live session, started now, with `on_end` called when it ends. Its id and its kick
    /// are kept: a kick that reached the login (a move of the user) ends the session.
    pub fn into_session(mut self, on_end: Option<EndHook>) -> SessionGuard {
        let started = Instant::now();
        if let Some(e) = self.sessions.inner.lock().unwrap().get_mut(self.info.id) {
            e.info.pending = false;
            e.info.committed = false;
            e.info.started = started;
        }
        self.info.pending = false;
        self.info.committed = false;
        self.info.started = started;
        self.on_end = on_end;
        self
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.inner.lock().unwrap().remove(self.info.id);
        if let Some(hook) = &self.on_end {
            hook(&self.info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn register_kick_and_drop() {
        let s = Sessions::new();
        let ended = Arc::new(AtomicU64::new(0));
        let e2 = ended.clone();
        let hook: EndHook = Arc::new(move |_| {
            e2.fetch_add(1, Ordering::SeqCst);
        });
        let addr: SocketAddr = "127.0.0.2:143".parse().unwrap();
        let g = s.register(Protocol::Imap, "alice", 7, addr, Some(hook));
        assert_eq!(s.count_user(7), 1);
        assert_eq!(s.count_backend_ip(addr.ip()), 1);
        assert_eq!(s.kick_user(7), 1);
        g.kicked().await; // the permit stored by the kick completes this at once
        drop(g);
        assert_eq!(s.count_user(7), 0);
        assert_eq!(ended.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn each_user_s_sessions_are_found_among_many() {
        let s = Sessions::new();
        let x: SocketAddr = "127.0.0.2:143".parse().unwrap();
        let y: SocketAddr = "127.0.0.3:143".parse().unwrap();
        let mut guards: Vec<SessionGuard> = (0..3000u32)
            .map(|i| {
                s.register(
                    Protocol::Imap,
                    "u",
                    i % 1000,
                    if i % 2 == 0 { x } else { y },
                    None,
                )
            })
            .collect();
        // User 4 has sessions 4, 1004, 2004: all on x.
        assert_eq!(s.count_user(4), 3);
        assert_eq!(s.backend_ips_of(4), vec![x.ip()]);
        // User 5: 5, 1005, 2005 on y; 1006 (user 6) is on x.
        assert_eq!(s.bound_ips_of(5), vec![y.ip()]);
        assert_eq!(s.kick_user_on(5, x.ip()), 0);
        assert_eq!(s.kick_user_on(5, y.ip()), 3);
        guards.retain(|g| g.info().user_hash != 4);
        assert_eq!(s.count_user(4), 0);
        assert!(s.backend_ips_of(4).is_empty());
        assert_eq!(s.count(), 2997);
        let again = s.register(Protocol::Imap, "u", 4, y, None);
        assert_eq!(s.backend_ips_of(4), vec![y.ip()]);
        drop(again);
        drop(guards);
        assert_eq!(s.count(), 0);
        assert_eq!(
            s.inner.lock().unwrap().by_user.len(),
            0,
            "no user left indexed"
        );
    }

    #[test]
    fn a_reservation_guards_the_invariant_but_is_not_listed() {
        let s = Sessions::new();
        let addr: SocketAddr = "127.0.0.2:143".parse().unwrap();
        let r = s.reserve(Protocol::Imap, "bob", 9, addr);
        assert_eq!(s.count_user(9), 1);
        assert_eq!(s.backend_ips_of(9), vec![addr.ip()]);
        assert_eq!(s.users_on(addr.ip()), vec![9]);
        assert!(s.list().is_empty());
        assert_eq!(s.count_backend_ip(addr.ip()), 0);
        assert_eq!(s.list_with_pending().len(), 1);
        drop(r);
        assert_eq!(s.count_user(9), 0);
    }

    /// A login's reservation becomes its session in place: listed, counted on its backend,
    /// its end hook called once; a kick that reached the login ends the session.
    #[tokio::test]
    async fn a_reservation_becomes_the_session_and_keeps_a_kick() {
        let s = Sessions::new();
        let addr: SocketAddr = "127.0.0.2:143".parse().unwrap();
        let ended = Arc::new(AtomicU64::new(0));
        let hook = |ended: &Arc<AtomicU64>| -> EndHook {
            let ended = ended.clone();
            Arc::new(move |_| {
                ended.fetch_add(1, Ordering::SeqCst);
            })
        };
        let r = s.reserve(Protocol::Imap, "bob", 9, addr);
        assert!(s.commit(&r));
        let id = r.info().id;
        let session = r.into_session(Some(hook(&ended)));
        let listed = s.list();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].id, listed[0].pending), (id, false));
        assert!(!session.info().pending);
        assert_eq!(s.count_backend_ip(addr.ip()), 1);
        assert_eq!(s.count_user(9), 1);
        // Not kicked: its kick wait is still pending.
        let kicked = tokio::time::timeout(Duration::from_millis(50), session.kicked()).await;
        assert!(kicked.is_err());
        drop(session);
        assert_eq!((s.count_user(9), ended.load(Ordering::SeqCst)), (0, 1));
        // A kick during the login reaches the session it becomes.
        let r = s.reserve(Protocol::Imap, "bob", 9, addr);
        assert_eq!(s.kick_user(9), 1);
        let session = r.into_session(Some(hook(&ended)));
        tokio::time::timeout(Duration::from_secs(5), session.kicked())
            .await
            .expect("the login's kick ends its session");
        drop(session);
        assert_eq!((s.count_user(9), ended.load(Ordering::SeqCst)), (0, 2));
    }

    #[test]
    fn only_one_of_two_logins_racing_to_different_backends_commits() {
        let s = Sessions::new();
        let x: SocketAddr = "127.0.0.2:143".parse().unwrap();
        let y: SocketAddr = "127.0.0.3:143".parse().unwrap();
        let on_x = s.reserve(Protocol::Imap, "carol", 5, x);
        let on_y = s.reserve(Protocol::Imap, "carol", 5, y);
        // Reservations that sent nothing do not tie the user anywhere.
        assert_eq!(s.count_user_bound(5), 0);
        assert!(s.bound_ips_of(5).is_empty());
        assert!(s.commit(&on_y), "nothing binds carol yet");
        assert!(!s.commit(&on_x), "carol's credentials already went to y");
        assert_eq!(s.bound_ips_of(5), vec![y.ip()]);
        // A second login on the same backend may commit too.
        let also_y = s.reserve(Protocol::Imap, "carol", 5, y);
        assert!(s.commit(&also_y));
        drop(on_y);
        drop(also_y);
        assert!(s.commit(&on_x), "y released carol");
        // A live session elsewhere refuses a commit as well.
        let live = s.register(Protocol::Imap, "dave", 6, y, None);
        let other = s.reserve(Protocol::Imap, "dave", 6, x);
        assert!(!s.commit(&other));
        drop(live);
        assert!(s.commit(&other));
    }
}
