//! POP3 through the director against real Dovecot backends: every way a client logs in, what
//! it sees before login, and that it reaches the right mailbox on the shared store.

mod support;

use support::client::{base64, curl, imap_append, imap_login, pop3_login, Conn};
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, PoolOptions, PASSWORD};
use support::logs::{login_lines, wait_login};

/// A message with CRLF line ends, a line that must be dot-stuffed on the wire, and a body
/// that names `tag` so that two messages differ.
fn message(tag: &str) -> Vec<u8> {
    format!(
        "From: sender@example.org\r\nTo: someone@example.org\r\nSubject: {tag}\r\n\r\n\
         Hello {tag}.\r\n.A line that starts with a dot.\r\n..and one with two.\r\nBye.\r\n"
    )
    .into_bytes()
}

/// Connects to the director's POP3 listener and reads the greeting.
fn connect(d: &TestDirector) -> Conn {
    let mut c = Conn::connect(d.pop3);
    let greeting = c.line();
    assert_eq!(greeting, "+OK Director ready.");
    c
}

/// After a login: the mailbox answers, and QUIT ends the session.
fn assert_logged_in_then_quit(c: &mut Conn) {
    let stat = c.pop3("STAT");
    assert!(stat.starts_with("+OK 0 0"), "{stat}");
    let quit = c.pop3("QUIT");
    assert!(quit.starts_with("+OK"), "{quit}");
    assert!(c.closed(), "the connection stays open after QUIT");
}

#[test]
fn capa_before_login_offers_user_sasl_and_stls() {
    let (pool, d) = TestDirector::with_pool(1);
    let mut c = connect(&d);
    assert_eq!(c.pop3("CAPA"), "+OK");
    let mut caps = Vec::new();
    loop {
        let l = c.line();
        assert!(!l.is_empty(), "CAPA not terminated: {caps:?}");
        if l == "." {
            break;
        }
        caps.push(l);
    }
    for expected in ["USER", "STLS", "SASL PLAIN LOGIN"] {
        assert!(caps.iter().any(|c| c == expected), "{expected} in {caps:?}");
    }
    // CAPA is a pre-login command of the director: no backend saw anything.
    assert!(login_lines(&pool.backend(0).log(), "pop3-login", &user(1)).is_empty());
    assert_logged_in_then_quit(&mut pop3_login(d.pop3, &user(1), PASSWORD));
}

/// Starts a director over `backends` backends, logs in with `login` on a new connection, and
/// checks the session with [`assert_logged_in_then_quit`].
fn logs_in(backends: usize, login: impl FnOnce(&mut Conn)) {
    let (_pool, d) = TestDirector::with_pool(backends);
    let mut c = connect(&d);
    login(&mut c);
    assert_logged_in_then_quit(&mut c);
}

#[test]
fn user_pass_login() {
    logs_in(2, |c| c.pop3_login_as(&user(2), PASSWORD));
}

#[test]
fn auth_plain_with_initial_response() {
    logs_in(2, |c| {
        let response = base64(format!("\0{}\0{PASSWORD}", user(3)).as_bytes());
        c.pop3_ok(&format!("AUTH PLAIN {response}"));
    });
}

#[test]
fn auth_plain_with_continuation() {
    logs_in(2, |c| {
        let go = c.pop3("AUTH PLAIN");
        assert!(go.starts_with('+') && !go.starts_with("+OK"), "{go}");
        c.pop3_ok(&base64(format!("\0{}\0{PASSWORD}", user(4)).as_bytes()));
    });
}

#[test]
fn auth_login() {
    logs_in(2, |c| {
        assert_eq!(c.pop3("AUTH LOGIN"), format!("+ {}", base64(b"Username:")));
        assert_eq!(
            c.pop3(&base64(user(5).as_bytes())),
            format!("+ {}", base64(b"Password:"))
        );
        c.pop3_ok(&base64(PASSWORD.as_bytes()));
    });
}

/// Dovecot settings that take away its brute-force slow-down (a 2 s delay on each failed
/// login, and anvil's penalty that grows to 15 s per client address, which here is always
/// 127.0.0.1): a test of failed logins then takes milliseconds instead of ~16 s. What the
/// client is told does not change.
const NO_AUTH_PENALTY: &str =
    "auth_failure_delay = 0\nservice anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

#[test]
fn wrong_password_is_an_auth_error_and_a_retry_succeeds() {
    let pool = Pool::start_with(PoolOptions {
        backends: 2,
        extra_config: NO_AUTH_PENALTY.into(),
        ..PoolOptions::default()
    });
    let d = TestDirector::start(&pool, &DirectorOptions::default());
    let u = user(6);
    let mut c = connect(&d);
    c.pop3_ok(&format!("USER {u}"));
    let refused = c.pop3("PASS not-the-password");
    assert!(refused.starts_with("-ERR [AUTH] "), "{refused}");
    // The same with SASL: still [AUTH], not a temporary failure.
    let refused = c.pop3(&format!(
        "AUTH PLAIN {}",
        base64(format!("\0{u}\0nope").as_bytes())
    ));
    assert!(refused.starts_with("-ERR [AUTH] "), "{refused}");
    c.pop3_login_as(&u, PASSWORD);
    assert_logged_in_then_quit(&mut c);
}

#[test]
fn unknown_command_is_an_error_and_quit_says_goodbye() {
    let (_pool, d) = TestDirector::with_pool(1);
    let mut c = connect(&d);
    let e = c.pop3("FROBNICATE now");
    assert!(e.starts_with("-ERR"), "{e}");
    assert!(c.pop3("NOOP").starts_with("+OK"), "still usable");
    let e = c.pop3("PASS before-user");
    assert!(e.starts_with("-ERR"), "{e}");
    let bye = c.pop3("QUIT");
    assert!(bye.starts_with("+OK"), "{bye}");
    assert!(c.closed());
    // After login, unknown commands are the backend's to answer, and the session goes on.
    let mut c = pop3_login(d.pop3, &user(7), PASSWORD);
    let e = c.pop3("FROBNICATE");
    assert!(e.starts_with("-ERR"), "{e}");
    assert_logged_in_then_quit(&mut c);
}

#[test]
fn message_stored_through_another_backend_is_retrieved_byte_exact() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(8);
    let home = d.home(&pool, &u);
    let other = pool.backends.iter().find(|b| b.ip != home.ip).unwrap();
    // Straight to the backend the director does not use for this user: the store is shared.
    let first = message("first");
    imap_append(other.imap(), &u, PASSWORD, &first);
    // And one through the director, over IMAP.
    let second = message("second");
    imap_append(d.imap, &u, PASSWORD, &second);

    let mut c = pop3_login(d.pop3, &u, PASSWORD);
    let total = first.len() + second.len();
    assert_eq!(c.pop3("STAT"), format!("+OK 2 {total}"));
    c.pop3_ok("LIST");
    let list = String::from_utf8(c.pop3_body()).unwrap();
    assert_eq!(list, format!("1 {}\r\n2 {}\r\n", first.len(), second.len()));
    assert_eq!(c.pop3("LIST 2"), format!("+OK 2 {}", second.len()));
    for (n, expected) in [(1, &first), (2, &second)] {
        c.pop3_ok(&format!("RETR {n}"));
        let got = c.pop3_body();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "RETR {n}"
        );
    }
    c.pop3_ok("QUIT");
    // The POP3 session ran on the user's own backend, not on the one the mail came through.
    wait_login(home, "pop3-login", &u);
    assert!(login_lines(&other.log(), "pop3-login", &u).is_empty());
}

#[test]
fn curl_lists_and_retrieves() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(9);
    let (first, second) = (message("one"), message("two"));
    imap_append(pool.backend(0).imap(), &u, PASSWORD, &first);
    imap_append(pool.backend(1).imap(), &u, PASSWORD, &second);
    let login = format!("{u}:{PASSWORD}");
    let (ok, out, err) = curl(&[&format!("pop3://{}/", d.pop3), "-u", &login]);
    assert!(ok, "curl LIST: {err}");
    assert_eq!(out, format!("1 {}\r\n2 {}\r\n", first.len(), second.len()));
    for (n, expected) in [(1, &first), (2, &second)] {
        let (ok, out, err) = curl(&[&format!("pop3://{}/{n}", d.pop3), "-u", &login]);
        assert!(ok, "curl RETR {n}: {err}");
        assert_eq!(out.as_bytes(), expected.as_slice(), "curl RETR {n}");
    }
    // A wrong password is a login failure curl reports, not a hang.
    let (ok, _, err) = curl(&[&format!("pop3://{}/", d.pop3), "-u", &format!("{u}:bad")]);
    assert!(!ok, "curl with a wrong password succeeded");
    assert!(
        err.contains("67") || err.to_lowercase().contains("login"),
        "{err}"
    );
}

#[test]
fn pop3_and_imap_sessions_of_a_user_share_one_backend() {
    let (pool, d) = TestDirector::with_pool(3);
    for i in 10..16 {
        let u = user(i);
        let ring = d.home(&pool, &u);
        let (mut imap, mut pop3);
        if i % 2 == 0 {
            pop3 = pop3_login(d.pop3, &u, PASSWORD);
            // The ring would now send new users elsewhere; this user has a record.
            d.state.set_weight(ring.ip, 0).unwrap();
            let (c, backend) = imap_login(d.imap, &u, PASSWORD);
            imap = c;
            assert_eq!(backend, ring.name, "{u}: IMAP after POP3");
        } else {
            let (c, backend) = imap_login(d.imap, &u, PASSWORD);
            imap = c;
            assert_eq!(backend, ring.name, "{u}: IMAP first");
            d.state.set_weight(ring.ip, 0).unwrap();
            pop3 = pop3_login(d.pop3, &u, PASSWORD);
        }
        // Dovecot saw the POP3 login of this user on the same backend, and on no other.
        wait_login(ring, "pop3-login", &u);
        for b in pool.backends.iter().filter(|b| b.ip != ring.ip) {
            assert!(
                login_lines(&b.log(), "pop3-login", &u).is_empty(),
                "{u} on {}",
                b.name
            );
            assert!(
                login_lines(&b.log(), "imap-login", &u).is_empty(),
                "{u} on {}",
                b.name
            );
        }
        let sessions = d.sessions_of(&u);
        assert_eq!(sessions.len(), 2, "{sessions:?}");
        assert!(
            sessions.iter().all(|s| s.backend.ip() == ring.ip),
            "{sessions:?}"
        );
        pop3.pop3_ok("QUIT");
        imap.imap_ok("z", "LOGOUT");
        d.state.set_weight(ring.ip, 100).unwrap();
    }
}
