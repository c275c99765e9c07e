//! Clients cannot take the pool down: what a backend does with a client's credentials says
//! nothing about the backend's health, and one client's credentials never go to a second
//! backend. Against three real Dovecot backends with the default health settings.
//!
//! The attack this reproduces: `a LOGIN {8000+}` with 8,000 bytes of username. Dovecot drops
//! such a login ("Authentication response too large"); a director that counted that as a
//! failed check, and replayed the credentials to the next backend in ring order, took every
//! backend down with four such connections.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use director::state::backend::Health;
use support::director::TestDirector;
use support::dovecot::{user, Pool, PoolOptions};
use support::logins::{LoginLoop, Timed};

/// How long the attack is kept up.
const ATTACK: Duration = Duration::from_secs(8);

/// What one hostile login saw.
#[derive(Debug, Default)]
struct Seen {
    /// Tagged `NO` replies.
    no: AtomicUsize,
    /// Tagged `OK`: must never happen.
    ok: AtomicUsize,
    /// Connection closed or no reply.
    other: AtomicUsize,
}

/// One hostile login: an 8,000-byte username as a non-synchronising literal.
fn oversized_login(addr: SocketAddr, seen: &Seen) {
    let Ok(s) = TcpStream::connect(addr) else {
        seen.other.fetch_add(1, Ordering::Relaxed);
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() || !line.starts_with("* OK") {
        seen.other.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut attack = b"a LOGIN {8000+}\r\n".to_vec();
    attack.extend(std::iter::repeat_n(b'u', 8000));
    attack.extend_from_slice(b" pass\r\n");
    if w.write_all(&attack).is_err() {
        seen.other.fetch_add(1, Ordering::Relaxed);
        return;
    }
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => {
                seen.other.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) if line.starts_with("a NO") => {
                seen.no.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) if line.starts_with("a OK") => {
                seen.ok.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
        }
    }
}

/// Records every backend that is ever seen down while it runs.
struct HealthWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<IpAddr>>,
}

impl HealthWatch {
    fn start(d: &TestDirector) -> HealthWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let state = d.state.clone();
        let thread = std::thread::spawn(move || {
            let mut down = Vec::new();
            while !s.load(Ordering::Relaxed) {
                for b in state.backends().backends.values() {
                    if b.health == Health::Down && !down.contains(&b.ip) {
                        down.push(b.ip);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            down
        });
        HealthWatch { stop, thread }
    }

    fn finish(self) -> Vec<IpAddr> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// How many times each backend's log says it dropped a login for its size.
fn too_large_per_backend(pool: &Pool) -> Vec<(String, usize)> {
    pool.backends
        .iter()
        .map(|b| {
            let n = b
                .log()
                .lines()
                .filter(|l| l.contains("too large") || l.contains("too long"))
                .count();
            (b.name.clone(), n)
        })
        .collect()
}

/// What an attack left behind: the normal users' logins, those of them that failed, and the
/// backends seen down meanwhile.
struct Aftermath {
    results: Vec<Timed>,
    failures: Vec<String>,
    down: Vec<IpAddr>,
}

/// Runs `attempt(thread, n)` over and over on four threads for `duration` (n counts each
/// thread's attempts from 1), while `normal` users log in and the backends' health is
/// watched; then lets any check the attack provoked finish.
fn attack(
    d: &TestDirector,
    normal: Vec<String>,
    duration: Duration,
    attempt: impl Fn(usize, usize) + Send + Sync + 'static,
) -> Aftermath {
    let logins = LoginLoop::start(d.imap, normal);
    let watch = HealthWatch::start(d);
    let stop_at = Instant::now() + duration;
    let attempt = Arc::new(attempt);
    let attackers: Vec<_> = (0..4)
        .map(|t| {
            let attempt = attempt.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while Instant::now() < stop_at {
                    n += 1;
                    attempt(t, n);
                }
            })
        })
        .collect();
    for a in attackers {
        a.join().unwrap();
    }
    // Let any check that the attack might have provoked finish.
    std::thread::sleep(Duration::from_secs(2));
    let results = logins.finish();
    let down = watch.finish();
    let failures = results
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().err().cloned())
        .collect();
    Aftermath {
        results,
        failures,
        down,
    }
}

#[test]
fn oversized_logins_leave_every_backend_up_and_other_users_unharmed() {
    let pool = Pool::start(3);
    // The default health settings (interval 2s, fast_interval 500ms, rise 2, fall 2) and the
    // default backend timeouts.
    let d = TestDirector::start_with_default_health(&pool, "");

    // Normal users on every backend keep logging in while the attack goes on.
    let normal: Vec<String> = (0..12).map(|i| user(100 + i)).collect();
    let seen = Arc::new(Seen::default());
    let addr = d.imap;
    let hostile = seen.clone();
    let Aftermath {
        results,
        failures,
        down,
    } = attack(&d, normal, ATTACK, move |_, _| {
        oversized_login(addr, &hostile)
    });

    let hostile = seen.no.load(Ordering::Relaxed) + seen.other.load(Ordering::Relaxed);
    let dropped = too_large_per_backend(&pool);
    println!(
        "attack: {hostile} oversized logins ({} NO, {} other); normal logins: {}, failed: {}; \
         backends seen down: {down:?}; logins dropped for size per backend: {dropped:?}",
        seen.no.load(Ordering::Relaxed),
        seen.other.load(Ordering::Relaxed),
        results.len(),
        failures.len()
    );
    assert!(hostile >= 20, "the attack did not run: {seen:?}");
    assert_eq!(
        seen.ok.load(Ordering::Relaxed),
        0,
        "an oversized login succeeded"
    );
    assert!(
        down.is_empty(),
        "backends taken down by the attack: {down:?}"
    );
    assert!(
        pool.backends
            .iter()
            .all(|b| d.state.backends().get(b.ip).unwrap().health == Health::Up),
        "a backend is down after the attack"
    );
    assert!(
        results.len() >= 50,
        "too few normal logins: {}",
        results.len()
    );
    assert!(
        failures.is_empty(),
        "normal users' logins failed: {failures:?}"
    );
    // Every hostile login went to the one backend its username hashes to, and no further.
    let hit: Vec<&(String, usize)> = dropped.iter().filter(|(_, n)| *n > 0).collect();
    assert!(
        hit.len() <= 1,
        "one client's credentials reached several backends: {dropped:?}"
    );
}

/// Logins whose credentials the backend closes on, or refuses, arriving while a normal user of
/// the same backend logs in: the backend is never suspected into the ground, and the normal
/// user never fails. Hostile logins of many different names reach every backend.
#[test]
fn hostile_logins_of_many_names_take_no_backend_down() {
    // Dovecot's auth penalty would slow every later login from the attackers' address, which
    // the director forwards and which is the normal users' address too in this test: off.
    // Its 2 s pause before each refusal stays.
    let pool = Pool::start_with(PoolOptions {
        backends: 3,
        extra_config:
            "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n".into(),
        ..PoolOptions::default()
    });
    let d = TestDirector::start_with_default_health(&pool, "");
    let answered = Arc::new(Mutex::new(Vec::new()));
    let replies = answered.clone();
    let addr = d.imap;
    let normal = (0..12).map(|i| user(150 + i)).collect();
    let Aftermath {
        results,
        failures,
        down,
    } = attack(&d, normal, Duration::from_secs(6), move |t, n| {
        // A different name every time, so every backend gets some: oversized, unknown users
        // with wrong passwords, and SASL that Dovecot rejects.
        let attempt = match n % 3 {
            0 => {
                let mut a = format!("a LOGIN {{7000+}}\r\n{t}-{n}").into_bytes();
                a.resize(a.len() + 7000 - format!("{t}-{n}").len(), b'v');
                a.extend_from_slice(b" x\r\n");
                a
            }
            1 => format!("a LOGIN nobody-{t}-{n} wrong\r\n").into_bytes(),
            _ => format!(
                "a AUTHENTICATE PLAIN {}\r\n",
                support::client::base64(format!("\0nobody-{t}-{n}\0x").as_bytes())
            )
            .into_bytes(),
        };
        let Ok(s) = TcpStream::connect(addr) else {
            return;
        };
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        if w.write_all(&attempt).is_err() {
            return;
        }
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.starts_with("a ") => {
                    replies.lock().unwrap().push(line.clone());
                    break;
                }
                Ok(_) => {}
            }
        }
    });
    let answered = answered.lock().unwrap();
    println!(
        "hostile logins answered: {} (OK: {}); normal logins: {}, failed: {}; seen down: {down:?}",
        answered.len(),
        answered.iter().filter(|l| l.starts_with("a OK")).count(),
        results.len(),
        failures.len()
    );
    assert!(answered.len() >= 12, "the attack did not run");
    assert!(!answered.iter().any(|l| l.starts_with("a OK")));
    assert!(down.is_empty(), "backends taken down: {down:?}");
    assert!(
        failures.is_empty(),
        "normal users' logins failed: {failures:?}"
    );
}
