//! The IMAP front end, through the director, against a real Dovecot pool: every way a client
//! can log in lands on the backend the router chooses; the pre-login dialogue answers as a
//! client expects (capabilities, errors, failed logins, limits, LOGINDISABLED until STARTTLS);
//! and nothing a client puts inside its credentials ever reaches a backend as a command.

mod support;

use std::time::Duration;

use support::client::{assert_ok, assert_tagged, base64, curl, quote, Conn};
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{
    user, Pool, PoolOptions, PASSWORD, SPECIAL_USERS, TRICKY_PASSWORD, TRICKY_USER,
};
use support::wait::wait_for;

/// Dovecot's own pauses after a failed login would make the tests that fail logins on
/// purpose slow: `auth_failure_delay` (2 s before the answer) and the auth penalty (each later
/// login from the same client address waits 2, 4, 8... s; the director forwards the client's
/// address, so all test clients are one). An anvil socket the auth process cannot open turns
/// the penalty off. The director's own pause (100 ms in tests) stays.
const NO_AUTH_DELAY: &str = "auth_failure_delay = 0\n\
                             service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

/// A pool of `n` backends that answer failed logins at once.
fn pool(n: usize) -> Pool {
    Pool::start_with(PoolOptions {
        backends: n,
        extra_config: NO_AUTH_DELAY.into(),
        ..PoolOptions::default()
    })
}

/// A director over a pool.
struct Setup {
    d: TestDirector,
    pool: Pool,
}

impl Setup {
    /// A director with the default options over [`pool`]`(n)`.
    fn start(n: usize) -> Setup {
        Setup::over(pool(n), &DirectorOptions::default())
    }

    fn over(pool: Pool, options: &DirectorOptions) -> Setup {
        let d = TestDirector::start(&pool, options);
        Setup { d, pool }
    }

    /// The name of the backend the director's router sends `user` to.
    fn routed(&self, user: &str) -> String {
        self.d.home(&self.pool, user).name.clone()
    }

    /// Connects to the director's plain IMAP listener; returns the connection and its
    /// greeting.
    fn connect(&self) -> (Conn, String) {
        let mut c = Conn::connect(self.d.imap);
        let greeting = c.line();
        assert!(greeting.starts_with("* OK "), "greeting: {greeting:?}");
        (c, greeting)
    }

    /// After a successful login (`reply` being its answer): the session is on the backend the
    /// router chooses for `user`, and logs out cleanly.
    fn assert_logged_in(&self, c: &mut Conn, reply: &[String], user: &str, how: &str) {
        assert_ok(reply, reply.last().unwrap().split(' ').next().unwrap(), how);
        assert!(
            reply.iter().all(|l| !l.starts_with('+')),
            "{how}: unexpected continuation request in {reply:?}"
        );
        assert_eq!(
            c.imap_backend(),
            self.routed(user),
            "{how}: {user} is not on its routed backend"
        );
        let bye = c.imap("zz", "LOGOUT");
        assert!(bye[0].starts_with("* BYE"), "{how}: {bye:?}");
        assert_ok(&bye, "zz", how);
    }

    /// Connects, runs `dialogue` (a login; it returns the reply), and checks the session with
    /// [`Setup::assert_logged_in`].
    fn logs_in(&self, user: &str, how: &str, dialogue: impl FnOnce(&mut Conn) -> Vec<String>) {
        let (mut c, _) = self.connect();
        let reply = dialogue(&mut c);
        self.assert_logged_in(&mut c, &reply, user, how);
    }

    /// Runs curl's `ID NIL` through the director with `extra` arguments; returns curl's
    /// trace. Panics unless curl succeeded and printed the routed backend's `* ID` line.
    fn curl_id(&self, url: &str, u: &str, p: &str, extra: &[&str]) -> String {
        let trace = self.pool.dir().join(format!(
            "curl-trace-{u}-{}",
            extra.join("_").replace('/', "_")
        ));
        let userpw = format!("{u}:{p}");
        let mut args = vec![url, "-u", &userpw, "-X", "ID NIL", "--trace-ascii"];
        let trace_arg = trace.display().to_string();
        args.push(&trace_arg);
        args.extend_from_slice(extra);
        let (ok, out, err) = curl(&args);
        let trace_text = std::fs::read_to_string(&trace).unwrap_or_default();
        assert!(ok, "curl {extra:?} as {u}: {err}\n{trace_text}");
        let expected = format!("* ID (\"x-backend\" \"{}\")", self.routed(u));
        assert!(
            out.contains(&expected),
            "curl {extra:?} as {u}: expected {expected:?} in {out:?}"
        );
        trace_text
    }
}

/// Panics unless the last line of `reply` is `<tag> NO [AUTHENTICATIONFAILED] ...`.
fn assert_auth_failed(reply: &[String], tag: &str, what: &str) {
    assert_tagged(reply, tag, "NO [AUTHENTICATIONFAILED]", what);
}

/// `(user(i), PASSWORD)` and then every special user with its password.
fn user_and_special_users(i: usize) -> Vec<(String, String)> {
    let mut cases = vec![(user(i), PASSWORD.to_owned())];
    cases.extend(
        SPECIAL_USERS
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string())),
    );
    cases
}

/// The capability list of a `* OK [CAPABILITY ...]` or `* CAPABILITY ...` line.
fn capabilities(line: &str) -> Vec<String> {
    let list = if let Some(rest) = line.strip_prefix("* OK [CAPABILITY ") {
        rest.split(']').next().unwrap()
    } else if let Some(rest) = line.strip_prefix("* CAPABILITY ") {
        rest
    } else {
        panic!("no capability list in {line:?}")
    };
    list.split(' ').map(str::to_owned).collect()
}

#[test]
fn login_with_atoms_and_quoted_strings_with_escapes() {
    let s = Setup::start(3);
    for i in 1..=3 {
        let u = user(i);
        s.logs_in(&u, "LOGIN with atoms", |c| {
            c.imap("a", &format!("LOGIN {u} {PASSWORD}"))
        });
    }
    for (u, p) in SPECIAL_USERS {
        s.logs_in(u, "LOGIN with quoted strings", |c| {
            c.imap("a", &format!("LOGIN {} {}", quote(u), quote(p)))
        });
    }
    // Lower-case command, quoted user and atom password.
    s.logs_in(&user(4), "lower-case login", |c| {
        c.imap("a", &format!("login \"{}\" {PASSWORD}", user(4)))
    });
    // User names hash lower-cased (`%Lu`): an upper-case login lands with the lower-case one.
    s.logs_in(&user(4), "upper-case user name", |c| {
        c.imap("a", &format!("LOGIN USER0004 {PASSWORD}"))
    });
}

#[test]
fn login_with_synchronising_literals() {
    let s = Setup::start(3);
    // Both arguments as literals, then each special user's password as a literal.
    for (i, (u, p)) in user_and_special_users(5).into_iter().enumerate() {
        let user_literal = i == 0;
        s.logs_in(&u, "LOGIN with literals", |c| {
            if user_literal {
                c.send(format!("a LOGIN {{{}}}\r\n", u.len()).as_bytes());
                c.continuation();
                c.send(format!("{u} {{{}}}\r\n", p.len()).as_bytes());
            } else {
                c.send(format!("a LOGIN {} {{{}}}\r\n", quote(&u), p.len()).as_bytes());
            }
            c.continuation();
            c.send(format!("{p}\r\n").as_bytes());
            c.until_tagged("a")
        });
    }
}

#[test]
fn login_with_non_synchronising_literals() {
    let s = Setup::start(3);
    let u = user(6);
    s.logs_in(&u, "LOGIN with {n+} literals", |c| {
        c.send(
            format!(
                "a LOGIN {{{}+}}\r\n{u} {{{}+}}\r\n{PASSWORD}\r\n",
                u.len(),
                PASSWORD.len()
            )
            .as_bytes(),
        );
        c.until_tagged("a")
    });

    s.logs_in(TRICKY_USER, "LOGIN, password {n+}", |c| {
        let p = TRICKY_PASSWORD;
        c.send(format!("a LOGIN {TRICKY_USER} {{{}+}}\r\n{p}\r\n", p.len()).as_bytes());
        c.until_tagged("a")
    });
}

#[test]
fn login_split_across_tcp_writes() {
    let s = Setup::start(3);
    for chunk in [1, 3] {
        let u = user(7 + chunk);
        s.logs_in(&u, "split quoted LOGIN", |c| {
            c.send_split(format!("a LOGIN {u} \"{PASSWORD}\"\r\n").as_bytes(), chunk);
            c.until_tagged("a")
        });

        s.logs_in(TRICKY_USER, "split LOGIN, {n+}", |c| {
            let login = format!(
                "a LOGIN {{{}+}}\r\n{TRICKY_USER} {}\r\n",
                TRICKY_USER.len(),
                quote(TRICKY_PASSWORD)
            );
            c.send_split(login.as_bytes(), chunk);
            c.until_tagged("a")
        });

        // A synchronising literal: the client waits for `+` between the pieces.
        s.logs_in(&u, "split LOGIN, {n}", |c| {
            c.send_split(
                format!("a LOGIN {u} {{{}}}\r\n", PASSWORD.len()).as_bytes(),
                chunk,
            );
            c.continuation();
            c.send_split(format!("{PASSWORD}\r\n").as_bytes(), chunk);
            c.until_tagged("a")
        });

        s.logs_in(&u, "split AUTHENTICATE PLAIN", |c| {
            let line = format!(
                "a AUTHENTICATE PLAIN {}\r\n",
                base64(format!("\0{u}\0{PASSWORD}").as_bytes())
            );
            c.send_split(line.as_bytes(), chunk);
            c.until_tagged("a")
        });
    }
}

#[test]
fn authenticate_plain_with_and_without_initial_response() {
    let s = Setup::start(3);
    for (u, p) in &user_and_special_users(11) {
        let response = base64(format!("\0{u}\0{p}").as_bytes());
        // SASL-IR.
        s.logs_in(u, "AUTHENTICATE PLAIN (SASL-IR)", |c| {
            c.imap("a", &format!("AUTHENTICATE PLAIN {response}"))
        });
        // Challenge and response.
        s.logs_in(u, "AUTHENTICATE PLAIN (continuation)", |c| {
            c.send(b"a authenticate plain\r\n");
            c.continuation();
            c.send(format!("{response}\r\n").as_bytes());
            c.until_tagged("a")
        });
    }
    // An authorisation identity equal to the user is the user itself.
    let u = user(12);
    s.logs_in(&u, "AUTHENTICATE PLAIN, authzid = user", |c| {
        let response = base64(format!("{u}\0{u}\0{PASSWORD}").as_bytes());
        c.imap("a", &format!("AUTHENTICATE PLAIN {response}"))
    });
}

#[test]
fn authenticate_login_with_and_without_initial_response() {
    let s = Setup::start(3);
    for (u, p) in &user_and_special_users(13) {
        s.logs_in(u, "AUTHENTICATE LOGIN", |c| {
            c.send(b"a AUTHENTICATE LOGIN\r\n");
            assert_eq!(c.continuation(), format!("+ {}", base64(b"Username:")));
            c.send(format!("{}\r\n", base64(u.as_bytes())).as_bytes());
            assert_eq!(c.continuation(), format!("+ {}", base64(b"Password:")));
            c.send(format!("{}\r\n", base64(p.as_bytes())).as_bytes());
            c.until_tagged("a")
        });

        // The user name as initial response (what curl sends).
        s.logs_in(u, "AUTHENTICATE LOGIN (SASL-IR)", |c| {
            c.send(format!("a AUTHENTICATE LOGIN {}\r\n", base64(u.as_bytes())).as_bytes());
            assert_eq!(c.continuation(), format!("+ {}", base64(b"Password:")));
            c.send(format!("{}\r\n", base64(p.as_bytes())).as_bytes());
            c.until_tagged("a")
        });
    }
}

#[test]
fn curl_logs_in_with_authenticate_plain_and_login() {
    let s = Setup::start(3);
    let url = format!("imap://{}/", s.d.imap);
    // The curl of Debian 12 (7.88) cannot be made to send the LOGIN command while AUTH=PLAIN
    // is offered (`--login-options AUTH=+LOGIN` needs curl 8.2); the raw client covers LOGIN.
    for (u, p) in [
        (user(14).as_str(), PASSWORD),
        (TRICKY_USER, TRICKY_PASSWORD),
    ] {
        let trace = s.curl_id(&url, u, p, &[]);
        let plain_ir = format!(
            "AUTHENTICATE PLAIN {}",
            base64(format!("\0{u}\0{p}").as_bytes())
        );
        assert!(
            trace.contains(&plain_ir),
            "curl did not use SASL-IR PLAIN:\n{trace}"
        );

        let trace = s.curl_id(&url, u, p, &["--login-options", "AUTH=LOGIN"]);
        assert!(
            trace.contains(&format!("AUTHENTICATE LOGIN {}", base64(u.as_bytes()))),
            "curl did not use AUTHENTICATE LOGIN:\n{trace}"
        );
    }
    // A wrong password: curl reports a failed login and prints nothing.
    let (ok, out, err) = curl(&[&url, "-u", &format!("{}:wrong", user(14)), "-X", "ID NIL"]);
    assert!(
        !ok && out.is_empty(),
        "wrong password through curl: {out:?} {err:?}"
    );
    assert!(err.contains("Login denied"), "{err}");
}

#[test]
fn pre_login_commands_answer_as_a_client_expects() {
    let s = Setup::start(2);
    let (mut c, greeting) = s.connect();
    let caps = capabilities(&greeting);
    for cap in [
        "IMAP4rev1",
        "STARTTLS",
        "AUTH=PLAIN",
        "AUTH=LOGIN",
        "SASL-IR",
        "LITERAL+",
        "ID",
    ] {
        assert!(
            caps.iter().any(|c| c == cap),
            "{cap} missing in {greeting:?}"
        );
    }
    assert!(!caps.iter().any(|c| c == "LOGINDISABLED"), "{greeting}");

    let reply = c.imap("a", "CAPABILITY");
    assert_eq!(reply.len(), 2, "{reply:?}");
    assert_eq!(
        capabilities(&reply[0]),
        caps,
        "CAPABILITY differs from the greeting"
    );
    assert_ok(&reply, "a", "CAPABILITY");

    c.imap_ok("b", "NOOP");

    assert_tagged(
        &c.imap("c", "FROBNICATE now"),
        "c",
        "BAD",
        "unknown command",
    );

    for (tag, command) in [
        ("d", "SELECT INBOX"),
        ("e", "FETCH 1 BODY[]"),
        ("f", "LIST \"\" *"),
    ] {
        let reply = c.imap(tag, command);
        let last = reply.last().unwrap();
        assert!(
            last.starts_with(&format!("{tag} BAD")) || last.starts_with(&format!("{tag} NO")),
            "{command} before login: {reply:?}"
        );
    }

    for (tag, command) in [
        ("g", "LOGIN user0001"),
        ("h1", "LOGIN user0001 \"secret"),
        ("h2", "LOGIN \"user0001\" \"sec\\ret\""),
        ("h3", "LOGIN user0001 secret extra"),
        ("h4", "LOGIN user0001 (secret)"),
    ] {
        assert_tagged(&c.imap(tag, command), tag, "BAD", command);
    }

    // Still usable after all those errors; ID before login does not name a backend.
    let reply = c.imap("h", "ID NIL");
    assert_ok(&reply, "h", "ID before login");
    assert!(!reply.iter().any(|l| l.contains("backend")), "{reply:?}");

    let reply = c.imap("i", "LOGOUT");
    assert!(reply[0].starts_with("* BYE"), "{reply:?}");
    assert_ok(&reply, "i", "LOGOUT");
    assert!(c.closed(), "the connection stays open after LOGOUT");
    assert!(s.d.sessions.list().is_empty());
}

#[test]
fn failed_login_then_success_on_the_same_connection() {
    let s = Setup::start(3);
    let u = user(15);
    s.logs_in(&u, "LOGIN after two failures", |c| {
        let reply = c.imap("a", &format!("LOGIN {u} wrong"));
        assert_auth_failed(&reply, "a", "wrong password");
        let response = base64(format!("\0{u}\0also-wrong").as_bytes());
        let reply = c.imap("b", &format!("AUTHENTICATE PLAIN {response}"));
        assert_auth_failed(&reply, "b", "wrong password, PLAIN");
        assert!(
            s.d.sessions.list().is_empty(),
            "a failed login left a session"
        );
        c.imap("c", &format!("LOGIN {u} {PASSWORD}"))
    });

    // An unknown user fails the same way.
    s.logs_in(&u, "LOGIN after an unknown user", |c| {
        let reply = c.imap("a", &format!("LOGIN nosuchuser {PASSWORD}"));
        assert_auth_failed(&reply, "a", "unknown user");
        c.imap("b", &format!("LOGIN {u} {PASSWORD}"))
    });
}

#[test]
fn three_failed_logins_close_the_connection() {
    let s = Setup::start(2);
    let u = user(16);
    let (mut c, _) = s.connect();
    for tag in ["a", "b", "c"] {
        c.send(format!("{tag} LOGIN {u} wrong\r\n").as_bytes());
        let line = c.line();
        assert!(
            line.starts_with(&format!("{tag} NO [AUTHENTICATIONFAILED]")),
            "failure {tag}: {line:?}"
        );
    }
    let line = c.line();
    assert!(
        line.is_empty() || line.starts_with("* BYE"),
        "after 3 failures: {line:?}"
    );
    assert!(
        c.closed(),
        "the connection stays open after 3 failed logins"
    );
    assert!(s.d.sessions.list().is_empty());
}

/// `head`, then `n` bytes `x`, then `tail`.
fn padded(head: &[u8], n: usize, tail: &[u8]) -> Vec<u8> {
    let mut bytes = head.to_vec();
    bytes.extend(std::iter::repeat_n(b'x', n));
    bytes.extend_from_slice(tail);
    bytes
}

#[test]
fn oversized_lines_and_literals_are_refused() {
    let s = Setup::start(2);
    // A literal above the limit is refused before the client sends it; the connection lives on.
    let (mut c, _) = s.connect();
    c.send(b"a LOGIN {100000}\r\n");
    let line = c.line();
    assert!(
        line.starts_with("a BAD") || line.starts_with("a NO"),
        "{line:?}"
    );
    assert_ok(&c.imap("b", "NOOP"), "b", "NOOP after a refused literal");

    // A `{n+}` literal above the limit: the client sends it anyway, so the connection ends.
    let (mut c, _) = s.connect();
    c.send(&padded(
        b"a LOGIN user0001 {100000+}\r\n",
        100_000,
        b"\r\nb NOOP\r\n",
    ));
    let line = c.line();
    assert!(
        line.starts_with("a BAD") || line.starts_with("* BYE"),
        "{line:?}"
    );
    let mut rest = Vec::new();
    loop {
        let l = c.line();
        if l.is_empty() {
            break;
        }
        rest.push(l);
    }
    assert!(
        rest.iter().all(|l| l.starts_with("* BYE")),
        "after a {{n+}} literal over the limit: {rest:?}"
    );

    // A line longer than the limit (8 KiB) ends the connection.
    let (mut c, _) = s.connect();
    c.send(&padded(b"a LOGIN user0001 ", 20_000, b"\r\n"));
    let line = c.line();
    assert!(
        line.starts_with("* BYE") || line.starts_with("a BAD"),
        "over-long line: {line:?}"
    );
    assert!(
        c.ended(),
        "the connection stays open after an over-long line"
    );
}

#[test]
fn logindisabled_until_starttls() {
    let s = Setup::over(
        pool(2),
        &DirectorOptions {
            trusted_networks: vec![],
            ..DirectorOptions::default()
        },
    );
    let u = user(17);
    let (mut c, greeting) = s.connect();
    let caps = capabilities(&greeting);
    assert!(caps.iter().any(|c| c == "LOGINDISABLED"), "{greeting}");
    assert!(caps.iter().any(|c| c == "STARTTLS"), "{greeting}");
    assert!(!caps.iter().any(|c| c.starts_with("AUTH=")), "{greeting}");

    let reply = c.imap("a", &format!("LOGIN {u} {PASSWORD}"));
    assert!(
        reply.last().unwrap().starts_with("a NO [PRIVACYREQUIRED]"),
        "{reply:?}"
    );
    let response = base64(format!("\0{u}\0{PASSWORD}").as_bytes());
    let reply = c.imap("b", &format!("AUTHENTICATE PLAIN {response}"));
    assert!(
        reply.last().unwrap().starts_with("b NO [PRIVACYREQUIRED]"),
        "{reply:?}"
    );
    assert_ok(&c.imap("c", "NOOP"), "c", "NOOP after refused logins");
    assert!(s.d.sessions.list().is_empty());

    // curl without TLS cannot log in.
    let url = format!("imap://127.0.0.1:{}/", s.d.imap.port());
    let (ok, out, _) = curl(&[&url, "-u", &format!("{u}:{PASSWORD}"), "-X", "ID NIL"]);
    assert!(
        !ok && out.is_empty(),
        "plaintext login through curl: {out:?}"
    );

    // With STARTTLS it can, under either name the certificate is valid for.
    let ca = s.pool.tls.ca.display().to_string();
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("imap://{host}:{}/", s.d.imap.port());
        let trace = s.curl_id(&url, &u, PASSWORD, &["--ssl-reqd", "--cacert", &ca]);
        assert!(trace.contains("STARTTLS"), "no STARTTLS in:\n{trace}");
    }
    // And on the implicit-TLS listener.
    let url = format!("imaps://localhost:{}/", s.d.imaps.port());
    s.curl_id(&url, TRICKY_USER, TRICKY_PASSWORD, &["--cacert", &ca]);
}

/// A pool whose backends log mailbox changes (`Mailbox created: X`, `Mailbox deleted: X`).
fn logging_pool() -> Pool {
    Pool::start_with(PoolOptions {
        backends: 2,
        extra_config: NO_AUTH_DELAY.to_owned()
            + "protocol imap {\n  mail_plugins = $mail_plugins notify mail_log\n}\n\
                       plugin {\n  mail_log_events = delete undelete expunge copy \
                       mailbox_delete mailbox_rename mailbox_create\n}\n",
        ..PoolOptions::default()
    })
}

/// Every backend's log so far, as bytes (Dovecot logs a client's bytes as they came, so the
/// log need not be UTF-8).
fn logs(pool: &Pool) -> Vec<Vec<u8>> {
    pool.backends
        .iter()
        .map(|b| std::fs::read(b.log_path()).unwrap_or_default())
        .collect()
}

/// What was logged since `before` (one entry per backend).
fn logged_since(pool: &Pool, before: &[Vec<u8>]) -> String {
    logs(pool)
        .iter()
        .zip(before)
        .map(|(now, then)| String::from_utf8_lossy(&now[then.len()..]).into_owned())
        .collect()
}

#[test]
fn commands_hidden_in_credentials_never_reach_a_backend() {
    let s = Setup::over(logging_pool(), &DirectorOptions::default());
    let (victim, other) = (user(18), user(19));
    for u in [&victim, &other] {
        let (mut c, _) = s.connect();
        c.imap_ok("a", &format!("LOGIN {u} {PASSWORD}"));
        c.imap_ok("b", "CREATE Keep");
        // A DELETE that runs shows in the log.
        c.imap_ok("c", "CREATE Gone");
        c.imap_ok("d", "DELETE Gone");
        c.imap_ok("e", "LOGOUT");
    }
    // Dovecot writes its log asynchronously: wait for the set-up sessions' last lines, so that
    // they are not taken for lines caused by the attempts below.
    for u in [&victim, &other] {
        let needle = format!("imap({u})");
        wait_for(
            &format!("the end of session of {u} logged"),
            Duration::from_secs(5),
            || {
                String::from_utf8_lossy(&logs(&s.pool).concat())
                    .lines()
                    .any(|l| l.contains(&needle) && l.contains("Disconnected"))
            },
        );
    }
    let created = String::from_utf8_lossy(&logs(&s.pool).concat()).into_owned();
    for logged in ["Mailbox created: Keep", "Mailbox deleted: Gone"] {
        assert!(
            created.contains(logged),
            "mail_log is not logging:\n{created}"
        );
    }
    let before = logs(&s.pool);

    /// One way of sending credentials.
    enum Form {
        /// LOGIN with both arguments as synchronising literals.
        SyncLiterals,
        /// LOGIN with both arguments as `{n+}` literals, in one write.
        NonSyncLiterals,
        /// AUTHENTICATE PLAIN with an initial response.
        Plain,
        /// AUTHENTICATE LOGIN, both answers to challenges.
        Login,
    }
    let injected = "\r\nX DELETE Keep\r\nY DELETE INBOX\r\n";
    let attempts: Vec<(Form, String, String)> = vec![
        (
            Form::SyncLiterals,
            victim.clone(),
            format!("{PASSWORD}{injected}"),
        ),
        (
            Form::SyncLiterals,
            victim.clone(),
            format!("x\r\nX LOGIN {other} {PASSWORD}{injected}"),
        ),
        (
            Form::SyncLiterals,
            victim.clone(),
            format!("{PASSWORD}\" \"x{injected}"),
        ),
        (
            Form::SyncLiterals,
            format!("{victim}{injected}"),
            PASSWORD.into(),
        ),
        (
            Form::SyncLiterals,
            format!("{victim}\" \"{PASSWORD}{injected}"),
            "x".into(),
        ),
        (
            Form::SyncLiterals,
            format!("{victim}\0{PASSWORD}"),
            "x".into(),
        ),
        (Form::SyncLiterals, victim.clone(), format!("x\0{PASSWORD}")),
        (
            Form::NonSyncLiterals,
            victim.clone(),
            format!("{PASSWORD}{injected}"),
        ),
        (
            Form::NonSyncLiterals,
            format!("{victim}{injected}"),
            PASSWORD.into(),
        ),
        (Form::Plain, victim.clone(), format!("{PASSWORD}{injected}")),
        (Form::Plain, format!("{victim}{injected}"), PASSWORD.into()),
        (Form::Login, victim.clone(), format!("{PASSWORD}{injected}")),
        (Form::Login, format!("{victim}{injected}"), PASSWORD.into()),
    ];
    for (i, (form, u, p)) in attempts.iter().enumerate() {
        let what = format!("attempt {i} ({u:?} / {p:?})");
        s.logs_in(&victim, &what, |c| {
            match form {
                Form::SyncLiterals => {
                    c.send(format!("a LOGIN {{{}}}\r\n", u.len()).as_bytes());
                    c.continuation();
                    c.send(format!("{u} {{{}}}\r\n", p.len()).as_bytes());
                    c.continuation();
                    c.send(format!("{p}\r\n").as_bytes());
                }
                Form::NonSyncLiterals => c.send(
                    format!(
                        "a LOGIN {{{}+}}\r\n{u} {{{}+}}\r\n{p}\r\n",
                        u.len(),
                        p.len()
                    )
                    .as_bytes(),
                ),
                Form::Plain => {
                    let response = base64(format!("\0{u}\0{p}").as_bytes());
                    c.send(format!("a AUTHENTICATE PLAIN {response}\r\n").as_bytes());
                }
                Form::Login => {
                    c.send(b"a AUTHENTICATE LOGIN\r\n");
                    c.continuation();
                    c.send(format!("{}\r\n", base64(u.as_bytes())).as_bytes());
                    c.continuation();
                    c.send(format!("{}\r\n", base64(p.as_bytes())).as_bytes());
                }
            }
            let reply = c.until_tagged("a");
            assert_auth_failed(&reply, "a", &what);
            // The connection is still usable, and a correct login still works.
            assert_ok(&c.imap("b", "NOOP"), "b", &what);
            c.imap("c", &format!("LOGIN {victim} {PASSWORD}"))
        });
    }
    // An authorisation identity (log in as another user) needs a master user: refused.
    let (mut c, _) = s.connect();
    let response = base64(format!("{other}\0{victim}\0{PASSWORD}").as_bytes());
    let reply = c.imap("a", &format!("AUTHENTICATE PLAIN {response}"));
    assert_auth_failed(&reply, "a", "PLAIN with another user as authzid");

    let log = logged_since(&s.pool, &before);
    for bad in [
        "Mailbox deleted",
        "delete: ",
        &format!("Login: user=<{other}>"),
        &format!("imap({other})"),
    ] {
        let line = log.lines().find(|l| l.contains(bad));
        assert!(line.is_none(), "a backend logged {line:?}\n{log}");
    }
    for u in [&victim, &other] {
        let (mut c, _) = s.connect();
        c.imap_ok("a", &format!("LOGIN {u} {PASSWORD}"));
        let reply = c.imap("b", "LIST \"\" *");
        assert!(
            reply.iter().any(|l| l.ends_with(" Keep")),
            "{u} lost Keep: {reply:?}"
        );
        assert!(
            reply.iter().any(|l| l.ends_with(" INBOX")),
            "{u} lost INBOX: {reply:?}"
        );
    }
}
