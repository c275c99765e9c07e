//! sieve-connect, the ManageSieve client of the tests (shared by `tests/sieve.rs` and the 2.4
//! suite in `tests/dovecot24/`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Command;

use super::command::run;
use super::dovecot::PASSWORD;

/// Runs sieve-connect against `addr` as `u` (`password` on fd 0); returns (success, output).
pub fn sieve_connect_with(
    addr: SocketAddr,
    u: &str,
    password: &str,
    args: &[&str],
) -> (bool, String) {
    let out = run(
        Command::new("sieve-connect")
            .args(["--server", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--user", u, "--passwordfd", "0", "--notlsverify"])
            .args(args),
        Some(format!("{password}\n").as_bytes()),
    )
    .expect("sieve-connect runs (installed by ./scripts/test)");
    (out.ok, out.text())
}

/// [`sieve_connect_with`] the right password.
pub fn sieve_connect(addr: SocketAddr, u: &str, args: &[&str]) -> (bool, String) {
    sieve_connect_with(addr, u, PASSWORD, args)
}

/// `addr` (a backend, asked directly) lists `script` of `u` as the active one.
pub fn assert_active(addr: SocketAddr, u: &str, script: &str) {
    let (ok, out) = sieve_connect(addr, u, &["--list"]);
    assert!(ok, "list on {addr}: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains(script) && l.contains("ACTIVE")),
        "{script} is not active on {addr}: {out}"
    );
}
