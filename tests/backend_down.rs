//! A backend that is dead or hung when a user logs in, against real Dovecot: a user with no
//! session goes to the next backend in ring order and stays there; with nowhere to go the
//! client is told to try later (IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`), not that
//! its password is wrong, and may try again on the same connection.

mod support;

use std::time::{Duration, Instant};

use director::state::router::RouteReason;
use support::client::{imap_login, pop3_login, quote, Conn};
use support::director::{ready, DirectorOptions, TestDirector};
use support::dovecot::{user, PASSWORD};
use support::logs::{login_lines, wait_login};

fn imap_login_line(u: &str) -> String {
    format!("LOGIN {} {}", quote(u), quote(PASSWORD))
}

#[test]
fn dead_backend_sends_a_new_user_to_the_next_in_ring_order_and_it_sticks() {
    let (pool, d) = TestDirector::with_pool(3);
    // Two users whose ring backend is the same one: one for IMAP, one for POP3.
    let first = ready(d.router.route(&user(50), "")).unwrap();
    let dead = first.backend.ip;
    let other = (51..200)
        .map(user)
        .find(|u| ready(d.router.route(u, "")).unwrap().backend.ip == dead)
        .expect("another user on the same backend");
    let (ui, up) = (user(50), other);
    let next_i = pool.by_ip(first.fallbacks.first().unwrap().ip).unwrap();
    let next_p = pool
        .by_ip(
            ready(d.router.route(&up, ""))
                .unwrap()
                .fallbacks
                .first()
                .unwrap()
                .ip,
        )
        .unwrap();
    let dead = pool.by_ip(dead).unwrap();
    dead.kill();

    let (mut imap, backend) = imap_login(d.imap, &ui, PASSWORD);
    assert_eq!(backend, next_i.name, "IMAP login after {} died", dead.name);
    let mut pop3 = pop3_login(d.pop3, &up, PASSWORD);
    wait_login(next_p, "pop3-login", &up);
    for u in [&ui, &up] {
        let route = ready(d.router.route(u, "")).unwrap();
        assert_eq!(route.reason, RouteReason::Sticky, "{u}");
        assert_ne!(
            route.backend.ip, dead.ip,
            "{u}: record still on the dead backend"
        );
    }
    imap.imap_ok("z", "LOGOUT");
    pop3.pop3_ok("QUIT");

    // The dead backend comes back; the users stay where they were moved, in both protocols.
    dead.start();
    let (_imap, backend) = imap_login(d.imap, &ui, PASSWORD);
    assert_eq!(backend, next_i.name, "{ui}'s next login");
    let (_imap2, backend) = imap_login(d.imap, &up, PASSWORD);
    assert_eq!(backend, next_p.name, "{up}'s next login (IMAP after POP3)");
    let _pop3 = pop3_login(d.pop3, &ui, PASSWORD);
    wait_login(next_i, "pop3-login", &ui);
    for u in [&ui, &up] {
        assert!(login_lines(&dead.log(), "imap-login", u).is_empty(), "{u}");
        assert!(login_lines(&dead.log(), "pop3-login", u).is_empty(), "{u}");
    }
}

#[test]
fn all_backends_dead_is_unavailable_and_a_retry_works_once_one_is_back() {
    let (pool, d) = TestDirector::with_pool(2);
    for b in &pool.backends {
        b.kill();
    }
    let (ui, up) = (user(60), user(61));
    let mut imap = Conn::imap_greeted(d.imap);
    let r = imap.imap("a", &imap_login_line(&ui));
    assert!(r.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{r:?}");
    imap.imap_ok("b", "NOOP");
    let mut pop3 = Conn::pop3_greeted(d.pop3);
    let e = pop3.pop3_user_pass(&up, PASSWORD);
    assert!(e.starts_with("-ERR [SYS/TEMP]"), "{e}");
    pop3.pop3_ok("NOOP");
    // More tries than max_auth_failures (3): a temporary failure is not a failed login.
    for _ in 0..3 {
        let r = imap.imap("c", &imap_login_line(&ui));
        assert!(r.last().unwrap().starts_with("c NO [UNAVAILABLE]"), "{r:?}");
        let e = pop3.pop3_user_pass(&up, PASSWORD);
        assert!(e.starts_with("-ERR [SYS/TEMP]"), "{e}");
    }

    let back = pool.backend(0);
    back.start();
    imap.imap_ok("d", &imap_login_line(&ui));
    assert_eq!(imap.imap_backend(), back.name);
    let ok = pop3.pop3_user_pass(&up, PASSWORD);
    assert!(ok.starts_with("+OK"), "{ok}");
    pop3.pop3_ok("STAT");
    wait_login(back, "pop3-login", &up);
}

/// The backend timeouts of these tests.
fn short_timeouts() -> DirectorOptions {
    DirectorOptions {
        connect_timeout: "1s".into(),
        login_timeout: "1s".into(),
        ..DirectorOptions::default()
    }
}

/// How long a login against a hung backend may take: the 1 s login timeout plus slack for a
/// debug build on a busy machine.
const HUNG_LIMIT: Duration = Duration::from_secs(4);

#[test]
fn hung_only_backend_is_unavailable_within_the_timeout() {
    let (pool, d) = TestDirector::start_with_pool(1, &short_timeouts());
    let b = pool.backend(0);
    let (ui, up) = (user(70), user(71));
    let mut imap = Conn::imap_greeted(d.imap);
    let mut pop3 = Conn::pop3_greeted(d.pop3);
    b.pause();

    let t = Instant::now();
    let r = imap.imap("a", &imap_login_line(&ui));
    let took = t.elapsed();
    assert!(r.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{r:?}");
    assert!(
        took >= Duration::from_millis(900) && took < HUNG_LIMIT,
        "{took:?}"
    );
    let t = Instant::now();
    let e = pop3.pop3_user_pass(&up, PASSWORD);
    let took = t.elapsed();
    assert!(e.starts_with("-ERR [SYS/TEMP]"), "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < HUNG_LIMIT,
        "{took:?}"
    );

    b.resume();
    imap.imap_ok("b", &imap_login_line(&ui));
    assert_eq!(imap.imap_backend(), b.name);
    let ok = pop3.pop3_user_pass(&up, PASSWORD);
    assert!(ok.starts_with("+OK"), "{ok}");
}

#[test]
fn hung_backend_sends_a_new_user_to_the_next_in_ring_order() {
    let (pool, d) = TestDirector::start_with_pool(2, &short_timeouts());
    let u = user(72);
    let route = ready(d.router.route(&u, "")).unwrap();
    let hung = pool.by_ip(route.backend.ip).unwrap();
    let next = pool.by_ip(route.fallbacks.first().unwrap().ip).unwrap();
    hung.pause();
    let t = Instant::now();
    let (_c, backend) = imap_login(d.imap, &u, PASSWORD);
    let took = t.elapsed();
    hung.resume();
    assert_eq!(backend, next.name);
    assert!(took < HUNG_LIMIT, "{took:?}");
    // And it stays there once the hung backend answers again.
    let (_c2, backend) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(backend, next.name);
}
