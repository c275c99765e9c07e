//! The test harness itself works: real Dovecot backends start, tell themselves apart, die and
//! come back.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::dovecot::{user, Pool, PASSWORD, TRICKY_PASSWORD, TRICKY_USER};

/// Runs curl with `args` and returns its stdout; panics if it fails.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "-m", "20"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let pool = Pool::start(2);
    let login = format!("{}:{PASSWORD}", user(1));
    for b in &pool.backends {
        let greeting = first_line(b.imap());
        assert!(
            greeting.starts_with("* OK") && greeting.ends_with(&format!("{} ready.", b.name)),
            "{}: greeting {greeting:?}",
            b.name
        );
        let id = curl(&[
            &format!("imap://{}/", b.imap()),
            "--user",
            &login,
            "-X",
            "ID NIL",
        ]);
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
    let id = curl(&[
        &format!("imap://{}/", b.imap()),
        "--user",
        &login,
        "-X",
        "ID NIL",
    ]);
    assert!(id.contains("backend1"), "after restart: {id:?}");
}
