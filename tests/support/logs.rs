//! Reading what the backends logged. Dovecot writes its log asynchronously (through the log
//! process), so a line about a login that just succeeded may appear a moment later: the
//! helpers here poll.
//!
//! Dovecot 2.3 logs a login as
//! `... imap-login: Info: Login: user=<user0001>, method=PLAIN, rip=192.0.2.55, lip=127.0.0.1,
//! mpid=1234, TLS, session=<...>`; Dovecot 2.4 writes `Logged in: user=<...>` with the same
//! fields.

#![allow(dead_code)]

use std::time::Duration;

use super::dovecot::{Backend, Pool};
use super::wait::wait_until;

/// How long a log line may take to appear.
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// The lines of `log` that record a successful login of `user` by `service` (`imap-login`,
/// `pop3-login`).
pub fn login_lines(log: &str, service: &str, user: &str) -> Vec<String> {
    let needles = [
        format!("Login: user=<{user}>"),
        format!("Logged in: user=<{user}>"),
    ];
    log.lines()
        .filter(|l| l.contains(&format!("{service}: ")) && needles.iter().any(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Every login of `user` by `service` went to `home`: it logged `at_least` of them, and no
/// other backend of `pool` logged any.
pub fn assert_logins_only_on(
    pool: &Pool,
    home: &Backend,
    service: &str,
    user: &str,
    at_least: usize,
) {
    for b in &pool.backends {
        let logins = login_lines(&b.log(), service, user).len();
        if b.name == home.name {
            assert!(
                logins >= at_least,
                "{} saw {logins} logins of {user}",
                b.name
            );
        } else {
            assert_eq!(logins, 0, "{} saw a login of {user}:\n{}", b.name, b.log());
        }
    }
}

/// Waits until `backend` has logged `n` logins of `user` by `service`, and returns them.
pub fn wait_logins(backend: &Backend, service: &str, user: &str, n: usize) -> Vec<String> {
    wait_until(
        &format!("{n} {service} login(s) of {user} in {}'s log", backend.name),
        LOG_WAIT,
        || {
            let lines = login_lines(&backend.log(), service, user);
            (lines.len() >= n).then_some(lines)
        },
    )
}

/// Waits for the first login of `user` by `service` on `backend` and returns its line.
pub fn wait_login(backend: &Backend, service: &str, user: &str) -> String {
    wait_logins(backend, service, user, 1).remove(0)
}

/// The value of `key=` in a Dovecot log line (`rip`, `lip`, `session` without its `<>`).
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let value = line[start..].split([',', ' ']).next()?;
    Some(value.trim_matches(['<', '>']).to_owned())
}

/// Whether a Dovecot login line says the connection was TLS (its `TLS` tag; a plaintext one
/// has none, or `secured` for a trusted network).
pub fn tls_flag(line: &str) -> bool {
    line.split(", ").any(|f| f == "TLS")
}
