//! Logins through a director whose listeners expect a PROXY header, as behind a load
//! balancer: the header names a client ([`CLIENT_IP`]) and the backend's login line must show
//! it as `rip=` once the director forwarded it (IMAP `ID`, POP3 `XCLIENT`, or a PROXY v2
//! header to Dovecot's `haproxy = yes` listeners). Shared by the 2.3 suite
//! (`tests/client_address.rs`) and the 2.4 one (`tests/dovecot24/`).

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};

use super::client::{quote, Conn};
use super::director::{DirectorOptions, TestDirector};
use super::dovecot::{user, Pool, PASSWORD};
use super::logs::{field, wait_login};

/// The client address the load balancer reports (TEST-NET-1: nothing real has it).
pub const CLIENT_IP: &str = "192.0.2.55";
pub const CLIENT_PORT: u16 = 40001;

/// A PROXY v1 header from the client `192.0.2.55:40001` to `127.0.0.1:port`.
pub fn v1_header(port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {CLIENT_IP} 127.0.0.1 {CLIENT_PORT} {port}\r\n").into_bytes()
}

/// The same as a binary PROXY v2 header (written out here by hand, from the spec).
pub fn v2_header(port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, command PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&CLIENT_IP.parse::<Ipv4Addr>().unwrap().octets());
    h.extend_from_slice(&Ipv4Addr::LOCALHOST.octets());
    h.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    h.extend_from_slice(&port.to_be_bytes());
    h
}

/// Listeners expect a PROXY header, and the reported client may log in in plaintext.
pub fn options(backend_extra: &str) -> DirectorOptions {
    DirectorOptions {
        proxy_protocol: true,
        trusted_networks: vec!["127.0.0.0/8".into(), "192.0.2.0/24".into()],
        backend_extra: backend_extra.into(),
        ..DirectorOptions::default()
    }
}

/// Sends `header`, then logs in over IMAP as `u` and checks the session works.
pub fn imap_via_proxy(addr: SocketAddr, header: &[u8], u: &str) -> Conn {
    let mut c = Conn::connect(addr);
    c.send(header);
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    c.imap_ok("a", &format!("LOGIN {} {}", quote(u), quote(PASSWORD)));
    c.imap_ok("b", "SELECT INBOX");
    c
}

/// Sends `header`, then logs in over POP3 as `u` and checks the session works.
pub fn pop3_via_proxy(addr: SocketAddr, header: &[u8], u: &str) -> Conn {
    let mut c = Conn::connect(addr);
    c.send(header);
    let greeting = c.line();
    assert!(greeting.starts_with("+OK"), "{greeting:?}");
    c.pop3_login_as(u, PASSWORD);
    c.pop3_ok("STAT");
    c
}

/// Logins through a director (see [`logins_via_proxy`]).
pub struct ProxiedLogins<const N: usize> {
    /// The sessions, in the order asked for.
    pub sessions: [Conn; N],
    /// The login lines of their backends, in the same order.
    pub lines: [String; N],
    /// The director they went through.
    pub director: TestDirector,
}

impl<const N: usize> ProxiedLogins<N> {
    /// Every backend logged the client the PROXY header named ([`CLIENT_IP`]) as `rip=`;
    /// returns the login lines.
    pub fn assert_client_forwarded(&self) -> &[String; N] {
        for line in &self.lines {
            assert_eq!(field(line, "rip").as_deref(), Some(CLIENT_IP), "{line}");
        }
        &self.lines
    }
}

/// Over `pool` behind a new director with [`options`]`(backend_extra)`: for each
/// `(protocol, i, header)` of `logins`, logs in over `protocol` (`imap`, `pop3`) as `user(i)`
/// after `header` (see [`imap_via_proxy`], [`pop3_via_proxy`]); then waits for the backends'
/// login lines.
pub fn logins_via_proxy<const N: usize>(
    pool: &Pool,
    backend_extra: &str,
    logins: [(&str, usize, Vec<u8>); N],
) -> ProxiedLogins<N> {
    let d = TestDirector::start(pool, &options(backend_extra));
    let logins = logins.map(|(protocol, i, header)| (protocol, user(i), header));
    let sessions = logins
        .each_ref()
        .map(|(protocol, u, header)| match *protocol {
            "imap" => imap_via_proxy(d.imap, header, u),
            _ => pop3_via_proxy(d.pop3, header, u),
        });
    let lines = logins
        .each_ref()
        .map(|(protocol, u, _)| wait_login(d.home(pool, u), &format!("{protocol}-login"), u));
    ProxiedLogins {
        sessions,
        lines,
        director: d,
    }
}
