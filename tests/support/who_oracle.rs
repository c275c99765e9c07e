//! The oracle of the cluster chaos tests, which never asks a director: every 150 ms (or as
//! fast as `doveadm` answers on a loaded machine) it lists the logged-in sessions of every
//! running backend of a [`Pool`] (`doveadm who`) and finds the users with sessions on two
//! backends at once.
//!
//! `doveadm -f tab who -1` (Dovecot 2.3.19) prints a header, then one line per connection:
//! `username<TAB>proto<TAB>pid<TAB>ip` (2.4 adds `<TAB>dest_ip`); with the pool's `service_count = 1` for imap, each
//! session has a process, so a pid names a session. A backend that does not answer (killed,
//! starting) counts as having none.
//!
//! A session the director has just ended may still be listed for a moment (the backend's
//! process sees the end of its connection, then tells anvil), and the backends are asked one
//! after the other, so one poll can show a user's old session on one backend and its new one
//! on another. An overlap counts only when the same processes are still listed on both
//! backends in the next poll too: a real overlap lasts as long as a held session.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::dovecot::{Backend, Pool};

/// Time from the start of one poll to the start of the next (longer when a poll takes
/// longer).
pub const POLL_EVERY: Duration = Duration::from_millis(150);

/// What one poll saw: user → backend name → pids of its sessions there.
pub type Snapshot = BTreeMap<String, BTreeMap<String, BTreeSet<u32>>>;

/// A backend's name and the pids of one user's sessions there.
pub type OnBackend = (String, BTreeSet<u32>);

/// One user on two backends at once, in two polls or more in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub user: String,
    /// The two backends, and the pids of the user's sessions listed on each in both polls.
    pub first: OnBackend,
    pub second: OnBackend,
    /// When the first poll that saw it began and when the last one did, since the oracle
    /// started.
    pub seen_from: Duration,
    pub seen_until: Duration,
    /// Polls that saw it (2 at least).
    pub polls: usize,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} (pids {:?}) and {} (pids {:?}) from {:.2}s to {:.2}s ({} polls)",
            self.user,
            self.first.0,
            self.first.1,
            self.second.0,
            self.second.1,
            self.seen_from.as_secs_f64(),
            self.seen_until.as_secs_f64(),
            self.polls
        )
    }
}

/// What the oracle saw over its run.
#[derive(Debug, Default)]
pub struct OracleReport {
    pub polls: usize,
    /// Polls that listed at least one session: the oracle did see the load.
    pub polls_with_sessions: usize,
    /// The most sessions one poll listed.
    pub most_sessions: usize,
    pub overlaps: Vec<Overlap>,
}

impl fmt::Display for OracleReport {
    /// One line for a test's output: polls, load seen, overlaps.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} polls ({} with sessions, at most {} sessions at once), {} overlaps",
            self.polls,
            self.polls_with_sessions,
            self.most_sessions,
            self.overlaps.len()
        )
    }
}

/// The polling thread; [`WhoOracle::stop`] ends it and returns its report.
pub struct WhoOracle {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<OracleReport>,
}

impl WhoOracle {
    /// Starts polling the backends of `pool`; times are counted from `clock`.
    pub fn start(pool: Arc<Pool>, clock: Instant) -> WhoOracle {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut report = OracleReport::default();
            let mut prev: Option<(Duration, Snapshot)> = None;
            while !flag.load(Ordering::Relaxed) {
                let began = clock.elapsed();
                let now = poll(&pool);
                report.polls += 1;
                let sessions: usize = now
                    .values()
                    .flat_map(|by| by.values())
                    .map(BTreeSet::len)
                    .sum();
                if sessions > 0 {
                    report.polls_with_sessions += 1;
                }
                report.most_sessions = report.most_sessions.max(sessions);
                if let Some((prev_began, prev)) = &prev {
                    for o in lasting_overlaps(prev, &now) {
                        note(&mut report.overlaps, o, *prev_began, began);
                    }
                }
                prev = Some((began, now));
                std::thread::sleep(POLL_EVERY.saturating_sub(clock.elapsed() - began));
            }
            report
        });
        WhoOracle { stop, thread }
    }

    /// Stops polling; what it saw.
    pub fn stop(self) -> OracleReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the who oracle panicked")
    }
}

/// One poll of every running backend, all asked at once (so that one poll is close to a
/// moment).
pub fn poll(pool: &Pool) -> Snapshot {
    let listed: Vec<(String, Vec<(String, u32)>)> = std::thread::scope(|scope| {
        let asked: Vec<_> = pool
            .backends
            .iter()
            .filter(|b| b.is_running())
            .map(|b| scope.spawn(move || (b.name.clone(), who(b))))
            .collect();
        asked.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut snap = Snapshot::new();
    for (backend, sessions) in listed {
        for (user, pid) in sessions {
            snap.entry(user)
                .or_default()
                .entry(backend.clone())
                .or_default()
                .insert(pid);
        }
    }
    snap
}

/// The (user, pid) of every logged-in connection of `b`; none if it does not answer.
pub fn who(b: &Backend) -> Vec<(String, u32)> {
    let Ok(out) = b
        .doveadm_command()
        .args(["-f", "tab", "who", "-1"])
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split('\t');
            let user = f.next()?;
            let _proto = f.next()?;
            let pid = f.next()?.parse().ok()?;
            Some((user.to_owned(), pid))
        })
        .collect()
}

/// The users that `prev` shows on two backends whose sessions there are still listed in
/// `now` on both: (user, (backend, pids), (backend, pids)) for each such pair.
pub fn lasting_overlaps(prev: &Snapshot, now: &Snapshot) -> Vec<(String, OnBackend, OnBackend)> {
    let mut out = Vec::new();
    for (user, on) in prev {
        if on.len() < 2 {
            continue;
        }
        let Some(still) = now.get(user) else {
            continue;
        };
        let lasting: Vec<OnBackend> = on
            .iter()
            .filter_map(|(backend, pids)| {
                let kept: BTreeSet<u32> = still.get(backend)?.intersection(pids).copied().collect();
                (!kept.is_empty()).then(|| (backend.clone(), kept))
            })
            .collect();
        for (i, a) in lasting.iter().enumerate() {
            for b in &lasting[i + 1..] {
                out.push((user.clone(), a.clone(), b.clone()));
            }
        }
    }
    out
}

/// Adds an overlap seen by the polls that began at `prev` and `now`, or extends the one it
/// continues (same user, backends and pids).
fn note(
    overlaps: &mut Vec<Overlap>,
    (user, first, second): (String, OnBackend, OnBackend),
    prev: Duration,
    now: Duration,
) {
    if let Some(o) = overlaps
        .iter_mut()
        .find(|o| o.user == user && o.first == first && o.second == second)
    {
        o.seen_until = now;
        o.polls += 1;
        return;
    }
    overlaps.push(Overlap {
        user,
        first,
        second,
        seen_from: prev,
        seen_until: now,
        polls: 2,
    });
}
