//! After login, through the director against a real Dovecot pool: the backend's answers reach
//! the client (its capabilities in the login reply), the session is relayed untouched (big
//! APPENDs with either kind of literal, big FETCHes byte for byte, IDLE, commands pipelined
//! with the login), and the director knows the live session until it ends.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use director::protocol::decision::Protocol;
use support::client::{assert_ok, base64, Conn};
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, PoolOptions, IMAP_PORT, PASSWORD};
use support::wait::wait_for;

/// Connects to `addr` (the director or a backend), reads the greeting and logs in with LOGIN;
/// returns the connection and the tagged OK line.
fn login(addr: SocketAddr, u: &str) -> (Conn, String) {
    let mut c = Conn::connect(addr);
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let reply = c.imap("a", &format!("LOGIN {u} {PASSWORD}"));
    let ok = assert_ok(&reply, "a", "login").to_owned();
    (c, ok)
}

/// [`login`], then `SELECT INBOX`, which must be empty; returns the connection and the reply to
/// SELECT.
fn login_to_empty_inbox(addr: SocketAddr, u: &str) -> (Conn, Vec<String>) {
    let (mut c, _) = login(addr, u);
    let reply = c.imap("b", "SELECT INBOX");
    assert_ok(&reply, "b", "SELECT INBOX");
    assert!(reply.iter().any(|l| l == "* 0 EXISTS"), "{reply:?}");
    (c, reply)
}

/// The `[CAPABILITY ...]` list of a reply line.
fn capability_code(line: &str) -> Vec<String> {
    let start = line
        .find("[CAPABILITY ")
        .unwrap_or_else(|| panic!("no [CAPABILITY ...] in {line:?}"))
        + 12;
    let list = line[start..].split(']').next().unwrap();
    list.split(' ').map(str::to_owned).collect()
}

/// A message of at least `size` bytes, CRLF lines only, deterministic for `id`: headers, then
/// lines of varied printable and UTF-8 text, among them lines that look like IMAP protocol
/// (tagged replies, `DONE`, literal announcements) so that a relay that parses anything shows.
fn message(id: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.org\r\nTo: {id}@example.org\r\nSubject: {id}\r\n\
         Message-ID: <{id}@director.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    .into_bytes();
    let protocol_like = [
        "a OK LOGIN completed",
        "* BYE Disconnected by the director.",
        "DONE",
        "+ idling",
        "zid OK [CAPABILITY IMAP4rev1] fake",
        "x LOGOUT {5}",
        ")",
        "* 1 FETCH (BODY[] {3}",
        "Grüße aus Köln, 東京からこんにちは",
        "",
    ];
    let mut state: u64 = id.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut i = 0usize;
    while m.len() < size {
        if i.is_multiple_of(61) {
            m.extend_from_slice(protocol_like[(i / 61) % protocol_like.len()].as_bytes());
        } else {
            // xorshift: printable ASCII of varied lengths, up to 200 bytes.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 200) as usize;
            m.extend_from_slice(format!("{i:06} ").as_bytes());
            for k in 0..len {
                let v = state.rotate_left(k as u32 % 64) as usize + k;
                m.push(b' ' + (v % 95) as u8);
            }
        }
        m.extend_from_slice(b"\r\n");
        i += 1;
    }
    m
}

/// The UID an `APPEND` reply assigned (`[APPENDUID <validity> <uid>]`).
fn appended_uid(line: &str) -> u32 {
    let start = line
        .find("[APPENDUID ")
        .unwrap_or_else(|| panic!("no APPENDUID in {line:?}"));
    line[start..]
        .split([' ', ']'])
        .nth(2)
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("bad APPENDUID in {line:?}"))
}

/// `UID FETCH uid (RFC822.SIZE <item>)` for an item answered with one literal
/// (`BODY.PEEK[]`, `BODY.PEEK[]<start.length>`...): the size and the literal's bytes.
fn fetch(c: &mut Conn, tag: &str, uid: u32, item: &str) -> (usize, Vec<u8>) {
    c.send(format!("{tag} UID FETCH {uid} (RFC822.SIZE {item})\r\n").as_bytes());
    let (lines, mut literals) = c.until_tagged_with_literals(tag);
    assert_ok(&lines, tag, "UID FETCH");
    assert_eq!(literals.len(), 1, "one literal expected in {lines:?}");
    let fetch_line = lines
        .iter()
        .find(|l| l.starts_with("* ") && l.contains(" FETCH ("))
        .unwrap_or_else(|| panic!("no FETCH reply in {lines:?}"));
    let size = fetch_line
        .split("RFC822.SIZE ")
        .nth(1)
        .and_then(|s| s.split([' ', ')']).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no RFC822.SIZE in {fetch_line:?}"));
    (size, literals.remove(0))
}

/// Panics with the first differing offset unless `got == expected`.
fn assert_same_bytes(got: &[u8], expected: &[u8], what: &str) {
    if got != expected {
        let at = got
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        panic!(
            "{what}: {} bytes received, {} expected, first difference at byte {at}",
            got.len(),
            expected.len()
        );
    }
}

#[test]
fn login_reply_carries_the_backends_capabilities() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(21);
    let backend = d.home(&pool, &u);
    let (mut direct, direct_ok) = login(backend.imap(), &u);
    let direct_caps = capability_code(&direct_ok);
    assert_ok(&direct.imap("z", "LOGOUT"), "z", "direct LOGOUT");
    // Post-login capabilities the director itself never announces.
    for cap in ["MOVE", "UIDPLUS", "NAMESPACE"] {
        assert!(direct_caps.iter().any(|c| c == cap), "{direct_ok}");
    }

    let (mut c, ok) = login(d.imap, &u);
    assert_eq!(capability_code(&ok), direct_caps, "LOGIN reply: {ok}");
    let reply = c.imap("b", "CAPABILITY");
    assert_ok(&reply, "b", "CAPABILITY");
    let listed: Vec<String> = reply[0]
        .strip_prefix("* CAPABILITY ")
        .unwrap_or_else(|| panic!("{reply:?}"))
        .split(' ')
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, direct_caps, "CAPABILITY after login");

    let mut c = Conn::connect(d.imap);
    c.line();
    let response = base64(format!("\0{u}\0{PASSWORD}").as_bytes());
    let reply = c.imap("a", &format!("AUTHENTICATE PLAIN {response}"));
    let ok = assert_ok(&reply, "a", "AUTHENTICATE PLAIN");
    assert_eq!(capability_code(ok), direct_caps, "AUTHENTICATE reply: {ok}");
}

#[test]
fn append_and_fetch_back_a_mebibyte_byte_for_byte() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(22);
    let (mut c, reply) = login_to_empty_inbox(d.imap, &u);
    assert!(reply.last().unwrap().contains("[READ-WRITE]"), "{reply:?}");

    // A synchronising literal: the client waits for the backend's `+`.
    let first = message("sync-literal", 1 << 20);
    c.send(format!("c APPEND INBOX (\\Seen) {{{}}}\r\n", first.len()).as_bytes());
    c.continuation();
    c.send(&first);
    c.send(b"\r\n");
    let reply = c.until_tagged("c");
    let first_uid = appended_uid(assert_ok(&reply, "c", "APPEND {n}"));

    // LITERAL+: command and message in one write.
    let second = message("literal-plus", (1 << 20) + 12_345);
    let mut command = format!("e APPEND INBOX {{{}+}}\r\n", second.len()).into_bytes();
    command.extend_from_slice(&second);
    command.extend_from_slice(b"\r\n");
    c.send(&command);
    let reply = c.until_tagged("e");
    assert!(
        reply.iter().all(|l| !l.starts_with('+')),
        "LITERAL+ APPEND was asked to continue: {reply:?}"
    );
    let second_uid = appended_uid(assert_ok(&reply, "e", "APPEND {n+}"));

    for (tag, uid, expected) in [("f", first_uid, &first), ("g", second_uid, &second)] {
        let (size, body) = fetch(&mut c, tag, uid, "BODY.PEEK[]");
        assert_eq!(size, expected.len(), "RFC822.SIZE of UID {uid}");
        assert_same_bytes(&body, expected, &format!("BODY[] of UID {uid}"));
    }
    let reply = c.imap("h", "NOOP");
    assert_ok(&reply, "h", "NOOP after the FETCHes");
    assert_eq!(pool.inbox_messages(&u).len(), 2, "messages in the store");
}

#[test]
fn a_large_message_on_the_backend_is_fetched_whole() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(23);
    // Stored by the backend directly, not through the director.
    let big = message("stored-directly", 5 << 20);
    let (mut direct, _) = login(d.home(&pool, &u).imap(), &u);
    let mut command = format!("b APPEND INBOX {{{}+}}\r\n", big.len()).into_bytes();
    command.extend_from_slice(&big);
    command.extend_from_slice(b"\r\n");
    direct.send(&command);
    let reply = direct.until_tagged("b");
    let uid = appended_uid(assert_ok(&reply, "b", "direct APPEND"));
    assert_ok(&direct.imap("c", "LOGOUT"), "c", "direct LOGOUT");

    let (mut c, _) = login(d.imap, &u);
    let reply = c.imap("b", "EXAMINE INBOX");
    assert_ok(&reply, "b", "EXAMINE INBOX");
    let (size, body) = fetch(&mut c, "c", uid, "BODY.PEEK[]");
    assert_eq!(size, big.len());
    assert_same_bytes(&body, &big, "BODY[] of a 5 MiB message");
    let (_, part) = fetch(&mut c, "d", uid, "BODY.PEEK[]<1000000.70000>");
    assert_same_bytes(&part, &big[1_000_000..1_070_000], "a partial FETCH");
    let reply = c.imap("e", "LOGOUT");
    assert!(reply[0].starts_with("* BYE"), "{reply:?}");
    assert_ok(&reply, "e", "LOGOUT");
}

#[test]
fn idle_sees_a_message_appended_by_another_session() {
    let (pool, d) = TestDirector::with_pool(3);
    let u = user(24);
    let (mut a, _) = login_to_empty_inbox(d.imap, &u);
    a.send(b"c IDLE\r\n");
    let cont = a.continuation();
    assert!(cont.starts_with("+ "), "{cont}");

    let (mut b, _) = login(d.imap, &u);
    assert_eq!(
        b.imap_backend(),
        d.home(&pool, &u).name,
        "second session on another backend"
    );
    let small = message("idle", 300);
    let mut command = format!("d APPEND INBOX {{{}+}}\r\n", small.len()).into_bytes();
    command.extend_from_slice(&small);
    command.extend_from_slice(b"\r\n");
    b.send(&command);
    assert_ok(&b.until_tagged("d"), "d", "APPEND from the second session");

    let started = Instant::now();
    loop {
        let line = a.line();
        assert!(!line.is_empty(), "IDLE session closed");
        assert!(line.starts_with("* "), "during IDLE: {line:?}");
        if line == "* 1 EXISTS" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no EXISTS");
    }
    a.send(b"DONE\r\n");
    assert_ok(&a.until_tagged("c"), "c", "IDLE after DONE");
    let (_, body) = fetch(&mut a, "e", 1, "BODY.PEEK[]");
    assert_same_bytes(&body, &small, "the message seen in IDLE");
}

#[test]
fn commands_pipelined_with_the_login_are_answered() {
    // One login fails on purpose: without Dovecot's 2 s failure delay and its auth penalty
    // (an anvil socket the auth process cannot open), as in `imap_frontend.rs`.
    let pool = Pool::start_with(PoolOptions {
        backends: 2,
        extra_config: "auth_failure_delay = 0\nservice anvil {\n  \
                       unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
            .into(),
        ..PoolOptions::default()
    });
    let d = TestDirector::start(&pool, &DirectorOptions::default());
    let u = user(25);
    let small = message("pipelined", 200);
    let append = {
        let mut a = format!("d APPEND INBOX {{{}+}}\r\n", small.len()).into_bytes();
        a.extend_from_slice(&small);
        a.extend_from_slice(b"\r\nf NOOP\r\n");
        a
    };
    // Each login as the pieces a client sends, waiting for `+` between them; the commands
    // are appended to the last piece.
    let plain = base64(format!("\0{u}\0{PASSWORD}").as_bytes());
    let logins: Vec<Vec<String>> = vec![
        vec![format!("a LOGIN {u} {PASSWORD}\r\n")],
        vec![format!(
            "a LOGIN {{{}+}}\r\n{u} {{{}+}}\r\n{PASSWORD}\r\n",
            u.len(),
            PASSWORD.len()
        )],
        vec![
            format!("a LOGIN {u} {{{}}}\r\n", PASSWORD.len()),
            format!("{PASSWORD}\r\n"),
        ],
        vec![format!("a AUTHENTICATE PLAIN {plain}\r\n")],
        vec!["a AUTHENTICATE PLAIN\r\n".into(), format!("{plain}\r\n")],
        vec![
            "a AUTHENTICATE LOGIN\r\n".into(),
            format!("{}\r\n", base64(u.as_bytes())),
            format!("{}\r\n", base64(PASSWORD.as_bytes())),
        ],
        // A failed login first: what follows it in the same write still runs in order.
        vec![format!("x LOGIN {u} wrong\r\na LOGIN {u} {PASSWORD}\r\n")],
    ];
    for (i, pieces) in logins.iter().enumerate() {
        let mut c = Conn::connect(d.imap);
        c.line();
        let (last, first) = pieces.split_last().unwrap();
        for piece in first {
            c.send(piece.as_bytes());
            c.continuation();
        }
        let mut bytes = last.clone().into_bytes();
        bytes.extend_from_slice(b"b SELECT INBOX\r\nc ID NIL\r\n");
        bytes.extend_from_slice(&append);
        c.send(&bytes);
        let login = &pieces[0];
        if login.starts_with("x ") {
            let reply = c.until_tagged("x");
            assert!(
                reply
                    .last()
                    .unwrap()
                    .starts_with("x NO [AUTHENTICATIONFAILED]"),
                "{reply:?}"
            );
        }
        assert_ok(&c.until_tagged("a"), "a", &format!("login {i}"));
        let reply = c.until_tagged("b");
        assert!(assert_ok(&reply, "b", "pipelined SELECT").contains("[READ-WRITE]"));
        assert!(
            reply.iter().any(|l| l == &format!("* {i} EXISTS")),
            "{reply:?}"
        );
        let reply = c.until_tagged("c");
        assert_ok(&reply, "c", "pipelined ID");
        let expected = format!("* ID (\"x-backend\" \"{}\")", d.home(&pool, &u).name);
        assert!(reply.contains(&expected), "{reply:?}");
        assert_ok(&c.until_tagged("d"), "d", "pipelined APPEND");
        assert_ok(&c.until_tagged("f"), "f", "pipelined NOOP");
    }
}

#[test]
fn sessions_are_listed_while_logged_in() {
    let (pool, d) = TestDirector::with_pool(3);
    let users = [user(26), user(27)];
    let mut conns = Vec::new();
    for u in &users {
        let (c, _) = login(d.imap, u);
        conns.push(c);
    }
    let mut sessions = d.sessions.list();
    sessions.sort_by(|a, b| a.username.cmp(&b.username));
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    for (s, u) in sessions.iter().zip(&users) {
        assert_eq!(&s.username, u);
        assert_eq!(s.protocol, Protocol::Imap);
        assert_eq!(s.backend, SocketAddr::new(d.home(&pool, u).ip, IMAP_PORT));
        assert_eq!(s.user_hash, d.router.hash(u));
    }

    // LOGOUT ends the first session (the client closes once it has the answer, as clients
    // do); a client that just goes away ends the second.
    let mut first = conns.remove(0);
    let reply = first.imap("z", "LOGOUT");
    assert!(reply[0].starts_with("* BYE"), "{reply:?}");
    assert_ok(&reply, "z", "LOGOUT");
    assert!(first.closed(), "the connection stays open after LOGOUT");
    drop(first);
    wait_for(
        &format!("the session of {} to be unlisted", users[0]),
        Duration::from_secs(5),
        || d.sessions.list().iter().all(|s| s.username != users[0]),
    );
    assert_eq!(d.sessions.list().len(), 1);

    drop(conns);
    wait_for(
        "every session to end with its client",
        Duration::from_secs(5),
        || d.sessions.list().is_empty(),
    );
}
