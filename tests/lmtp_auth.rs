//! LMTP in `auth.mode: dovecot` against a real Dovecot auth service and real Dovecot backends:
//! each recipient is looked up over the auth-master socket (as Dovecot's LMTP proxy does), so a
//! user the passdb pins (`host=`) or tags (`director_tag=`) receives mail on the backend it
//! reads it from, a user the passdb does not know gets the backend's 550 while the others of
//! the transaction are delivered, and while the auth service is down recipients get 451 (the
//! MTA keeps the message), with one log line, until it is back.

mod support;

use std::net::SocketAddr;

use support::auth_service::{AuthService, AuthServiceConfig};
use support::client::{curl, Conn};
use support::director::{config_yaml, with_listener, DirectorOptions, TestDirector};
use support::director_log::{capture_director_log, director_log, wait_director_line};
use support::dovecot::{user, Pool};
use support::swaks::{self, Target};

/// A director over the first `configured` backends of `pool`, backend `tagged` (if any)
/// tagged `vip`, with an LMTP listener whose recipients are looked up on `auth`'s auth-master
/// socket, and a metrics listener.
fn director(
    pool: &Pool,
    configured: usize,
    tagged: Option<usize>,
    auth: &AuthService,
) -> TestDirector {
    let options = DirectorOptions {
        extra: "metrics:\n  address: 127.0.0.1:0\n".into(),
        ..DirectorOptions::with_configured_backends(configured)
    };
    let mut yaml = config_yaml(pool, &options);
    if let Some(i) = tagged {
        let entry = format!("  - host: {}\n", pool.backend(i).ip);
        yaml = yaml.replacen(&entry, &format!("{entry}    tag: vip\n"), 1);
    }
    let listener = format!(
        "{{protocol: lmtp, address: 127.0.0.1:0, auth: {{mode: dovecot, master_socket: {}, request_timeout: 5s}}}}",
        auth.master_socket().display()
    );
    TestDirector::start_yaml(&with_listener(&yaml, &listener))
}

/// Delivers a message with `body` to `to`.
fn deliver(lmtp: SocketAddr, to: &str, body: &str) -> (bool, String) {
    swaks::lmtp(Target::Tcp(lmtp), &["--to", to, "--body", body])
}

/// Sends an LMTP command; returns the last line of its reply.
fn cmd(c: &mut Conn, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes());
    loop {
        let l = c.line();
        assert!(l.len() >= 3, "reply expected, got {l:?}");
        if l.as_bytes().get(3) != Some(&b'-') {
            return l;
        }
    }
}

/// Connects and says LHLO and MAIL FROM.
fn transaction(lmtp: SocketAddr) -> Conn {
    let mut c = Conn::connect(lmtp);
    assert!(c.line().starts_with("220 "));
    assert!(cmd(&mut c, "LHLO mta.test").starts_with("250 "));
    assert!(cmd(&mut c, "MAIL FROM:<sender@example.org>").starts_with("250 "));
    c
}

/// The value of the series `series` (name and labels as exposed) on `d`'s `/metrics`.
fn metric(d: &TestDirector, series: &str) -> f64 {
    let url = format!("http://{}/metrics", d.metrics.expect("metrics listener"));
    let (ok, out, err) = curl(&[&url]);
    assert!(ok, "curl {url}: {err}");
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{out}"))
        .parse()
        .unwrap()
}

#[test]
fn pinned_tagged_and_unknown_recipients_are_routed_as_the_passdb_says() {
    // backend1 is the only untagged backend, backend2 the only `vip` one, backend3 is not in
    // the director's configuration: only the passdb can send mail to the last two.
    let pool = Pool::start(3);
    let (pinned, tagged, plain) = (user(1), user(2), user(3));
    let users = format!(
        "{pinned}:{{PLAIN}}x::::::host={}\n{tagged}:{{PLAIN}}x::::::director_tag=vip\n{plain}:{{PLAIN}}x::::::\n",
        pool.backend(2).ip
    );
    let auth = AuthService::start(AuthServiceConfig::with_users(&users));
    let d = director(&pool, 2, Some(1), &auth);
    let lmtp = d.lmtp[0];

    for (u, backend) in [(&pinned, 2), (&tagged, 1), (&plain, 0)] {
        let body = format!("for {u}");
        let (ok, out) = deliver(lmtp, &format!("{u}@example.org"), &body);
        assert!(ok, "{u}: {out}");
        let msg = pool.wait_for_message(u, &body);
        let name = &pool.backend(backend).name;
        assert!(
            msg.contains(&format!("by {name}")),
            "{u} not delivered by {name}:\n{msg}"
        );
    }

    // An unknown recipient gets the backend's 550; the known one of the same transaction
    // gets its mail.
    let mut c = transaction(lmtp);
    assert_eq!(
        cmd(&mut c, "RCPT TO:<ghost@example.org>"),
        "550 5.1.1 <ghost@example.org> User doesn't exist: ghost@example.org"
    );
    assert!(cmd(&mut c, &format!("RCPT TO:<{plain}@example.org>")).starts_with("250 "));
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    let reply = cmd(&mut c, "Subject: mixed\r\n\r\nmixed transaction\r\n.");
    assert!(reply.starts_with("250 "), "{reply}");
    assert!(cmd(&mut c, "QUIT").starts_with("221 "));
    pool.wait_for_message(&plain, "mixed transaction");

    let rejected = "director_lmtp_recipients_total{result=\"rejected\"}";
    assert_eq!(metric(&d, rejected), 1.0);
    let found = "director_auth_lookups_total{result=\"found\"}";
    assert_eq!(metric(&d, found), 4.0);
    let not_found = "director_auth_lookups_total{result=\"not_found\"}";
    assert_eq!(metric(&d, not_found), 1.0);
}

#[test]
fn while_the_auth_service_is_down_recipients_get_451_and_one_log_line() {
    capture_director_log();
    let pool = Pool::start(1);
    let u = user(4);
    let mut auth = AuthService::start(AuthServiceConfig::with_users(&format!(
        "{u}:{{PLAIN}}x::::::"
    )));
    let d = director(&pool, 1, None, &auth);
    let lmtp = d.lmtp[0];
    let to = format!("{u}@example.org");
    let endpoint = auth.master_socket().display().to_string();

    auth.kill();
    let (ok, out) = deliver(lmtp, &to, "while down");
    assert!(!ok, "delivered while the auth service was down:\n{out}");
    assert!(
        out.contains(&format!("451 4.3.0 <{to}> Temporary user lookup failure")),
        "{out}"
    );
    // More recipients, more failures: still one line in the log.
    let mut c = transaction(lmtp);
    for _ in 0..5 {
        assert!(cmd(&mut c, &format!("RCPT TO:<{to}>")).starts_with("451 4.3.0 "));
    }
    assert!(
        cmd(&mut c, "DATA").starts_with("503 "),
        "no recipient took the message"
    );
    assert!(cmd(&mut c, "QUIT").starts_with("221 "));
    assert!(pool.inbox_contents(&u).is_empty(), "nothing was delivered");
    let unusable = |l: &str| l.contains("auth service unusable") && l.contains(&endpoint);
    wait_director_line("the auth-master socket reported down", unusable);
    assert_eq!(director_log().lines().filter(|l| unusable(l)).count(), 1);
    let up = format!("director_auth_service_up{{endpoint=\"{endpoint}\"}}");
    assert_eq!(metric(&d, &up), 0.0);
    let errors = "director_auth_lookups_total{result=\"error\"}";
    assert_eq!(metric(&d, errors), 6.0);
    let deferred = "director_lmtp_recipients_total{result=\"deferred\"}";
    assert_eq!(metric(&d, deferred), 6.0);

    // Back: the message the MTA kept is delivered.
    auth.run();
    let (ok, out) = deliver(lmtp, &to, "after the restart");
    assert!(ok, "{out}");
    pool.wait_for_message(&u, "after the restart");
    wait_director_line("the auth-master socket reported back", |l| {
        l.contains("auth service reachable again") && l.contains(&endpoint)
    });
    assert_eq!(metric(&d, &up), 1.0);
}
