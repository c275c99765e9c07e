//! This director's lease: membership (`directors/<id>`), the checker's election and
//! fencing.
//!
//! The lease is renewed every quarter of its TTL. If no renewal has succeeded for a while,
//! the director must assume that etcd may expire its lease soon, after which movers stop
//! waiting for its acknowledgements. So at (last successful renewal sent + TTL - margin) it
//! fences itself: no new backend sessions (logins get a temporary failure), and its relayed
//! sessions are ended unless `keep_sessions_when_fenced`. It then takes a new lease, reads
//! the state afresh and serves again. The margin (a fifth of the TTL, at least a second)
//! covers the time ending the sessions takes and clock rates.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use tracing::{debug, error, info, warn};

use crate::state::cluster::keys::{encode, now_ms, MemberValue};
use crate::state::cluster::ClusterState;

/// A lease this director holds.
struct Held {
    id: i64,
    /// The earliest moment etcd may expire it.
    expires: Instant,
    since_ms: u64,
    /// Sessions last written into the membership value.
    sessions: u64,
}

/// Takes the first lease (so that the director serves from its start when etcd is up),
/// then keeps it in the background.
pub(super) async fn start(state: ClusterState) {
    let held = acquire(&state).await;
    tokio::spawn(keep(state, held));
}

/// The pause before a renewal is tried again after one that failed.
const RENEW_AGAIN: Duration = Duration::from_millis(50);

fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_secs(1))
}

/// The membership value now.
fn member(state: &ClusterState, since_ms: u64, sessions: u64) -> MemberValue {
    MemberValue {
        address: state.inner.cluster.advertise.clone().unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        since: since_ms,
        sessions,
        at: now_ms(),
    }
}

/// Grants a lease, registers the membership under it, waits until the replica is current
/// and campaigns for the checker's seat. `None` when etcd cannot be reached.
async fn acquire(state: &ClusterState) -> Option<Held> {
    let i = &state.inner;
    let ttl = i.cluster.lease_ttl;
    let sent = Instant::now();
    let id = match i.etcd.grant(ttl).await {
        Ok(id) => id,
        Err(e) => {
            debug!(error = %e, "cluster: no lease");
            return None;
        }
    };
    let since_ms = now_ms();
    let sessions = i.sessions.count() as u64;
    let value = member(state, since_ms, sessions);
    let revision = match i.etcd.put(&i.keys.member(&i.me), encode(&value), id).await {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, "cluster: cannot register this director");
            let _ = i.etcd.revoke(id).await;
            return None;
        }
    };
    i.lease.store(id, Ordering::Release);
    // Serve only with a replica that has caught up with etcd (a move it missed while
    // fenced is in it, and gets acknowledged).
    if state.caught_up(revision).await.is_err() {
        debug!("cluster: the replica did not catch up: not serving yet");
        i.lease.store(0, Ordering::Release);
        let _ = i.etcd.revoke(id).await;
        return None;
    }
    let was_fenced = !i.serving.swap(true, Ordering::AcqRel);
    state.acknowledge_moves_under_way();
    i.metrics.cluster_lease_up(true);
    i.metrics.cluster_fenced(false);
    campaign(state.clone()).await;
    if was_fenced {
        info!(director_id = %i.me, lease_ttl = ?ttl, "cluster: lease held: serving");
    }
    // Moves of this director that nothing runs (begun before a crash and a restart under
    // the same id, or not finished for an etcd error): finish them now, rather than leave
    // their users' logins waiting until the next refresh round.
    tokio::spawn(state.clone().finish_own_orphaned_moves());
    Some(Held {
        id,
        expires: sent + ttl,
        since_ms,
        sessions,
    })
}

/// Keeps the lease, fences when it cannot, and takes a new one when it can again.
async fn keep(state: ClusterState, mut held: Option<Held>) {
    let i = &state.inner;
    let ttl = i.cluster.lease_ttl;
    let every = (ttl / 4).max(Duration::from_millis(500));
    let mut backoff = Duration::from_millis(250);
    // Until the next renewal: `every`, or at once after one that failed (a request lost
    // to a dead etcd leader takes the whole request_timeout; waiting `every` more could
    // leave no time before the fence).
    let mut pause = every;
    loop {
        let Some(h) = held.as_mut() else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            held = acquire(&state).await;
            if held.is_some() {
                backoff = Duration::from_millis(250);
            }
            continue;
        };
        tokio::time::sleep(pause).await;
        pause = RENEW_AGAIN;
        let fence_at = tokio::time::Instant::from_std(h.expires - margin(ttl));
        let sent = Instant::now();
        let renewed = tokio::select! {
            r = i.etcd.keep_alive(h.id) => Some(r),
            _ = tokio::time::sleep_until(fence_at) => None,
        };
        match renewed {
            Some(Ok(granted)) if granted > 0 => {
                pause = every;
                h.expires = sent + Duration::from_secs(granted as u64);
                let sessions = i.sessions.count() as u64;
                if sessions != h.sessions {
                    let value = member(&state, h.since_ms, sessions);
                    if i.etcd
                        .put(&i.keys.member(&i.me), encode(&value), h.id)
                        .await
                        .is_ok()
                    {
                        h.sessions = sessions;
                    }
                }
                continue;
            }
            Some(Ok(_)) => {
                fence(&state, "etcd expired this director's lease");
                held = None;
                continue;
            }
            Some(Err(e)) => debug!(error = %e, "cluster: lease not renewed"),
            None => {}
        }
        if tokio::time::Instant::now() >= fence_at {
            fence(&state, "the lease could not be renewed in time");
            let (etcd, id) = (i.etcd.clone(), h.id);
            // Best effort: gone at once if etcd hears it, else at its expiry.
            tokio::spawn(async move {
                let _ = etcd.revoke(id).await;
            });
            held = None;
        }
    }
}

/// Stops serving: no new backend sessions, and (unless configured otherwise) this
/// director's sessions ended, since they could outlive a move it does not hear of.
fn fence(state: &ClusterState, why: &str) {
    let i = &state.inner;
    i.lease.store(0, Ordering::Release);
    if !i.serving.swap(false, Ordering::AcqRel) {
        return;
    }
    i.metrics.cluster_lease_up(false);
    i.metrics.cluster_fenced(true);
    i.metrics.cluster_lease_lost();
    i.metrics.cluster_checker(false);
    let sessions = i.sessions.count();
    if i.cluster.keep_sessions_when_fenced {
        error!(director_id = %i.me, why, sessions,
               "cluster: cut off from etcd: new logins get a temporary failure; keeping the relayed sessions (keep_sessions_when_fenced)");
    } else {
        error!(director_id = %i.me, why, sessions,
               "cluster: cut off from etcd: new logins get a temporary failure; ending the relayed sessions");
        let kicked = i.sessions.kick_all();
        if kicked > 0 {
            warn!(kicked, "cluster: sessions ended while fenced");
        }
    }
}

/// Takes the checker's seat if it is free (under this director's lease).
pub(super) async fn campaign(state: ClusterState) {
    let i = &state.inner;
    let lease = i.lease.load(Ordering::Acquire);
    if lease == 0 {
        return;
    }
    let key = i.keys.checker();
    let r = i
        .etcd
        .txn(
            vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(
                key,
                i.me.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )],
            vec![],
        )
        .await;
    match r {
        Ok(r) if r.succeeded() => {
            let revision = r.header().map_or(0, |h| h.revision());
            let _ = state.caught_up(revision).await;
            info!(director_id = %i.me, "cluster: this director now runs the health checks");
        }
        Ok(_) => {}
        Err(e) => debug!(error = %e, "cluster: cannot campaign for the checker's seat"),
    }
    state.members_changed();
}

impl ClusterState {
    /// Leaves the cluster at a clean stop: the lease is revoked, so membership and the
    /// checker's seat go at once (another director takes the checks over).
    pub async fn leave(&self) {
        let i = &self.inner;
        let id = i.lease.swap(0, Ordering::AcqRel);
        i.serving.store(false, Ordering::Release);
        if id != 0 {
            let _ = i.etcd.revoke(id).await;
            info!(director_id = %i.me, "cluster: left");
        }
    }
}
