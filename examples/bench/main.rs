//! Benchmarks of the director against a direct connection to the same real Dovecot backend.
//! Run with `./scripts/bench [auth|cluster]` (release build); it prints the figures for
//! BENCHMARKS.md.
//!
//! - No argument: login latency, relay throughput (a large FETCH) and memory per idle (IDLE)
//!   session. Environment: BENCH_LOGINS (default 300), BENCH_IDLE (default 1000),
//!   BENCH_MESSAGE_MIB (default 20), BENCH_FETCHES (default 5).
//! - `auth`: logins through a Dovecot auth service (dovecot mode) against passthrough and
//!   direct logins ([`auth`]).
//! - `cluster`: what cluster mode costs (etcd in the login path, logins/s over two
//!   directors, a move across three, etcd writes of record refreshes, memory per record,
//!   the checker's fail-over) ([`cluster`]).

#[path = "../../tests/support/command.rs"]
mod command;
#[path = "../../tests/support/dovecot.rs"]
mod dovecot;
#[path = "../../tests/support/env.rs"]
mod env;
#[path = "../../tests/support/etcd.rs"]
mod etcd;
#[path = "../../tests/support/partition.rs"]
mod partition;
#[path = "../../tests/support/ports.rs"]
mod ports;
#[path = "../../tests/support/wait.rs"]
mod wait;

mod auth;
#[path = "../../tests/support/auth_service.rs"]
mod auth_service;
mod cluster;
mod director_process;
mod imap;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use director_process::DirectorProcess;
use imap::Imap;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn logins(addr: SocketAddr, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let mut c = Imap::connect(addr);
        c.login(&dovecot::user(1 + i % 100));
        c.cmd("z", "LOGOUT");
        times.push(t.elapsed());
    }
    median(times)
}

fn fetch(addr: SocketAddr, user: &str, size: usize, n: usize) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..n {
        let mut c = Imap::connect(addr);
        c.login(user);
        c.cmd("s", "SELECT INBOX");
        let t = Instant::now();
        write!(c.w, "f FETCH 1 BODY.PEEK[]\r\n").unwrap();
        let head = c.line();
        assert!(head.contains(&format!("{{{size}}}")), "{head}");
        let mut buf = vec![0u8; size];
        c.r.read_exact(&mut buf).unwrap();
        loop {
            if c.line().starts_with("f ") {
                break;
            }
        }
        best = best.min(t.elapsed());
        c.cmd("z", "LOGOUT");
    }
    best
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        None => relay(),
        Some("auth") => auth::run(),
        Some("cluster") => cluster::run(),
        Some(other) => {
            panic!("unknown benchmark {other:?}: none (login, relay, idle), `auth` or `cluster`")
        }
    }
}

/// Login, relay and idle-memory figures, director vs direct.
fn relay() {
    let n_logins = env::env_or("BENCH_LOGINS", 300);
    let n_idle = env::env_or("BENCH_IDLE", 1000);
    let mib = env::env_or("BENCH_MESSAGE_MIB", 20);
    let n_fetch = env::env_or("BENCH_FETCHES", 5);
    // One imap process per session (Dovecot's default) would cap the idle test at the
    // backend's process_limit: pack sessions into few processes instead.
    let pool = dovecot::Pool::start_with(dovecot::PoolOptions {
        backends: 1,
        extra_config:
            "service imap {\n  service_count = 0\n  client_limit = 500\n  process_limit = 100\n}\n\
                       service stats {\n  client_limit = 10000\n}\n"
                .into(),
        ..dovecot::PoolOptions::default()
    });
    let backend = pool.backend(0).imap();
    let port = ports::free_port();
    let cfg = pool.dir().join("bench-director.yaml");
    let yaml = format!(
        "trusted_networks: [127.0.0.0/8]\nlisteners:\n  - {{protocol: imap, address: 127.0.0.1:{port}}}\n\
         backend_defaults:\n  ports: {{imap: {}}}\nbackends:\n  - host: {}\n",
        dovecot::IMAP_PORT,
        pool.backend(0).ip
    );
    let director: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = DirectorProcess::start(&cfg, &yaml, director);

    println!(
        "# director benchmark ({} logins, {} idle sessions, {mib} MiB message)",
        n_logins, n_idle
    );
    // Warm up both paths.
    logins(backend, 10);
    logins(director, 10);
    let direct = logins(backend, n_logins);
    let via = logins(director, n_logins);
    println!(
        "login+logout median: direct {:.2} ms, director {:.2} ms, ratio {:.2}",
        direct.as_secs_f64() * 1e3,
        via.as_secs_f64() * 1e3,
        via.as_secs_f64() / direct.as_secs_f64()
    );

    // A large message, appended directly.
    let user = dovecot::user(150);
    let size = mib * 1024 * 1024;
    let mut body = b"Subject: bench\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n",
        );
    }
    body.truncate(size - 2);
    body.extend_from_slice(b"\r\n");
    let mut c = Imap::connect(backend);
    c.login(&user);
    write!(c.w, "p APPEND INBOX {{{size}+}}\r\n").unwrap();
    c.w.write_all(&body).unwrap();
    c.w.write_all(b"\r\n").unwrap();
    loop {
        let l = c.line();
        if l.starts_with("p ") {
            assert!(l.starts_with("p OK"), "{l}");
            break;
        }
    }
    c.cmd("z", "LOGOUT");
    let direct = fetch(backend, &user, size, n_fetch);
    let via = fetch(director, &user, size, n_fetch);
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    println!(
        "FETCH {mib} MiB (best of {n_fetch}): direct {:.0} MiB/s, director {:.0} MiB/s, time ratio {:.2}",
        rate(direct),
        rate(via),
        via.as_secs_f64() / direct.as_secs_f64()
    );

    // Idle sessions: logged in and in IDLE.
    let pid = child.pid();
    let mut warm: Vec<Imap> = Vec::new();
    for i in 0..20 {
        let mut c = Imap::connect(director);
        c.login(&dovecot::user(1 + i % 100));
        warm.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let mut idle: Vec<Imap> = Vec::with_capacity(n_idle);
    for i in 0..n_idle {
        let mut c = Imap::connect(director);
        c.login(&dovecot::user(1 + i % 200));
        write!(c.w, "i IDLE\r\n").unwrap();
        let l = c.line();
        assert!(l.starts_with('+'), "IDLE: {l}");
        idle.push(c);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid);
    println!(
        "idle sessions: director RSS {before} KiB with 20 sessions, {after} KiB with {} more in IDLE: {:.1} KiB per idle session",
        n_idle,
        (after.saturating_sub(before)) as f64 / n_idle as f64
    );
    drop(idle);
    drop(warm);
    drop(child);
}
