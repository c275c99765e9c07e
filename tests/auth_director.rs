//! Authentication at the director (`auth: {mode: dovecot}`) against a real Dovecot 2.3 auth
//! service ([`support::auth_service`]: a passwd-file passdb whose users carry extra fields,
//! reached on its `director-login` login socket, which hands back the client's password on a
//! `proxy` login) in front of real Dovecot backends: what users and postmasters see of each
//! passdb field.
//!
//! Every director here hashes `%u` (case kept), so a route by the name the client typed and one
//! by the name the passdb returns can differ. Which backend served a session: IMAP `ID`'s
//! `x-backend`, the backends' login lines and `doveadm who`.
//!
//! # Facts about Dovecot 2.3.19 these tests rely on
//!
//! - A login socket returns `pass=` (the client's password) on a `proxy` login only when the
//!   client's mechanism carried the password in clear (PLAIN, LOGIN) and the passdb set no
//!   `pass` itself. For CRAM-MD5 and SCRAM the passdb must return `pass` (or `master`+`pass`).
//! - `nologin` users get an `OK` with `nologin` (and `reason`, `host`), not a `FAIL`.
//! - A backend's auth process logs a master login as `Master user logging in as USER`.
//! - A second `service imap-login { inet_listener ... }` block adds a listener to the first.
//!   In `login_log_format_elements`, `%{lport}` is the port the client reached the *director*
//!   on (forwarded in IMAP `ID`), `%{real_lport}` the backend's own port.
//! - A failed login straight to a backend penalises the client address (auth penalty): the
//!   director's next login for that address waits seconds. These tests never fail one there.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use director::routing::ring::Ring;
use director::routing::user_hash::UserHash;
use support::admin_cli::AdminCli;
use support::auth_service::{AuthService, AuthServiceConfig, LOGIN_PORT, MECHANISMS};
use support::client::{
    assert_ok, assert_tagged, base64, curl_imap_cram_md5, imap_login, quote, Conn,
};
use support::command::run;
use support::director::{config_yaml, ready, with_listener, DirectorOptions, TestDirector};
use support::director_log::{capture_director_log, director_log, wait_director_line};
use support::dovecot::{
    user, Backend, Pool, PoolOptions, IMAP_PORT, MASTER_PASSWORD, MASTER_USER, PASSWORD,
};
use support::logs::{field, login_lines, tls_flag, wait_login, LOG_WAIT};
use support::ports::free_port;
use support::sasl::{cram_md5, ScramSha256};
use support::scrape::{get, sample};
use support::serve::{scratch, BIN};
use support::wait::{wait_for, wait_until};

/// The directors' `username_hash`: case kept (Dovecot's default `%Lu` would hide a route by
/// the typed name).
const HASH: &str = "%u";

/// A line of the auth service's passwd-file: `u`, its password there, its extra fields.
fn entry(u: &str, password: &str, extra: &str) -> String {
    format!("{u}:{{PLAIN}}{password}::::::{extra}")
}

/// A user the service accepts with the backends' password. `proxy=y` makes the login socket
/// return the client's password (`pass=`), which the backend login needs when the client's
/// mechanism sent none in clear.
fn proxied(u: &str) -> String {
    entry(u, PASSWORD, "proxy=y")
}

/// A user whose passdb entry also returns the password for the backend login (`pass=`): what
/// a mechanism that never sends the password in clear (CRAM-MD5, SCRAM) needs, since Dovecot
/// hands back the client's password only when the client sent it.
fn with_pass(u: &str) -> String {
    entry(u, PASSWORD, &format!("proxy=y pass={PASSWORD}"))
}

fn start_auth(users: &[String]) -> AuthService {
    AuthService::start(AuthServiceConfig {
        users: users.to_vec(),
        ..AuthServiceConfig::default()
    })
}

/// The service's login socket, as the director's `auth.socket` names it.
fn socket(auth: &AuthService) -> SocketAddr {
    SocketAddr::new(auth.ip(), LOGIN_PORT)
}

/// The configuration of a director over `pool` whose logins `auth` checks.
fn yaml(pool: &Pool, auth: &AuthService, options: DirectorOptions) -> String {
    let extra = format!(
        "username_hash: \"{HASH}\"\nauth:\n  mode: dovecot\n  socket: \"{}\"\n{}",
        socket(auth),
        options.extra
    );
    config_yaml(pool, &DirectorOptions { extra, ..options })
}

fn director(pool: &Pool, auth: &AuthService) -> TestDirector {
    TestDirector::start_yaml(&yaml(pool, auth, DirectorOptions::default()))
}

/// The backend the ring of `pool` (every backend at weight 100, no tag) gives `u`: known
/// before any director runs, for the passdb entries that pin users elsewhere.
fn ring_home<'p>(pool: &'p Pool, u: &str) -> &'p Backend {
    let ring = Ring::build(pool.backends.iter().map(|b| (b.ip, 100)));
    let ip = ring
        .lookup(UserHash::new(HASH).unwrap().hash(u))
        .expect("a backend");
    pool.by_ip(ip).unwrap()
}

/// The first user from `from` on whose ring backend `pick` agrees.
fn user_where(pool: &Pool, from: usize, pick: impl Fn(&Backend) -> bool) -> String {
    (from..from + 50)
        .map(user)
        .find(|u| pick(ring_home(pool, u)))
        .expect("some user hashes there")
}

/// An IMAP `LOGIN` on a new connection; returns the tagged reply.
fn imap_refused(d: &TestDirector, u: &str, password: &str) -> String {
    let mut c = Conn::imap_greeted(d.imap);
    let r = c.imap("a", &format!("LOGIN {} {}", quote(u), quote(password)));
    r.last().unwrap().clone()
}

/// Panics if any backend of `pool` has logged anything of `u` (a login, a failed one).
fn no_backend_saw(pool: &Pool, u: &str) {
    let needle = format!("user=<{u}>");
    for b in &pool.backends {
        let log = b.log();
        assert!(!log.contains(&needle), "{} saw {u}:\n{log}", b.name);
        assert_eq!(b.who(u), 0, "{u} is logged in on {}", b.name);
    }
}

/// The users the director has records of (`director map`), with their backends.
fn records(d: &TestDirector) -> Vec<(String, String)> {
    let map = AdminCli::of(d).json(&["map"]);
    map["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap_or("?").to_owned(),
                e["backend"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The text of a SASL challenge line (`+ BASE64`), decoded.
fn challenge(line: &str) -> Vec<u8> {
    let data = line
        .strip_prefix("+ ")
        .unwrap_or_else(|| panic!("not a challenge: {line:?}"));
    STANDARD.decode(data).unwrap()
}

/// Starts SCRAM-SHA-256 as `tag` with an initial response, and answers the server's first
/// message with the proof.
fn scram_to_proof(c: &mut Conn, tag: &str, scram: &mut ScramSha256) {
    let first = base64(&scram.client_first());
    c.send(format!("{tag} AUTHENTICATE SCRAM-SHA-256 {first}\r\n").as_bytes());
    let server_first = challenge(&c.continuation());
    c.send(format!("{}\r\n", base64(&scram.client_final(&server_first))).as_bytes());
}

#[test]
fn a_login_is_routed_and_registered_by_the_name_the_passdb_returns() {
    capture_director_log();
    let pool = Pool::start(2);
    // Dovecot lower-cases the name (its `auth_username_format = %Lu`): `User0007` is
    // `user0007`. Take a user whose two spellings hash to different backends.
    let typed = |i: usize| format!("User{i:04}");
    let i = (1..=50)
        .find(|&i| ring_home(&pool, &typed(i)).ip != ring_home(&pool, &user(i)).ip)
        .expect("a user whose spellings hash apart");
    let (u, typed) = (user(i), typed(i));
    let auth = start_auth(&[proxied(&u)]);
    let d = director(&pool, &auth);
    let home = d.home(&pool, &u);
    let other = pool.backends.iter().find(|b| b.ip != home.ip).unwrap();
    assert_eq!(home.ip, ring_home(&pool, &u).ip);

    let (mut c, backend) = imap_login(d.imap, &typed, PASSWORD);
    assert_eq!(
        backend, home.name,
        "{typed} went to the ring's backend of the typed name"
    );
    assert_eq!(home.who(&u), 1, "doveadm who on {}", home.name);
    assert_eq!(other.who(&u), 0, "doveadm who on {}", other.name);
    // Sessions, records and the log name the user as the passdb does.
    assert_eq!(d.sessions_of(&u).len(), 1);
    assert!(d.sessions_of(&typed).is_empty());
    assert_eq!(records(&d), [(u.clone(), home.ip.to_string())]);
    let line = wait_director_line("the login's log line", |l| {
        l.contains("logged in") && l.contains(&format!(" user={u} "))
    });
    assert!(
        line.contains(&format!("backend={}:{IMAP_PORT}", home.ip)),
        "{line}"
    );
    c.imap_ok("z", "LOGOUT");
}

#[test]
fn a_wrong_password_or_an_unknown_user_reaches_no_backend_and_leaves_no_record() {
    let pool = Pool::start(2);
    let u = user(2);
    // The service's password differs from the backends': the director asked the service.
    let other = user(3);
    let auth = start_auth(&[
        proxied(&u),
        entry(&other, "only-the-service-knows", "proxy=y"),
    ]);
    let d = director(&pool, &auth);

    // At once: the service holds every failure back until its next flush (500 ms).
    std::thread::scope(|scope| {
        let attempts = [
            (u.as_str(), "wrong"),
            ("nobody", PASSWORD),
            (&other, PASSWORD),
        ];
        for (name, password) in attempts {
            let d = &d;
            scope.spawn(move || {
                let reply = imap_refused(d, name, password);
                assert!(
                    reply.starts_with("a NO [AUTHENTICATIONFAILED]"),
                    "{name}: {reply}"
                );
            });
        }
    });
    // The service judged them (its log), and the director made no record of anyone.
    for line in [
        format!("passwd-file({u},127.0.0.1,"),
        "passwd-file(nobody,127.0.0.1,".to_owned(),
        format!("passwd-file({other},127.0.0.1,"),
    ] {
        wait_for(&format!("{line} in the service's log"), LOG_WAIT, || {
            auth.log().contains(&line)
        });
    }
    let log = auth.log();
    assert!(log.contains("unknown user"), "{log}");
    assert!(log.contains("Password mismatch"), "{log}");
    assert_eq!(records(&d), []);
    let status = AdminCli::of(&d).json(&["status", "nobody"]);
    assert!(status["current"].is_null(), "{status}");
    assert!(d.sessions.list().is_empty());

    // The right password: the one backend login, after which the backends' logs are read.
    let (mut c, backend) = imap_login(d.imap, &u, PASSWORD);
    let home = d.home(&pool, &u);
    assert_eq!(backend, home.name);
    let logins = wait_login(home, "imap-login", &u);
    c.imap_ok("z", "LOGOUT");
    for b in &pool.backends {
        let log = b.log();
        let of_u: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("user=<{u}>")))
            .collect();
        let expected = if b.ip == home.ip {
            vec![logins.as_str()]
        } else {
            vec![]
        };
        assert_eq!(of_u, expected, "{}", b.name);
    }
    no_backend_saw(&pool, "nobody");
    no_backend_saw(&pool, &other);
    assert_eq!(records(&d), [(u.clone(), home.ip.to_string())]);
}

#[test]
fn cram_md5_and_scram_sha_256_log_in_with_the_password_the_service_returns() {
    capture_director_log();
    let pool = Pool::start(2);
    let (cram_user, scram_user, no_pass) = (user(4), user(5), user(26));
    let auth = start_auth(&[
        with_pass(&cram_user),
        with_pass(&scram_user),
        proxied(&no_pass),
    ]);
    let d = director(&pool, &auth);

    let mut c = Conn::imap_greeted(d.imap);
    let caps = c.imap_ok("c", "CAPABILITY").join("\n");
    for m in MECHANISMS {
        assert!(caps.contains(&format!(" AUTH={m}")), "{m}: {caps}");
    }

    // curl computes CRAM-MD5; the backend gets a plain login with the service's `pass`.
    let (ok, out, err) = curl_imap_cram_md5(d.imap, &cram_user, PASSWORD);
    assert!(ok, "curl CRAM-MD5: {err}");
    assert!(err.contains("AUTHENTICATE CRAM-MD5"), "{err}");
    let cram_home = d.home(&pool, &cram_user);
    assert!(
        out.contains(&format!("\"x-backend\" \"{}\"", cram_home.name)),
        "{out}"
    );
    let line = wait_login(cram_home, "imap-login", &cram_user);
    assert!(line.contains("method=PLAIN"), "{line}");

    // SCRAM-SHA-256 with an initial response; the server proves it knows the password too.
    let scram_home = d.home(&pool, &scram_user);
    let mut scram = ScramSha256::new(&scram_user, PASSWORD);
    scram_to_proof(&mut c, "s", &mut scram);
    let server_final = challenge(&c.continuation());
    assert_eq!(server_final, scram.server_final());
    c.send(b"\r\n");
    assert_ok(&c.until_tagged("s"), "s", "SCRAM-SHA-256");
    assert_eq!(c.imap_backend(), scram_home.name);
    assert_eq!(scram_home.who(&scram_user), 1);
    let line = wait_login(scram_home, "imap-login", &scram_user);
    assert!(line.contains("method=PLAIN"), "{line}");

    // A wrong password fails at the proof, and no backend hears of it.
    let mut c = Conn::imap_greeted(d.imap);
    let mut scram = ScramSha256::new(&scram_user, "wrong");
    scram_to_proof(&mut c, "w", &mut scram);
    assert_tagged(
        &c.until_tagged("w"),
        "w",
        "NO [AUTHENTICATIONFAILED]",
        "wrong SCRAM",
    );
    assert_eq!(
        login_lines(&scram_home.log(), "imap-login", &scram_user).len(),
        1
    );

    // A passdb entry without `pass`: the service says OK, but there is nothing to log in to
    // the backend with. A temporary failure, and the log tells the postmaster why.
    let mut c = Conn::imap_greeted(d.imap);
    c.send(b"n AUTHENTICATE CRAM-MD5\r\n");
    let chal = challenge(&c.continuation());
    c.send(format!("{}\r\n", base64(&cram_md5(&no_pass, PASSWORD, &chal))).as_bytes());
    assert_tagged(
        &c.until_tagged("n"),
        "n",
        "NO [UNAVAILABLE]",
        "CRAM-MD5 without pass",
    );
    let line = wait_director_line("why the login failed", |l| {
        l.contains(&format!(
            "user {no_pass}: no password for the backend login"
        ))
    });
    assert!(line.contains("ERROR"), "{line}");
    no_backend_saw(&pool, &no_pass);
}

#[test]
fn pop3_and_managesieve_offer_the_services_mechanisms_and_log_in_through_it() {
    let pool = Pool::start(2);
    let users: Vec<String> = (6..=9).map(user).collect();
    let [pop3_pass, pop3_cram, sieve_plain, sieve_cram] = users.clone().try_into().unwrap();
    let auth = start_auth(&users.iter().map(|u| with_pass(u)).collect::<Vec<_>>());
    let d = director(&pool, &auth);
    let mechanisms = MECHANISMS.join(" ");

    let mut c = Conn::pop3_greeted(d.pop3);
    c.pop3_ok("CAPA");
    let capa = String::from_utf8(c.pop3_body()).unwrap();
    assert!(
        capa.lines().any(|l| l == format!("SASL {mechanisms}")),
        "{capa}"
    );
    // USER/PASS: a wrong password first, then the right one.
    c.pop3_ok(&format!("USER {pop3_pass}"));
    let e = c.pop3("PASS wrong");
    assert!(e.starts_with("-ERR"), "{e}");
    c.pop3_login_as(&pop3_pass, PASSWORD);
    c.pop3_ok("STAT");
    let home = d.home(&pool, &pop3_pass);
    assert_eq!(
        wait_login(home, "pop3-login", &pop3_pass)
            .matches("Login:")
            .count(),
        1
    );
    assert_eq!(home.who(&pop3_pass), 1);
    // SASL: CRAM-MD5.
    let mut c = Conn::pop3_greeted(d.pop3);
    let chal = challenge(&c.pop3("AUTH CRAM-MD5"));
    let ok = c.pop3(&base64(&cram_md5(&pop3_cram, PASSWORD, &chal)));
    assert!(ok.starts_with("+OK"), "{ok}");
    c.pop3_ok("STAT");
    let home = d.home(&pool, &pop3_cram);
    wait_login(home, "pop3-login", &pop3_cram);
    assert_eq!(home.who(&pop3_cram), 1);

    // ManageSieve: the SASL capability, then PLAIN with an initial response.
    let (mut c, greeting) = Conn::sieve_greeted(d.sieve);
    let expected = format!("\"SASL\" \"{mechanisms}\"");
    assert!(greeting.contains(&expected), "{greeting:?}");
    let plain = base64(format!("\0{sieve_plain}\0{PASSWORD}").as_bytes());
    c.send(format!("AUTHENTICATE \"PLAIN\" \"{plain}\"\r\n").as_bytes());
    let ok = c.line();
    assert!(ok.starts_with("OK"), "{ok}");
    c.send(b"LISTSCRIPTS\r\n");
    let listed = c.line();
    assert!(listed.starts_with("OK"), "the backend answers: {listed}");
    wait_login(
        d.home(&pool, &sieve_plain),
        "managesieve-login",
        &sieve_plain,
    );
    // CRAM-MD5: the challenge comes as a quoted string, the answer goes as one.
    let (mut c, _) = Conn::sieve_greeted(d.sieve);
    c.send(b"AUTHENTICATE \"CRAM-MD5\"\r\n");
    let quoted = c.line();
    let chal = STANDARD.decode(quoted.trim_matches('"')).unwrap();
    let response = base64(&cram_md5(&sieve_cram, PASSWORD, &chal));
    c.send(format!("\"{response}\"\r\n").as_bytes());
    let ok = c.line();
    assert!(ok.starts_with("OK"), "{ok}");
    wait_login(d.home(&pool, &sieve_cram), "managesieve-login", &sieve_cram);
}

/// A second IMAP listener on every backend, on a port no director setting names.
const ALT_IMAP_PORT: u16 = 12143;

#[test]
fn a_pinned_user_lands_on_its_host_and_port_whatever_the_ring_says() {
    capture_director_log();
    // Dovecot merges a second `service imap-login` block into the first; `%{real_lport}` in
    // the login line tells which listener took the login (`%{lport}` is the port the client
    // reached the director on, which the director forwards in IMAP ID).
    let pool = Pool::start_with(PoolOptions {
        backends: 2,
        extra_config: format!(
            "service imap-login {{\n  inet_listener imap_alt {{\n    port = {ALT_IMAP_PORT}\n  }}\n}}\n\
             login_log_format_elements = user=<%u> method=%m rip=%r lip=%l lport=%{{real_lport}} mpid=%e %c session=<%{{session}}>\n"
        ),
        ..PoolOptions::default()
    });
    let pinned = pool.backend(1);
    let elsewhere = |b: &Backend| b.ip != pinned.ip;
    let by_host = user_where(&pool, 10, elsewhere);
    let by_port = user_where(&pool, 60, elsewhere);
    let closed = user_where(&pool, 110, elsewhere);
    let closed_port = 12999;
    let ip = pinned.ip;
    let auth = start_auth(&[
        entry(&by_host, PASSWORD, &format!("proxy=y host={ip}")),
        entry(
            &by_port,
            PASSWORD,
            &format!("proxy=y host={ip} port={ALT_IMAP_PORT}"),
        ),
        entry(
            &closed,
            PASSWORD,
            &format!("proxy=y host={ip} port={closed_port}"),
        ),
    ]);
    let d = director(&pool, &auth);
    for u in [&by_host, &by_port, &closed] {
        assert_ne!(d.home(&pool, u).ip, ip, "{u} hashes to the pinned backend");
    }

    for u in [&by_host, &by_port] {
        let (mut c, backend) = imap_login(d.imap, u, PASSWORD);
        assert_eq!(backend, pinned.name, "{u}");
        assert_eq!(pinned.who(u), 1, "{u}");
        assert_eq!(ring_home(&pool, u).who(u), 0, "{u}");
        c.imap_ok("z", "LOGOUT");
    }
    let lport = |u: &str| field(&wait_login(pinned, "imap-login", u), "lport");
    assert_eq!(lport(&by_host).as_deref(), Some("10143"));
    assert_eq!(lport(&by_port).as_deref(), Some("12143"));
    // The record follows the pin: what `director status USER` shows a postmaster.
    let status = AdminCli::of(&d).json(&["status", &by_host]);
    assert_eq!(status["current"], ip.to_string(), "{status}");
    assert_ne!(status["hashed"], ip.to_string(), "{status}");

    // A port nothing listens on: a temporary failure, and the log names the address tried.
    let reply = imap_refused(&d, &closed, PASSWORD);
    assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
    let line = wait_director_line("the failed connect", |l| {
        l.contains(&format!(" user={closed} "))
            && l.contains(&format!("backend={ip}:{closed_port}"))
    });
    assert!(line.contains("WARN"), "{line}");
    no_backend_saw(&pool, &closed);
}

#[test]
fn starttls_any_cert_gives_one_user_tls_to_a_backend_the_director_reaches_in_clear() {
    let pool = Pool::start(2);
    let (any_cert, verified, plain) = (user(13), user(14), user(15));
    let auth = start_auth(&[
        entry(&any_cert, PASSWORD, "proxy=y starttls=any-cert"),
        entry(&verified, PASSWORD, "proxy=y starttls=yes"),
        proxied(&plain),
    ]);
    // No backend TLS in the configuration, and a name the backends' certificate does not
    // carry: only a login that checks no certificate gets through TLS.
    let options =
        DirectorOptions::with_backend_extra("    tls_server_name: not-this.example.org\n");
    let d = TestDirector::start_yaml(&yaml(&pool, &auth, options));

    let (mut c, backend) = imap_login(d.imap, &any_cert, PASSWORD);
    let home = d.home(&pool, &any_cert);
    assert_eq!(backend, home.name);
    c.imap_ok("s", "SELECT INBOX");
    let line = wait_login(home, "imap-login", &any_cert);
    assert!(tls_flag(&line), "not over TLS: {line}");

    let (mut c, _) = imap_login(d.imap, &plain, PASSWORD);
    c.imap_ok("z", "LOGOUT");
    let line = wait_login(d.home(&pool, &plain), "imap-login", &plain);
    assert!(!tls_flag(&line), "over TLS without starttls=: {line}");

    // `starttls=yes` checks the certificate, which names another host: no login anywhere.
    let reply = imap_refused(&d, &verified, PASSWORD);
    assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
    no_backend_saw(&pool, &verified);
}

#[test]
fn nologin_shows_the_reason_or_refers_and_reaches_no_backend() {
    let pool = Pool::start(2);
    let (refused, moved) = (user(16), user(17));
    let auth = start_auth(&[
        entry(
            &refused,
            PASSWORD,
            "nologin=y reason=Account_closed,_ask_the_helpdesk",
        ),
        entry(
            &moved,
            PASSWORD,
            "nologin=y host=imap.example.org reason=Moved_to_the_new_site",
        ),
    ]);
    let d = director(&pool, &auth);

    let reply = imap_refused(&d, &refused, PASSWORD);
    assert_eq!(
        reply,
        "a NO [AUTHENTICATIONFAILED] Account_closed,_ask_the_helpdesk"
    );
    let mut c = Conn::pop3_greeted(d.pop3);
    let e = c.pop3_user_pass(&refused, PASSWORD);
    assert!(
        e.starts_with("-ERR") && e.contains("Account_closed,_ask_the_helpdesk"),
        "{e}"
    );
    let reply = imap_refused(&d, &moved, PASSWORD);
    assert_eq!(
        reply,
        format!("a NO [REFERRAL imap://{moved};AUTH=*@imap.example.org/] Moved_to_the_new_site")
    );
    no_backend_saw(&pool, &refused);
    no_backend_saw(&pool, &moved);
    assert_eq!(records(&d), []);
}

#[test]
fn a_tagged_user_goes_only_to_its_pool_and_waits_when_none_of_it_is_up() {
    let pool = Pool::start(3);
    let vip: Vec<String> = (18..=21).map(user).collect();
    let ordinary = user(22);
    let mut users: Vec<String> = vip
        .iter()
        .map(|u| entry(u, PASSWORD, "proxy=y director_tag=vip"))
        .collect();
    users.push(proxied(&ordinary));
    let auth = start_auth(&users);
    // backend2 and backend3 are the pool `vip`; backend1 alone serves the untagged ring.
    let mut config = yaml(&pool, &auth, DirectorOptions::default());
    for b in &pool.backends[1..] {
        let plain = format!("  - host: {}\n    weight: 100\n", b.ip);
        config = config.replacen(&plain, &format!("{plain}    tag: vip\n"), 1);
    }
    let d = TestDirector::start_yaml(&config);
    let tagged: Vec<&str> = pool.backends[1..].iter().map(|b| b.name.as_str()).collect();

    for u in &vip {
        let (mut c, backend) = imap_login(d.imap, u, PASSWORD);
        let ring = ready(d.router.route(u, "vip")).unwrap().backend.ip;
        assert_eq!(backend, pool.by_ip(ring).unwrap().name, "{u}");
        assert!(tagged.contains(&backend.as_str()), "{u} on {backend}");
        c.imap_ok("z", "LOGOUT");
    }
    let (mut c, backend) = imap_login(d.imap, &ordinary, PASSWORD);
    assert_eq!(backend, pool.backend(0).name);
    c.imap_ok("z", "LOGOUT");

    let cli = AdminCli::of(&d);
    for b in &pool.backends[1..] {
        cli.ok(&["down", &b.ip.to_string()]);
    }
    let reply = imap_refused(&d, &vip[0], PASSWORD);
    assert!(
        reply.starts_with("a NO [UNAVAILABLE]") && reply.contains("pool vip"),
        "{reply}"
    );
    // The untagged ring is not affected.
    let (_c, backend) = imap_login(d.imap, &ordinary, PASSWORD);
    assert_eq!(backend, pool.backend(0).name);
}

#[test]
fn a_master_login_opens_the_users_mailbox_with_a_password_the_backend_never_saw() {
    let pool = Pool::start(2);
    let u = user(23);
    let client_password = "known-to-the-service-only";
    let auth = start_auth(&[entry(
        &u,
        client_password,
        &format!("proxy=y master={MASTER_USER} pass={MASTER_PASSWORD}"),
    )]);
    let d = director(&pool, &auth);
    let home = d.home(&pool, &u);
    assert_ne!(client_password, PASSWORD, "the backends' password for {u}");

    let (mut c, backend) = imap_login(d.imap, &u, client_password);
    assert_eq!(backend, home.name);
    c.imap_ok("s", "SELECT INBOX");
    assert_eq!(home.who(&u), 1, "doveadm who on {}", home.name);
    let line = wait_login(home, "imap-login", &u);
    assert!(line.contains("method=PLAIN"), "{line}");
    // The backend's auth process says whose password it checked (`auth_verbose`).
    let master = format!("Master user logging in as {u}");
    wait_for(
        &format!("{master:?} in {}'s log", home.name),
        LOG_WAIT,
        || home.log().contains(&master),
    );

    // A wrong password at the director: refused there, the master login is not tried.
    let reply = imap_refused(&d, &u, "wrong");
    assert!(reply.starts_with("a NO [AUTHENTICATIONFAILED]"), "{reply}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(login_lines(&home.log(), "imap-login", &u).len(), 1);
    assert_eq!(home.log().matches(&master).count(), 1);
}

#[test]
fn the_auth_service_killed_and_restarted_mid_run() {
    capture_director_log();
    let pool = Pool::start(2);
    let (u, passthrough_user) = (user(24), user(25));
    let mut auth = start_auth(&[proxied(&u)]);
    let endpoint = socket(&auth).to_string();
    // A second IMAP listener whose backend checks the passwords, and the metrics listener.
    let passthrough = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = with_listener(
        &yaml(
            &pool,
            &auth,
            DirectorOptions::with_extra("metrics:\n  address: 127.0.0.1:0\n"),
        ),
        &format!("{{protocol: imap, address: \"{passthrough}\", tls: none, auth: {{mode: passthrough}}}}"),
    );
    let d = TestDirector::start_yaml(&config);
    let metrics = d.metrics.expect("a metrics listener");
    let up = || {
        let (_, text) = get(metrics, "/metrics");
        sample(
            &text,
            "director_auth_service_up",
            &[("endpoint", &endpoint)],
        )
    };
    let (mut c, _) = imap_login(d.imap, &u, PASSWORD);
    c.imap_ok("z", "LOGOUT");
    assert_eq!(up(), Some(1.0));

    auth.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let reply = imap_refused(&d, &u, PASSWORD);
        assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    let (mut c, backend) = imap_login(passthrough, &passthrough_user, PASSWORD);
    assert_eq!(backend, d.home(&pool, &passthrough_user).name);
    c.imap_ok("z", "LOGOUT");
    assert_eq!(up(), Some(0.0));
    let down_lines = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("auth service unusable") && l.contains(&format!("auth={endpoint}"))
            })
            .count()
    };
    assert_eq!(down_lines(&director_log()), 1, "{}", director_log());

    // Back: logins work again within the client's back-off (at most 5 s), no restart.
    auth.run();
    let restarted = Instant::now();
    let backend = wait_until("a login after the restart", Duration::from_secs(7), || {
        let mut c = Conn::imap_greeted(d.imap);
        let r = c.imap("a", &format!("LOGIN {} {}", quote(&u), quote(PASSWORD)));
        r.last()
            .unwrap()
            .starts_with("a OK")
            .then(|| c.imap_backend())
    });
    assert_eq!(backend, d.home(&pool, &u).name);
    eprintln!(
        "logins worked again {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(up(), Some(1.0));
    wait_director_line("the service's return", |l| {
        l.contains("auth service reachable again") && l.contains(&format!("auth={endpoint}"))
    });
    assert_eq!(down_lines(&director_log()), 1);
}

#[test]
fn check_config_wants_the_socket_of_dovecot_mode_and_names_the_field() {
    let dir = scratch("auth_director", "check-config");
    let listeners = "listeners:\n  - protocol: imap\n    address: 127.0.0.1:1143\nbackends:\n  - host: 127.0.0.1\n";
    let check = |name: &str, text: String| {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        run(
            std::process::Command::new(BIN).args(["check-config", "-c", path.to_str().unwrap()]),
            None,
        )
        .expect("run the director binary")
    };
    let out = check("top.yaml", format!("auth:\n  mode: dovecot\n{listeners}"));
    assert!(!out.ok, "{}", out.text());
    assert!(out.stderr.contains("auth.socket"), "{}", out.stderr);
    let per_listener = listeners.replace(
        "address: 127.0.0.1:1143\n",
        "address: 127.0.0.1:1143\n    auth: {mode: dovecot}\n",
    );
    let out = check("listener.yaml", per_listener);
    assert!(!out.ok, "{}", out.text());
    assert!(
        out.stderr.contains("listeners[0].auth.socket"),
        "{}",
        out.stderr
    );
    // With the socket, the same file passes.
    let out = check(
        "good.yaml",
        format!("auth:\n  mode: dovecot\n  socket: \"127.0.0.1:10990\"\n{listeners}"),
    );
    assert!(out.ok, "{}", out.text());
}
