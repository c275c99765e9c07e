//! Two directors in front of one pool, sharing their state through a real etcd: the three
//! ways two independent directors put one user on two backends (issue 10's first
//! paragraph), each ending with the user on one backend as the backends themselves report
//! it (`doveadm who`), plus admin changes and restarts seen by every director.

mod support;

use std::time::{Duration, Instant};

use support::admin_cli::AdminCli;
use support::client::{imap_login, Conn};
use support::cluster::{
    member_options, sessions_by_backend, start_member, start_members, wait_only_on,
};
use support::director::{config_yaml, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};
use support::etcd::EtcdCluster;
use support::logins::try_login;
use support::scrape::get;
use support::wait::wait_until;

/// The backend's health as director `cli` reports it.
fn health(cli: &AdminCli, ip: std::net::IpAddr) -> String {
    cli.backend_status(ip)["health"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn wait_health(cli: &AdminCli, ip: std::net::IpAddr, want: &str) {
    wait_until(&format!("{ip} {want}"), Duration::from_secs(15), || {
        (health(cli, ip) == want).then_some(())
    });
}

/// Sequence 1: a user moved by director 1 after its backend died, logging in through
/// director 2 once the backend is back, lands where director 1 moved it.
#[test]
fn a_move_after_a_backend_death_holds_on_the_other_director() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    let ds = start_members(&pool, &etcd.endpoints(), 2);
    let (c1, c2) = (AdminCli::of(&ds[0]), AdminCli::of(&ds[1]));
    let u = user(7);
    let (mut first, on) = imap_login(ds[0].imap, &u, PASSWORD);
    let dead = pool.backends.iter().find(|b| b.name == on).unwrap();
    let other = pool.backends.iter().find(|b| b.name != on).unwrap();
    dead.kill();
    wait_health(&c1, dead.ip, "down");
    wait_health(&c2, dead.ip, "down");
    assert!(first.ended(), "the session on the dead backend ended");
    // The client reconnects through director 1: it goes to the other backend.
    let (mut again, again_on) = imap_login(ds[0].imap, &u, PASSWORD);
    assert_eq!(again_on, other.name);
    dead.start();
    wait_health(&c1, dead.ip, "up");
    wait_health(&c2, dead.ip, "up");
    // Director 2 has no session of the user; the ring would send it back to `dead`.
    let (mut through_2, on_2) = imap_login(ds[1].imap, &u, PASSWORD);
    assert_eq!(on_2, other.name, "director 2 follows the shared record");
    wait_only_on(&pool, &u, &other.name);
    assert_eq!(
        sessions_by_backend(&pool, &u),
        vec![(other.name.clone(), 2)]
    );
    again.imap_ok("n1", "NOOP");
    through_2.imap_ok("n2", "NOOP");
}

/// Sequence 2: `move` and `down` on director 1 end the user's sessions on director 2 first,
/// and director 2 routes by them.
#[test]
fn move_and_down_on_one_director_hold_on_the_other() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    let ds = start_members(&pool, &etcd.endpoints(), 2);
    let (c1, c2) = (AdminCli::of(&ds[0]), AdminCli::of(&ds[1]));
    let u = user(11);
    let (mut held, on) = imap_login(ds[1].imap, &u, PASSWORD);
    let from = pool.backends.iter().find(|b| b.name == on).unwrap();
    let to = pool.backends.iter().find(|b| b.name != on).unwrap();

    let out = c1.ok(&["move", &u, &to.ip.to_string()]);
    assert!(out.contains("moved"), "{out}");
    assert!(
        held.ended(),
        "director 2's session was ended by director 1's move"
    );
    let (mut after, after_on) = imap_login(ds[1].imap, &u, PASSWORD);
    assert_eq!(after_on, to.name, "director 2 routes by the move");
    wait_only_on(&pool, &u, &to.name);

    // `down` on director 1: director 2 sees it, and its session there ends.
    c1.ok(&["down", &to.ip.to_string()]);
    assert_eq!(c2.backend_status(to.ip)["admin"], "down");
    assert!(
        after.ended(),
        "director 2's session on the downed backend ended"
    );
    let (_back, back_on) = imap_login(ds[1].imap, &u, PASSWORD);
    assert_eq!(back_on, from.name);
    wait_only_on(&pool, &u, &from.name);

    // Weights and kicks too.
    c2.ok(&["update", &from.ip.to_string(), "42"]);
    assert_eq!(c1.backend_status(from.ip)["weight"], 42);
    let (mut via_1, _) = imap_login(ds[0].imap, &u, PASSWORD);
    c2.ok(&["kick", &u]);
    assert!(
        via_1.ended(),
        "a kick on director 2 ends director 1's session"
    );
}

/// Sequence 3: one health verdict for the cluster, from one elected checker; admin state
/// survives a restart of every director.
#[test]
fn one_checker_one_verdict_and_state_survives_restarts() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    let mut ds = start_members(&pool, &etcd.endpoints(), 2);
    let c1 = AdminCli::of(&ds[0]);
    let checkers = |cli: &AdminCli| -> Vec<String> {
        let s = cli.json(&["status"]);
        assert_eq!(s["mode"], "cluster");
        s["cluster"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["checker"] == true)
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_until("two members", Duration::from_secs(10), || {
        (c1.json(&["status"])["cluster"]["members"]
            .as_array()
            .unwrap()
            .len()
            == 2)
            .then_some(())
    });
    assert_eq!(checkers(&c1).len(), 1, "exactly one checker");
    let b = pool.backend(0);
    b.kill();
    for d in &ds {
        wait_health(&AdminCli::of(d), b.ip, "down");
    }
    b.start();
    for d in &ds {
        wait_health(&AdminCli::of(d), b.ip, "up");
    }
    // An admin decision outlives every director.
    c1.ok(&["down", &pool.backend(1).ip.to_string()]);
    ds.clear();
    let d3 = start_member(&pool, &etcd.endpoints(), "d3");
    let c3 = AdminCli::of(&d3);
    assert_eq!(c3.backend_status(pool.backend(1).ip)["admin"], "down");
    wait_until("d3 checks", Duration::from_secs(10), || {
        (checkers(&c3) == vec!["d3".to_owned()]).then_some(())
    });
}

/// The director cut off from etcd fences itself before its lease can expire: its sessions
/// end, logins get a temporary failure, `/readyz` says why, admin changes fail clearly; the
/// other director moves the user without waiting for it past its lease; healed, it rejoins
/// by itself and follows what changed meanwhile.
#[test]
fn a_director_cut_off_from_etcd_fences_and_rejoins() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    let d1 = start_member(&pool, &etcd.endpoints(), "d1");
    let d2 = TestDirector::start_yaml(&config_yaml(
        &pool,
        &member_options(
            &etcd.cuttable_endpoints(),
            "d2",
            "metrics:\n  address: 127.0.0.1:0\n",
        ),
    ));
    let (c1, c2) = (AdminCli::of(&d1), AdminCli::of(&d2));
    let readyz = d2.metrics.expect("metrics listener");
    wait_until("d2 ready", Duration::from_secs(10), || {
        (get(readyz, "/readyz").0 == 200).then_some(())
    });
    let u = user(3);
    let (mut held, on) = imap_login(d2.imap, &u, PASSWORD);
    let to = pool.backends.iter().find(|b| b.name != on).unwrap();

    let mut cut = etcd.partition();
    cut.cut();
    let started = Instant::now();
    assert!(held.ended(), "the fenced director ended its session");
    let fenced_after = started.elapsed();
    assert!(
        fenced_after < Duration::from_secs(5),
        "fenced {fenced_after:?} after the cut, before the 5 s lease could expire"
    );
    let (code, body) = get(readyz, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cut off from the cluster"), "{body}");
    match try_login(d2.imap, &u) {
        Err(e) => assert!(e.contains("UNAVAILABLE"), "{e}"),
        Ok(b) => panic!("a fenced director logged {u} in on {b}"),
    }
    let mut pop3 = Conn::pop3_greeted(d2.pop3);
    let answer = pop3.pop3_user_pass(&u, PASSWORD);
    assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
    let refused = c2.run(&["update", &to.ip.to_string(), "7"], None);
    assert!(!refused.ok, "an admin change on the cut-off director fails");
    assert!(
        refused.stderr.contains("etcd") && refused.stderr.contains("nothing was changed"),
        "{}",
        refused.stderr
    );
    // The move on d1 waits for d2's acknowledgement only until d2's lease expires.
    let out = c1.ok(&["move", &u, &to.ip.to_string()]);
    assert!(out.contains("moved"), "{out}");
    assert_eq!(
        c1.backend_status(to.ip)["weight"],
        100,
        "nothing was queued"
    );

    cut.heal();
    wait_until("d2 rejoins", Duration::from_secs(15), || {
        (get(readyz, "/readyz").0 == 200).then_some(())
    });
    let (_c, back_on) = imap_login(d2.imap, &u, PASSWORD);
    assert_eq!(
        back_on, to.name,
        "the rejoined director follows the move it missed"
    );
    wait_only_on(&pool, &u, &to.name);
}

/// With `keep_sessions_when_fenced`, a cut-off director keeps relaying what it has (the
/// operator accepted the risk) and still refuses new logins.
#[test]
fn keep_sessions_when_fenced_keeps_them() {
    let pool = Pool::start(1);
    let etcd = EtcdCluster::start_one();
    let yaml = config_yaml(&pool, &member_options(&etcd.cuttable_endpoints(), "d1", "")).replace(
        "  lease_ttl: 5s\n",
        "  lease_ttl: 5s\n  keep_sessions_when_fenced: true\n",
    );
    let d = TestDirector::start_yaml(&yaml);
    let u = user(4);
    let (mut held, _) = imap_login(d.imap, &u, PASSWORD);
    let mut cut = etcd.partition();
    cut.cut();
    wait_until("fenced", Duration::from_secs(10), || {
        try_login(d.imap, &user(5))
            .err()
            .filter(|e| e.contains("UNAVAILABLE"))
    });
    held.imap_ok("n1", "NOOP");
    cut.heal();
}

/// A record lives while any director has a session of its user, however long, and expires
/// `user_expire` after the last one ends, for every director.
#[test]
fn records_live_with_sessions_on_any_director_and_expire_after_the_last() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    let top = "user_expire: 4s\n";
    let d1 = TestDirector::start_yaml(&config_yaml(
        &pool,
        &member_options(&etcd.endpoints(), "d1", top),
    ));
    let d2 = TestDirector::start_yaml(&config_yaml(
        &pool,
        &member_options(&etcd.endpoints(), "d2", top),
    ));
    let c2 = AdminCli::of(&d2);
    let u = user(21);
    let (mut held, on) = imap_login(d1.imap, &u, PASSWORD);
    let home = pool.backends.iter().find(|b| b.name == on).unwrap();
    // Nobody new goes to `home` now: only the record can send the user there.
    c2.ok(&["update", &home.ip.to_string(), "0"]);
    std::thread::sleep(Duration::from_secs(7));
    held.imap_ok("n1", "NOOP");
    let (_through_2, on_2) = imap_login(d2.imap, &u, PASSWORD);
    assert_eq!(
        on_2, home.name,
        "the record outlived user_expire while d1 had a session"
    );
    drop(_through_2);
    held.imap_ok("z", "LOGOUT");
    let current = |cli: &AdminCli| cli.json(&["status", &u])["current"].clone();
    wait_until("the record expires", Duration::from_secs(20), || {
        current(&c2).is_null().then_some(())
    });
    assert!(current(&AdminCli::of(&d1)).is_null(), "gone for d1 too");
}

/// etcd with authentication on: a director with the right user and password file joins; one
/// with a wrong password does not start, and says why.
#[test]
fn etcd_authentication() {
    let pool = Pool::start(1);
    let etcd = EtcdCluster::start_one();
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "director:dirpw"],
        &["role", "add", "director"],
        &[
            "role",
            "grant-permission",
            "director",
            "--prefix=true",
            "readwrite",
            "/director/",
        ],
        &["user", "grant-role", "director", "director"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(args);
    }
    let secret = pool.dir().join("etcd-password");
    let with_password = |password: &str| {
        std::fs::write(&secret, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        config_yaml(&pool, &member_options(&etcd.endpoints(), "d1", "")).replace(
            "    connect_timeout: 1s\n",
            &format!(
                "    connect_timeout: 1s\n    user: director\n    password_file: {}\n",
                secret.display()
            ),
        )
    };
    let d = TestDirector::start_yaml(&with_password("dirpw"));
    let (_c, _) = imap_login(d.imap, &user(1), PASSWORD);
    drop(d);
    let config = director::config::Config::parse(&with_password("wrong")).unwrap();
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(director::server::Director::build(&config))
        .err()
        .expect("a wrong etcd password stops the start");
    eprintln!("the start fails with: {}", err.0);
    assert!(
        err.0.contains("cluster.etcd") && err.0.contains("authentication failed"),
        "{}",
        err.0
    );
}

/// A login through a director that does not check finds a dead backend: the checker (another
/// director, whose own checks are far apart) hears of it and takes the backend down at once.
#[test]
fn a_login_failure_on_any_director_reaches_the_checker() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    // Checks every 60 s: only a suspicion can bring a backend down within seconds.
    let slow = "health:\n  enabled: true\n  interval: 60s\n  fast_interval: 200ms\n";
    let options = |id: &str| {
        let mut o = member_options(&etcd.endpoints(), id, "");
        o.extra = o.extra.replace(support::cluster::FAST_HEALTH, slow);
        o
    };
    let d1 = TestDirector::start_yaml(&config_yaml(&pool, &options("d1")));
    let c1 = AdminCli::of(&d1);
    wait_until("d1 checks", Duration::from_secs(10), || {
        c1.json(&["status"])["cluster"]["checker"]
            .as_bool()
            .filter(|c| *c)
    });
    // The first round of checks is done before d2 starts.
    wait_until("first checks", Duration::from_secs(10), || {
        pool.backends
            .iter()
            .all(|b| !c1.backend_status(b.ip)["check"].is_null())
            .then_some(())
    });
    let d2 = TestDirector::start_yaml(&config_yaml(&pool, &options("d2")));
    let u = user(31);
    let (mut first, home) = imap_login(d2.imap, &u, PASSWORD);
    first.imap_ok("z", "LOGOUT");
    let dead = pool.backends.iter().find(|b| b.name == home).unwrap();
    let live = pool.backends.iter().find(|b| b.name != home).unwrap();
    dead.kill();
    let started = Instant::now();
    // The login waits for the checker's verdict and move, then lands on the live backend.
    let (_c, on) = imap_login(d2.imap, &u, PASSWORD);
    assert_eq!(on, live.name);
    assert_eq!(health(&c1, dead.ip), "down");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "down after {:?}: the suspicion did not reach the checker",
        started.elapsed()
    );
}

/// A director reads a state larger than one etcd answer (gRPC's 4 MiB) page by page, at one
/// revision, and routes by it.
#[test]
fn a_large_state_loads_in_pages() {
    let pool = Pool::start(2);
    let etcd = EtcdCluster::start_one();
    let home = pool.backend(1);
    // 25,000 records (2.5 pages), 128 puts per transaction (etcd's default limit).
    let records = 25_000u32;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    for chunk in (0..records).collect::<Vec<_>>().chunks(128) {
        // etcdctl txn: no comparisons (an empty line), the puts, an empty line, no failure ops.
        let mut txn = String::from("\n");
        for h in chunk {
            txn += &format!(
                "put /director/users/{:08x} {{\"b\":\"{}\",\"r\":{now_ms}}}\n",
                h * 7919,
                home.ip
            );
        }
        txn += "\n\n";
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
            .arg("txn");
        let ran = support::command::run(&mut cmd, Some(txn.as_bytes())).unwrap();
        assert!(ran.ok, "{}", ran.text());
    }
    let d = start_member(&pool, &etcd.endpoints(), "d1");
    let status = AdminCli::of(&d).json(&["status"]);
    assert_eq!(status["records"], records, "every record loaded");
    assert_eq!(
        AdminCli::of(&d).backend_status(home.ip)["users"],
        records,
        "all on the backend their records name"
    );
}
