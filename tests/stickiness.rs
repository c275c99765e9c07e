//! Where users go, as a user sees it, against a real Dovecot pool: weights share new users
//! out in proportion; a user with a sticky record stays on its backend whatever happens to the
//! ring, until the record expires; concurrent first logins of one user agree on one backend.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use director::config::Config;
use director::state::backend::{AdminState, Backend, Health};
use director::state::router::RouteReason;
use support::client::{imap_login, Conn};
use support::director::{config_yaml, ready, DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};
use support::wait::wait_for;

/// Pool backend `i` as the director would have it had the configuration listed it with
/// `weight` (same ports and timeouts as the configured ones).
fn pool_backend(pool: &Pool, i: usize, weight: u32) -> Backend {
    let config = Config::parse(&config_yaml(pool, &DirectorOptions::default())).unwrap();
    let ip = pool.backend(i).ip;
    Backend {
        ip,
        host: ip.to_string().into(),
        weight,
        tag: "".into(),
        admin: AdminState::Up,
        health: Health::Up,
        settings: Arc::new(config.backend_settings(i)),
    }
}

/// The name (`backend1`...) of the pool backend at `ip`.
fn name(pool: &Pool, ip: IpAddr) -> String {
    pool.by_ip(ip)
        .unwrap_or_else(|| panic!("{ip} is not a pool backend"))
        .name
        .clone()
}

/// Where the director's current ring sends `username`, without binding it.
fn ring_answer(d: &TestDirector, username: &str) -> IpAddr {
    d.state
        .backends()
        .ring("")
        .and_then(|r| r.lookup(d.router.hash(username)))
        .expect("a ring with points")
}

/// Logs out and closes the connection, then waits until the director has ended the session
/// (so that, if it was the user's last, the record's `user_expire` clock has started).
fn logout(d: &TestDirector, mut c: Conn, username: &str) {
    let hash = d.router.hash(username);
    let before = d.sessions.count_user(hash);
    assert!(before > 0, "{username} has no session to log out");
    c.imap_ok("lo", "LOGOUT");
    drop(c);
    wait_for(
        &format!("{username}'s session to be unregistered after LOGOUT"),
        Duration::from_secs(15),
        || d.sessions.count_user(hash) < before,
    );
}

/// Waits until `username` has no live record (polling: the exact moment is not the point).
/// It asks the state, not the backends: a login to find out would refresh the record.
fn wait_until_expired(d: &TestDirector, username: &str, within: Duration) {
    let hash = d.router.hash(username);
    wait_for(&format!("{username}'s record to expire"), within, || {
        d.state.record(hash, Instant::now()).is_none()
    });
}

/// Weights 100/50/200 share 10,000 new users out as 2/7, 1/7 and 4/7, and real logins land
/// where the router says.
///
/// Tolerance: the shares are those of the ring's arcs, not of the weights. With M = 350 points
/// placed by MD5 (as good as uniform), the arcs of a backend with k points cover a fraction of
/// the ring distributed as Beta(k, M - k): variance k(M-k) / (M²(M+1)), i.e. a standard
/// deviation of 0.024, 0.019 and 0.026 for 100, 50 and 200 points. Sampling 10,000 users adds
/// p(1-p)/n (σ ≈ 0.005). The pool's addresses, and so the ring, differ from run to run; each
/// share must lie within 4 σ of its weight's share (all three together fail by chance about
/// once in 5,000 runs).
#[test]
fn weights_share_new_users_and_logins_land_where_the_router_says() {
    let pool = Pool::start(3);
    let weights = [100u32, 50, 200];
    let d = TestDirector::start(
        &pool,
        &DirectorOptions {
            weights: weights.to_vec(),
            ..DirectorOptions::default()
        },
    );

    // Real logins first, for users the router has not bound yet: each must land on the
    // backend the ring names, and the router must then agree. Ten users per backend at most,
    // so that every backend (even the light one) is logged into.
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut sessions = Vec::new();
    for i in 1..=200 {
        let u = user(i);
        let expected = name(&pool, ring_answer(&d, &u));
        if per_backend.get(&expected).copied().unwrap_or(0) >= 10 {
            continue;
        }
        let (c, landed) = imap_login(d.imap, &u, PASSWORD);
        assert_eq!(landed, expected, "{u} logged in");
        let route = ready(d.router.route(&u, "")).unwrap();
        assert_eq!(
            name(&pool, route.backend.ip),
            landed,
            "{u}: router after login"
        );
        assert_eq!(route.reason, RouteReason::Sticky, "{u}");
        *per_backend.entry(expected).or_default() += 1;
        sessions.push(c);
    }
    println!("real logins per backend: {per_backend:?}");
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    assert!(per_backend.values().all(|&n| n == 10), "{per_backend:?}");

    // 10,000 new users through the router.
    let n = 10_000usize;
    let mut counts: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for i in 0..n {
        let route = ready(d.router.route(&format!("share{i}@example.org"), "")).unwrap();
        assert_eq!(route.reason, RouteReason::Ring);
        *counts.entry(route.backend.ip).or_default() += 1;
    }
    let total_weight: u32 = weights.iter().sum();
    let m = total_weight as f64;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        let b = pool.backend(i);
        let share = counts.get(&b.ip).copied().unwrap_or(0) as f64 / n as f64;
        let expected = w as f64 / m;
        let k = w as f64;
        let ring_var = k * (m - k) / (m * m * (m + 1.0));
        let sample_var = expected * (1.0 - expected) / n as f64;
        let tolerance = 4.0 * (ring_var + sample_var).sqrt();
        report.push(format!(
            "{} weight {w}: share {share:.4}, weights say {expected:.4} ± {tolerance:.4}",
            b.name
        ));
        if (share - expected).abs() > tolerance {
            failures.push(b.name.clone());
        }
    }
    println!("measured shares of {n} users:\n  {}", report.join("\n  "));
    assert!(failures.is_empty(), "out of tolerance: {failures:?}");
    drop(sessions);
}

/// Users with records (live sessions, or logged out within `user_expire`) stay on their
/// backend when a heavy backend is added and another's weight changes; users without one
/// follow the new ring, and real logins of new users reach the added backend.
#[test]
fn ring_changes_move_nobody_with_a_record() {
    let (pool, d) = TestDirector::start_with_pool(4, &DirectorOptions::with_configured_backends(3));
    assert_eq!(d.state.backends().backends.len(), 3);
    let added = pool.backend(3);
    let reweighted = pool.backend(0);

    // Users 1..=12 keep their session open; 13..=24 log out (their record lives 15 min).
    let mut before: BTreeMap<String, String> = BTreeMap::new();
    let mut open = Vec::new();
    for i in 1..=24 {
        let u = user(i);
        let (c, landed) = imap_login(d.imap, &u, PASSWORD);
        assert_ne!(
            landed, added.name,
            "{u}: the 4th backend is not configured yet"
        );
        before.insert(u.clone(), landed);
        if i <= 12 {
            open.push(c);
        } else {
            logout(&d, c, &u);
        }
    }

    let old = d.state.backends();
    d.state.upsert_backend(pool_backend(&pool, 3, 1000));
    d.state.set_weight(reweighted.ip, 20).unwrap();
    let new = d.state.backends();
    assert_eq!(new.backends.len(), 4);

    // The change matters to most of them: the new ring would send them elsewhere.
    let would_move = before
        .iter()
        .filter(|(u, b)| name(&pool, ring_answer(&d, u)) != **b)
        .count();
    println!("users with records the new ring would move: {would_move}/24");
    assert!(would_move >= 12, "{would_move}");

    for (u, b) in &before {
        let (c, landed) = imap_login(d.imap, u, PASSWORD);
        assert_eq!(&landed, b, "{u} moved after the ring changed");
        open.push(c);
    }

    // Users never seen follow the new ring. Consistent hashing: the only ones whose answer
    // changes either go to the added backend or were on the one that lost points.
    let lookup = |set: &director::state::BackendSet, u: &str| {
        set.ring("")
            .and_then(|r| r.lookup(d.router.hash(u)))
            .unwrap()
    };
    let mut changed = 0;
    for i in 101..=170 {
        let u = user(i);
        let (was, now) = (lookup(&old, &u), lookup(&new, &u));
        let route = ready(d.router.route(&u, "")).unwrap();
        assert_eq!(route.reason, RouteReason::Ring, "{u}");
        assert_eq!(route.backend.ip, now, "{u}: router and new ring disagree");
        if was != now {
            changed += 1;
            assert!(
                now == added.ip || was == reweighted.ip,
                "{u} moved from {was} to {now}"
            );
        }
    }
    println!("new users whose backend changed: {changed}/70");
    // Weights 20/100/100/1000: about 1000/1220 of them now go to the added backend.
    assert!(changed >= 35, "{changed}/70");

    // Real first logins after the change land on the new ring's answer, often the new backend.
    let mut on_added = 0;
    for i in 171..=185 {
        let u = user(i);
        let expected = name(&pool, lookup(&new, &u));
        let (c, landed) = imap_login(d.imap, &u, PASSWORD);
        assert_eq!(landed, expected, "{u}");
        if landed == added.name {
            on_added += 1;
        }
        open.push(c);
    }
    println!("new users' real logins on the added backend: {on_added}/15");
    assert!(on_added >= 3, "{on_added}/15");
}

/// A logged-out user's record outlives the ring change for `user_expire`, then the user
/// follows the ring.
#[test]
fn record_expires_after_the_last_session() {
    let (pool, d) =
        TestDirector::start_with_pool(3, &DirectorOptions::with_extra("user_expire: 2s\n"));
    let u = user(7);
    let (c, first) = imap_login(d.imap, &u, PASSWORD);
    let old_ip = pool.backends.iter().find(|b| b.name == first).unwrap().ip;
    d.state.set_weight(old_ip, 0).unwrap();
    let new_name = name(&pool, ring_answer(&d, &u));
    assert_ne!(new_name, first);
    logout(&d, c, &u);

    // Right after the logout the record is alive: same backend, though its weight is 0.
    let (c, again) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(again, first, "{u} right after logout");
    logout(&d, c, &u);

    wait_until_expired(&d, &u, Duration::from_secs(10));
    let (c, later) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(later, new_name, "{u} after its record expired");
    logout(&d, c, &u);
}

/// While a session is open the record does not expire, however long past `user_expire`.
#[test]
fn record_with_a_live_session_never_expires() {
    let (pool, d) =
        TestDirector::start_with_pool(3, &DirectorOptions::with_extra("user_expire: 2s\n"));
    let u = user(8);
    let (mut held, first) = imap_login(d.imap, &u, PASSWORD);
    let old_ip = pool.backends.iter().find(|b| b.name == first).unwrap().ip;
    d.state.set_weight(old_ip, 0).unwrap();
    let new_name = name(&pool, ring_answer(&d, &u));
    assert_ne!(new_name, first);

    // Past user_expire, and past a few runs of the director's sweeper (every second).
    std::thread::sleep(Duration::from_millis(3500));
    let (c, second) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(second, first, "{u}: second login while a session is open");
    held.imap_ok("s1", "SELECT INBOX");

    // Once both sessions are over, the record expires and the ring decides.
    logout(&d, c, &u);
    logout(&d, held, &u);
    wait_until_expired(&d, &u, Duration::from_secs(10));
    let (c, later) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(
        later, new_name,
        "{u} after its sessions ended and the record expired"
    );
    logout(&d, c, &u);
}

/// Twenty simultaneous first logins of one user all reach the same backend; also while the
/// ring keeps changing under them, so that only the user's record can keep them together.
#[test]
fn concurrent_first_logins_agree_on_one_backend() {
    let (pool, d) = TestDirector::with_pool(3);
    let threads = 20;
    for (i, flip_ring) in [(190, false), (191, false), (192, true), (193, true)] {
        let u = user(i);
        assert!(d.state.record(d.router.hash(&u), Instant::now()).is_none());
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (barrier, u, addr) = (barrier.clone(), u.clone(), d.imap);
                std::thread::spawn(move || {
                    // Greeted first, so that the LOGINs leave as close together as possible.
                    let mut c = Conn::imap_greeted(addr);
                    barrier.wait();
                    let r = c.imap("a1", &format!("LOGIN {u} {PASSWORD}"));
                    assert!(r.last().unwrap().starts_with("a1 OK"), "{u}: {r:?}");
                    let backend = c.imap_backend();
                    (c, backend)
                })
            })
            .collect();
        // The ring's first choice for the user is switched off and on while the logins run.
        let target = ring_answer(&d, &u);
        let done = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (state, done) = (d.state.clone(), done.clone());
            std::thread::spawn(move || {
                let mut flips = 0;
                while flip_ring && !done.load(Ordering::Relaxed) {
                    state.set_weight(target, 0).unwrap();
                    std::thread::sleep(Duration::from_micros(300));
                    state.set_weight(target, 100).unwrap();
                    std::thread::sleep(Duration::from_micros(300));
                    flips += 1;
                }
                flips
            })
        };
        barrier.wait();
        let results: Vec<(Conn, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        let flips = flipper.join().unwrap();
        let mut landed: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, b) in &results {
            *landed.entry(b.as_str()).or_default() += 1;
        }
        println!("{u}: {landed:?}, ring flipped {flips} times");
        assert_eq!(landed.len(), 1, "{u} reached several backends: {landed:?}");
        let record = d.state.record(d.router.hash(&u), Instant::now()).unwrap();
        assert_eq!(&name(&pool, record.backend), results[0].1.as_str());
        assert_eq!(record.sessions as usize, threads);
        if flip_ring {
            assert!(flips > 0);
        }
    }
}
