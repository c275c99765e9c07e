//! `scripts/bench cluster`: what cluster mode (issue 10) costs and how fast it reacts.
//!
//! One pool of two real Dovecot backends for every figure; each figure starts its own
//! 1-member etcd on loopback (the test fixture `tests/support/etcd.rs`: Debian's etcd 3.4,
//! data on the machine's disk, so every commit pays a real fsync) and its own director
//! processes (release build), so that etcd's counters and the directors' state are the
//! figure's alone. Each figure is a module and prints its own table:
//!
//! - `latency` ([`latency`]): the login latency etcd adds, for a user with a record and for
//!   a new one, against a single director without `cluster:`.
//! - `throughput` ([`throughput`]): logins/s through 2 cluster directors vs 1, and vs a
//!   single director.
//! - `move` ([`moves`]): `director down HOST` of the backend holding about half of 1,000
//!   users, run on one of 3 directors.
//! - `refresh` ([`refresh`]): the etcd write rate of record refreshes, measured with 2,000
//!   held sessions and scaled to 100,000 active users with the default refresh.
//! - `memory` ([`memory`]): memory per sticky record in a director's replica.
//! - `failover` ([`failover`]): how long the cluster goes without a health checker when the
//!   director running the checks is killed.
//!
//! `BENCH_CLUSTER_FIGURES=latency,move` runs only those. Users: the pool's 200 plus
//! `user0201`..`user2000` added to its passwd file (Dovecot reads it again when it changes).

mod directors;
mod failover;
mod latency;
mod memory;
mod moves;
mod refresh;
mod throughput;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dovecot::{self, Pool, PoolOptions};
use crate::imap::Imap;
use crate::measure::load_average;

/// Users the figures may log in: `user0001`..`user2000`.
pub const USERS: usize = 2000;

/// A figure: it starts what it needs over the pool and prints its table.
type Figure = fn(&Pool);

/// The figures, by the name `BENCH_CLUSTER_FIGURES` takes.
const FIGURES: [(&str, Figure); 6] = [
    ("latency", latency::run),
    ("throughput", throughput::run),
    ("move", moves::run),
    ("refresh", refresh::run),
    ("memory", memory::run),
    ("failover", failover::run),
];

pub fn run() {
    let wanted: Option<Vec<String>> = std::env::var("BENCH_CLUSTER_FIGURES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    if let Some(w) = &wanted {
        for name in w {
            assert!(
                FIGURES.iter().any(|(n, _)| n == name),
                "BENCH_CLUSTER_FIGURES: unknown figure {name:?}; known: {}",
                FIGURES.map(|(n, _)| n).join(", ")
            );
        }
    }
    let started = Instant::now();
    println!("# cluster mode (issue 10): 2 Dovecot backends, 1-member etcd on loopback per figure");
    println!("load average at the start: {}", load_average());
    // Sessions packed into few imap processes: the held sessions of the refresh figure
    // would otherwise need a process each.
    let pool = Pool::start_with(PoolOptions {
        backends: 2,
        extra_config:
            "service imap {\n  service_count = 0\n  client_limit = 1000\n  process_limit = 100\n}\n\
             service stats {\n  client_limit = 10000\n}\n"
                .into(),
        ..PoolOptions::default()
    });
    add_users(&pool, USERS);
    // Mailboxes exist before any director sees a user, so that a first login through a
    // director costs the director's work, not Dovecot's creation of the Maildir.
    direct_logins(pool.backend(0).imap(), 1..=USERS, 4);
    for (name, figure) in FIGURES {
        if wanted
            .as_ref()
            .is_some_and(|w| !w.iter().any(|n| n == name))
        {
            continue;
        }
        println!("\n## {name} (load average before: {})", load_average());
        let t = Instant::now();
        let retried = RETRIED.load(Ordering::Relaxed);
        figure(&pool);
        println!("({name}: {:.0} s)", t.elapsed().as_secs_f64());
        let retried = RETRIED.load(Ordering::Relaxed) - retried;
        if retried > 0 {
            println!("{retried} logins got a temporary failure and were tried again; the directors' warnings:");
            for line in warnings(&pool).iter().rev().take(12).rev() {
                println!("  {line}");
            }
        }
    }
    println!(
        "\nload average at the end: {}; whole run {:.0} s",
        load_average(),
        started.elapsed().as_secs_f64()
    );
}

/// The warnings and errors in the logs of the directors of the last figure.
fn warnings(pool: &Pool) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(pool.dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("director-") && name.ends_with(".log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("{name}: {l}")),
            );
        }
    }
    out
}

/// Adds `user0201`..`user{n}` (the pool's password) to the pool's passwd file.
fn add_users(pool: &Pool, n: usize) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(pool.passwd_path())
        .unwrap();
    for i in dovecot::USER_COUNT + 1..=n {
        writeln!(
            f,
            "{}:{{PLAIN}}{}::::::",
            dovecot::user(i),
            dovecot::PASSWORD
        )
        .unwrap();
    }
}

/// Logs each of `users` in and out once at `addr`, `clients` at a time.
fn direct_logins(addr: SocketAddr, users: RangeInclusive<usize>, clients: usize) {
    let list: Vec<usize> = users.collect();
    let n = list.len();
    load(&[addr], n, clients, &list);
}

/// Logins that got a temporary failure (`NO [UNAVAILABLE]`) and were tried again.
static RETRIED: AtomicUsize = AtomicUsize::new(0);

/// How often a login that gets a temporary failure is tried again, 200 ms apart.
const TRIES: usize = 25;

/// Connects and logs `user` in. A temporary failure (etcd slow to answer on a busy
/// machine, a director not serving yet) is counted and the login tried again; anything
/// else stops the benchmark.
pub fn login(addr: SocketAddr, user: usize) -> Imap {
    for _ in 0..TRIES {
        let mut c = Imap::connect(addr);
        match c.try_login(&dovecot::user(user)) {
            Ok(()) => return c,
            Err(r) if r.contains("[UNAVAILABLE]") => {
                RETRIED.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(r) => panic!("LOGIN {}: {r}", dovecot::user(user)),
        }
    }
    panic!(
        "LOGIN {}: a temporary failure {TRIES} times",
        dovecot::user(user)
    );
}

/// Connect, `LOGIN`, `LOGOUT`; the time from before connecting to the `LOGIN`'s `OK` (tries
/// again after a temporary failure included).
pub fn timed_login(addr: SocketAddr, user: usize) -> Duration {
    let t = Instant::now();
    let mut c = login(addr, user);
    let took = t.elapsed();
    c.cmd("z", "LOGOUT");
    took
}

/// `logins` login+logout cycles by `clients` threads, client `i` through `addrs[i %
/// addrs.len()]`, users taken in turn from `users`; the wall time and every login's latency.
pub fn load(
    addrs: &[SocketAddr],
    logins: usize,
    clients: usize,
    users: &[usize],
) -> (Duration, Vec<Duration>) {
    let next = Arc::new(AtomicUsize::new(0));
    let users: Arc<Vec<usize>> = Arc::new(users.to_vec());
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (next, users) = (next.clone(), users.clone());
            let addr = addrs[c % addrs.len()];
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= logins {
                        return latencies;
                    }
                    latencies.push(timed_login(addr, users[i % users.len()]));
                }
            })
        })
        .collect();
    let latencies = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client thread failed"))
        .collect();
    (start.elapsed(), latencies)
}

/// A logged-in session kept open, and the backend that serves it.
pub struct Held {
    /// `backend1`...: the backend's answer to `ID NIL`.
    pub backend: String,
    imap: Imap,
}

impl Held {
    /// Logs `user` in at `addr` and asks the backend its name.
    pub fn open(addr: SocketAddr, user: usize) -> Held {
        let mut imap = login(addr, user);
        write!(imap.w, "i ID NIL\r\n").unwrap();
        let mut backend = String::new();
        loop {
            let l = imap.line();
            assert!(!l.is_empty(), "closed during ID");
            if let Some(rest) = l.strip_prefix("* ID (\"x-backend\" \"") {
                backend = rest.split('"').next().unwrap_or_default().to_owned();
            }
            if l.starts_with("i ") {
                break;
            }
        }
        assert!(!backend.is_empty(), "no x-backend in the ID answer");
        Held { backend, imap }
    }

    /// Whether the director ended the session: a `NOOP` meets a `BYE`, the end of the
    /// stream or an error rather than its `OK`.
    pub fn ended(&mut self) -> bool {
        let _ = self.imap.w.set_read_timeout(Some(Duration::from_secs(5)));
        if write!(self.imap.w, "n NOOP\r\n").is_err() {
            return true;
        }
        loop {
            let mut l = String::new();
            match self.imap.r.read_line(&mut l) {
                Ok(0) | Err(_) => return true,
                Ok(_) if l.starts_with("* BYE") => return true,
                Ok(_) if l.starts_with("n ") => return !l.starts_with("n OK"),
                Ok(_) => {}
            }
        }
    }
}

/// Opens a held session for each `(user, address)`, `clients` at a time.
pub fn hold_all(sessions: &[(usize, SocketAddr)], clients: usize) -> Vec<Held> {
    let work = Arc::new(Mutex::new(sessions.to_vec()));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let work = work.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                loop {
                    let Some((user, addr)) = work.lock().unwrap().pop() else {
                        return held;
                    };
                    held.push(Held::open(addr, user));
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client thread failed"))
        .collect()
}

/// Waits until `done` holds, polling every 20 ms, for at most `limit`; panics naming
/// `what`. Returns how long it took.
pub fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "waited {limit:?} in vain for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// A small deterministic generator (xorshift), so that "random" directors are the same in
/// every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `d` in milliseconds, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}
