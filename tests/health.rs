//! The health checker against real Dovecot backends: a killed backend is marked down and its
//! users log in elsewhere with no error seen by a client; a restarted one comes back up after
//! `rise` passes while moved users stay; admin decisions and a pause of checks are respected;
//! result codes tell a hung backend from a refused port from a wrong banner (a scripted fake).

mod support;

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use director::health::probe::CheckCode;
use director::state::backend::{AdminState, Health};
use director::state::ChecksPause;
use support::client::imap_login;
use support::director::{ready, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};
use support::health_checks::{self, admin_of, down_bound, health_of, last_code, wait_health};
use support::wait::wait_until;

/// A pool of `backends` and a director checking them, once every backend has had a passing
/// check.
fn checked(backends: usize) -> (Pool, TestDirector) {
    let pool = Pool::start(backends);
    let d = health_checks::checked(&pool);
    (pool, d)
}

#[test]
fn failover_killed_backend_goes_down_and_comes_back() {
    health_checks::killed_backend_goes_down_and_comes_back(&Pool::start(3));
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
