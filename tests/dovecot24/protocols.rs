//! The protocol checks of the 2.3 suite against Dovecot 2.4 backends: most share the three
//! 2.4 backends of [`shared_pool`] (each test starts its own director over them, which is
//! cheap); the failover test, which kills a backend, starts a pool of its own. Where a check
//! of the 2.3 suite lives in `tests/support/`, the same function runs here.

use std::time::Duration;

use crate::shared_pool;
use crate::support::backend_tls::{login_both_ways, logins_are_tls, IMPLICIT_TLS, STARTTLS};
use crate::support::client::{assert_ok, imap_append, imap_login, pop3_login, Conn};
use crate::support::director::{ready, with_listener, DirectorOptions, TestDirector};
use crate::support::dovecot::{
    user, DovecotVersion, Pool, PoolOptions, MASTER_PASSWORD, MASTER_USER, PASSWORD,
};
use crate::support::health_checks;
use crate::support::logs::{assert_logins_only_on, field, login_lines, tls_flag, wait_login};
use crate::support::proxied_logins::{logins_via_proxy, v1_header, v2_header};
use crate::support::sieve_connect::{assert_active, sieve_connect, sieve_connect_with};
use crate::support::swaks::{self, Target};

/// Users `first..first + n` (the tests of this file take disjoint ranges: they run at once
/// over the same backends and mailboxes).
fn users(first: usize, n: usize) -> Vec<String> {
    (first..first + n).map(user).collect()
}

#[test]
fn imap_logins_land_on_the_rings_backend_and_stick() {
    let pool = shared_pool();
    let d = TestDirector::start(pool, &DirectorOptions::default());
    let mut names = Vec::new();
    for u in users(1, 9) {
        let home = d.home(pool, &u);
        assert_eq!(home.version(), DovecotVersion::V2_4);
        for _ in 0..2 {
            let (mut c, backend) = imap_login(d.imap, &u, PASSWORD);
            assert_eq!(backend, home.name, "{u}");
            // The 2.4 answer to a post-login ID, relayed as it came.
            let id = c.imap("i", "ID NIL");
            assert!(
                id.iter()
                    .any(|l| l.starts_with("* ID (\"name\" \"Dovecot\" \"x-backend\"")),
                "{id:?}"
            );
            c.imap_ok("z", "LOGOUT");
        }
        names.push(home.name.clone());
    }
    names.sort();
    names.dedup();
    assert!(names.len() > 1, "all users on one backend: {names:?}");
}

#[test]
fn imap_append_fetch_byte_exact_and_commands_pipelined_with_the_login() {
    let pool = shared_pool();
    let d = TestDirector::start(pool, &DirectorOptions::default());
    let u = user(20);
    let mut message = b"Subject: 2.4 relay\r\n\r\n".to_vec();
    for i in 0..20_000u32 {
        message.extend_from_slice(format!("line {i} \x01\x7f").as_bytes());
        message.extend_from_slice(b"\xe9\r\n");
    }
    imap_append(d.imap, &u, PASSWORD, &message);

    // LOGIN, SELECT and FETCH sent in one write: the director relays what follows the login.
    let mut c = Conn::imap_greeted(d.imap);
    c.send(
        format!("a LOGIN {u} {PASSWORD}\r\nb SELECT INBOX\r\nc FETCH * BODY.PEEK[]\r\n").as_bytes(),
    );
    assert_ok(&c.until_tagged("a"), "a", "pipelined LOGIN");
    assert_ok(&c.until_tagged("b"), "b", "pipelined SELECT");
    let (lines, literals) = c.until_tagged_with_literals("c");
    assert_ok(&lines, "c", "pipelined FETCH");
    assert_eq!(
        literals.last(),
        Some(&message),
        "the message came back changed"
    );
    let home = d.home(pool, &u);
    assert!(!login_lines(&home.log(), "imap-login", &u).is_empty());
    c.imap_ok("z", "LOGOUT");
}

#[test]
fn pop3_logins_retrieve_what_imap_stored() {
    let pool = shared_pool();
    let d = TestDirector::start(pool, &DirectorOptions::default());
    for u in users(30, 3) {
        let message = format!("Subject: for {u}\r\n\r\nbody of {u}\r\n.leading dot\r\n");
        imap_append(d.imap, &u, PASSWORD, message.as_bytes());
        let mut c = pop3_login(d.pop3, &u, PASSWORD);
        let stat = c.pop3_ok("STAT");
        assert!(stat.starts_with("+OK 1 "), "{u}: {stat}");
        c.pop3_ok("RETR 1");
        let body = c.pop3_body();
        assert_eq!(body, message.as_bytes(), "{u}");
        c.pop3_ok("QUIT");
        wait_login(d.home(pool, &u), "pop3-login", &u);
    }
    // SASL PLAIN with an initial response, as mail clients send it.
    let u = user(33);
    let mut c = Conn::pop3_greeted(d.pop3);
    let plain = crate::support::client::base64(format!("\0{u}\0{PASSWORD}").as_bytes());
    c.pop3_ok(&format!("AUTH PLAIN {plain}"));
    c.pop3_ok("STAT");
    c.pop3_ok("QUIT");
    wait_login(d.home(pool, &u), "pop3-login", &u);
}

#[test]
fn lmtp_routes_each_recipient_and_relays_a_backends_550() {
    let pool = shared_pool();
    let yaml = with_listener(
        &crate::support::director::config_yaml(pool, &DirectorOptions::default()),
        "{protocol: lmtp, address: 127.0.0.1:0}",
    );
    let d = TestDirector::start_yaml(&yaml);
    let lmtp = d.lmtp[0];
    // Recipients on every backend in one message: one delivery each, by its own backend.
    let rcpts = users(40, 6);
    let to: Vec<String> = rcpts.iter().map(|u| format!("{u}@example.org")).collect();
    let (ok, out) = swaks::lmtp(
        Target::Tcp(lmtp),
        &["--to", &to.join(","), "--body", "to 2.4 backends"],
    );
    assert!(ok, "{out}");
    let mut by = Vec::new();
    for (u, address) in rcpts.iter().zip(&to) {
        let msg = pool.wait_for_message(u, "to 2.4 backends");
        // The director routes an LMTP recipient by its whole address (username_hash %Lu).
        let home = d.home(pool, address);
        assert!(
            msg.contains(&format!("by {}", home.name)),
            "{u} was not delivered by {}:\n{msg}",
            home.name
        );
        by.push(home.name.clone());
    }
    by.sort();
    by.dedup();
    assert!(by.len() > 1, "one backend delivered all: {by:?}");

    // The sender's address reaches the 2.4 LMTP server (XCLIENT from login_trusted_networks):
    // its Received header names the MTA's address, not the director's.
    let u = user(47);
    let (ok, out) = swaks::lmtp(
        Target::Tcp(lmtp),
        &[
            "--local-interface",
            "127.0.0.3",
            "--to",
            &format!("{u}@example.org"),
            "--body",
            "from 127.0.0.3",
        ],
    );
    assert!(ok, "{out}");
    let msg = pool.wait_for_message(&u, "from 127.0.0.3");
    assert!(
        msg.contains("[127.0.0.3]"),
        "the MTA's address did not arrive:\n{msg}"
    );

    // An unknown user: the backend's 550 reaches the sender, and the other recipient of the
    // same message is delivered.
    let u = user(46);
    let (ok, out) = swaks::lmtp(
        Target::Tcp(lmtp),
        &[
            "--to",
            &format!("nosuchuser@example.org,{u}@example.org"),
            "--body",
            "one of two",
        ],
    );
    assert!(ok, "swaks fails only when no recipient is accepted: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains("550") && l.contains("nosuchuser")),
        "no 550 for the unknown user:\n{out}"
    );
    pool.wait_for_message(&u, "one of two");
    let (ok, out) = swaks::lmtp(
        Target::Tcp(lmtp),
        &["--to", "nosuchuser@example.org", "--body", "lost"],
    );
    assert!(!ok && out.contains("550"), "{out}");
}

#[test]
fn managesieve_uploads_and_activates_on_the_users_backend() {
    let pool = shared_pool();
    let d = TestDirector::start(pool, &DirectorOptions::default());
    let u = user(50);
    let home = d.home(pool, &u);
    let local = pool.dir().join("filter-2.4.sieve");
    std::fs::write(&local, "require \"fileinto\";\r\nkeep;\r\n").unwrap();
    let local = local.to_str().unwrap();
    let (ok, out) = sieve_connect(
        d.sieve,
        &u,
        &["--upload", "--localsieve", local, "--remotesieve", "kept"],
    );
    assert!(ok, "upload: {out}");
    let (ok, out) = sieve_connect(d.sieve, &u, &["--activate", "--remotesieve", "kept"]);
    assert!(ok, "activate: {out}");
    // The backend itself, asked directly, has the script active.
    assert_active(home.sieve(), &u, "kept");
    assert_logins_only_on(pool, home, "managesieve-login", &u, 3);
    let (ok, _) = sieve_connect_with(d.sieve, &u, "wrong", &["--list"]);
    assert!(!ok, "a wrong password logged in");
}

#[test]
fn starttls_and_implicit_tls_to_2_4_backends() {
    let pool = shared_pool();
    logins_are_tls(pool, STARTTLS, &[60, 61]);
    logins_are_tls(pool, IMPLICIT_TLS, &[62, 63]);
    // The control: without backend TLS, the 2.4 login line does not say TLS.
    let d = TestDirector::start(pool, &DirectorOptions::default());
    let (imap, pop3) = login_both_ways(pool, &d, &user(64));
    assert!(!tls_flag(&imap), "{imap}");
    assert!(!tls_flag(&pop3), "{pop3}");
}

#[test]
fn client_address_reaches_2_4_by_id_xclient_and_proxy_v2() {
    let pool = shared_pool();
    // IMAP ID x-originating-ip and POP3 XCLIENT (forward: auto), after a v1 and a v2 header.
    let mut logins = logins_via_proxy(
        pool,
        "",
        [("imap", 70, v1_header(143)), ("pop3", 71, v2_header(110))],
    );
    for line in logins.assert_client_forwarded() {
        assert!(field(line, "session").is_some(), "{line}");
    }
    let [imap, pop3] = &mut logins.sessions;
    imap.imap_ok("z", "LOGOUT");
    pop3.pop3_ok("QUIT");
    // A PROXY v2 header to 2.4's haproxy = yes listeners.
    let logins = logins_via_proxy(
        pool,
        "    forward: proxy_v2\n    ports: {imap: 11143, pop3: 11110}\n",
        [("imap", 72, v2_header(143)), ("pop3", 73, v1_header(110))],
    );
    for line in logins.assert_client_forwarded() {
        assert_eq!(field(line, "lip").as_deref(), Some("127.0.0.1"), "{line}");
    }
    // ID forwarding over STARTTLS to the backend.
    let logins = logins_via_proxy(pool, STARTTLS, [("imap", 74, v1_header(143))]);
    let line = &logins.assert_client_forwarded()[0];
    assert!(tls_flag(line), "{line}");
}

#[test]
fn master_user_logins_land_on_the_users_2_4_backend() {
    let pool = shared_pool();
    let d = TestDirector::start(
        pool,
        &DirectorOptions::with_extra("auth_master_user_separator: \"*\"\n"),
    );
    // A user whose whole master login string hashes elsewhere than the user's own name.
    let u = (80..120)
        .map(user)
        .find(|u| {
            let own = ready(d.router.route(u, "")).unwrap().backend.ip;
            let whole = ready(d.router.route(&format!("{u}*{MASTER_USER}"), ""))
                .unwrap()
                .backend
                .ip;
            own != whole
        })
        .expect("a user whose master login hashes elsewhere");
    let home = d.home(pool, &u);
    let (mut own, backend) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(backend, home.name);
    let (mut master, backend) = imap_login(d.imap, &format!("{u}*{MASTER_USER}"), MASTER_PASSWORD);
    assert_eq!(
        backend, home.name,
        "the master login of {u} split the mailbox"
    );
    let mut pop3 = pop3_login(d.pop3, &format!("{u}*{MASTER_USER}"), MASTER_PASSWORD);
    pop3.pop3_ok("STAT");
    // Dovecot 2.4's own word: both sessions of the user are on its backend, none elsewhere.
    crate::support::wait::wait_until(
        &format!("doveadm who lists 3 sessions of {u} on {}", home.name),
        Duration::from_secs(5),
        || (home.who(&u) == 3).then_some(()),
    );
    for b in pool.backends.iter().filter(|b| b.name != home.name) {
        assert_eq!(b.who(&u), 0, "doveadm who on {}", b.name);
    }
    pop3.pop3_ok("QUIT");
    master.imap_ok("y", "LOGOUT");
    own.imap_ok("z", "LOGOUT");
}

#[test]
fn built_in_checks_with_credentials_pass_on_2_4() {
    let pool = shared_pool();
    let path = pool.dir().join("check-credentials-2.4.yaml");
    std::fs::write(&path, format!("user: {}\npassword: {PASSWORD}\n", user(90))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Every built-in check (imap and pop3 log in), on every backend; it returns once each
    // backend passed.
    let d = TestDirector::start_with_default_health(
        pool,
        &format!(
            "  checks: [imap, pop3, lmtp, sieve]\n  credentials_file: {}\n",
            path.display()
        ),
    );
    // The checks' logins reached the 2.4 backends as logins of the check user.
    for b in &pool.backends {
        wait_login(b, "imap-login", &user(90));
        wait_login(b, "pop3-login", &user(90));
    }
    let checker = d.health.as_ref().unwrap();
    for b in &pool.backends {
        let r = checker.last_result(b.ip).unwrap();
        assert_eq!(
            r.code,
            director::health::probe::CheckCode::Ok,
            "{}: {r:?}",
            b.name
        );
    }
}

#[test]
fn failover_from_a_killed_2_4_backend_and_back() {
    // Its own pool: the test kills and restarts a backend.
    let pool = Pool::start_with(PoolOptions::v24(3));
    health_checks::killed_backend_goes_down_and_comes_back(&pool);
}

#[test]
fn a_2_4_backend_with_default_cleartext_rules_takes_the_directors_plaintext_logins() {
    // 2.4's default `auth_allow_cleartext = no` (2.3: `disable_plaintext_auth = yes`) refuses a
    // plaintext login without TLS, except from `login_trusted_networks`: the director's
    // address there is all a backend needs for the director's logins without TLS.
    let pool = Pool::start_with(PoolOptions {
        extra_config_24: "auth_allow_cleartext = no\nlogin_trusted_networks = 127.0.0.1/32\n"
            .into(),
        ..PoolOptions::v24(1)
    });
    let d = TestDirector::start(&pool, &DirectorOptions::default());
    let u = user(95);
    let (mut c, backend) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(backend, pool.backend(0).name);
    c.imap_ok("z", "LOGOUT");
    let mut c = pop3_login(d.pop3, &u, PASSWORD);
    c.pop3_ok("QUIT");
    // The control: the same plaintext login straight from an untrusted address is refused.
    let untrusted = "127.0.0.2".parse().unwrap();
    let mut direct = Conn::connect_from(untrusted, pool.backend(0).imap());
    let greeting = direct.line();
    assert!(greeting.contains("LOGINDISABLED"), "{greeting}");
    let reply = direct.imap("a", &format!("LOGIN {u} {PASSWORD}"));
    assert!(
        reply.last().is_some_and(|l| l.starts_with("a NO")),
        "{reply:?}"
    );
}
