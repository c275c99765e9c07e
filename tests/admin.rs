//! The admin interface against real Dovecot: the `director` binary's verbs talk to a running
//! director (in-process here) through the admin socket named in the same configuration file.
//! Users change backend only with their sessions ended first; adding backends or changing
//! weights moves nobody with a record; maintenance lets allowed test users through; admin
//! state survives a restart; the TCP API needs its token; dumps (ours and a real Dovecot
//! director's) import.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use director::state::backend::AdminState;
use support::admin_cli::AdminCli;
use support::client::{imap_login, Conn};
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, RefDirector, PASSWORD};
use support::ports::free_port;
use support::wait::wait_for;

/// A pool of `backends`, a director with `options` over it, and the CLI for that director.
fn with_cli(backends: usize, options: &DirectorOptions) -> (Pool, TestDirector, AdminCli) {
    let (pool, d) = TestDirector::start_with_pool(backends, options);
    let cli = AdminCli::of(&d);
    (pool, d, cli)
}

/// A user (from `from` on) whose ring answer is `ip` now, among the pool's users.
fn user_hashed_to(d: &TestDirector, ip: IpAddr, from: usize) -> String {
    (from..=200)
        .map(user)
        .find(|u| {
            d.state
                .backends()
                .ring("")
                .and_then(|r| r.lookup(d.router.hash(u)))
                == Some(ip)
        })
        .unwrap_or_else(|| panic!("no user hashed to {ip}"))
}

fn record_of(d: &TestDirector, username: &str) -> Option<IpAddr> {
    d.state
        .record(d.router.hash(username), Instant::now())
        .map(|r| r.backend)
}

/// Whether the session is still usable (a NOOP answers OK).
fn alive(c: &mut Conn) -> bool {
    let r = c.imap("n1", "NOOP");
    r.last().is_some_and(|l| l.starts_with("n1 OK"))
}

#[test]
fn status_map_add_update_remove_with_users_logged_in() {
    let (pool, d, cfg) = with_cli(3, &DirectorOptions::with_configured_backends(2));
    let (a, b, c) = (pool.backend(0), pool.backend(1), pool.backend(2));
    let mut open = Vec::new();
    let mut landed = Vec::new();
    for i in 1..=10 {
        let (conn, name) = imap_login(d.imap, &user(i), PASSWORD);
        open.push(conn);
        landed.push(name);
    }

    let human = cfg.ok(&["status"]);
    assert!(
        human.contains(&a.ip.to_string()) && human.contains(&b.ip.to_string()),
        "{human}"
    );
    assert!(human.contains("health checks: running"), "{human}");
    let s = cfg.json(&["status"]);
    assert_eq!(s["backends"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["records"], 10, "{s}");
    assert_eq!(s["sessions"], 10, "{s}");
    let users: u64 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["users"].as_u64().unwrap())
        .sum();
    assert_eq!(users, 10);
    assert_eq!(cfg.backend_status(a.ip)["weight"], 100);
    assert_eq!(cfg.backend_status(a.ip)["admin"], "up");
    assert_eq!(cfg.backend_status(a.ip)["health"], "up");
    assert!(cfg.backend_status(a.ip)["check"].is_null());

    // status USER and map know the users.
    let u1 = cfg.json(&["status", &user(1)]);
    let current: IpAddr = u1["current"].as_str().unwrap().parse().unwrap();
    assert_eq!(pool.by_ip(current).unwrap().name, landed[0]);
    assert_eq!(u1["hashed"], u1["current"], "{u1}");
    assert_eq!(u1["sessions"], 1);
    assert!(u1["expires_in_secs"].is_null());
    let human = cfg.ok(&["status", &user(1)]);
    assert!(
        human.contains("Current:") && human.contains("Hashed:"),
        "{human}"
    );
    let map = cfg.json(&["map"]);
    assert_eq!(map["users"].as_array().unwrap().len(), 10, "{map}");
    assert!(map["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["user"] == user(1)));
    let on_a = cfg.json(&["map", &a.ip.to_string()]);
    assert!(on_a["users"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["backend"] == a.ip.to_string()));
    assert!(cfg.ok(&["map"]).contains(&user(1)));

    // Adding a heavy backend and changing a weight moves nobody with a record.
    let before: Vec<Option<IpAddr>> = (1..=10).map(|i| record_of(&d, &user(i))).collect();
    let out = cfg.ok(&["add", &c.ip.to_string(), "900"]);
    assert!(out.contains("added"), "{out}");
    assert_eq!(cfg.backend_status(c.ip)["weight"], 900);
    cfg.ok(&["update", &a.ip.to_string(), "0"]);
    assert_eq!(cfg.backend_status(a.ip)["weight"], 0);
    let after: Vec<Option<IpAddr>> = (1..=10).map(|i| record_of(&d, &user(i))).collect();
    assert_eq!(before, after);
    for conn in &mut open {
        assert!(alive(conn));
    }
    // A weight above the maximum is refused with the reason.
    cfg.fails(
        &["update", &b.ip.to_string(), "1200"],
        None,
        "above the maximum 1000",
    );
    cfg.fails(
        &["down", "10.255.255.254"],
        None,
        "no backend 10.255.255.254",
    );

    // A new user of the added backend logs in there; `remove` ends its session and its
    // next login lands elsewhere.
    let newbie = user_hashed_to(&d, c.ip, 11);
    let (mut conn, name) = imap_login(d.imap, &newbie, PASSWORD);
    assert_eq!(name, c.name);
    let out = cfg.ok(&["remove", &c.ip.to_string()]);
    assert!(
        out.contains("1 moved") && out.contains("1 sessions ended"),
        "{out}"
    );
    assert!(conn.ended(), "session on the removed backend still open");
    let (_conn, name) = imap_login(d.imap, &newbie, PASSWORD);
    assert_eq!(
        name, b.name,
        "weight 0 on {} leaves only {}",
        a.name, b.name
    );
    assert_eq!(
        cfg.json(&["status"])["backends"].as_array().unwrap().len(),
        2
    );
    drop(open);
}

#[test]
fn move_kick_down_and_up() {
    let (pool, d, cfg) = with_cli(2, &DirectorOptions::default());
    let (a, b) = (pool.backend(0), pool.backend(1));
    let u = user_hashed_to(&d, a.ip, 1);

    // move USER HOST: the open session is ended; the next login lands on HOST.
    let (mut conn, name) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(name, a.name);
    let out = cfg.ok(&["move", &u, &b.ip.to_string()]);
    assert!(
        out.contains("1 moved") && out.contains("1 sessions ended"),
        "{out}"
    );
    assert!(conn.ended());
    let (mut conn, name) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(name, b.name);
    assert_eq!(cfg.json(&["status", &u])["current"], b.ip.to_string());

    // kick: sessions end, the record stays.
    let out = cfg.ok(&["kick", &u]);
    assert!(out.contains("1 sessions ended"), "{out}");
    assert!(conn.ended());
    let (_c, name) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(name, b.name);

    // down: users moved off (sessions ended); new logins avoid it; up lets it take new
    // users again while the moved ones stay where they went.
    let v = user_hashed_to(&d, b.ip, 1);
    let (mut vc, name) = imap_login(d.imap, &v, PASSWORD);
    assert_eq!(name, b.name);
    drop(_c);
    let out = cfg.ok(&["down", &b.ip.to_string()]);
    assert!(out.contains("sessions ended"), "{out}");
    assert!(vc.ended());
    assert_eq!(cfg.backend_status(b.ip)["admin"], "down");
    let (_vc, name) = imap_login(d.imap, &v, PASSWORD);
    assert_eq!(name, a.name);
    cfg.ok(&["up", &b.ip.to_string()]);
    assert_eq!(cfg.backend_status(b.ip)["admin"], "up");
    let (_vc2, name) = imap_login(d.imap, &v, PASSWORD);
    assert_eq!(name, a.name, "a moved user stays where it went");
    let after_v: usize = v
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap();
    let fresh = user_hashed_to(&d, b.ip, after_v + 1);
    let (_f, name) = imap_login(d.imap, &fresh, PASSWORD);
    assert_eq!(name, b.name);
}

#[test]
fn flush_safe_and_forced() {
    let (pool, d, cfg) = with_cli(2, &DirectorOptions::default());
    let (a, b) = (pool.backend(0), pool.backend(1));
    let [on_a, on_b] = [a.ip, b.ip].map(|ip| user_hashed_to(&d, ip, 1));
    let (mut ca, _) = imap_login(d.imap, &on_a, PASSWORD);
    let (mut cb, _) = imap_login(d.imap, &on_b, PASSWORD);

    // Nothing to do while the ring agrees with the records.
    let out = cfg.ok(&["flush", "all"]);
    assert!(out.contains("2 stayed"), "{out}");
    assert!(alive(&mut ca) && alive(&mut cb));

    // The runbook: weight 0, then flush: the users of A are sent where the ring now
    // sends them, their sessions ended first.
    cfg.ok(&["update", &a.ip.to_string(), "0"]);
    let out = cfg.ok(&["flush", &a.ip.to_string()]);
    assert!(
        out.contains("1 moved") && out.contains("1 sessions ended"),
        "{out}"
    );
    assert!(ca.ended());
    assert_eq!(record_of(&d, &on_a), Some(b.ip));
    let (_ca, name) = imap_login(d.imap, &on_a, PASSWORD);
    assert_eq!(name, b.name);
    assert!(alive(&mut cb), "a user of B is untouched");

    // --force only drops the records: sessions go on.
    let out = cfg.ok(&["flush", &b.ip.to_string(), "--force"]);
    assert!(out.contains("2 records dropped"), "{out}");
    assert!(!out.contains("sessions ended"), "{out}");
    assert!(alive(&mut cb));
    assert_eq!(record_of(&d, &on_b), None);
}

#[test]
fn maintenance_with_an_allowed_user_and_its_end() {
    let (pool, d, cfg) = with_cli(2, &DirectorOptions::default());
    let (a, b) = (pool.backend(0), pool.backend(1));
    let [normal, tester] = [a.ip, b.ip].map(|ip| user_hashed_to(&d, ip, 1));
    let newcomer = user_hashed_to(&d, a.ip, 100);
    let (mut nc, name) = imap_login(d.imap, &normal, PASSWORD);
    assert_eq!(name, a.name);
    cfg.ok(&["update", &a.ip.to_string(), "70"]);

    let out = cfg.ok(&[
        "maintenance",
        &a.ip.to_string(),
        "start",
        "--allow-user",
        &tester,
    ]);
    assert!(out.contains("maintenance started"), "{out}");
    assert!(nc.ended(), "the normal user's session on A is ended");
    let st = cfg.backend_status(a.ip);
    assert_eq!(st["admin"], "maintenance");
    assert_eq!(st["weight"], 0);
    assert_eq!(st["maintenance"]["previous_weight"], 70);
    assert_eq!(st["maintenance"]["allowed_users"][0], tester.as_str());
    assert!(cfg.ok(&["status"]).contains("allowed users"));
    let (_nc, name) = imap_login(d.imap, &normal, PASSWORD);
    assert_eq!(name, b.name, "moved off A");
    let (_new, name) = imap_login(d.imap, &newcomer, PASSWORD);
    assert_eq!(name, b.name, "new logins avoid A");
    let (mut tc, name) = imap_login(d.imap, &tester, PASSWORD);
    assert_eq!(name, a.name, "the allowed user is let onto A");
    assert_eq!(
        cfg.json(&["status", &tester])["maintenance_backend"],
        a.ip.to_string()
    );

    cfg.ok(&["maintenance", &a.ip.to_string(), "stop"]);
    let st = cfg.backend_status(a.ip);
    assert_eq!(st["admin"], "up");
    assert_eq!(st["weight"], 70, "the previous weight is restored");
    assert!(st["maintenance"].is_null());
    assert!(alive(&mut tc));

    // --for ends it by itself.
    cfg.ok(&["maintenance", &a.ip.to_string(), "start", "--for", "2s"]);
    assert_eq!(cfg.backend_status(a.ip)["admin"], "maintenance");
    assert!(tc.ended(), "the tester is no longer allowed: moved off");
    wait_for("maintenance ends after 2s", Duration::from_secs(8), || {
        d.state.backends().get(a.ip).unwrap().admin == AdminState::Up
    });
    assert_eq!(cfg.backend_status(a.ip)["weight"], 70);
    cfg.fails(
        &["maintenance", &a.ip.to_string(), "stop"],
        None,
        "not in maintenance",
    );
}

#[test]
fn admin_state_survives_a_restart_and_dump_reimports() {
    let pool = Pool::start(4);
    let state_file = pool.dir().join("var").join("state.yaml");
    let options = DirectorOptions {
        configured_backends: Some(3),
        extra: format!("state_file: {}\nuser_expire: 15m\n", state_file.display()),
        ..DirectorOptions::default()
    };
    let ips: Vec<String> = (0..4).map(|i| pool.backend(i).ip.to_string()).collect();
    let tester = user(7);
    let d = TestDirector::start(&pool, &options);
    let cfg = AdminCli::of(&d);
    cfg.ok(&["down", &ips[0]]);
    cfg.ok(&[
        "maintenance",
        &ips[1],
        "start",
        "--allow-user",
        &tester,
        "--for",
        "2h",
    ]);
    cfg.ok(&["update", &ips[2], "55"]);
    cfg.ok(&["add", &ips[3], "20", "--tag", "vip"]);
    cfg.ok(&["checks", "pause", "--for", "30m"]);
    let s = cfg.json(&["status"]);
    let until = s["checks_paused"]["until"]
        .as_u64()
        .expect("paused with an end");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 1790..=now + 1801).contains(&until), "{s}");
    assert!(cfg.ok(&["status"]).contains("health checks: paused until"));
    assert!(d.state.checks_pause().is_some());
    let dump = cfg.ok(&["dump"]);
    assert!(std::fs::read_to_string(&state_file)
        .unwrap()
        .contains("maintenance"));
    drop(d);

    // A restart with the same state file keeps it all.
    let d = TestDirector::start(&pool, &options);
    let cfg = AdminCli::of(&d);
    let set = d.state.backends();
    assert_eq!(set.backends.len(), 4);
    assert_eq!(set.get(pool.backend(0).ip).unwrap().admin, AdminState::Down);
    assert_eq!(
        set.get(pool.backend(1).ip).unwrap().admin,
        AdminState::Maintenance
    );
    assert_eq!(set.get(pool.backend(1).ip).unwrap().weight, 0);
    assert_eq!(set.get(pool.backend(2).ip).unwrap().weight, 55);
    assert_eq!(&*set.get(pool.backend(3).ip).unwrap().tag, "vip");
    assert!(d.state.maintenance()[&pool.backend(1).ip].allows(&tester));
    assert!(d.state.checks_pause().is_some());
    let (_c, name) = imap_login(d.imap, &tester, PASSWORD);
    assert_eq!(
        name,
        pool.backend(1).name,
        "the allowed user after the restart"
    );
    let strip_for = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.split(" --for").next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(strip_for(&cfg.ok(&["dump"])), strip_for(&dump));
    drop(d);

    // The dump, imported into a fresh director (no state file), gives the same state.
    let fresh = TestDirector::start(&pool, &DirectorOptions::with_configured_backends(3));
    let cfg = AdminCli::of(&fresh);
    let r = cfg.run(&["import", "-"], Some(&dump));
    assert!(r.ok, "import: {}\n{}", r.stdout, r.stderr);
    assert_eq!(strip_for(&cfg.ok(&["dump"])), strip_for(&dump));

    // A line that is not an admin change is refused before anything runs.
    cfg.fails(
        &["import", "-"],
        Some("director kick someone\n"),
        "can be imported",
    );
}

/// Sends one HTTP request to the TCP admin API; `None` when the connection is closed
/// without an answer.
fn http(addr: SocketAddr, token: Option<&str>, body: &str) -> Option<(u16, String)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    http_with_authorization(addr, auth.as_deref(), body)
}

/// [`http`] with the whole `Authorization` header value given (scheme included).
fn http_with_authorization(
    addr: SocketAddr,
    authorization: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let req = format!(
        "POST /v1/command HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(req.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if raw.is_empty() {
        return None;
    }
    let (status, body) = director::admin::client::parse_response(&raw).unwrap();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn tcp_admin_needs_the_token_and_an_allowed_network() {
    let pool = Pool::start(1);
    let token = "s3cret-token-0123456789";
    let token_file = pool.dir().join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tcp = |allow: &str, port: u16| {
        DirectorOptions::with_extra(&format!(
            "admin:\n  socket: {}/tcp-{port}.sock\n  tcp:\n    address: 127.0.0.1:{port}\n    token_file: {}\n    allow_from: [{allow}]\n",
            pool.dir().display(),
            token_file.display()
        ))
    };
    let port = free_port();
    let d = TestDirector::start(&pool, &tcp("127.0.0.0/8", port));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let status = r#"{"verb":"status"}"#;
    let (code, body) = http(addr, None, status).unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, _) = http(addr, Some("wrong-token-0123456789"), status).unwrap();
    assert_eq!(code, 401);
    let (code, body) = http(addr, Some(token), status).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&pool.backend(0).ip.to_string()), "{body}");
    // The scheme is case-insensitive (RFC 7235); another scheme is not a bearer token.
    for scheme in ["bearer", "BEARER", "bEaReR "] {
        let (code, body) =
            http_with_authorization(addr, Some(&format!("{scheme} {token}")), status).unwrap();
        assert_eq!(code, 200, "{scheme}: {body}");
    }
    let (code, _) = http_with_authorization(addr, Some(&format!("Basic {token}")), status).unwrap();
    assert_eq!(code, 401);
    let down = format!(r#"{{"verb":"down","host":"{}"}}"#, pool.backend(0).ip);
    let (code, _) = http(addr, Some("wrong-token-0123456789"), &down).unwrap();
    assert_eq!(code, 401);
    assert_eq!(
        d.state.backends().get(pool.backend(0).ip).unwrap().admin,
        AdminState::Up
    );
    drop(d);

    // From outside allow_from: closed without an answer.
    let port = free_port();
    let d = TestDirector::start(&pool, &tcp("10.0.0.0/8", port));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(http(addr, Some(token), status), None);
    drop(d);

    // A token file that others may read: the director refuses to start.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let yaml = support::director::config_yaml(&pool, &tcp("127.0.0.0/8", free_port()));
    let config = director::config::Config::parse(&yaml).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = match rt.block_on(director::server::Director::build(&config)) {
        Ok(_) => panic!("started with a world-readable token file"),
        Err(e) => e.0,
    };
    assert!(
        err.contains("admin.tcp.token_file") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn unix_socket_is_owner_only_and_the_cli_says_when_nothing_listens() {
    let (_pool, d, cfg) = with_cli(1, &DirectorOptions::default());
    let socket = d
        .yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("socket: "))
        .unwrap()
        .to_owned();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(d);
    cfg.fails(&["status"], None, "cannot reach the director");
}

/// Dovecot 2.3's `doveadm director dump` writes one `doveadm director add HOST[@TAG] VHOSTS`
/// per host (and nothing for a host that is down); importing it gives the same weights and
/// tags, and `doveadm director down HOST` lines are understood too.
#[test]
fn import_of_a_real_dovecot_director_dump() {
    let pool = Pool::start(3);
    let ips: Vec<IpAddr> = (0..3).map(|i| pool.backend(i).ip).collect();
    let reference = RefDirector::start(&[(ips[0], 100), (ips[1], 100)], "%Lu");
    reference.set_host(ips[0], 40);
    reference.doveadm(&["director", "add", "-t", "vip", &ips[2].to_string(), "30"]);
    let dump = reference.doveadm(&["director", "dump"]);
    println!("doveadm director dump:\n{dump}");
    assert!(
        dump.contains(&format!("doveadm director add {}@vip 30", ips[2])),
        "{dump}"
    );

    let d = TestDirector::start(&pool, &DirectorOptions::with_configured_backends(1));
    let cfg = AdminCli::of(&d);
    let file = pool.dir().join("dovecot-dump.txt");
    std::fs::write(&file, format!("{dump}doveadm director down {}\n", ips[1])).unwrap();
    let r = cfg.run(&["import", file.to_str().unwrap()], None);
    assert!(r.ok, "import: {}\n{}", r.stdout, r.stderr);
    let set = d.state.backends();
    assert_eq!(set.backends.len(), 3);
    assert_eq!(set.get(ips[0]).unwrap().weight, 40);
    assert_eq!(set.get(ips[1]).unwrap().weight, 100);
    assert_eq!(set.get(ips[1]).unwrap().admin, AdminState::Down);
    assert_eq!(set.get(ips[2]).unwrap().weight, 30);
    assert_eq!(&*set.get(ips[2]).unwrap().tag, "vip");
}

#[test]
fn status_shows_the_health_checkers_last_results() {
    let (pool, _d, cfg) = with_cli(
        2,
        &DirectorOptions::with_extra(
            "health: {interval: 300ms, fast_interval: 100ms, rise: 2, fall: 2}\n",
        ),
    );
    let (alive, dead) = (pool.backend(0), pool.backend(1));
    dead.kill();
    wait_for(
        "the killed backend's check result",
        Duration::from_secs(10),
        || cfg.backend_status(dead.ip)["check"]["code"] == "connection_refused",
    );
    wait_for(
        "the live backend's check result",
        Duration::from_secs(10),
        || cfg.backend_status(alive.ip)["check"]["code"] == "ok",
    );
    let live = cfg.backend_status(alive.ip);
    assert!(
        live["check"]["latency_ms"].as_f64().unwrap() >= 0.0,
        "{live}"
    );
    wait_for(
        "the killed backend marked down",
        Duration::from_secs(10),
        || cfg.backend_status(dead.ip)["health"] == "down",
    );
    let text = cfg.ok(&["status"]);
    assert!(text.contains("connection_refused"), "{text}");
}
