//! A hung backend costs its users seconds, not `login_timeout`: with the default health
//! settings, users of a backend that stops answering are served elsewhere within a few
//! seconds, no client sees an error, and no login waits longer than the connect timeout.
//!
//! Four ways of hanging: a real Dovecot frozen with SIGSTOP (the kernel accepts connections,
//! nothing answers), a listener whose accept queue is full (connects hang: the kernel drops
//! the SYNs), and scripted fakes for what a real backend cannot do on purpose: greet and then
//! never answer, greet and hang at LOGIN (a hung auth process: only checks that log in can
//! find it), and trickle its greeting a byte a second.
//!
//! The figures printed here (time from the hang until every user was served elsewhere, the
//! slowest login) are recorded in BENCHMARKS.md ("Hung backend"); the assertions use generous
//! bounds that tell the mechanism apart from a 30 s `login_timeout`, never the figures.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use director::state::backend::Health;
use support::client::imap_login;
use support::director::{ready, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};
use support::logins::{LoginLoop, Timed};
use support::wait::wait_until;

/// The default `connect_timeout`: no login may take longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on "served elsewhere" and on any one login: far below `login_timeout` (30 s), far
/// above the seconds the mechanism takes, so a busy machine does not fail the test.
const BOUND: Duration = Duration::from_secs(12);

/// The default health settings and backend timeouts, with check credentials when `logs_in`.
fn director(pool: &Pool, logs_in: bool) -> TestDirector {
    let mut extra = String::new();
    if logs_in {
        let path = pool.dir().join("check-credentials.yaml");
        std::fs::write(&path, format!("user: {}\npassword: {PASSWORD}\n", user(1))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        extra += &format!("  credentials_file: {}\n", path.display());
    }
    TestDirector::start_with_default_health(pool, &extra)
}

/// `n` users whose backend (record, else ring) is `ip`.
fn users_of(d: &TestDirector, ip: IpAddr, n: usize) -> Vec<String> {
    let users: Vec<String> = (1..=200)
        .map(user)
        .filter(|u| ready(d.router.route(u, "")).is_ok_and(|r| r.backend.ip == ip))
        .take(n)
        .collect();
    assert_eq!(users.len(), n, "not enough users on {ip}");
    users
}

/// What the logins of one user saw after the hang.
struct Outcome {
    /// The first successful login on another backend, counted from the hang.
    served_elsewhere: Option<Duration>,
    failures: Vec<String>,
    slowest: Duration,
}

fn outcome(results: &[Timed], hung_at: Instant, hung_backend: &str) -> Outcome {
    let after: Vec<&Timed> = results
        .iter()
        .filter(|(_, end, _)| *end >= hung_at)
        .collect();
    Outcome {
        served_elsewhere: after
            .iter()
            .filter(|(start, _, r)| {
                *start >= hung_at && r.as_ref().is_ok_and(|b| b != hung_backend)
            })
            .map(|(_, end, _)| *end - hung_at)
            .min(),
        failures: after
            .iter()
            .filter_map(|(_, _, r)| r.as_ref().err().cloned())
            .collect(),
        slowest: after
            .iter()
            .map(|(start, end, _)| *end - *start)
            .max()
            .unwrap_or_default(),
    }
}

/// Runs one login loop per user (a login every 50 ms each), hangs the backend with `hang`,
/// keeps the logins going for `run`, and checks what the clients saw.
fn logins_across_a_hang(
    d: &TestDirector,
    users: &[String],
    hung_backend: &str,
    run: Duration,
    hang: impl FnOnce(),
) -> Vec<Outcome> {
    let loops: Vec<LoginLoop> = users
        .iter()
        .map(|u| LoginLoop::start_paced(d.imap, vec![u.clone()], Duration::from_millis(50)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let hung_at = Instant::now();
    hang();
    std::thread::sleep(run);
    let outcomes: Vec<Outcome> = loops
        .into_iter()
        .map(|l| outcome(&l.finish(), hung_at, hung_backend))
        .collect();
    for (u, o) in users.iter().zip(&outcomes) {
        println!(
            "{u}: served elsewhere {:?} after the hang; slowest login {:?}; failures {:?}",
            o.served_elsewhere, o.slowest, o.failures
        );
    }
    let worst = outcomes.iter().filter_map(|o| o.served_elsewhere).max();
    let slowest = outcomes.iter().map(|o| o.slowest).max();
    println!("hang: every user served elsewhere within {worst:?}; slowest login {slowest:?}");
    for (u, o) in users.iter().zip(&outcomes) {
        assert!(
            o.failures.is_empty(),
            "{u}: client-visible errors {:?}",
            o.failures
        );
        let served = o
            .served_elsewhere
            .unwrap_or_else(|| panic!("{u} never served elsewhere"));
        assert!(served < BOUND, "{u} served elsewhere only after {served:?}");
        assert!(o.slowest < BOUND, "{u}: a login took {:?}", o.slowest);
    }
    outcomes
}

#[test]
fn users_of_a_frozen_backend_are_served_elsewhere_in_seconds_without_errors() {
    let pool = Pool::start(3);
    let d = director(&pool, false);
    let victim = pool.backend(0);
    let users = users_of(&d, victim.ip, 6);
    // One user keeps a session open on the victim: it is ended when the checker takes the
    // backend down, and the user's next login goes elsewhere.
    let (mut held, on) = imap_login(d.imap, &users[5], PASSWORD);
    assert_eq!(on, victim.name);

    let outcomes = logins_across_a_hang(
        &d,
        &users[..5],
        &victim.name,
        Duration::from_secs(8),
        || victim.pause(),
    );
    assert_eq!(
        d.state.backends().get(victim.ip).unwrap().health,
        Health::Down
    );
    assert!(
        held.until_closed(Duration::from_secs(10)).is_some(),
        "the session on the frozen backend was not ended"
    );
    let (_c, now_on) = imap_login(d.imap, &users[5], PASSWORD);
    assert_ne!(now_on, victim.name);
    let worst = outcomes.iter().map(|o| o.slowest).max().unwrap();
    assert!(
        worst < CONNECT_TIMEOUT + Duration::from_secs(5),
        "slowest login {worst:?}"
    );
    victim.resume();
}

/// What a scripted fake IMAP backend does wrong.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Greets, then never answers anything.
    HangAfterGreeting,
    /// Greets with its capabilities and answers everything but LOGIN / AUTHENTICATE.
    HangAtLogin,
    /// Sends its greeting one byte a second.
    Trickle,
}

/// Starts a fake backend on `ip`; it misbehaves while `on` is true and refuses nothing.
fn fake_backend(ip: IpAddr, how: Misbehaviour, stop: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let stop = stop.clone();
            std::thread::spawn(move || serve_fake(conn, how, stop));
        }
    });
    port
}

fn serve_fake(conn: TcpStream, how: Misbehaviour, stop: Arc<AtomicBool>) {
    let mut w = conn.try_clone().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut r = BufReader::new(conn);
    match how {
        Misbehaviour::Trickle => {
            for b in b"* OK fake ready\r\n" {
                if stop.load(Ordering::Relaxed) || w.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Misbehaviour::HangAfterGreeting => {
            let _ = w.write_all(b"* OK fake ready\r\n");
        }
        Misbehaviour::HangAtLogin => {
            let _ =
                w.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID] fake ready\r\n");
        }
    }
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Err(_) => continue,
            Ok(_) => {}
        }
        let mut words = line.split_ascii_whitespace();
        let (Some(tag), Some(cmd)) = (words.next(), words.next()) else {
            continue;
        };
        let cmd = cmd.to_ascii_uppercase();
        let reply = match (how, cmd.as_str()) {
            (Misbehaviour::HangAtLogin, "CAPABILITY") => {
                format!("* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID\r\n{tag} OK done\r\n")
            }
            (Misbehaviour::HangAtLogin, "ID") => format!("* ID NIL\r\n{tag} OK done\r\n"),
            (Misbehaviour::HangAtLogin, "NOOP") => format!("{tag} OK done\r\n"),
            (Misbehaviour::HangAtLogin, "LOGOUT") => {
                let _ = w.write_all(format!("* BYE bye\r\n{tag} OK done\r\n").as_bytes());
                return;
            }
            _ => continue,
        };
        if w.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Adds a fake backend beside two real ones, sends users to it, and makes sure they are served
/// elsewhere within seconds without errors while it misbehaves.
fn fake_hangs(how: Misbehaviour, logs_in: bool) {
    let pool = Pool::start(2);
    let d = director(&pool, logs_in);
    let fake_ip = pool.spare_ip(250);
    let stop = Arc::new(AtomicBool::new(false));
    let port = fake_backend(fake_ip, how, stop.clone());
    let fake = d.backend_like(pool.backend(0).ip, fake_ip, Some(port));
    // The fake joins misbehaving: its users (new records) log in while it does.
    let users = {
        d.state.upsert_backend(fake);
        users_of(&d, fake_ip, 5)
    };
    logins_across_a_hang(&d, &users, "fake", Duration::from_secs(8), || {});
    wait_until("fake down", BOUND, || {
        (d.state.backends().get(fake_ip).unwrap().health == Health::Down).then_some(())
    });
    println!(
        "{how:?}: the checker's verdict: {:?}",
        d.health.as_ref().unwrap().last_result(fake_ip)
    );
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(SocketAddr::new(fake_ip, port));
}

#[test]
fn a_backend_that_greets_and_then_hangs_costs_seconds() {
    fake_hangs(Misbehaviour::HangAfterGreeting, false);
}

#[test]
fn a_backend_that_hangs_at_login_costs_seconds_when_checks_log_in() {
    fake_hangs(Misbehaviour::HangAtLogin, true);
}

#[test]
fn a_backend_that_trickles_its_greeting_costs_seconds() {
    fake_hangs(Misbehaviour::Trickle, false);
}

/// A backend whose connects hang (its accept queue is full, so the kernel drops every SYN, as
/// it is for a backend host that vanished from the network): a login waits at most
/// `connect_timeout` on it, then goes on to the next backend in ring order, and the checker
/// takes it down.
#[test]
fn a_backend_whose_connects_hang_costs_the_connect_timeout() {
    use std::os::fd::AsRawFd;
    let pool = Pool::start(2);
    let d = director(&pool, false);
    let fake_ip = pool.spare_ip(251);
    let listener = TcpListener::bind((fake_ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    // A backlog of 0 holds one connection, which is never accepted: later SYNs are dropped.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _fillers: Vec<TcpStream> = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok())
        .collect();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "a connect to the full listener should hang"
    );
    let fake = d.backend_like(pool.backend(0).ip, fake_ip, Some(addr.port()));
    let users = {
        d.state.upsert_backend(fake);
        users_of(&d, fake_ip, 3)
    };
    let outcomes = logins_across_a_hang(&d, &users, "fake", Duration::from_secs(8), || {});
    let slowest = outcomes.iter().map(|o| o.slowest).max().unwrap();
    assert!(
        slowest < CONNECT_TIMEOUT + Duration::from_secs(5),
        "slowest login {slowest:?}"
    );
    wait_until("fake down", BOUND, || {
        (d.state.backends().get(fake_ip).unwrap().health == Health::Down).then_some(())
    });
    println!(
        "the checker's verdict: {:?}",
        d.health.as_ref().unwrap().last_result(fake_ip)
    );
}
