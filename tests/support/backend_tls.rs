//! TLS from the director to the backends, seen from the backend: Dovecot's login line says
//! `TLS` for a login over STARTTLS or implicit TLS. Shared by the 2.3 suite (`tests/tls.rs`)
//! and the 2.4 one (`tests/dovecot24/`).

#![allow(dead_code)]

use super::client::{imap_login, pop3_login};
use super::director::{ready, DirectorOptions, TestDirector};
use super::dovecot::{user, Pool, PASSWORD};
use super::logs::{tls_flag, wait_login};

/// Logs in through the director over IMAP and POP3 as `u`, and returns the backend's login
/// lines for both (IMAP first).
pub fn login_both_ways(pool: &Pool, d: &TestDirector, u: &str) -> (String, String) {
    let (mut imap, backend) = imap_login(d.imap, u, PASSWORD);
    let home = pool
        .by_ip(ready(d.router.route(u, "")).unwrap().backend.ip)
        .unwrap();
    assert_eq!(backend, home.name);
    let r = imap.imap("s", "SELECT INBOX");
    assert!(r.last().unwrap().starts_with("s OK"), "{r:?}");
    let mut pop3 = pop3_login(d.pop3, u, PASSWORD);
    let stat = pop3.pop3("STAT");
    assert!(stat.starts_with("+OK"), "{stat}");
    pop3.pop3_ok("QUIT");
    imap.imap_ok("z", "LOGOUT");
    (
        wait_login(home, "imap-login", u),
        wait_login(home, "pop3-login", u),
    )
}

/// The backend settings of STARTTLS and of implicit TLS (on Dovecot's IMAPS and POP3S ports).
pub const STARTTLS: &str = "    tls: starttls\n";
pub const IMPLICIT_TLS: &str = "    tls: implicit\n    ports: {imap: 10993, pop3: 10995}\n";

/// Through a director whose backends are configured with `backend_extra`, `users` log in over
/// IMAP and POP3, and Dovecot logs every one of those logins as over TLS.
pub fn logins_are_tls(pool: &Pool, backend_extra: &str, users: &[usize]) {
    let d = TestDirector::start(pool, &DirectorOptions::with_backend_extra(backend_extra));
    for u in users {
        let (imap, pop3) = login_both_ways(pool, &d, &user(*u));
        assert!(tls_flag(&imap), "IMAP login not over TLS: {imap}");
        assert!(tls_flag(&pop3), "POP3 login not over TLS: {pop3}");
    }
}
