//! The router: which backend a user goes to. A live sticky record wins; otherwise the ring of
//! the user's tag decides and a record is made. Routing never sees protocol syntax.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::routing::user_hash::UserHash;
use crate::state::backend::Backend;
use crate::state::{BackendSet, State};

/// Where a user goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub user_hash: u32,
    /// The backend to use.
    pub backend: Backend,
    /// Why this backend.
    pub reason: RouteReason,
    /// Other backends in ring order, for when `backend` cannot be reached and the user has
    /// no live session (so moving the user cannot put it on two backends).
    pub fallbacks: Fallbacks,
}

/// The backends to try after a route's own, in ring order. Only where to find them is kept
/// (the ring's place in the backends as they were at routing time, and the user's hash):
/// the order is walked when a login gets that far, and most logins never do.
#[derive(Debug, Clone, Default)]
pub struct Fallbacks {
    set: Arc<BackendSet>,
    /// The ring's place in `set`; `None`: no fallbacks.
    ring: Option<usize>,
    hash: u32,
    /// The route's own backend, not a fallback.
    skip: Option<IpAddr>,
}

impl Fallbacks {
    /// The fallbacks, first to last. The ring is walked when the first one is asked for, not
    /// before (a login chains them behind its backend and most never get there).
    pub fn iter(&self) -> impl Iterator<Item = &Backend> {
        std::iter::once(()).flat_map(move |()| {
            let order = self
                .ring
                .and_then(|place| self.set.ring_at(place))
                .map(|ring| ring.candidates(self.hash))
                .unwrap_or_default();
            order
                .into_iter()
                .filter(move |ip| Some(*ip) != self.skip)
                .filter_map(move |ip| self.set.get(ip))
        })
    }

    /// The first fallback.
    pub fn first(&self) -> Option<&Backend> {
        self.iter().next()
    }

    /// None left (an LMTP delivery goes to the route's backend or nowhere).
    pub fn clear(&mut self) {
        self.ring = None;
    }

    pub fn is_empty(&self) -> bool {
        self.first().is_none()
    }
}

/// Why a route chose its backend; the names appear in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// The user's live sticky record.
    Sticky,
    /// The ring (the user had no live record).
    Ring,
    /// An allowed test user of a backend in maintenance.
    Maintenance,
    /// The backend an auth service named for the user (`host`), outside the ring.
    Pinned,
}

impl RouteReason {
    pub fn name(self) -> &'static str {
        match self {
            RouteReason::Sticky => "sticky",
            RouteReason::Ring => "ring",
            RouteReason::Maintenance => "maintenance",
            RouteReason::Pinned => "pinned",
        }
    }
}

impl fmt::Display for RouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why no route exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no backend can take users of tag {0:?}")]
    NoBackend(String),
    /// The shared state could not record the user (etcd unreachable, this director fenced).
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    /// A cluster's record points to a backend that does not serve, and no move came.
    #[error("the user's backend does not serve and the user was not moved")]
    Stranded,
}

/// Whether `state` is shared by several directors.
fn clustered(state: &dyn State) -> bool {
    matches!(state.mode(), crate::state::StateMode::Cluster { .. })
}

/// Routes users over a [`State`].
#[derive(Clone)]
pub struct Router {
    state: Arc<dyn State>,
    user_hash: UserHash,
}

impl Router {
    pub fn new(state: Arc<dyn State>, user_hash: UserHash) -> Self {
        Router { state, user_hash }
    }

    pub fn state(&self) -> &Arc<dyn State> {
        &self.state
    }

    /// The hash of `username`.
    pub fn hash(&self, username: &str) -> u32 {
        self.user_hash.hash(username)
    }

    /// Where `username` (of `tag`, "" for untagged) goes now, binding it if it had no record.
    pub async fn route(&self, username: &str, tag: &str) -> Result<Route, RouteError> {
        self.route_hashed(username, self.hash(username), tag).await
    }

    /// [`Router::route`] for a caller that has hashed the user already ([`Router::hash`]).
    pub async fn route_hashed(
        &self,
        username: &str,
        hash: u32,
        tag: &str,
    ) -> Result<Route, RouteError> {
        let now = Instant::now();
        self.state.serving()?;
        let recorded = self.state.noted_record(hash, username, now);
        let set = self.state.backends();
        if let Some(route) = self.maintenance_route(username, hash, &set, now).await? {
            return Ok(route);
        }
        let ring = set.ring_place(tag);
        let recorded = recorded
            .and_then(|r| set.get(r.backend))
            .filter(|b| b.serves_existing())
            .cloned();
        let (backend, reason) = match recorded {
            Some(b) => {
                // In a cluster an old record is refreshed first, so that no director's purge
                // drops it under this login.
                self.state.keep(hash, now).await?;
                (b, RouteReason::Sticky)
            }
            None => {
                let first = ring
                    .and_then(|place| set.ring_at(place))
                    .and_then(|r| r.lookup(hash))
                    .and_then(|ip| set.get(ip))
                    .ok_or_else(|| RouteError::NoBackend(tag.to_owned()))?;
                let bound = self.state.bind(hash, first.ip, now).await?;
                match set.get(bound).filter(|b| b.serves_existing()) {
                    // Someone else bound the user a moment ago: follow their record.
                    Some(b) if bound != first.ip => (b.clone(), RouteReason::Sticky),
                    Some(_) => (first.clone(), RouteReason::Ring),
                    // In a cluster another director may still serve the user there: only a
                    // move (the checker's, an admin's) may change its backend.
                    None if clustered(&*self.state) => return Err(RouteError::Stranded),
                    // A record to a backend that no longer serves: the ring decides.
                    None => {
                        self.state.rebind(hash, first.ip, now).await?;
                        (first.clone(), RouteReason::Ring)
                    }
                }
            }
        };
        let skip = Some(backend.ip);
        Ok(Route {
            user_hash: hash,
            backend,
            reason,
            fallbacks: Fallbacks {
                set,
                ring,
                hash,
                skip,
            },
        })
    }

    /// An allowed test user of a backend in maintenance goes there (and its record follows,
    /// unless it still has live sessions elsewhere: then the record wins, so that the user is
    /// never on two backends; `maintenance start` moves allowed users there first).
    async fn maintenance_route(
        &self,
        username: &str,
        hash: u32,
        set: &crate::state::BackendSet,
        now: Instant,
    ) -> Result<Option<Route>, RouteError> {
        let maintenance = self.state.maintenance();
        let Some((ip, _)) = maintenance.iter().find(|(_, m)| m.allows(username)) else {
            return Ok(None);
        };
        let Some(backend) = set.get(*ip).cloned() else {
            return Ok(None);
        };
        let bound = self.state.bind(hash, backend.ip, now).await?;
        if bound != backend.ip {
            // In a cluster the user may have sessions elsewhere through another director:
            // `maintenance start` moved allowed users here; a record elsewhere wins.
            if clustered(&*self.state) {
                return Ok(None);
            }
            match self.state.record(hash, now) {
                Some(r) if r.sessions > 0 => return Ok(None),
                _ => self.state.rebind(hash, backend.ip, now).await?,
            }
        }
        Ok(Some(Route {
            user_hash: hash,
            backend,
            reason: RouteReason::Maintenance,
            fallbacks: Fallbacks::default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::state::backend::{AdminState, Health};
    use crate::state::local::LocalState;
    use std::net::IpAddr;
    use std::time::Duration;

    fn backend(ip: &str, weight: u32) -> Backend {
        let cfg = Config::parse(
            "listeners: [{protocol: imap, address: 127.0.0.1:1}]\nbackends: [{host: 10.0.0.1}]\n",
        )
        .unwrap();
        Backend {
            ip: ip.parse().unwrap(),
            host: ip.into(),
            weight,
            tag: "".into(),
            admin: AdminState::Up,
            health: Health::Up,
            settings: Arc::new(cfg.backend_settings(0)),
        }
    }

    fn router(backends: Vec<Backend>) -> (Router, Arc<LocalState>) {
        let state = Arc::new(LocalState::new(backends, Duration::from_secs(900)));
        (Router::new(state.clone(), UserHash::default()), state)
    }

    fn route(r: &Router, user: &str) -> Result<Route, RouteError> {
        block_on(r.route(user, ""))
    }

    /// Runs a future that never waits (the local state's) to its end.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn records_outlive_ring_changes() {
        let (r, state) = router(vec![backend("10.0.0.1", 100), backend("10.0.0.2", 100)]);
        let users: Vec<String> = (0..200).map(|i| format!("user{i}")).collect();
        let before: Vec<IpAddr> = users
            .iter()
            .map(|u| route(&r, u).unwrap().backend.ip)
            .collect();
        // A new heavy backend would take most new users, but nobody bound moves.
        state.upsert_backend(backend("10.0.0.3", 1000));
        for (u, b) in users.iter().zip(&before) {
            let route = route(&r, u).unwrap();
            assert_eq!(route.backend.ip, *b);
            assert_eq!(route.reason, RouteReason::Sticky);
        }
        let new_on_third = (0..200)
            .filter(|i| {
                route(&r, &format!("new{i}"))
                    .unwrap()
                    .backend
                    .ip
                    .to_string()
                    == "10.0.0.3"
            })
            .count();
        assert!(new_on_third > 100, "{new_on_third}");
    }

    #[test]
    fn down_backend_loses_its_records_and_empty_ring_errors() {
        let (r, state) = router(vec![backend("10.0.0.1", 100), backend("10.0.0.2", 100)]);
        let first = route(&r, "alice").unwrap();
        state.set_admin(first.backend.ip, AdminState::Down).unwrap();
        let again = route(&r, "alice").unwrap();
        assert_ne!(again.backend.ip, first.backend.ip);
        assert!(again.fallbacks.is_empty());
        state.set_weight(again.backend.ip, 0).unwrap();
        // Weight 0: the user with a record stays, a new user has nowhere to go.
        assert_eq!(route(&r, "alice").unwrap().backend.ip, again.backend.ip);
        assert_eq!(
            route(&r, "bob").unwrap_err(),
            RouteError::NoBackend(String::new())
        );
    }

    #[test]
    fn fallbacks_are_the_ring_order_without_the_route_backend() {
        let (r, state) = router(vec![
            backend("10.0.0.1", 100),
            backend("10.0.0.2", 100),
            backend("10.0.0.3", 100),
        ]);
        let hash = r.hash("alice");
        let order = state.backends().ring("").unwrap().candidates(hash);
        let ips = |route: &Route| -> Vec<IpAddr> { route.fallbacks.iter().map(|b| b.ip).collect() };
        let first = route(&r, "alice").unwrap();
        assert_eq!(
            (first.backend.ip, first.reason),
            (order[0], RouteReason::Ring)
        );
        assert_eq!(ips(&first), order[1..]);
        // A record on the ring's last: the fallbacks are the other two, in ring order.
        state.rebind(hash, order[2], Instant::now());
        let sticky = route(&r, "alice").unwrap();
        assert_eq!(
            (sticky.backend.ip, sticky.reason),
            (order[2], RouteReason::Sticky)
        );
        assert_eq!(ips(&sticky), order[..2]);
        assert_eq!(sticky.fallbacks.first().map(|b| b.ip), Some(order[0]));
        let mut cleared = sticky.clone();
        cleared.fallbacks.clear();
        assert!(cleared.fallbacks.is_empty() && !sticky.fallbacks.is_empty());
    }
}
