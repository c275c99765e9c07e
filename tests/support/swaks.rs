//! swaks, the SMTP test client, as the MTA of the LMTP tests: it delivers one message over
//! LMTP to the director or to a backend, by TCP or by a unix socket.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use super::command::run;

/// Where swaks connects.
pub enum Target<'a> {
    Tcp(SocketAddr),
    Socket(&'a Path),
}

/// `swaks --protocol LMTP` to `target`, as `mta.test` sending from `sender@example.org` with
/// a 30 s timeout, plus `args` (`--to`, `--body`...): (success, stdout and stderr).
pub fn lmtp(target: Target, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("swaks");
    cmd.args(["--protocol", "LMTP", "--helo", "mta.test"])
        .args(["--from", "sender@example.org", "--timeout", "30"]);
    match target {
        Target::Tcp(addr) => cmd
            .args(["--server", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()]),
        Target::Socket(path) => cmd.arg("--socket").arg(path),
    };
    let out = run(cmd.args(args), None).expect("swaks runs (installed by ./scripts/test)");
    (out.ok, out.text())
}
