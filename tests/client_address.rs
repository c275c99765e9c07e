//! The real client address, end to end: a load balancer tells the director who the client is
//! with a PROXY header (v1 or v2), and the director tells the Dovecot backend, which logs it as
//! `rip=`. Forwarding is IMAP `ID` / POP3 `XCLIENT` (`forward: auto`), a PROXY v2 header to
//! Dovecot's `haproxy = yes` listeners (`forward: proxy_v2`), or nothing (`forward: none`).
//! The director's session id travels too (`x-session-id`, `XCLIENT SESSION=`), so one session
//! has one id in both programs' logs. A webmail front end in `trusted_networks` may name its
//! own user's address (and its session id) in IMAP `ID` before login, as Dovecot allows.

mod support;

use std::time::Duration;

use support::client::{quote, Conn};
use support::director::{DirectorOptions, TestDirector};
use support::director_log::{capture_director_log, wait_director_line};
use support::dovecot::{user, Pool, PASSWORD};
use support::logs::{field, wait_login};
use support::proxied_logins::{
    self, imap_via_proxy, options, v1_header, v2_header, ProxiedLogins, CLIENT_IP,
};

/// Over a new pool of two: [`logins_via_proxy`] (the pool is dropped after the logins).
fn logins_via_proxy<const N: usize>(
    backend_extra: &str,
    logins: [(&str, usize, Vec<u8>); N],
) -> (ProxiedLogins<N>, Pool) {
    let pool = Pool::start(2);
    (
        proxied_logins::logins_via_proxy(&pool, backend_extra, logins),
        pool,
    )
}

// --- What the director itself logs, to compare session ids. ---

/// The session id the director logged for the login of `u` (one login per user per test).
fn director_session_id(u: &str) -> String {
    let user_field = format!(" user={u} ");
    let line = wait_director_line(&format!("the director's login line for {u}"), |l| {
        l.contains("logged in") && l.contains(&user_field)
    });
    field(&line, "session").unwrap_or_else(|| panic!("no session= in {line}"))
}

// --- The tests. ---

#[test]
fn imap_id_forwards_the_proxy_v1_client_and_the_session_id() {
    capture_director_log();
    let (mut logins, _pool) = logins_via_proxy("", [("imap", 40, v1_header(143))]);
    let line = &logins.assert_client_forwarded()[0];
    // x-connected-ip: the address the client connected to, as the header says.
    assert_eq!(field(line, "lip").as_deref(), Some("127.0.0.1"), "{line}");
    // x-session-id: Dovecot adopts the director's id for the session.
    let session = field(line, "session").expect("session= in the login line");
    assert_eq!(session, director_session_id(&user(40)), "{line}");
    logins.sessions[0].imap_ok("z", "LOGOUT");
}

#[test]
fn pop3_xclient_forwards_the_proxy_v2_client_and_the_session_id() {
    capture_director_log();
    let (mut logins, _pool) = logins_via_proxy("", [("pop3", 41, v2_header(110))]);
    let line = &logins.assert_client_forwarded()[0];
    let session = field(line, "session").expect("session= in the login line");
    assert_eq!(session, director_session_id(&user(41)), "{line}");
    logins.sessions[0].pop3_ok("QUIT");
}

#[test]
fn imap_v2_header_in_and_pop3_v1_header_in_with_forward_auto() {
    // The other pairings of header version and protocol.
    let (logins, _pool) = logins_via_proxy(
        "",
        [("imap", 42, v2_header(143)), ("pop3", 43, v1_header(110))],
    );
    logins.assert_client_forwarded();
}

#[test]
fn proxy_v2_to_dovecot_haproxy_listeners() {
    let (mut logins, _pool) = logins_via_proxy(
        "    forward: proxy_v2\n    ports: {imap: 11143, pop3: 11110}\n",
        [("imap", 44, v1_header(143)), ("pop3", 45, v2_header(110))],
    );
    for line in logins.assert_client_forwarded() {
        assert_eq!(field(line, "lip").as_deref(), Some("127.0.0.1"), "{line}");
    }
    let [imap, pop3] = &mut logins.sessions;
    imap.imap_ok("z", "LOGOUT");
    pop3.pop3_ok("QUIT");
}

#[test]
fn forward_none_keeps_the_client_address_from_the_backend() {
    let (logins, _pool) = logins_via_proxy(
        "    forward: none\n",
        [("imap", 46, v1_header(143)), ("pop3", 47, v2_header(110))],
    );
    for line in &logins.lines {
        let rip = field(line, "rip").expect("rip= in the login line");
        assert_ne!(rip, CLIENT_IP, "{line}");
        assert!(
            rip.starts_with("127."),
            "the director's own address: {line}"
        );
    }
}

#[test]
fn without_a_proxy_header_the_director_forwards_the_tcp_peer() {
    // The control: no PROXY listener, forward auto. Dovecot logs the test client's address.
    let (pool, d) = TestDirector::with_pool(1);
    let u = user(48);
    let _c = imap_via_proxy(d.imap, b"", &u);
    let line = wait_login(pool.backend(0), "imap-login", &u);
    assert_eq!(field(&line, "rip").as_deref(), Some("127.0.0.1"), "{line}");
}

#[test]
fn malformed_proxy_header_closes_without_a_greeting() {
    let (_pool, d) = TestDirector::start_with_pool(1, &options(""));
    let mut bad_version = v2_header(143);
    bad_version[12] = 0x31;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "missing port",
            b"PROXY TCP4 192.0.2.55 127.0.0.1 40001\r\n".to_vec(),
        ),
        (
            "bad address",
            b"PROXY TCP4 192.0.2.555 127.0.0.1 40001 143\r\n".to_vec(),
        ),
        (
            "IPv6 in TCP4",
            b"PROXY TCP4 2001:db8::1 127.0.0.1 40001 143\r\n".to_vec(),
        ),
        (
            "unknown family",
            b"PROXY UDP4 192.0.2.55 127.0.0.1 40001 143\r\n".to_vec(),
        ),
        (
            "no header, IMAP at once",
            b"a LOGIN user0001 secret\r\n".to_vec(),
        ),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("v2, version 3", bad_version),
        (
            "too long",
            [b"PROXY ".as_slice(), &[b'x'; 200], b"\r\n"].concat(),
        ),
    ];
    for addr in [d.imap, d.pop3] {
        for (what, bytes) in &cases {
            let mut c = Conn::connect(addr);
            c.send(bytes);
            let got = c
                .until_closed(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{what} on {addr}: the connection stays open"));
            assert!(
                got.is_empty(),
                "{what} on {addr}: the director answered {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    // A good header still works on the same listeners.
    let _c = imap_via_proxy(d.imap, &v1_header(143), &user(49));
}

#[test]
fn forwarding_survives_starttls_to_the_backend() {
    // ID and XCLIENT are sent after STARTTLS/STLS, on the protected connection.
    let (logins, _pool) = logins_via_proxy(
        "    tls: starttls\n",
        [("imap", 50, v1_header(143)), ("pop3", 51, v1_header(110))],
    );
    for line in logins.assert_client_forwarded() {
        assert!(line.split(", ").any(|f| f == "TLS"), "{line}");
    }
}

/// The address a trusted webmail front end connects from in the test below.
const WEBMAIL_IP: &str = "127.0.0.11";
/// An untrusted client's address.
const STRANGER_IP: &str = "127.0.0.12";

/// Connects from `source`, sends an `ID` that names another client, logs in as `u`, and
/// checks the session works.
fn imap_with_originating_id(d: &TestDirector, source: &str, u: &str) -> Conn {
    let mut c = Conn::connect_from(source.parse().unwrap(), d.imap);
    assert!(c.line().starts_with("* OK"));
    c.imap_ok(
        "i",
        "ID (\"name\" \"webmail\" \"x-originating-ip\" \"192.0.2.7\" \
         \"x-originating-port\" \"51234\" \"x-session-ext-id\" \"abc123\")",
    );
    c.imap_ok("a", &format!("LOGIN {} {}", quote(u), quote(PASSWORD)));
    c.imap_ok("b", "SELECT INBOX");
    c
}

/// The director's `session ended` line of session `id`.
fn director_end_line(id: &str) -> String {
    let session_field = format!("session={id} ");
    wait_director_line(&format!("the director's end line of {id}"), |l| {
        l.contains("session ended") && l.contains(&session_field)
    })
}

#[test]
fn imap_id_from_a_trusted_client_names_the_real_client() {
    capture_director_log();
    let (pool, d) = TestDirector::start_with_pool(
        1,
        &DirectorOptions {
            trusted_networks: vec![format!("{WEBMAIL_IP}/32")],
            extra: "disable_plaintext_auth: false\n".into(),
            ..DirectorOptions::default()
        },
    );
    let (trusted, stranger) = (user(52), user(53));
    let mut t = imap_with_originating_id(&d, WEBMAIL_IP, &trusted);
    let mut s = imap_with_originating_id(&d, STRANGER_IP, &stranger);

    // The trusted front end's user: the backend learns the address the front end named, and
    // the front end's session id.
    let line = wait_login(pool.backend(0), "imap-login", &trusted);
    assert_eq!(field(&line, "rip").as_deref(), Some("192.0.2.7"), "{line}");
    assert_eq!(field(&line, "session").as_deref(), Some("abc123"), "{line}");
    // The stranger: its own address, and the director's session id.
    let line = wait_login(pool.backend(0), "imap-login", &stranger);
    assert_eq!(field(&line, "rip").as_deref(), Some(STRANGER_IP), "{line}");
    let session = field(&line, "session").expect("session= in the login line");
    assert_eq!(session, director_session_id(&stranger), "{line}");

    // The director's own log of the sessions says the same.
    let trusted_id = director_session_id(&trusted);
    t.imap_ok("z", "LOGOUT");
    s.imap_ok("z", "LOGOUT");
    let end = director_end_line(&trusted_id);
    assert_eq!(
        field(&end, "client").as_deref(),
        Some("192.0.2.7:51234"),
        "{end}"
    );
    let end = director_end_line(&session);
    let client = field(&end, "client").unwrap_or_default();
    assert!(client.starts_with(&format!("{STRANGER_IP}:")), "{end}");
}
