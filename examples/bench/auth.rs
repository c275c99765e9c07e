//! `scripts/bench auth`: what authentication at the director costs (issue 9).
//!
//! One real Dovecot backend, a Dovecot auth service (`auth_service`: a passwd-file passdb
//! with the pool's users, `proxy=y` and the backends' password, reached on its login socket),
//! and one director process with two IMAP listeners over that backend: one in passthrough
//! mode, one with `auth: {mode: dovecot}`. The same load generator runs against the backend
//! directly, the passthrough listener and the dovecot listener: `BENCH_AUTH_CLIENTS` threads
//! (default 4), each connecting, logging in (IMAP `LOGIN`) and logging out in a loop, until
//! `BENCH_AUTH_LOGINS` logins (default 5000) are done. `BENCH_AUTH_ROUNDS` rounds (default 5)
//! of the three runs, the order reversed every other round, so that drift on a noisy machine
//! falls on all three alike.
//!
//! Per run: logins/s (login+logout cycles over the run's wall time), the p50 and p99 login
//! latency (from before connecting to the `LOGIN`'s `OK`), and the CPU time per login of the
//! director process and, in dovecot mode, of the auth service's auth process (utime and
//! stime from `/proc/PID/stat` before and after the run). The summary gives the median of the
//! rounds and the ratios.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth_service::{AuthService, AuthServiceConfig, LOGIN_PORT};
use crate::director_process::DirectorProcess;
use crate::imap::Imap;
use crate::measure::{clock_tick, cpu_ticks, load_average, ms, percentile};
use crate::{dovecot, env, ports};

/// Where a run's clients log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Passthrough,
    Dovecot,
}

const MODES: [Mode; 3] = [Mode::Direct, Mode::Passthrough, Mode::Dovecot];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Passthrough => "passthrough",
            Mode::Dovecot => "dovecot",
        }
    }
}

/// The figures of one run.
struct Run {
    logins_per_s: f64,
    p50: Duration,
    p99: Duration,
    /// CPU per login of the director (not for direct runs).
    director_cpu: Option<Cpu>,
    /// CPU per login of the auth process (dovecot runs).
    auth_cpu: Option<Cpu>,
}

/// CPU time of a process: in user space, and in the kernel (on loopback the receiving
/// socket's TCP work runs in the sender's system time, so a proxy pays much of it).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl Cpu {
    fn total(self) -> Duration {
        self.user + self.system
    }
}

pub fn run() {
    let logins = env::env_or("BENCH_AUTH_LOGINS", 5000usize);
    let clients = env::env_or("BENCH_AUTH_CLIENTS", 4usize);
    let rounds = env::env_or("BENCH_AUTH_ROUNDS", 5usize);

    let pool = dovecot::Pool::start_with(dovecot::PoolOptions {
        backends: 1,
        extra_config:
            "service imap {\n  service_count = 0\n  client_limit = 500\n  process_limit = 100\n}\n"
                .into(),
        ..dovecot::PoolOptions::default()
    });
    let backend = pool.backend(0);
    let users: String = (1..=dovecot::USER_COUNT)
        .map(|i| {
            format!(
                "{}:{{PLAIN}}{}::::::proxy=y\n",
                dovecot::user(i),
                dovecot::PASSWORD
            )
        })
        .collect();
    let auth = AuthService::start(AuthServiceConfig::with_users(&users));

    let [passthrough_port, dovecot_port] = ports::free_ports(2)[..] else {
        unreachable!()
    };
    let yaml = format!(
        "trusted_networks: [127.0.0.0/8]\nlisteners:\n  - {{protocol: imap, address: 127.0.0.1:{passthrough_port}}}\n  \
         - {{protocol: imap, address: 127.0.0.1:{dovecot_port}, auth: {{mode: dovecot, socket: \"{}:{LOGIN_PORT}\"}}}}\n\
         backend_defaults:\n  ports: {{imap: {}}}\nbackends:\n  - host: {}\n",
        auth.ip(),
        dovecot::IMAP_PORT,
        backend.ip
    );
    let passthrough = ports::local(passthrough_port);
    let dovecot_mode = ports::local(dovecot_port);
    let director = DirectorProcess::start(
        &pool.dir().join("bench-auth-director.yaml"),
        &yaml,
        passthrough,
    );
    let addr = |mode: Mode| match mode {
        Mode::Direct => backend.imap(),
        Mode::Passthrough => passthrough,
        Mode::Dovecot => dovecot_mode,
    };

    println!(
        "# authentication at the director: {logins} logins per run, {clients} clients, {rounds} rounds"
    );
    println!("load average at the start: {}", load_average());
    // Warm-up: every user once through each path (records, Dovecot's processes, the auth
    // process, which its master starts on the first connection).
    for mode in MODES {
        load(addr(mode), dovecot::USER_COUNT, clients);
    }
    let auth_pid = auth.auth_pid();
    let tick = clock_tick();

    let mut runs: Vec<(Mode, Run)> = Vec::new();
    for round in 0..rounds {
        let mut order = MODES;
        if round % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            let director_before = cpu_ticks(director.pid());
            let auth_before = cpu_ticks(auth_pid);
            let (wall, mut latencies) = load(addr(mode), logins, clients);
            let per_login = |before: (u64, u64), pid: u32| {
                let after = cpu_ticks(pid);
                let per = |ticks: u64| tick * ticks as u32 / logins as u32;
                Cpu {
                    user: per(after.0 - before.0),
                    system: per(after.1 - before.1),
                }
            };
            latencies.sort();
            let run = Run {
                logins_per_s: logins as f64 / wall.as_secs_f64(),
                p50: percentile(&latencies, 50),
                p99: percentile(&latencies, 99),
                director_cpu: (mode != Mode::Direct)
                    .then(|| per_login(director_before, director.pid())),
                auth_cpu: (mode == Mode::Dovecot).then(|| per_login(auth_before, auth_pid)),
            };
            println!(
                "round {} {:<11} {:>7.0} logins/s  p50 {:>6.2} ms  p99 {:>6.2} ms  director CPU/login {}  auth CPU/login {}",
                round + 1,
                mode.name(),
                run.logins_per_s,
                ms(run.p50),
                ms(run.p99),
                shown(run.director_cpu),
                shown(run.auth_cpu)
            );
            runs.push((mode, run));
        }
    }
    println!("load average at the end: {}", load_average());
    summary(&runs);
}

/// One figure of a run, if the run has it.
type Figure = dyn Fn(&Run) -> Option<f64>;

/// The medians over the rounds, per mode, and the ratios, as a Markdown table.
fn summary(runs: &[(Mode, Run)]) {
    let median = |mode: Mode, f: &Figure| -> Option<f64> {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|(m, _)| *m == mode)
            .filter_map(|(_, r)| f(r))
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let rows: [(&str, &Figure); 6] = [
        ("logins/s", &|r| Some(r.logins_per_s)),
        ("p50 login latency (ms)", &|r| Some(ms(r.p50))),
        ("p99 login latency (ms)", &|r| Some(ms(r.p99))),
        ("director CPU per login (µs)", &|r| {
            cpu_micros(r.director_cpu, Cpu::total)
        }),
        ("of which user space (µs)", &|r| {
            cpu_micros(r.director_cpu, |c| c.user)
        }),
        ("auth process CPU per login (µs)", &|r| {
            cpu_micros(r.auth_cpu, Cpu::total)
        }),
    ];
    let cell = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_owned(),
    };
    println!("\nmedian of the rounds:\n");
    println!("| What | Direct | Passthrough | Dovecot | Dovecot / passthrough | Passthrough / direct | Dovecot / direct |");
    println!("|---|---|---|---|---|---|---|");
    for (what, f) in rows {
        let [d, p, a] = MODES.map(|m| median(m, f));
        println!(
            "| {what} | {} | {} | {} | {} | {} | {} |",
            cell(d),
            cell(p),
            cell(a),
            ratio(a, p),
            ratio(p, d),
            ratio(a, d)
        );
    }
}

/// `logins` login+logout cycles against `addr` by `clients` threads (users taken in turn);
/// returns the wall time and every login's latency.
fn load(addr: SocketAddr, logins: usize, clients: usize) -> (Duration, Vec<Duration>) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= logins {
                        return latencies;
                    }
                    let t = Instant::now();
                    let mut c = Imap::connect(addr);
                    c.login(&dovecot::user(1 + i % dovecot::USER_COUNT));
                    latencies.push(t.elapsed());
                    c.cmd("z", "LOGOUT");
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

/// `f` of `cpu` in microseconds.
fn cpu_micros(cpu: Option<Cpu>, f: fn(Cpu) -> Duration) -> Option<f64> {
    cpu.map(|c| f(c).as_secs_f64() * 1e6)
}

fn shown(cpu: Option<Cpu>) -> String {
    cpu.map_or("–".to_owned(), |c| {
        format!(
            "{:.0} µs (user {:.0})",
            c.total().as_secs_f64() * 1e6,
            c.user.as_secs_f64() * 1e6
        )
    })
}
