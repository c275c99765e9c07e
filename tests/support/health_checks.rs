//! The health checker's failover against real Dovecot backends, shared by the 2.3 suite
//! (`tests/health.rs`) and the 2.4 one (`tests/dovecot24/`): checks every 500 ms, down after
//! 2 failures, and [`killed_backend_goes_down_and_comes_back`].

#![allow(dead_code)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use director::health::probe::CheckCode;
use director::state::backend::{AdminState, Health};

use super::client::imap_login;
use super::director::{DirectorOptions, TestDirector};
use super::dovecot::{user, Pool, PASSWORD};
use super::logins::{LoginLoop, Timed};
use super::wait::wait_until;

pub const INTERVAL: Duration = Duration::from_millis(500);
pub const FALL: u32 = 2;

/// An upper bound that proves the mechanism, generous for a debug build on a busy machine:
/// ten times `interval` x `fall`.
pub fn down_bound() -> Duration {
    INTERVAL * FALL * 10
}

pub fn options() -> DirectorOptions {
    DirectorOptions {
        extra: "health:\n  interval: 500ms\n  fast_interval: 200ms\n  rise: 2\n  fall: 2\n".into(),
        connect_timeout: "1s".into(),
        ..DirectorOptions::default()
    }
}

pub fn health_of(d: &TestDirector, ip: IpAddr) -> Health {
    d.state.backends().get(ip).expect("backend").health
}

pub fn admin_of(d: &TestDirector, ip: IpAddr) -> AdminState {
    d.state.backends().get(ip).expect("backend").admin
}

pub fn wait_health(d: &TestDirector, ip: IpAddr, h: Health, limit: Duration) -> Duration {
    let t = Instant::now();
    wait_until(&format!("{ip} health {h:?}"), limit, || {
        (health_of(d, ip) == h).then_some(())
    });
    t.elapsed()
}

pub fn last_code(d: &TestDirector, ip: IpAddr) -> Option<CheckCode> {
    d.health.as_ref().unwrap().last_result(ip).map(|r| r.code)
}

/// A director checking `pool` with [`options`], once every backend has had a passing check.
pub fn checked(pool: &Pool) -> TestDirector {
    let d = TestDirector::start(pool, &options());
    wait_until("first checks", Duration::from_secs(10), || {
        pool.backends
            .iter()
            .all(|b| last_code(&d, b.ip) == Some(CheckCode::Ok))
            .then_some(())
    });
    d
}

/// Over `pool` (three backends or more; the first is killed and started again): users with
/// open sessions and a loop of logins while the first backend dies. No client sees an error,
/// no login lands on the dead backend, its sessions end and its users' records move; once it
/// is back up (after `rise` passes) the moved users stay where they are.
pub fn killed_backend_goes_down_and_comes_back(pool: &Pool) {
    let d = checked(pool);
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
