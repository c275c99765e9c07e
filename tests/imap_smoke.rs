//! The thinnest whole path: an IMAP and a POP3 login through the director land on the ring's
//! backend of a real Dovecot pool.

mod support;

use support::client::{imap_login, Conn};
use support::director::{ready, TestDirector};
use support::dovecot::{user, PASSWORD};

#[test]
fn imap_login_lands_on_the_rings_backend_and_sticks() {
    let (pool, d) = TestDirector::with_pool(3);
    for i in 1..=6 {
        let u = user(i);
        let expected_ip = ready(d.router.route(&u, "")).unwrap().backend.ip;
        let expected = pool.by_ip(expected_ip).unwrap().name.clone();
        let (mut c1, b1) = imap_login(d.imap, &u, PASSWORD);
        assert_eq!(b1, expected, "{u}");
        let (mut c2, b2) = imap_login(d.imap, &u, PASSWORD);
        assert_eq!(b2, expected, "{u} second session");
        c1.imap_ok("a2", "LOGOUT");
        c2.imap_ok("a2", "SELECT INBOX");
    }
}

#[test]
fn pop3_user_pass_login() {
    let (_pool, d) = TestDirector::with_pool(2);
    let mut c = Conn::pop3_greeted(d.pop3);
    c.send(format!("USER {}\r\n", user(1)).as_bytes());
    assert!(c.line().starts_with("+OK"));
    c.send(format!("PASS {PASSWORD}\r\n").as_bytes());
    let ok = c.line();
    assert!(ok.starts_with("+OK"), "{ok}");
    c.send(b"STAT\r\n");
    let stat = c.line();
    assert!(stat.starts_with("+OK 0 0"), "{stat}");
    c.send(b"QUIT\r\n");
    assert!(c.line().starts_with("+OK"));
}
