//! `scripts/bench` (no argument): the director beside HAProxy and direct connections, in one
//! run, in front of the same two real Dovecot 2.3 backends (imap processes reused:
//! `service_count = 0`). HAProxy runs in TCP mode, round robin, no health checks, no logging
//! ([`crate::haproxy`]); the director runs as deployed: health checks on, its `info` log
//! (one line per login and one per session end) written to a file. Direct clients take the
//! two backends in turn.
//!
//! Each figure is measured for the three targets in turn, direct → director → HAProxy, then
//! again in the reverse order (`BENCH_ROUNDS` rounds, default 2), and the median of the rounds
//! is printed, so that the drift of a shared machine falls on all three alike. Figures:
//!
//! - logins/s with 10 and with 50 clients (threads doing connect, `LOGIN`, `LOGOUT` for
//!   `BENCH_SECONDS`, default 4), and the proxy's CPU time (user + system from
//!   `/proc/PID/stat`) per session over the 50-client runs;
//! - the `NOOP` round trip p50 of one logged-in session (`BENCH_NOOPS`, default 2000), and
//!   what the proxy adds to it;
//! - a large `FETCH` (`BENCH_MESSAGE_MB`, default 54 MB, `BENCH_FETCHES` times, default 10):
//!   MB/s, and the proxy's CPU time per GB relayed;
//! - RSS per idle relayed IMAP session (logged in, in `IDLE`) at `BENCH_IDLE` sessions
//!   (default 9000), the RSS growth over the sessions of a freshly started proxy (memory
//!   freed by earlier figures would otherwise be reused and hide growth); for the director
//!   also over TLS
//!   (`BENCH_IDLE_TLS`, default 3000, implicit TLS from the client);
//! - the listen backlog of the listening socket (`ss -ltn`, Send-Q);
//! - a reconnect storm: `BENCH_STORM` clients (default 9000) connect within one second from
//!   150 client addresses (127.201.0.x: a real storm comes from many hosts, and the
//!   director's `max_preauth_per_ip` counts per address), each logs in and stays; the time
//!   until all are greeted and all logged in, failures, and the machine's SYN retransmits and
//!   listen queue overflows during it (`/proc/net/netstat`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::director_process::DirectorProcess;
use crate::dovecot::{self, Pool, PASSWORD};
use crate::env::env_or;
use crate::haproxy::Haproxy;
use crate::measure::{
    clock_tick, context_switches, cpu_ticks, load_average, ms, percentile, rss_kib,
};
use crate::ports;

/// Where a run's clients go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Director,
    Haproxy,
}

const TARGETS: [Target; 3] = [Target::Direct, Target::Director, Target::Haproxy];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Director => "director",
            Target::Haproxy => "haproxy",
        }
    }
}

/// The three targets and how to reach them.
struct Setup {
    backends: Vec<SocketAddr>,
    director: SocketAddr,
    director_tls: SocketAddr,
    haproxy: SocketAddr,
    director_process: DirectorProcess,
    haproxy_process: Haproxy,
    tls: Arc<rustls::ClientConfig>,
    /// What it takes to start the director and HAProxy again.
    director_config: std::path::PathBuf,
    director_yaml: String,
    director_log: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Setup {
    /// The addresses clients of `t` connect to (taken in turn).
    fn addrs(&self, t: Target) -> Vec<SocketAddr> {
        match t {
            Target::Direct => self.backends.clone(),
            Target::Director => vec![self.director],
            Target::Haproxy => vec![self.haproxy],
        }
    }

    /// Starts the proxy of `t` again: a fresh process for a memory figure that earlier
    /// figures' allocations (freed but kept by the allocator) would blur.
    fn restart(&mut self, t: Target) {
        match t {
            Target::Direct => {}
            Target::Director => {
                self.director_process.kill();
                self.director_process = DirectorProcess::start_logging(
                    &self.director_config,
                    &self.director_yaml,
                    self.director,
                    &self.director_log,
                    "info",
                );
            }
            Target::Haproxy => {
                self.haproxy_process.kill();
                self.haproxy_process = Haproxy::start(&self.dir, self.haproxy, &self.backends);
            }
        }
    }

    /// The proxy process of `t`, if any.
    fn pid(&self, t: Target) -> Option<u32> {
        match t {
            Target::Direct => None,
            Target::Director => Some(self.director_process.pid()),
            Target::Haproxy => Some(self.haproxy_process.pid()),
        }
    }
}

/// CPU time of `pid` so far (user + system, all threads).
fn cpu(pid: u32) -> Duration {
    let (u, s) = cpu_ticks(pid);
    clock_tick() * (u + s) as u32
}

pub fn run() {
    let rounds = env_or("BENCH_ROUNDS", 2usize);
    let secs = env_or("BENCH_SECONDS", 4u64);
    let noops = env_or("BENCH_NOOPS", 2000usize);
    let mb = env_or("BENCH_MESSAGE_MB", 54usize);
    let fetches = env_or("BENCH_FETCHES", 10usize);
    let n_idle = env_or("BENCH_IDLE", 9000usize);
    let n_idle_tls = env_or("BENCH_IDLE_TLS", 3000usize);
    let n_storm = env_or("BENCH_STORM", 9000usize);

    let (_pool, mut setup) = start();
    println!(
        "# director vs HAProxy vs direct: 2 Dovecot backends, {rounds} rounds, load average {}",
        load_average()
    );

    // Warm up every path.
    for t in TARGETS {
        login_rate(&setup.addrs(t), 4, Duration::from_millis(500));
    }

    let mut table = Table::default();
    for round in 0..rounds {
        let order = round_order(round);
        login_figures(&setup, &mut table, round, &order, &[10, 50], secs);
        for &t in &order {
            let p50 = noop_p50(setup.addrs(t)[0], noops);
            table.add(t, "NOOP round trip p50 (ms)", ms(p50));
        }
    }

    fetch_figures(&setup, &mut table, rounds, mb, fetches);

    for t in [Target::Director, Target::Haproxy] {
        let port = setup.addrs(t)[0].port();
        if let Some(b) = listen_backlog(port) {
            table.add(t, "listen backlog", b as f64);
        }
    }
    idle_figures(&mut setup, &mut table, n_idle, n_idle_tls);

    for t in TARGETS {
        let s = storm(&setup.addrs(t), n_storm, Duration::from_secs(1));
        s.print(t, n_storm);
        table.add(
            t,
            &format!("storm of {n_storm}: all logged in after (s)"),
            s.logged_in.as_secs_f64(),
        );
        table.add(
            t,
            &format!("storm of {n_storm}: failed logins"),
            s.failed as f64,
        );
        table.add(
            t,
            &format!("storm of {n_storm}: SYN retransmits"),
            s.syn_retransmits as f64,
        );
        // Let the backends end the storm's sessions before the next storm.
        std::thread::sleep(Duration::from_secs(3));
    }
    println!("load average at the end: {}", load_average());
    table.print();
}

/// Round `round`'s order of the targets: forwards, then backwards, so that a drift of the
/// machine falls on all alike.
fn round_order(round: usize) -> Vec<Target> {
    if round.is_multiple_of(2) {
        TARGETS.to_vec()
    } else {
        TARGETS.iter().rev().copied().collect()
    }
}

/// Logins/s with each of `clients` for each target of `order`, and the proxy's CPU time per
/// session, into `table`.
fn login_figures(
    setup: &Setup,
    table: &mut Table,
    round: usize,
    order: &[Target],
    clients: &[usize],
    secs: u64,
) {
    for &t in order {
        for &clients in clients {
            let before = setup
                .pid(t)
                .map(|pid| (cpu(pid), context_switches(pid), cpu_ticks(pid).1));
            let (n, wall) = login_rate(&setup.addrs(t), clients, Duration::from_secs(secs));
            let rate = n as f64 / wall.as_secs_f64();
            table.add(t, &format!("logins/s, {clients} clients"), rate);
            if let (Some(pid), Some((cpu_before, switches_before, sys_before))) =
                (setup.pid(t), before)
            {
                let per = (cpu(pid) - cpu_before).as_secs_f64() * 1e3 / n as f64;
                table.add(
                    t,
                    &format!("proxy CPU per session, {clients} clients (ms)"),
                    per,
                );
                let sys = clock_tick() * (cpu_ticks(pid).1 - sys_before) as u32;
                table.add(
                    t,
                    &format!("of which in the kernel, {clients} clients (ms)"),
                    sys.as_secs_f64() * 1e3 / n as f64,
                );
                let switches = context_switches(pid) - switches_before;
                table.add(
                    t,
                    &format!("proxy context switches per session, {clients} clients"),
                    switches as f64 / n as f64,
                );
            }
            println!(
                "round {} {:<8} {clients} clients: {rate:.0} logins/s",
                round + 1,
                t.name()
            );
        }
    }
}

/// `scripts/bench cpu`: only the logins and the proxy CPU per session with 50 clients,
/// `BENCH_ROUNDS` rounds (default 6): the figure to watch while making logins cheaper.
/// `scripts/bench idle`: only the RSS per idle session (director and HAProxy, plain; the
/// director over TLS), each in a fresh process.
pub fn idle_only() {
    let n_idle = env_or("BENCH_IDLE", 9000usize);
    let n_idle_tls = env_or("BENCH_IDLE_TLS", 3000usize);
    let (_pool, mut setup) = start();
    let mut table = Table::default();
    idle_figures(&mut setup, &mut table, n_idle, n_idle_tls);
    table.print();
}

/// RSS per idle session at `n_idle` sessions (director and HAProxy) and per idle TLS session
/// at `n_idle_tls` (director), each target restarted first.
fn idle_figures(setup: &mut Setup, table: &mut Table, n_idle: usize, n_idle_tls: usize) {
    for t in [Target::Director, Target::Haproxy] {
        setup.restart(t);
        let pid = setup.pid(t).unwrap();
        let kib = idle_kib(pid, setup.addrs(t)[0], n_idle, None);
        table.add(t, &format!("RSS per idle session at {n_idle} (KiB)"), kib);
        println!("{:<8} idle: {kib:.2} KiB per session", t.name());
    }
    setup.restart(Target::Director);
    let kib = idle_kib(
        setup.director_process.pid(),
        setup.director_tls,
        n_idle_tls,
        Some(setup.tls.clone()),
    );
    table.add(
        Target::Director,
        &format!("RSS per idle TLS session at {n_idle_tls} (KiB)"),
        kib,
    );
    println!("director idle TLS: {kib:.2} KiB per session");
}

pub fn cpu_only() {
    let rounds = env_or("BENCH_ROUNDS", 6usize);
    let secs = env_or("BENCH_SECONDS", 4u64);
    let (_pool, setup) = start();
    for t in TARGETS {
        login_rate(&setup.addrs(t), 4, Duration::from_millis(500));
    }
    let mut table = Table::default();
    for round in 0..rounds {
        login_figures(&setup, &mut table, round, &round_order(round), &[50], secs);
    }
    table.print();
}

/// `scripts/bench callgrind`: the instructions the director and HAProxy execute in user
/// space per session (login + logout, 4 clients for `BENCH_SECONDS`, default 15), counted by
/// valgrind's callgrind over the load only (`callgrind_control -z` before, `-d` after): a
/// figure the machine's noise does not move, and where it goes (inclusive, top 45). Kernel
/// work (the syscalls) is not counted: `scripts/bench profile` shows it.
pub fn callgrind() {
    let secs = env_or("BENCH_SECONDS", 15u64);
    let out = std::path::Path::new("target/bench-profile");
    std::fs::create_dir_all(out).unwrap();
    let out = out.canonicalize().unwrap();
    let (_pool, mut setup) = start();
    std::env::set_var(
        "BENCH_WRAP",
        format!(
            "valgrind --tool=callgrind --callgrind-out-file={}/callgrind.%p.out",
            out.display()
        ),
    );
    for t in [Target::Director, Target::Haproxy] {
        setup.restart(t);
        let pid = setup.pid(t).unwrap();
        login_rate(&setup.addrs(t), 2, Duration::from_secs(2));
        callgrind_control(&["-z", &pid.to_string()]);
        let (n, _) = login_rate(&setup.addrs(t), 4, Duration::from_secs(secs));
        callgrind_control(&["-d", &pid.to_string()]);
        let dumps: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("callgrind.{pid}.out."))
            })
            .collect();
        let dump = dumps.iter().max().expect("callgrind wrote the dump");
        let report = std::process::Command::new("callgrind_annotate")
            .args(["--inclusive=yes", "--threshold=100"])
            .arg(dump)
            .output()
            .expect("callgrind_annotate (Debian: valgrind)");
        let text = String::from_utf8_lossy(&report.stdout);
        let total: u64 = text
            .lines()
            .find(|l| l.contains("PROGRAM TOTALS"))
            .and_then(|l| l.split_whitespace().next())
            .map(|n| n.replace(',', "").parse().unwrap())
            .expect("callgrind_annotate prints the program totals");
        println!(
            "# {}: {n} sessions, {:.0} user-space instructions per session ({})",
            t.name(),
            total as f64 / n as f64,
            dump.display()
        );
        for line in text
            .lines()
            .skip_while(|l| !l.contains("file:function"))
            .skip(2)
            .take_while(|l| !l.trim().is_empty())
            .take(45)
        {
            println!("{}", line.chars().take(170).collect::<String>());
        }
    }
    std::env::remove_var("BENCH_WRAP");
}

fn callgrind_control(args: &[&str]) {
    let status = std::process::Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("callgrind_control (Debian: valgrind)");
    assert!(status.success(), "callgrind_control {args:?} failed");
}

/// The two backends, the director (logging at `info` to a file, as deployed) and HAProxy.
fn start() -> (Pool, Setup) {
    // BENCH_BACKEND_EXTRA: Dovecot settings appended to the backends' (e.g. their login
    // limits, to see a storm meet them).
    let pool = Pool::start_with(dovecot::PoolOptions {
        backends: 2,
        extra_config: "service imap {\n  service_count = 0\n  client_limit = 1000\n  \
                       process_limit = 100\n}\nservice stats {\n  client_limit = 20000\n}\n\
                       service anvil {\n  client_limit = 20000\n}\n"
            .to_owned()
            + &std::env::var("BENCH_BACKEND_EXTRA").unwrap_or_default(),
        ..dovecot::PoolOptions::default()
    });
    let backends: Vec<SocketAddr> = pool.backends.iter().map(|b| b.imap()).collect();
    let (p1, p2, p3) = (ports::free_port(), ports::free_port(), ports::free_port());
    let director: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let director_tls: SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    let haproxy: SocketAddr = format!("127.0.0.1:{p3}").parse().unwrap();
    let mut yaml = format!(
        "trusted_networks: [127.0.0.0/8]\ntls:\n  cert: {}\n  key: {}\n\
         listeners:\n  - {{protocol: imap, address: {director}}}\n  \
         - {{protocol: imap, address: {director_tls}, tls: implicit}}\n\
         backend_defaults:\n  ports: {{imap: {}}}\n  max_logins_in_flight: {}\nbackends:\n",
        pool.tls.cert.display(),
        pool.tls.key.display(),
        dovecot::IMAP_PORT,
        // BENCH_MAX_LOGINS: the director's max_logins_in_flight per backend.
        env_or("BENCH_MAX_LOGINS", 40u32),
    );
    for b in &pool.backends {
        yaml += &format!("  - host: {}\n", b.ip);
    }
    yaml += &format!("admin:\n  socket: {}/admin.sock\n", pool.dir().display());
    let log = pool.dir().join("director.log");
    let director_config = pool.dir().join("director.yaml");
    let director_process =
        DirectorProcess::start_logging(&director_config, &yaml, director, &log, "info");
    let haproxy_process = Haproxy::start(pool.dir(), haproxy, &backends);
    let setup = Setup {
        backends,
        director,
        director_tls,
        haproxy,
        director_process,
        haproxy_process,
        tls: client_tls(&pool.tls.ca),
        director_config,
        director_yaml: yaml,
        director_log: log,
        dir: pool.dir().to_owned(),
    };
    (pool, setup)
}

/// `scripts/bench fetch`: only the large `FETCH` (MB/s and the proxy CPU per GB), the three
/// targets in turn for `BENCH_ROUNDS` rounds (default 4).
pub fn fetch_only() {
    let rounds = env_or("BENCH_ROUNDS", 4usize);
    let mb = env_or("BENCH_MESSAGE_MB", 54usize);
    let fetches = env_or("BENCH_FETCHES", 10usize);
    let (_pool, setup) = start();
    let mut table = Table::default();
    fetch_figures(&setup, &mut table, rounds, mb, fetches);
    table.print();
}

/// A message of `mb` MB appended directly (every backend reads the shared store), then
/// fetched `fetches` times through each target in turn, `rounds` rounds: MB/s and the proxy's
/// CPU time per GB relayed, into `table`.
fn fetch_figures(setup: &Setup, table: &mut Table, rounds: usize, mb: usize, fetches: usize) {
    let user = dovecot::user(150);
    let size = mb * 1_000_000;
    append_message(setup.backends[0], &user, size);
    for round in 0..rounds {
        for t in round_order(round) {
            let before = setup.pid(t).map(cpu);
            let wall = fetch(setup.addrs(t)[0], &user, size, fetches);
            let bytes = (size * fetches) as f64;
            table.add(t, "FETCH MB/s", bytes / 1e6 / wall.as_secs_f64());
            if let (Some(pid), Some(before)) = (setup.pid(t), before) {
                let per_gb = (cpu(pid) - before).as_secs_f64() / (bytes / 1e9);
                table.add(t, "proxy CPU per GB relayed (s)", per_gb);
            }
            println!("round {} {:<8} FETCH done", round + 1, t.name());
        }
    }
}

/// `scripts/bench storm`: only the reconnect storm, for the three targets.
pub fn storm_only() {
    let n_storm = env_or("BENCH_STORM", 9000usize);
    let (_pool, setup) = start();
    for t in TARGETS {
        let s = storm(&setup.addrs(t), n_storm, Duration::from_secs(1));
        s.print(t, n_storm);
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// `scripts/bench profile`: where the director's CPU goes while 50 clients log in and out
/// for `BENCH_SECONDS` (default 10): `perf record -g` of the director process, then the
/// functions that took the most samples (`perf report`, self time). perf.data is left in
/// `target/bench-profile/` for a closer look (`perf report -i ...`).
pub fn profile() {
    let secs = env_or("BENCH_SECONDS", 10u64);
    let (_pool, setup) = start();
    login_rate(
        &setup.addrs(Target::Director),
        4,
        Duration::from_millis(500),
    );
    let out = std::path::Path::new("target/bench-profile");
    std::fs::create_dir_all(out).unwrap();
    let data = out.join("perf.data");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &setup.director_process.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf (Debian: linux-perf) runs");
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu(setup.director_process.pid());
    let (n, wall) = login_rate(
        &setup.addrs(Target::Director),
        50,
        Duration::from_secs(secs),
    );
    let used = cpu(setup.director_process.pid()) - before;
    dovecot::signal(perf.id(), "INT");
    let _ = perf.wait();
    println!(
        "# {n} logins in {:.1} s ({:.0}/s), director CPU {:.3} ms per session",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        used.as_secs_f64() * 1e3 / n as f64
    );
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--stdio",
            "--sort",
            "dso,symbol",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output()
        .expect("perf report");
    let text = String::from_utf8_lossy(&report.stdout);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(60)
    {
        println!("{line}");
    }
    println!("# perf.data: {}", data.display());

    // Syscalls per session, director and HAProxy alike (strace slows both down: read the
    // counts, not the rates).
    for t in [Target::Director, Target::Haproxy] {
        let pid = setup.pid(t).unwrap();
        let mut strace = std::process::Command::new("strace")
            .args(["-c", "-f", "-q", "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("strace runs (Debian: strace)");
        std::thread::sleep(Duration::from_millis(500));
        let (n, _) = login_rate(&setup.addrs(t), 10, Duration::from_secs(3));
        dovecot::signal(strace.id(), "INT");
        let mut text = String::new();
        strace
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let _ = strace.wait();
        let mut total = 0u64;
        let mut rows = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors,] syscall
            if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
                let calls: u64 = f[3].parse().unwrap_or(0);
                let name = f[f.len() - 1];
                if name == "total" {
                    continue;
                }
                total += calls;
                rows.push((calls, name.to_owned()));
            }
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
        let per = |c: u64| c as f64 / n.max(1) as f64;
        let top: Vec<String> = rows
            .iter()
            .take(12)
            .map(|(c, name)| format!("{name} {:.1}", per(*c)))
            .collect();
        println!(
            "# {}: {:.1} syscalls per session ({n} sessions): {}",
            t.name(),
            per(total),
            top.join(", ")
        );
    }
}

/// Figures per target and row, in the order first added.
#[derive(Default)]
struct Table {
    rows: Vec<String>,
    values: Vec<(Target, String, f64)>,
}

impl Table {
    fn add(&mut self, t: Target, row: &str, v: f64) {
        if !self.rows.iter().any(|r| r == row) {
            self.rows.push(row.to_owned());
        }
        self.values.push((t, row.to_owned(), v));
    }

    fn median(&self, t: Target, row: &str) -> Option<f64> {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .filter(|(tt, r, _)| *tt == t && r == row)
            .map(|(_, _, v)| *v)
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    }

    fn print(&self) {
        let cell = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.3}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "–".to_owned(),
        };
        println!("\nmedian of the rounds:\n");
        println!("| figure | direct | director | HAProxy | director / direct | HAProxy / direct | director / HAProxy |");
        println!("|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let [d, r, h] = TARGETS.map(|t| self.median(t, row));
            println!(
                "| {row} | {} | {} | {} | {} | {} | {} |",
                cell(d),
                cell(r),
                cell(h),
                ratio(r, d),
                ratio(h, d),
                ratio(r, h)
            );
        }
    }
}

/// Login+logout cycles by `clients` threads for `length`, taking `addrs` in turn; returns the
/// cycles done and the wall time.
fn login_rate(addrs: &[SocketAddr], clients: usize, length: Duration) -> (usize, Duration) {
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|k| {
            let (done, stop, addrs) = (done.clone(), stop.clone(), addrs.to_vec());
            std::thread::spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let mut s = Session::connect(addrs[i % addrs.len()]);
                    s.login(&dovecot::user(1 + i % dovecot::USER_COUNT));
                    s.command("z", "LOGOUT");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += clients;
                }
            })
        })
        .collect();
    std::thread::sleep(length);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a client thread failed");
    }
    (done.load(Ordering::Relaxed), start.elapsed())
}

/// The p50 of `n` NOOP round trips in one session.
fn noop_p50(addr: SocketAddr, n: usize) -> Duration {
    let mut s = Session::connect(addr);
    s.login(&dovecot::user(7));
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.command("n", "NOOP");
        times.push(t.elapsed());
    }
    times.sort();
    percentile(&times, 50)
}

/// APPENDs a message of `size` bytes for `user` at `addr`.
fn append_message(addr: SocketAddr, user: &str, size: usize) {
    let mut body = b"Subject: bench\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n",
        );
    }
    body.truncate(size - 2);
    body.extend_from_slice(b"\r\n");
    let mut s = Session::connect(addr);
    s.login(user);
    s.write(format!("p APPEND INBOX {{{size}+}}\r\n").as_bytes());
    s.write(&body);
    s.write(b"\r\n");
    let r = s.until_tagged("p");
    assert!(r.starts_with("p OK"), "APPEND: {r}");
    s.command("z", "LOGOUT");
}

/// Wall time of `n` FETCHes of the whole last message (of `size` bytes) of `user`.
fn fetch(addr: SocketAddr, user: &str, size: usize, n: usize) -> Duration {
    let mut s = Session::connect(addr);
    s.login(user);
    s.command("s", "SELECT INBOX");
    let mut buf = vec![0u8; size];
    let start = Instant::now();
    for _ in 0..n {
        s.write(b"f FETCH * BODY.PEEK[]\r\n");
        let head = s.line();
        assert!(head.contains(&format!("{{{size}}}")), "{head}");
        s.r.read_exact(&mut buf).unwrap();
        let r = s.until_tagged("f");
        assert!(r.starts_with("f OK"), "{r}");
    }
    let wall = start.elapsed();
    s.command("z", "LOGOUT");
    wall
}

/// RSS growth of `pid` per idle session (logged in, in IDLE) over `n` sessions to `addr`,
/// over TLS when `tls` is given.
fn idle_kib(pid: u32, addr: SocketAddr, n: usize, tls: Option<Arc<rustls::ClientConfig>>) -> f64 {
    let open = |i: usize| -> Box<dyn Idle> {
        let tcp = TcpStream::connect(addr).expect("connect");
        let user = dovecot::user(1 + i % dovecot::USER_COUNT);
        match &tls {
            None => Box::new(idle_session(tcp, &user)),
            Some(cfg) => {
                let conn =
                    rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap())
                        .unwrap();
                Box::new(idle_session(rustls::StreamOwned::new(conn, tcp), &user))
            }
        }
    };
    let warm: Vec<Box<dyn Idle>> = (0..20).map(open).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let sessions: Vec<Box<dyn Idle>> = (0..n).map(|i| open(20 + i)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid);
    drop(sessions);
    drop(warm);
    std::thread::sleep(Duration::from_secs(2));
    after.saturating_sub(before) as f64 / n as f64
}

/// A held idle session (plain or TLS).
trait Idle {}
impl<S> Idle for BufReader<S> {}

/// Greeting, LOGIN, IDLE on `stream`; returns it held in IDLE.
fn idle_session<S: Read + Write>(stream: S, user: &str) -> BufReader<S> {
    let mut r = BufReader::new(stream);
    let greeting = read_line(&mut r);
    assert!(greeting.starts_with("* OK"), "greeting {greeting}");
    r.get_mut()
        .write_all(format!("a LOGIN {user} {PASSWORD}\r\ni IDLE\r\n").as_bytes())
        .unwrap();
    let mut l = read_line(&mut r);
    while !l.starts_with("a ") {
        l = read_line(&mut r);
    }
    assert!(l.starts_with("a OK"), "LOGIN {l}");
    let l = read_line(&mut r);
    assert!(l.starts_with('+'), "IDLE {l}");
    r
}

fn read_line<R: BufRead>(r: &mut R) -> String {
    let mut l = String::new();
    r.read_line(&mut l).expect("read");
    assert!(!l.is_empty(), "closed");
    l
}

/// The backlog of the socket listening on 127.0.0.1:`port` (Send-Q of `ss -ltn`).
fn listen_backlog(port: u16) -> Option<u64> {
    let out = dovecot::command_stdout("ss", &["-ltnH", &format!("sport = :{port}")]);
    out.lines().next()?.split_whitespace().nth(2)?.parse().ok()
}

/// What a reconnect storm saw.
struct Storm {
    greeted: Duration,
    logged_in: Duration,
    failed: usize,
    first_error: Option<String>,
    syn_retransmits: u64,
    listen_overflows: u64,
}

impl Storm {
    /// Prints what the storm of `n` clients to `t` saw, and its first failure.
    fn print(&self, t: Target, n: usize) {
        println!(
            "{:<8} storm of {n}: all greeted after {:.2} s, all logged in after {:.2} s, \
             {} failed, SYN retransmits {}, listen overflows {}",
            t.name(),
            self.greeted.as_secs_f64(),
            self.logged_in.as_secs_f64(),
            self.failed,
            self.syn_retransmits,
            self.listen_overflows
        );
        if let Some(e) = &self.first_error {
            println!("  first failure: {e}");
        }
    }
}

/// `n` clients connect to `addrs` (in turn) spread evenly over `within`, from 150 client
/// addresses; each logs in and stays until all are done.
fn storm(addrs: &[SocketAddr], n: usize, within: Duration) -> Storm {
    let before = tcp_ext(&["TCPSynRetrans", "ListenOverflows"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addrs = addrs.to_vec();
    let results: Vec<Result<(Duration, Duration), String>> = rt.block_on(async move {
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let addr = addrs[i % addrs.len()];
                let at = start + within.mul_f64(i as f64 / n as f64);
                let source = IpAddr::V4(Ipv4Addr::new(127, 201, 0, 1 + (i % 150) as u8));
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let r = tokio::time::timeout(
                        Duration::from_secs(120),
                        storm_client(
                            addr,
                            source,
                            &dovecot::user(1 + i % dovecot::USER_COUNT),
                            start,
                        ),
                    )
                    .await;
                    match r {
                        Ok(r) => r,
                        Err(_) => Err("no login within 120 s".into()),
                    }
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut out = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok((g, l, stream)) => {
                    held.push(stream);
                    out.push(Ok((g, l)));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        drop(held);
        out
    });
    let after = tcp_ext(&["TCPSynRetrans", "ListenOverflows"]);
    let ok: Vec<&(Duration, Duration)> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    Storm {
        greeted: ok.iter().map(|(g, _)| *g).max().unwrap_or_default(),
        logged_in: ok.iter().map(|(_, l)| *l).max().unwrap_or_default(),
        failed: results.len() - ok.len(),
        first_error: results.iter().find_map(|r| r.as_ref().err().cloned()),
        syn_retransmits: after[0] - before[0],
        listen_overflows: after[1] - before[1],
    }
}

/// One client of a storm: connect from `source`, greeting, LOGIN. Returns when it was
/// greeted and logged in (from `start`), and the connection, to hold.
async fn storm_client(
    addr: SocketAddr,
    source: IpAddr,
    user: &str,
    start: tokio::time::Instant,
) -> Result<(Duration, Duration, tokio::net::TcpStream), String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(source, 0))
        .map_err(|e| e.to_string())?;
    let stream = sock
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut r = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).await.map_err(|e| e.to_string())?;
    if !line.starts_with("* OK") {
        return Err(format!("greeting {line:?}"));
    }
    let greeted = start.elapsed();
    r.get_mut()
        .write_all(format!("a LOGIN {user} {PASSWORD}\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        line.clear();
        if r.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before the login's answer".into());
        }
        if line.starts_with("a ") {
            break;
        }
    }
    if !line.starts_with("a OK") {
        return Err(format!("LOGIN {line:?}"));
    }
    Ok((greeted, start.elapsed(), r.into_inner()))
}

/// Counters of the `TcpExt:` lines of `/proc/net/netstat`.
fn tcp_ext(names: &[&str]) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let keys: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    names
        .iter()
        .map(|n| {
            let i = keys
                .iter()
                .position(|k| k == n)
                .unwrap_or_else(|| panic!("no {n}"));
            values[i].parse().unwrap()
        })
        .collect()
}

/// A client TLS config trusting the pool's CA.
fn client_tls(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A blocking IMAP client session for the load and the FETCH: one command at a time.
struct Session {
    r: BufReader<TcpStream>,
}

impl Session {
    fn connect(addr: SocketAddr) -> Session {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut session = Session {
            r: BufReader::new(s),
        };
        let g = session.line();
        assert!(g.starts_with("* OK"), "greeting {g}");
        session
    }

    fn write(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        read_line(&mut self.r)
    }

    fn until_tagged(&mut self, tag: &str) -> String {
        loop {
            let l = self.line();
            if l.starts_with(tag) && l.as_bytes().get(tag.len()) == Some(&b' ') {
                return l;
            }
        }
    }

    fn command(&mut self, tag: &str, c: &str) -> String {
        self.write(format!("{tag} {c}\r\n").as_bytes());
        self.until_tagged(tag)
    }

    fn login(&mut self, user: &str) {
        let r = self.command("a", &format!("LOGIN {user} {PASSWORD}"));
        assert!(r.starts_with("a OK"), "LOGIN {user}: {r}");
    }
}
