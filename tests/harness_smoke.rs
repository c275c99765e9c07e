//! The test harness itself works: real Dovecot backends start, tell themselves apart, die and
//! come back.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::dovecot::{user, Pool, PASSWORD, TRICKY_PASSWORD, TRICKY_USER};
use support::swaks::{self, Target};

/// Runs curl with `args` and returns its stdout; panics if it fails.
fn curl(args: &[&str]) -> String {
    let (ok, out, err) = support::client::curl(args);
    assert!(ok, "curl {args:?}: {err}");
    out
}

/// What curl prints for `ID NIL` after logging in to the IMAP server at `addr` with `login`
/// (`user:password`).
fn imap_id(addr: SocketAddr, login: &str) -> String {
    curl(&[&format!("imap://{addr}/"), "--user", login, "-X", "ID NIL"])
}

/// The first line a server sends.
fn first_line(addr: std::net::SocketAddr) -> String {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

#[test]
fn backends_answer_tell_apart_die_and_restart() {
    let started = std::time::Instant::now();
    let pool = Pool::start(2);
    eprintln!("Pool::start(2) took {:?}", started.elapsed());
    let login = format!("{}:{PASSWORD}", user(1));
    for b in &pool.backends {
        let greeting = first_line(b.imap());
        assert!(
            greeting.starts_with("* OK") && greeting.ends_with(&format!("{} ready.", b.name)),
            "{}: greeting {greeting:?}",
            b.name
        );
        let id = imap_id(b.imap(), &login);
        assert!(
            id.contains(&format!("(\"x-backend\" \"{}\")", b.name)),
            "{}: ID answered {id:?}",
            b.name
        );
        // LOGIN with a password full of quoting traps, over implicit TLS checked by the CA.
        let id = curl(&[
            "--cacert",
            pool.tls.ca.to_str().unwrap(),
            "--login-options",
            "AUTH=LOGIN",
            &format!("imaps://{}/", b.imaps()),
            "--user",
            &format!("{TRICKY_USER}:{TRICKY_PASSWORD}"),
            "-X",
            "ID NIL",
        ]);
        assert!(id.contains(&b.name), "{}: ID answered {id:?}", b.name);
    }
    assert!(pool
        .backend(0)
        .log()
        .contains("imap-login: Info: Login: user=<user0001>"));

    // POP3: an empty maildir lists nothing, but the login must succeed.
    curl(&[
        &format!("pop3://{}/", pool.backend(1).pop3()),
        "--user",
        &login,
    ]);
    assert!(pool
        .backend(1)
        .log()
        .contains("pop3-login: Info: Login: user=<user0001>"));

    let b = pool.backend(0);
    b.kill();
    let refused = TcpStream::connect_timeout(&b.imap(), Duration::from_secs(2));
    assert!(refused.is_err(), "killed backend still accepts connections");
    assert!(TcpStream::connect(pool.backend(1).imap()).is_ok());
    b.start();
    let id = imap_id(b.imap(), &login);
    assert!(id.contains("backend1"), "after restart: {id:?}");
}

#[test]
fn pause_lmtp_store_and_reference_director() {
    let pool = Pool::start(2);
    let started = std::time::Instant::now();
    let b = pool.backend(1);

    // Paused: the kernel accepts, nobody greets.
    b.pause();
    let stream = TcpStream::connect(b.imap()).expect("a paused backend still accepts");
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut line = String::new();
    assert!(
        BufReader::new(stream).read_line(&mut line).is_err(),
        "paused backend greeted {line:?}"
    );
    b.resume();
    assert!(first_line(b.imap()).ends_with("backend2 ready."));

    // LMTP to one backend lands in the shared store; the recipient's domain is dropped.
    let (ok, out) = swaks::lmtp(
        Target::Tcp(b.lmtp()),
        &[
            "--to",
            "User0002@example.com",
            "--body",
            "hello from the harness",
        ],
    );
    assert!(ok, "{out}");
    let mail = pool.inbox_contents(&user(2));
    assert_eq!(mail.len(), 1, "{:?}", pool.inbox_messages(&user(2)));
    assert!(mail[0].contains("by backend2"), "{}", mail[0]);

    // The reference director proxies to the pool's backends (it checks no password).
    let hosts: Vec<_> = pool.backends.iter().map(|b| (b.ip, 100)).collect();
    let reference = support::dovecot::RefDirector::start(&hosts, "%Ln");
    let hashed = reference.hashed(&[user(2)])[0].unwrap();
    let id = imap_id(
        SocketAddr::new(reference.ip, support::dovecot::IMAP_PORT),
        &format!("{}:{PASSWORD}", user(2)),
    );
    let name = &pool.by_ip(hashed).unwrap().name;
    assert!(
        id.contains(name.as_str()),
        "director sent user0002 to {hashed}, ID said {id:?}"
    );
    eprintln!(
        "pause, LMTP and reference director in {:?}",
        started.elapsed()
    );
}
