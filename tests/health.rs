//! The health checker against real Dovecot backends: a killed backend is marked down and its
//! users log in elsewhere with no error seen by a client; a restarted one comes back up after
//! `rise` passes while moved users stay; admin decisions and a pause of checks are respected;
//! result codes tell a hung backend from a refused port from a wrong banner (a scripted fake).

mod support;

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use director::health::probe::CheckCode;
use director::state::backend::{AdminState, Health};
use director::state::ChecksPause;
use support::client::imap_login;
use support::director::{ready, DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};
use support::logins::{LoginLoop, Timed};
use support::wait::wait_until;

const INTERVAL: Duration = Duration::from_millis(500);
const FALL: u32 = 2;

/// An upper bound that proves the mechanism, generous for a debug build on a busy machine:
/// ten times `interval` x `fall`.
fn down_bound() -> Duration {
    INTERVAL * FALL * 10
}

fn options() -> DirectorOptions {
    DirectorOptions {
        extra: "health:\n  interval: 500ms\n  fast_interval: 200ms\n  rise: 2\n  fall: 2\n".into(),
        connect_timeout: "1s".into(),
        ..DirectorOptions::default()
    }
}

fn health_of(d: &TestDirector, ip: IpAddr) -> Health {
    d.state.backends().get(ip).expect("backend").health
}

fn admin_of(d: &TestDirector, ip: IpAddr) -> AdminState {
    d.state.backends().get(ip).expect("backend").admin
}

fn wait_health(d: &TestDirector, ip: IpAddr, h: Health, limit: Duration) -> Duration {
    let t = Instant::now();
    wait_until(&format!("{ip} health {h:?}"), limit, || {
        (health_of(d, ip) == h).then_some(())
    });
    t.elapsed()
}

fn last_code(d: &TestDirector, ip: IpAddr) -> Option<CheckCode> {
    d.health.as_ref().unwrap().last_result(ip).map(|r| r.code)
}

/// A pool of `backends` and a director checking them with [`options`], once every backend
/// has had a passing check.
fn checked(backends: usize) -> (Pool, TestDirector) {
    let (pool, d) = TestDirector::start_with_pool(backends, &options());
    wait_until("first checks", Duration::from_secs(10), || {
        pool.backends
            .iter()
            .all(|b| last_code(&d, b.ip) == Some(CheckCode::Ok))
            .then_some(())
    });
    (pool, d)
}

#[test]
fn failover_killed_backend_goes_down_and_comes_back() {
    let (pool, d) = checked(3);
    let checker = d.health.as_ref().expect("health checker enabled");
    let victim = pool.backend(0);

    // Users logged in through the director, sessions kept open.
    let mut sessions = Vec::new();
    for i in 0..30 {
        let u = user(100 + i);
        let (c, backend) = imap_login(d.imap, &u, PASSWORD);
        sessions.push((u, c, backend));
    }
    let on_victim: Vec<String> = sessions
        .iter()
        .filter(|(_, _, b)| *b == victim.name)
        .map(|(u, _, _)| u.clone())
        .collect();
    assert!(!on_victim.is_empty(), "no session on {}", victim.name);

    // Their logins (and others') go on while the backend dies.
    let mut loop_users = on_victim.clone();
    loop_users.extend((0..10).map(|i| user(150 + i)));
    let logins = LoginLoop::start(d.imap, loop_users);
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    victim.kill();
    let to_down = wait_health(&d, victim.ip, Health::Down, down_bound());
    let down_at = Instant::now();
    let down_after = down_at - killed;
    std::thread::sleep(Duration::from_secs(1));
    let results = logins.finish();

    let failures: Vec<&String> = results
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().err())
        .collect();
    // Logins that were under way at some time between the kill and the verdict.
    let overlapping = |(start, end, _): &&Timed| *start <= down_at && *end >= killed;
    let in_window = results.iter().filter(overlapping).count();
    let failed_in_window = results
        .iter()
        .filter(overlapping)
        .filter(|(_, _, r)| r.is_err())
        .count();
    let on_victim_after_kill = results
        .iter()
        .filter(|(t, _, r)| *t >= killed && r.as_ref().is_ok_and(|b| *b == victim.name))
        .count();
    println!(
        "failover: kill -> health down {down_after:?} (polled {to_down:?}); logins in that window: \
         {in_window}, failed: {failed_in_window}; logins in the whole run: {}, failed: {}",
        results.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert_eq!(
        on_victim_after_kill, 0,
        "a login landed on the dead backend"
    );
    assert!(in_window > 0, "no login during the failover window");
    let r = checker.last_result(victim.ip).unwrap();
    assert!(
        matches!(r.code, CheckCode::ConnectionRefused),
        "last result {r:?}"
    );

    // Its sessions ended; its users' records point elsewhere.
    for (u, c, b) in sessions.iter_mut() {
        if *b == victim.name {
            assert!(
                c.until_closed(Duration::from_secs(10)).is_some(),
                "{u}'s session on the dead backend is still open"
            );
        }
    }
    let hashes: Vec<u32> = on_victim.iter().map(|u| d.router.hash(u)).collect();
    wait_until(
        "records off the dead backend",
        Duration::from_secs(10),
        || {
            hashes
                .iter()
                .all(|h| {
                    d.state
                        .record(*h, Instant::now())
                        .is_none_or(|r| r.backend != victim.ip)
                })
                .then_some(())
        },
    );

    // Back up after `rise` passes; moved users stay where they are.
    let moved: Vec<(String, String)> = on_victim
        .iter()
        .map(|u| {
            let (_c, b) = imap_login(d.imap, u, PASSWORD);
            assert_ne!(b, victim.name, "{u}");
            (u.clone(), b)
        })
        .collect();
    let restarted = Instant::now();
    victim.start();
    let up_after = wait_health(&d, victim.ip, Health::Up, down_bound());
    println!(
        "failover: restart -> health up {:?} after the start returned ({:?} after it began)",
        up_after,
        restarted.elapsed()
    );
    assert_eq!(checker.last_result(victim.ip).unwrap().code, CheckCode::Ok);
    for (u, before) in &moved {
        let (_c, b) = imap_login(d.imap, u, PASSWORD);
        assert_eq!(&b, before, "{u} moved again after the backend came back");
    }
    assert_eq!(admin_of(&d, victim.ip), AdminState::Up);
}

#[test]
fn admin_down_and_maintenance_backends_are_not_checked() {
    let (pool, d) = checked(2);
    let checker = d.health.as_ref().unwrap();

    let a = pool.backend(0);
    for admin in [AdminState::Down, AdminState::Maintenance] {
        d.state.set_admin(a.ip, admin).unwrap();
        // A check already under way may still land.
        std::thread::sleep(Duration::from_millis(500));
        let before = checker.last_result(a.ip);
        // Checks would pass: the admin's decision stays.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(admin_of(&d, a.ip), admin);
        assert_eq!(checker.last_result(a.ip), before, "{admin:?}: checked");
        assert_eq!(health_of(&d, a.ip), Health::Up);
    }
    // Dead while in maintenance: not checked, so not marked down either.
    a.kill();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(health_of(&d, a.ip), Health::Up);
    assert_eq!(admin_of(&d, a.ip), AdminState::Maintenance);
    // Back to admin up: checked again, and found dead.
    d.state.set_admin(a.ip, AdminState::Up).unwrap();
    wait_health(&d, a.ip, Health::Down, down_bound());
    assert_eq!(admin_of(&d, a.ip), AdminState::Up);
    // Health down and admin down are separate: setting one leaves the other.
    d.state.set_admin(a.ip, AdminState::Down).unwrap();
    a.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        health_of(&d, a.ip),
        Health::Down,
        "checked while admin down"
    );
    assert_eq!(admin_of(&d, a.ip), AdminState::Down);
}

#[test]
fn paused_checks_leave_a_killed_backend_up_until_resumed() {
    let (pool, d) = checked(2);

    d.state.set_checks_pause(Some(ChecksPause {
        since: SystemTime::now(),
        until: None,
    }));
    let dead = pool.backend(0);
    let u = (40..200)
        .map(user)
        .find(|u| ready(d.router.route(u, "")).unwrap().backend.ip == dead.ip)
        .expect("a user of the backend");
    dead.kill();
    // Passive failover still works while paused.
    let (_c, b) = imap_login(d.imap, &u, PASSWORD);
    assert_ne!(b, dead.name);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        health_of(&d, dead.ip),
        Health::Up,
        "marked down while paused"
    );
    d.state.set_checks_pause(None);
    let t = wait_health(&d, dead.ip, Health::Down, down_bound());
    println!("paused checks: down {t:?} after resume");
}

/// A fake backend at `ip` that greets every connection with `banner` and keeps it open.
fn fake_backend(ip: IpAddr, banner: &'static str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(banner.as_bytes());
            open.push(c);
        }
    });
    port
}

#[test]
fn result_codes_tell_a_hung_backend_from_a_refused_port_from_a_wrong_banner() {
    let (pool, d) = checked(1);
    let checker = d.health.as_ref().unwrap();

    let b = pool.backend(0);
    let fake_ip = pool.spare_ip(250);
    let refused_ip = pool.spare_ip(251);

    // Backends added at run time are checked.
    let port = fake_backend(fake_ip, "220 smtp.example ESMTP\r\n");
    d.state
        .upsert_backend(d.backend_like(b.ip, fake_ip, Some(port)));
    d.state
        .upsert_backend(d.backend_like(b.ip, refused_ip, None));

    wait_health(&d, fake_ip, Health::Down, down_bound());
    assert_eq!(last_code(&d, fake_ip), Some(CheckCode::WrongResponse));
    let detail = checker.last_result(fake_ip).unwrap().detail;
    assert!(detail.contains("220 smtp.example"), "{detail}");
    wait_health(&d, refused_ip, Health::Down, down_bound());
    assert_eq!(
        last_code(&d, refused_ip),
        Some(CheckCode::ConnectionRefused)
    );

    // A hung backend: the greeting never comes (1 s step timeout in checks/imap.yaml).
    b.pause();
    wait_health(&d, b.ip, Health::Down, Duration::from_secs(20));
    let r = checker.last_result(b.ip).unwrap();
    b.resume();
    assert_eq!(r.code, CheckCode::ResponseTimeout, "{r:?}");
    assert!(r.latency >= Duration::from_millis(900), "{r:?}");
    wait_health(&d, b.ip, Health::Up, down_bound());

    // Removed backends are no longer checked.
    d.state.remove_backend(fake_ip).unwrap();
    wait_until("fake backend forgotten", Duration::from_secs(5), || {
        checker.last_result(fake_ip).is_none().then_some(())
    });
    let names: Vec<&str> = [
        "ok",
        "connection_refused",
        "wrong_response",
        "response_timeout",
    ]
    .to_vec();
    assert_eq!(
        [
            CheckCode::Ok,
            CheckCode::ConnectionRefused,
            CheckCode::WrongResponse,
            CheckCode::ResponseTimeout
        ]
        .map(|c| c.name())
        .to_vec(),
        names
    );
}
