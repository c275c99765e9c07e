//! Chaos, in the spirit of Dovecot's director test: clients log in and out as a few users over
//! and over while backends are taken down, brought back, re-weighted and evacuated under them.
//! The test fails if a user is ever seen on two backends at once (counting logins that are
//! still under way), which is the invariant this program exists for.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use director::state::backend::AdminState;
use director::state::moves::{MoveReason, Mover};
use director::state::State;
use support::director::TestDirector;
use support::dovecot::{user, PASSWORD};

/// A small deterministic pseudo-random sequence (no extra crates).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn no_user_is_ever_on_two_backends() {
    let (pool, d) = TestDirector::with_pool(3);
    let ips: Vec<IpAddr> = pool.backends.iter().map(|b| b.ip).collect();
    let users: Vec<String> = (1..=6).map(user).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let logins_ok = Arc::new(AtomicUsize::new(0));
    let logins_refused = Arc::new(AtomicUsize::new(0));
    let changes = Arc::new(AtomicUsize::new(0));
    let violations = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));

    // Watch the live sessions and the logins under way (reservations) of every user.
    let watcher = {
        let (sessions, stop, violations) = (d.sessions.clone(), stop.clone(), violations.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut by_user: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
                for s in sessions.list_with_pending() {
                    by_user
                        .entry(s.user_hash)
                        .or_default()
                        .insert(s.backend.ip());
                }
                for (hash, backends) in by_user {
                    if backends.len() > 1 {
                        violations
                            .lock()
                            .unwrap()
                            .push(format!("user hash {hash} on {backends:?}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    // Clients.
    let mut clients = Vec::new();
    for t in 0..6u64 {
        let (addr, users, stop) = (d.imap, users.clone(), stop.clone());
        let (ok, refused) = (logins_ok.clone(), logins_refused.clone());
        clients.push(std::thread::spawn(move || {
            let mut rng = Lcg(t * 7919 + 1);
            while !stop.load(Ordering::Relaxed) {
                let u = &users[rng.next(users.len() as u64) as usize];
                // Raw socket, errors tolerated: a kicked session ends under our feet.
                let Ok(stream) = TcpStream::connect(addr) else {
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                if !line.starts_with("* OK") {
                    continue;
                }
                let _ = w.write_all(format!("a LOGIN {u} {PASSWORD}\r\n").as_bytes());
                line.clear();
                let _ = r.read_line(&mut line);
                if line.starts_with("a OK") {
                    ok.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(rng.next(150)));
                    let _ = w.write_all(b"b NOOP\r\nz LOGOUT\r\n");
                    line.clear();
                    let _ = r.read_line(&mut line);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Chaos: backends down and up, re-weighted, evacuated; never all down at once.
    let chaos = {
        let (state, sessions, stop, changes) = (
            d.state.clone(),
            d.sessions.clone(),
            stop.clone(),
            changes.clone(),
        );
        let ips = ips.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let dyn_state: Arc<dyn State> = state.clone();
            let mover = Mover::new(dyn_state, sessions);
            let mut rng = Lcg(42);
            while !stop.load(Ordering::Relaxed) {
                let ip = ips[rng.next(ips.len() as u64) as usize];
                let set = state.backends();
                let up = set
                    .backends
                    .values()
                    .filter(|b| b.admin == AdminState::Up)
                    .count();
                match rng.next(4) {
                    0 if up > 1 => {
                        state.set_admin(ip, AdminState::Down).unwrap();
                        rt.block_on(mover.evacuate(ip, MoveReason::Maintenance, false));
                    }
                    1 => state.set_admin(ip, AdminState::Up).unwrap(),
                    2 => state.set_weight(ip, rng.next(200) as u32 + 1).unwrap(),
                    _ => {
                        // A flush: users follow the ring now.
                        rt.block_on(mover.evacuate(ip, MoveReason::Flush, false));
                    }
                }
                changes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(30 + rng.next(100)));
            }
        })
    };

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    chaos.join().unwrap();
    for c in clients {
        c.join().unwrap();
    }
    watcher.join().unwrap();
    let v = violations.lock().unwrap();
    let (ok, refused, changes) = (
        logins_ok.load(Ordering::Relaxed),
        logins_refused.load(Ordering::Relaxed),
        changes.load(Ordering::Relaxed),
    );
    eprintln!("chaos: {ok} logins ok, {refused} refused, {changes} backend changes");
    assert!(
        v.is_empty(),
        "a user was on two backends at once:\n{}",
        v.join("\n")
    );
    assert!(
        ok >= 50,
        "too few logins got through ({ok}) to prove anything"
    );
    assert!(changes >= 20, "too few changes ({changes})");
}
