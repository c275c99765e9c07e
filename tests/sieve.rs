//! ManageSieve through the director with a real client (sieve-connect): a script uploaded,
//! listed, activated and fetched back is stored for that user and seen by its own backend.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};

/// Runs sieve-connect against `addr` as `u` (password on fd 0); returns (success, output).
fn sieve_connect(addr: SocketAddr, u: &str, args: &[&str]) -> (bool, String) {
    let mut child = Command::new("sieve-connect")
        .args([
            "--server",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(["--user", u, "--passwordfd", "0", "--notlsverify"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sieve-connect runs (installed by ./scripts/test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn sieve_connect_uploads_lists_activates_and_fetches_through_the_director() {
    let pool = Pool::start(3);
    let d = TestDirector::start(&pool, &DirectorOptions::default());
    let u = user(21);
    let home = pool
        .by_ip(d.router.route(&u, "").unwrap().backend.ip)
        .unwrap();
    let script = "require \"fileinto\";\r\nif header :contains \"subject\" \"[list]\" {\r\n  fileinto \"INBOX\";\r\n}\r\n";
    let local = pool.dir().join("filter.sieve");
    std::fs::write(&local, script).unwrap();
    let local = local.to_str().unwrap();

    let (ok, out) = sieve_connect(
        d.sieve,
        &u,
        &["--upload", "--localsieve", local, "--remotesieve", "lists"],
    );
    assert!(ok, "upload: {out}");
    let (ok, out) = sieve_connect(d.sieve, &u, &["--activate", "--remotesieve", "lists"]);
    assert!(ok, "activate: {out}");
    let (ok, out) = sieve_connect(d.sieve, &u, &["--list"]);
    assert!(ok, "list: {out}");
    let line = out
        .lines()
        .find(|l| l.contains("lists"))
        .unwrap_or_else(|| panic!("script not listed: {out}"));
    assert!(line.contains("ACTIVE"), "not active: {out}");
    let fetched = pool.dir().join("fetched.sieve");
    let (ok, out) = sieve_connect(
        d.sieve,
        &u,
        &[
            "--download",
            "--remotesieve",
            "lists",
            "--localsieve",
            fetched.to_str().unwrap(),
        ],
    );
    assert!(ok, "download: {out}");
    assert_eq!(std::fs::read_to_string(&fetched).unwrap(), script);

    // Every session went to the user's backend, and that backend sees the active script when
    // the client talks to it directly.
    let (ok, out) = sieve_connect(home.sieve(), &u, &["--list"]);
    assert!(ok, "direct list: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains("lists") && l.contains("ACTIVE")),
        "{out}"
    );
    for b in &pool.backends {
        let logins = b
            .log()
            .lines()
            .filter(|l| l.contains("managesieve-login: Info: Login:") && l.contains(&u))
            .count();
        if b.name == home.name {
            assert!(logins >= 4, "{} saw {logins} logins of {u}", b.name);
        } else {
            assert_eq!(logins, 0, "{} saw a login of {u}:\n{}", b.name, b.log());
        }
    }
    // A wrong password is a failed login, not an error of the director.
    let mut child = Command::new("sieve-connect")
        .args([
            "--server",
            "127.0.0.1",
            "--port",
            &d.sieve.port().to_string(),
        ])
        .args(["--user", &u, "--passwordfd", "0", "--notlsverify", "--list"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"wrong\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
}
