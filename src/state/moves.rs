//! Moves: the only way a user changes backend while it has a record. First every session of
//! the user is ended, then the record points to the new backend, so a user is never served by
//! two backends at once. Used by the admin verbs (`move`, `kick`, `flush`) and by the health
//! checker and maintenance (evacuating a backend).

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::state::sessions::Sessions;
use crate::state::State;

/// How long a move waits for the user's sessions to end after kicking them.
const SESSION_END_WAIT: Duration = Duration::from_secs(10);

/// Why users were moved or kicked; the names appear in logs, metrics and admin output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// An administrator's `move USER HOST`.
    Admin,
    /// `flush HOST` / `flush all`.
    Flush,
    /// The backend's health went down.
    HealthDown,
    /// The backend went into maintenance or was set down by an administrator.
    Maintenance,
    /// An administrator's `kick USER`.
    Kick,
}

impl MoveReason {
    /// Every reason (the catalogue starts each at 0: `metrics::MOVE_REASONS`).
    pub const ALL: [MoveReason; 5] = [
        MoveReason::Admin,
        MoveReason::Flush,
        MoveReason::HealthDown,
        MoveReason::Maintenance,
        MoveReason::Kick,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MoveReason::Admin => "admin",
            MoveReason::Flush => "flush",
            MoveReason::HealthDown => "health_down",
            MoveReason::Maintenance => "maintenance",
            MoveReason::Kick => "kick",
        }
    }
}

/// Its label value, so that the metrics take the reason as it is.
impl AsRef<str> for MoveReason {
    fn as_ref(&self) -> &str {
        self.name()
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a move or flush did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// Users whose record now points elsewhere.
    pub moved: usize,
    /// Users whose record was dropped (no backend left to take them, or `--force`).
    pub dropped: usize,
    /// Sessions told to end.
    pub kicked: usize,
    /// Users left as they were: a move of theirs was already under way.
    pub busy: usize,
    /// Users whose move failed: the shared state could not be changed (etcd unreachable).
    pub failed: usize,
}

impl MoveReport {
    /// Adds another report's counts.
    pub fn add(&mut self, r: &MoveReport) {
        self.moved += r.moved;
        self.dropped += r.dropped;
        self.kicked += r.kicked;
        self.busy += r.busy;
        self.failed += r.failed;
    }
}

/// Performs moves over the shared state and this director's sessions.
#[derive(Clone)]
pub struct Mover {
    pub state: Arc<dyn State>,
    pub sessions: Sessions,
    /// Counts moves and kicks by reason (the health checker counts its checks here too).
    pub metrics: Metrics,
    /// Moves run at once by [`Mover::move_many`] (`cluster.move_parallelism`).
    pub parallelism: usize,
}

/// Moves run at once when nothing says otherwise (Dovecot's director's default).
pub const DEFAULT_PARALLELISM: usize = 100;

impl Mover {
    pub fn new(state: Arc<dyn State>, sessions: Sessions) -> Self {
        Mover {
            state,
            sessions,
            metrics: Metrics::new(),
            parallelism: DEFAULT_PARALLELISM,
        }
    }

    /// The same mover, running `n` moves at once.
    pub fn with_parallelism(mut self, n: usize) -> Self {
        self.parallelism = n.max(1);
        self
    }

    /// Moves each user to its target, up to [`Mover::parallelism`] at once (in a cluster a
    /// move waits for every director's acknowledgement: one at a time, a thousand users
    /// would take a thousand round trips). Returns the sum of their reports.
    pub async fn move_many(
        &self,
        moves: Vec<(u32, Option<IpAddr>)>,
        reason: MoveReason,
    ) -> MoveReport {
        let limit = Arc::new(tokio::sync::Semaphore::new(self.parallelism));
        let mut running = tokio::task::JoinSet::new();
        for (hash, to) in moves {
            let permit = limit.clone().acquire_owned().await.expect("never closed");
            let me = self.clone();
            running.spawn(async move {
                let r = me.move_user(hash, to, reason).await;
                drop(permit);
                r
            });
        }
        let mut total = MoveReport::default();
        while let Some(r) = running.join_next().await {
            if let Ok(r) = r {
                total.add(&r);
            }
        }
        total
    }

    /// The same mover, counting on the director's `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Ends every session of `hash` and waits (up to a limit) until they are gone. Returns
    /// how many sessions were told to end.
    pub async fn kick(&self, hash: u32) -> usize {
        let kicked = self.sessions.kick_user(hash);
        let deadline = Instant::now() + SESSION_END_WAIT;
        while self.sessions.count_user(hash) > 0 {
            if Instant::now() >= deadline {
                warn!(user_hash = hash, "sessions still open after a kick");
                break;
            }
            // A kick notifies each session once; repeat it for sessions that registered
            // between the kick and now.
            self.sessions.kick_user(hash);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kicked
    }

    /// `director kick USER`: ends the user's sessions on every director. Alone, or in a
    /// cluster for a user without a record, that is this director's sessions; in a cluster
    /// the user's record is marked as moving (to where it is) so that every director ends
    /// its sessions and acknowledges before logins of the user go on.
    pub async fn kick_everywhere(&self, hash: u32) -> Result<usize, crate::state::StateError> {
        let record = self.state.record(hash, Instant::now());
        let (crate::state::StateMode::Cluster { .. }, Some(record)) = (self.state.mode(), record)
        else {
            return Ok(self.kick(hash).await);
        };
        if !self.state.begin_move(hash).await? {
            return Ok(self.kick(hash).await);
        }
        let kicked = self.kick(hash).await;
        self.state.finish_move(hash, Some(record.backend)).await?;
        Ok(kicked)
    }

    /// Ends the sessions of `hash` relayed to `ip` and waits (up to a limit) until they are
    /// gone. Returns how many sessions were told to end.
    pub async fn kick_on(&self, hash: u32, ip: IpAddr) -> usize {
        let kicked = self.sessions.kick_user_on(hash, ip);
        let deadline = Instant::now() + SESSION_END_WAIT;
        while self.sessions.backend_ips_of(hash).contains(&ip) {
            if Instant::now() >= deadline {
                warn!(user_hash = hash, backend = %ip, "sessions still open after a kick");
                break;
            }
            self.sessions.kick_user_on(hash, ip);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kicked
    }

    /// Moves one user: ends its sessions, then points its record at `to` (or drops the
    /// record when `to` is `None`). Logins of the user wait while this runs.
    pub async fn move_user(&self, hash: u32, to: Option<IpAddr>, reason: MoveReason) -> MoveReport {
        let mut report = MoveReport::default();
        match self.state.begin_move(hash).await {
            Ok(true) => {}
            Ok(false) => {
                report.busy = 1;
                return report;
            }
            Err(e) => {
                warn!(user_hash = hash, error = %e, "user not moved");
                report.failed = 1;
                return report;
            }
        }
        report.kicked = self.kick(hash).await;
        if let Err(e) = self.state.finish_move(hash, to).await {
            warn!(user_hash = hash, to = ?to, error = %e, "move not finished");
            report.failed = 1;
            return report;
        }
        match to {
            Some(_) => report.moved = 1,
            None => report.dropped = 1,
        }
        self.metrics
            .moved(reason, report.moved + report.dropped, report.kicked);
        info!(user_hash = hash, to = ?to, reason = %reason, kicked = report.kicked, "user moved");
        report
    }

    /// Moves every user with a record on `from` to where the ring of its backend's tag now
    /// sends it (records are dropped when the ring is empty). The caller changes the
    /// backend's state first (down, weight 0, maintenance) so the ring no longer includes it.
    /// With `force`, records are only dropped and no session is ended (Dovecot's `flush -F`).
    pub async fn evacuate(&self, from: IpAddr, reason: MoveReason, force: bool) -> MoveReport {
        let now = Instant::now();
        let set = self.state.backends();
        let tag = set.get(from).map(|b| b.tag.clone()).unwrap_or_default();
        let users: Vec<u32> = self.state.records_on(from, now);
        let recorded: HashSet<u32> = users.iter().copied().collect();
        let mut total = MoveReport::default();
        // Users whose record already points elsewhere (routing re-points a record whose
        // backend no longer serves, when the user logs in again) but who still have sessions
        // here: end only those sessions, so their new login may proceed.
        let mut strays: Vec<u32> = self
            .sessions
            .users_on(from)
            .into_iter()
            .filter(|h| !recorded.contains(h))
            .collect();
        let targets: Vec<(u32, Option<IpAddr>)> = users
            .into_iter()
            .map(|hash| {
                let to = set
                    .ring(&tag)
                    .and_then(|ring| ring.candidates(hash).into_iter().find(|ip| *ip != from));
                (hash, to)
            })
            .collect();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.parallelism));
        let mut running = tokio::task::JoinSet::new();
        for (hash, to) in targets {
            let permit = limit.clone().acquire_owned().await.expect("never closed");
            let me = self.clone();
            running.spawn(async move {
                let _permit = permit;
                // A user who logged in again meanwhile may already be bound elsewhere: end
                // only its sessions here, leave its new session alone.
                if me
                    .state
                    .record(hash, Instant::now())
                    .is_none_or(|r| r.backend != from)
                {
                    return (MoveReport::default(), Some(hash));
                }
                let r = if force {
                    match me.state.remove_record(hash).await {
                        Ok(()) => {
                            me.metrics.moved(reason, 1, 0);
                            MoveReport {
                                dropped: 1,
                                ..MoveReport::default()
                            }
                        }
                        Err(e) => {
                            warn!(user_hash = hash, error = %e, "record not dropped");
                            MoveReport {
                                failed: 1,
                                ..MoveReport::default()
                            }
                        }
                    }
                } else {
                    me.move_user(hash, to, reason).await
                };
                (r, None)
            });
        }
        while let Some(done) = running.join_next().await {
            if let Ok((r, stray)) = done {
                total.add(&r);
                strays.extend(stray);
            }
        }
        if !force {
            for hash in strays {
                let kicked = self.kick_on(hash, from).await;
                self.metrics.moved(reason, 0, kicked);
                total.kicked += kicked;
            }
        }
        info!(backend = %from, reason = %reason, moved = total.moved, dropped = total.dropped,
              kicked = total.kicked, "backend evacuated");
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics start every reason at 0 by name: the catalogue lists the same names.
    #[test]
    fn the_metrics_catalogue_lists_every_reason() {
        assert_eq!(
            MoveReason::ALL.map(MoveReason::name),
            crate::metrics::MOVE_REASONS
        );
    }
}
