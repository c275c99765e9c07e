//! The seed memo's set-up end to end, on real programs: Debian's slapd holds the users
//! ([`support::slapd`]); a Dovecot 2.3 auth service ([`support::auth_service`]) checks them
//! with an LDAP passdb whose `pass_attrs` return `=proxy=y`, `=master=`[`MASTER_USER`],
//! `=pass=`[`MASTER_PASSWORD`] and `mailHost` as `host`; real Dovecot backends ([`Pool`]) know
//! that master user (separator `*`); the director runs with `auth: {mode: dovecot}` against
//! the service's login socket.
//!
//! Every LDAP password here differs from the one the backends know ([`PASSWORD`]), so a
//! session can only have opened through the master login the passdb asked for: the backend's
//! login line names who authenticated (`auth_user=<master>`, in a login log format set here),
//! and `doveadm who` lists the user.
//!
//! # What an attacker tried
//!
//! [`no_client_without_the_password_gets_a_master_login_in_passthrough_mode`] and
//! [`..._in_dovecot_mode`](no_client_without_the_password_gets_a_master_login_in_dovecot_mode)
//! run the same attempts against one director configuration in either mode (both with
//! `auth_master_user_separator: "*"`). The attacker knows the victim's name, has an account
//! of their own (its password, in the mode's store), and does not know the victim's password
//! nor the master password. Tried, each on its own connection:
//!
//! - IMAP `LOGIN`: a wrong password; the password of the *other* store (the backends' for a
//!   dovecot-mode director, the LDAP one for a passthrough one); the name in capitals;
//!   `victim*master` with a wrong password; `victim*attacker` with the attacker's password
//!   (the attacker as a master user); LDAP filter metacharacters in the name (`*`,
//!   `user000*`, `victim)(uid=*`) with the attacker's password; a NUL in a literal name
//!   (`victim\0attacker`); CRLF and a second command inside a literal name; an 8 KiB name;
//!   commands pipelined behind a failed `LOGIN` (`SELECT` must not reach a backend).
//! - IMAP `AUTHENTICATE`: PLAIN with authzid=victim and the attacker's own authcid and
//!   password; PLAIN with authzid=victim, authcid=master and a wrong password; PLAIN with a
//!   NUL too many; PLAIN not base64; PLAIN with an empty initial response; PLAIN and LOGIN
//!   aborted (`*`) half way; CRAM-MD5 aborted, and with a made-up digest; DIGEST-MD5 as the
//!   attacker with authzid=victim; DIGEST-MD5 replaying a correct response computed for
//!   another session's nonce; DIGEST-MD5 aborted; SCRAM-SHA-256 abandoned after the server's
//!   first message; EXTERNAL, ANONYMOUS and XOAUTH2 with a forged token.
//! - Inside the attacker's own, successful session: `LOGIN` and `AUTHENTICATE` as the victim
//!   (they reach the backend's post-login state and must change nothing).
//! - POP3: `USER`/`PASS` wrong; `USER victim*master`; `AUTH PLAIN` with authzid=victim;
//!   `APOP`; `AUTH CRAM-MD5` aborted; `PASS` without `USER`.
//! - ManageSieve: `AUTHENTICATE "PLAIN"` with authzid=victim and the attacker's credentials,
//!   and with a wrong password.
//! - Dovecot mode: the auth service killed, then `LOGIN` with the password the backends
//!   would take, and PLAIN with authzid=victim: the director must not fall back to letting the
//!   backend decide.
//!
//! Verdicts: no attempt gets an `OK`; afterwards no backend logged a master login or any
//! login of the victim, `doveadm who` lists the victim nowhere, and in dovecot mode no
//! backend log line names the victim at all (nothing reached them). Each test ends with the
//! control that shows the oracle sees a master login when one really happens.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use support::auth_service::{AuthService, AuthServiceConfig, LOGIN_PORT};
use support::client::{assert_ok, base64, curl_imap_cram_md5, imap_login, quote, Conn};
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, Backend, Pool, PoolOptions, MASTER_PASSWORD, MASTER_USER, PASSWORD};
use support::logs::{field, login_lines, wait_logins, LOG_WAIT};
use support::sasl_digest::{DigestMd5, DigestResponse};
use support::slapd::{LdapUser, Slapd};
use support::wait::wait_until;

/// The user the tests log in as, and whose sessions the attacker is after.
const VICTIM: &str = "user0005";
const VICTIM_LDAP_PASSWORD: &str = "v1ctim's LDAP pass";
/// A user with an account of their own.
const ATTACKER: &str = "user0009";
const ATTACKER_LDAP_PASSWORD: &str = "mallory's own";
/// The password of the pinned user ([`Site::pinned`]).
const PINNED_LDAP_PASSWORD: &str = "pinned pass";
/// A user who logs in to each backend directly to flush its log (see [`settle`]).
const CANARY: &str = "user0100";
/// Where `digest-uri` says the client connects.
const DIGEST_URI: &str = "imap/localhost";

/// The seed memo's `pass_attrs`: the name as the directory spells it, the password, the
/// routing attribute as `host`, and the master login for the backends.
fn pass_attrs() -> String {
    format!(
        "uid=user, userPassword=password, mailHost=host, =proxy=y, =master={MASTER_USER}, \
         =pass={MASTER_PASSWORD}"
    )
}

/// Slapd, the auth service, a pool of two backends and one director configuration run twice:
/// in passthrough mode and in dovecot mode.
struct Site {
    passthrough: TestDirector,
    dovecot: TestDirector,
    auth: AuthService,
    _slapd: Slapd,
    /// A user whose entry has a `mailHost`: the backend the ring does not give it.
    pinned: String,
    pool: Pool,
}

/// Which director an attempt goes to, and so which passwords the attacker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Passthrough,
    Dovecot,
}

impl Site {
    fn start() -> Site {
        // The login line names who authenticated (a master user for someone else). No failure
        // delay and no penalty: a passthrough director hands the backends every failed
        // attempt, all from one address.
        let pool = Pool::start_with(PoolOptions {
            backends: 2,
            extra_config: "auth_failure_delay = 0\n\
                           login_log_format_elements = user=<%u> method=%m rip=%r lip=%l \
                           mpid=%e %c session=<%{session}> auth_user=<%{auth_user}>\n\
                           service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
                .into(),
            ..PoolOptions::default()
        });
        let separator = "auth_master_user_separator: \"*\"\n";
        let passthrough = TestDirector::start(&pool, &DirectorOptions::with_extra(separator));
        let pinned = user(20);
        let ring_home = passthrough.home(&pool, &pinned).ip;
        let pinned_to = pool.backends.iter().find(|b| b.ip != ring_home).unwrap();
        let slapd = Slapd::start(&[
            LdapUser::new(VICTIM, VICTIM_LDAP_PASSWORD),
            LdapUser::new(ATTACKER, ATTACKER_LDAP_PASSWORD),
            LdapUser::new(&pinned, PINNED_LDAP_PASSWORD)
                .with("mailHost", &pinned_to.ip.to_string()),
        ]);
        let auth = AuthService::start(AuthServiceConfig {
            extra_passdb: Some(slapd.dovecot_passdb(slapd.dir(), &pass_attrs())),
            ..AuthServiceConfig::default()
        });
        let dovecot = TestDirector::start(
            &pool,
            &DirectorOptions::with_extra(&format!(
                "{separator}auth: {{mode: dovecot, socket: \"{}:{LOGIN_PORT}\"}}\n",
                auth.ip()
            )),
        );
        Site {
            passthrough,
            dovecot,
            auth,
            _slapd: slapd,
            pinned,
            pool,
        }
    }

    fn director(&self, mode: Mode) -> &TestDirector {
        match mode {
            Mode::Passthrough => &self.passthrough,
            Mode::Dovecot => &self.dovecot,
        }
    }

    /// The backend the ring gives `u` (the same for both directors).
    fn ring_home(&self, u: &str) -> &Backend {
        self.passthrough.home(&self.pool, u)
    }
}

/// The logins of `u` on `b` (any protocol) made by someone else: a master user. The pool's
/// login log format ends in `auth_user=<...>`, who authenticated.
fn master_logins(b: &Backend, u: &str) -> Vec<String> {
    let log = b.log();
    ["imap-login", "pop3-login", "managesieve-login"]
        .iter()
        .flat_map(|service| login_lines(&log, service, u))
        .filter(|l| field(l, "auth_user").as_deref() != Some(u))
        .collect()
}

/// The lines of `b`'s log that name `u` at all.
fn lines_naming(b: &Backend, u: &str) -> Vec<String> {
    b.log()
        .lines()
        .filter(|l| l.contains(u))
        .map(str::to_owned)
        .collect()
}

/// Waits until `b` has logged `n` master logins as `u`; returns them.
fn wait_master_logins(b: &Backend, u: &str, n: usize) -> Vec<String> {
    wait_until(
        &format!("{n} master login(s) as {u} in {}'s log", b.name),
        LOG_WAIT,
        || {
            let lines = master_logins(b, u);
            (lines.len() >= n).then_some(lines)
        },
    )
}

/// Waits until every backend has written out what happened before now: Dovecot logs through
/// its log process, so a line about an attempt may come a moment after the client's answer.
/// A direct login of [`CANARY`] on each backend, logged after it, marks the point.
fn settle(pool: &Pool) {
    for b in &pool.backends {
        let seen = login_lines(&b.log(), "imap-login", CANARY).len();
        let (mut c, _) = imap_login(b.imap(), CANARY, PASSWORD);
        c.imap_ok("z", "LOGOUT");
        wait_logins(b, "imap-login", CANARY, seen + 1);
    }
}

/// A SASL response function: the next response to a challenge, or `None` to abort (`*`).
type Respond<'a> = &'a mut dyn FnMut(&[u8]) -> Option<Vec<u8>>;

/// `a AUTHENTICATE MECH [IR]` on a greeted IMAP connection, answering each challenge with
/// `respond`; returns the tagged reply (or `(closed)`).
fn imap_sasl(c: &mut Conn, mech: &str, initial: Option<&[u8]>, respond: Respond) -> String {
    match initial {
        Some(ir) => c.send(format!("a AUTHENTICATE {mech} {}\r\n", base64_or_empty(ir)).as_bytes()),
        None => c.send(format!("a AUTHENTICATE {mech}\r\n").as_bytes()),
    }
    loop {
        let line = tagged_or_continuation(c, "a");
        let Some(challenge) = line.strip_prefix('+') else {
            return line;
        };
        let challenge = STANDARD
            .decode(challenge.trim())
            .expect("a base64 challenge");
        match respond(&challenge) {
            Some(response) => c.send(format!("{}\r\n", base64(&response)).as_bytes()),
            None => c.send(b"*\r\n"),
        }
    }
}

/// `=` for an empty initial response (RFC 4959), else base64.
fn base64_or_empty(ir: &[u8]) -> String {
    if ir.is_empty() {
        "=".into()
    } else {
        base64(ir)
    }
}

/// The next line that is `tag ...`, a continuation (`+...`) or `* BYE`; `(closed)` at end
/// of stream.
fn tagged_or_continuation(c: &mut Conn, tag: &str) -> String {
    loop {
        let line = c.line();
        if line.is_empty() {
            return "(closed)".into();
        }
        if line.starts_with('+')
            || line.starts_with(&format!("{tag} "))
            || line.starts_with("* BYE")
        {
            return line;
        }
    }
}

/// A DIGEST-MD5 responder for `digest`: the response to the first challenge, then (after
/// checking the server's `rspauth`) the empty response RFC 2831 asks for.
fn digest_responder(digest: DigestMd5<'_>) -> impl FnMut(&[u8]) -> Option<Vec<u8>> + '_ {
    let mut sent: Option<DigestResponse> = None;
    move |challenge| match &sent {
        None => {
            let r = digest.respond(challenge);
            let text = r.text.clone();
            sent = Some(r);
            Some(text)
        }
        Some(r) => {
            assert_eq!(
                String::from_utf8_lossy(challenge),
                r.rspauth,
                "the server's proof of the password"
            );
            Some(Vec::new())
        }
    }
}

/// Whether a client's final line is a success: IMAP `tag OK`, POP3 `+OK`, ManageSieve `OK`.
fn is_success(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("");
    first == "+OK" || first == "OK" || (first != "*" && words.next() == Some("OK"))
}

/// A PLAIN message `authzid\0authcid\0password`.
fn plain(authzid: &str, authcid: &str, password: &str) -> Vec<u8> {
    format!("{authzid}\0{authcid}\0{password}").into_bytes()
}

#[test]
fn the_digest_md5_helper_reproduces_rfc_2831s_example() {
    // RFC 2831 section 4: chris / secret at elwood.innosoft.com.
    let digest = DigestMd5 {
        user: "chris",
        password: "secret",
        authzid: None,
        digest_uri: "imap/elwood.innosoft.com",
        cnonce: "OA6MHXh6VqTrRk",
    };
    let r = digest.respond(
        b"realm=\"elwood.innosoft.com\",nonce=\"OA6MG9tEQGm2hh\",qop=\"auth\",\
          algorithm=md5-sess,charset=utf-8",
    );
    let text = String::from_utf8(r.text).unwrap();
    assert!(
        text.contains("response=d388dad90d4bbd760a152321f2143af7"),
        "{text}"
    );
    assert_eq!(r.rspauth, "rspauth=ea40f60335c427b5527b84dbabcdfffd");
}

#[test]
fn cram_md5_and_digest_md5_open_sessions_through_the_master_login_the_passdb_names() {
    let site = Site::start();
    let d = &site.dovecot;
    let home = site.ring_home(VICTIM);

    // The backends do not know the LDAP password: only a master login can open a session.
    let mut direct = Conn::imap_greeted(home.imap());
    let refused = direct.imap(
        "a",
        &format!("LOGIN {VICTIM} {}", quote(VICTIM_LDAP_PASSWORD)),
    );
    assert!(!is_success(refused.last().unwrap()), "{refused:?}");

    // The director offers what the auth service offers.
    let mut c = Conn::imap_greeted(d.imap);
    let caps = c.imap_ok("c", "CAPABILITY").join("\n");
    for mech in ["AUTH=CRAM-MD5", "AUTH=DIGEST-MD5", "AUTH=SCRAM-SHA-256"] {
        assert!(caps.contains(mech), "{mech} missing: {caps}");
    }

    // CRAM-MD5 from curl.
    let (ok, out, err) = curl_imap_cram_md5(d.imap, VICTIM, VICTIM_LDAP_PASSWORD);
    assert!(ok, "curl CRAM-MD5: {out}\n{err}\n{}", site.auth.log());
    assert!(
        err.contains("AUTHENTICATE CRAM-MD5"),
        "curl did not use CRAM-MD5: {err}"
    );
    assert!(
        out.contains(&format!("\"x-backend\" \"{}\"", home.name)),
        "{out}"
    );
    let first = wait_master_logins(home, VICTIM, 1);

    // DIGEST-MD5, computed here, on a session kept open.
    let mut respond = digest_responder(DigestMd5 {
        user: VICTIM,
        password: VICTIM_LDAP_PASSWORD,
        authzid: None,
        digest_uri: DIGEST_URI,
        cnonce: "director-test-cnonce",
    });
    let reply = imap_sasl(&mut c, "DIGEST-MD5", None, &mut respond);
    assert!(
        reply.starts_with("a OK"),
        "DIGEST-MD5: {reply}\n{}",
        site.auth.log()
    );
    assert_eq!(c.imap_backend(), home.name);
    c.imap_ok("s", "SELECT INBOX");
    assert_eq!(home.who(VICTIM), 1, "doveadm who on {}", home.name);
    let other = site.pool.backends.iter().find(|b| b.ip != home.ip).unwrap();
    assert_eq!(other.who(VICTIM), 0, "doveadm who on {}", other.name);
    let both = wait_master_logins(home, VICTIM, 2);
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(both[0], first[0]);
    for line in &both {
        assert_eq!(
            field(line, "auth_user").as_deref(),
            Some(MASTER_USER),
            "{line}"
        );
        assert!(line.contains("method=PLAIN"), "{line}");
    }
    // The user's own password never reached a backend.
    for b in &site.pool.backends {
        assert!(!b.log().contains(VICTIM_LDAP_PASSWORD), "{}", b.log());
    }
}

#[test]
fn a_user_whose_entry_has_a_mail_host_lands_on_that_backend() {
    let site = Site::start();
    let u = site.pinned.clone();
    let ring = site.ring_home(&u);
    let pinned = site.pool.backends.iter().find(|b| b.ip != ring.ip).unwrap();

    let (mut c, backend) = imap_login(site.dovecot.imap, &u, PINNED_LDAP_PASSWORD);
    assert_eq!(backend, pinned.name, "the ring would say {}", ring.name);
    c.imap_ok("s", "SELECT INBOX");
    assert_eq!(pinned.who(&u), 1);
    assert_eq!(ring.who(&u), 0);
    wait_master_logins(pinned, &u, 1);
    let sessions = site.dovecot.sessions_of(&u);
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].backend.ip(), pinned.ip);
}

#[test]
fn a_wrong_password_is_refused_before_any_backend_hears_of_it() {
    let site = Site::start();
    let d = &site.dovecot;

    // The backends' password is not the user's password here.
    for password in [PASSWORD, "wrong"] {
        let mut c = Conn::imap_greeted(d.imap);
        let reply = c.imap("a", &format!("LOGIN {VICTIM} {}", quote(password)));
        assert_eq!(
            reply.last().unwrap(),
            "a NO [AUTHENTICATIONFAILED] Authentication failed.",
            "{reply:?}"
        );
    }
    let (ok, out, err) = curl_imap_cram_md5(d.imap, VICTIM, "wrong");
    assert!(!ok, "CRAM-MD5 with a wrong password: {out}");
    assert!(err.contains("denied") || err.contains("Login"), "{err}");

    // The auth service refused all three (its log names the user)...
    wait_until("three refusals in the auth service's log", LOG_WAIT, || {
        let log = site.auth.log();
        let n = log
            .lines()
            .filter(|l| l.contains(VICTIM) && l.to_lowercase().contains("mismatch"))
            .count();
        (n >= 3).then_some(())
    });
    // ...and no backend heard of the user.
    settle(&site.pool);
    for b in &site.pool.backends {
        let named = lines_naming(b, VICTIM);
        assert!(named.is_empty(), "{} heard of {VICTIM}: {named:?}", b.name);
    }
    assert!(site.dovecot.sessions_of(VICTIM).is_empty());
}

/// Runs every attempt of the module's list against the director of `mode`; returns, per
/// attempt, what it was and the client's final lines.
fn attempts(site: &Site, mode: Mode) -> Vec<(String, Vec<String>)> {
    let d = site.director(mode);
    let (own_password, other_store_password) = match mode {
        Mode::Passthrough => (PASSWORD, VICTIM_LDAP_PASSWORD),
        Mode::Dovecot => (ATTACKER_LDAP_PASSWORD, PASSWORD),
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut record = |what: &str, lines: Vec<String>| out.push((what.to_owned(), lines));

    // IMAP LOGIN.
    let login = |u: &str, p: &str| {
        let mut c = Conn::imap_greeted(d.imap);
        c.send(format!("a LOGIN {} {}\r\n", quote(u), quote(p)).as_bytes());
        vec![tagged_or_continuation(&mut c, "a")]
    };
    record("LOGIN, wrong password", login(VICTIM, "wrong"));
    record(
        "LOGIN with the other store's password",
        login(VICTIM, other_store_password),
    );
    record(
        "LOGIN, name in capitals",
        login(&VICTIM.to_uppercase(), "wrong"),
    );
    record(
        "LOGIN victim*master, wrong password",
        login(&format!("{VICTIM}*{MASTER_USER}"), "wrong"),
    );
    record(
        "LOGIN victim*attacker with the attacker's password",
        login(&format!("{VICTIM}*{ATTACKER}"), own_password),
    );
    for name in ["*", "user000*", &format!("{VICTIM})(uid=*")] {
        record(
            &format!("LOGIN {name:?} with the attacker's password"),
            login(name, own_password),
        );
    }
    record(
        "LOGIN with an 8 KiB name",
        login(&format!("{VICTIM}{}", "x".repeat(8192)), "wrong"),
    );
    let literal_login = |name: &[u8], password: &str| {
        let mut c = Conn::imap_greeted(d.imap);
        c.send(format!("a LOGIN {{{}}}\r\n", name.len()).as_bytes());
        let go = tagged_or_continuation(&mut c, "a");
        if !go.starts_with('+') {
            return vec![go];
        }
        c.send(name);
        c.send(format!(" {}\r\n", quote(password)).as_bytes());
        vec![tagged_or_continuation(&mut c, "a")]
    };
    record(
        "LOGIN, a NUL in a literal name",
        literal_login(format!("{VICTIM}\0{ATTACKER}").as_bytes(), own_password),
    );
    record(
        "LOGIN, CRLF and a command in a literal name",
        literal_login(
            format!("{VICTIM}\r\nx LOGIN {VICTIM}*{MASTER_USER} wrong").as_bytes(),
            "wrong",
        ),
    );
    {
        let mut c = Conn::imap_greeted(d.imap);
        c.send(format!("a LOGIN {VICTIM} wrong\r\nb SELECT INBOX\r\nc LOGOUT\r\n").as_bytes());
        let a = tagged_or_continuation(&mut c, "a");
        let b = tagged_or_continuation(&mut c, "b");
        record("commands pipelined behind a failed LOGIN", vec![a, b]);
    }

    // IMAP AUTHENTICATE.
    let sasl = |mech: &str, initial: Option<&[u8]>, respond: Respond| {
        let mut c = Conn::imap_greeted(d.imap);
        vec![imap_sasl(&mut c, mech, initial, respond)]
    };
    let mut abort = |_: &[u8]| None;
    record(
        "PLAIN authzid=victim with the attacker's credentials",
        sasl(
            "PLAIN",
            Some(&plain(VICTIM, ATTACKER, own_password)),
            &mut abort,
        ),
    );
    record(
        "PLAIN authzid=victim authcid=master, wrong password",
        sasl(
            "PLAIN",
            Some(&plain(VICTIM, MASTER_USER, "wrong")),
            &mut abort,
        ),
    );
    record(
        "PLAIN with a NUL too many",
        sasl(
            "PLAIN",
            Some(format!("\0{VICTIM}\0wrong\0{MASTER_USER}").as_bytes()),
            &mut abort,
        ),
    );
    {
        let mut c = Conn::imap_greeted(d.imap);
        c.send(b"a AUTHENTICATE PLAIN !!!!\r\n");
        record(
            "PLAIN not base64",
            vec![tagged_or_continuation(&mut c, "a")],
        );
    }
    record(
        "PLAIN, empty initial response",
        sasl("PLAIN", Some(b""), &mut abort),
    );
    record("PLAIN aborted", sasl("PLAIN", None, &mut abort));
    let mut name_then_abort = {
        let mut asked = false;
        move |_: &[u8]| {
            let first = !asked;
            asked = true;
            first.then(|| VICTIM.as_bytes().to_vec())
        }
    };
    record(
        "LOGIN aborted after the name",
        sasl("LOGIN", None, &mut name_then_abort),
    );
    record("CRAM-MD5 aborted", sasl("CRAM-MD5", None, &mut abort));
    let mut made_up =
        |_: &[u8]| Some(format!("{VICTIM} 00112233445566778899aabbccddeeff").into_bytes());
    record(
        "CRAM-MD5, made-up digest",
        sasl("CRAM-MD5", None, &mut made_up),
    );
    let mut as_victim = digest_responder(DigestMd5 {
        user: ATTACKER,
        password: own_password,
        authzid: Some(VICTIM),
        digest_uri: DIGEST_URI,
        cnonce: "attacker-cnonce",
    });
    record(
        "DIGEST-MD5 as the attacker with authzid=victim",
        sasl("DIGEST-MD5", None, &mut as_victim),
    );
    {
        // A correct response for one session's nonce, sent in another session.
        let mut captured: Option<Vec<u8>> = None;
        let mut capture = |challenge: &[u8]| {
            let r = DigestMd5 {
                user: VICTIM,
                password: VICTIM_LDAP_PASSWORD,
                authzid: None,
                digest_uri: DIGEST_URI,
                cnonce: "victim-cnonce",
            }
            .respond(challenge);
            captured = Some(r.text);
            None
        };
        let first = sasl("DIGEST-MD5", None, &mut capture);
        let lines = match captured {
            Some(response) => {
                let mut replay = |_: &[u8]| Some(response.clone());
                let mut lines = first;
                lines.extend(sasl("DIGEST-MD5", None, &mut replay));
                lines
            }
            None => first,
        };
        record("DIGEST-MD5 replayed from another session", lines);
    }
    record("DIGEST-MD5 aborted", sasl("DIGEST-MD5", None, &mut abort));
    record(
        "SCRAM-SHA-256 abandoned after the server's first message",
        sasl(
            "SCRAM-SHA-256",
            Some(format!("n,,n={VICTIM},r=attackernonce").as_bytes()),
            &mut abort,
        ),
    );
    record(
        "EXTERNAL",
        sasl("EXTERNAL", Some(VICTIM.as_bytes()), &mut abort),
    );
    record("ANONYMOUS", sasl("ANONYMOUS", Some(b"x"), &mut abort));
    record(
        "XOAUTH2 with a forged token",
        sasl(
            "XOAUTH2",
            Some(format!("user={VICTIM}\x01auth=Bearer forged\x01\x01").as_bytes()),
            &mut abort,
        ),
    );

    // Inside the attacker's own session.
    {
        let (mut c, _) = imap_login(d.imap, ATTACKER, own_password);
        let b = c.imap("b", &format!("LOGIN {VICTIM} wrong"));
        let ir = base64(&plain(VICTIM, ATTACKER, own_password));
        let c2 = c.imap("c", &format!("AUTHENTICATE PLAIN {ir}"));
        record(
            "LOGIN and AUTHENTICATE inside the attacker's session",
            vec![b.last().unwrap().clone(), c2.last().unwrap().clone()],
        );
        c.imap_ok("z", "LOGOUT");
    }

    // POP3.
    let pop3 = |commands: &[String]| {
        let mut c = Conn::pop3_greeted(d.pop3);
        let mut last = String::new();
        for command in commands {
            last = c.pop3(command);
            if last.starts_with('+') && !last.starts_with("+OK") {
                // A SASL challenge: abort.
                last = c.pop3("*");
            }
            if last.is_empty() {
                return vec!["(closed)".to_owned()];
            }
        }
        vec![last]
    };
    record(
        "POP3 USER/PASS, wrong password",
        pop3(&[format!("USER {VICTIM}"), "PASS wrong".into()]),
    );
    record(
        "POP3 USER victim*master",
        pop3(&[format!("USER {VICTIM}*{MASTER_USER}"), "PASS wrong".into()]),
    );
    record(
        "POP3 AUTH PLAIN authzid=victim",
        pop3(&[format!(
            "AUTH PLAIN {}",
            base64(&plain(VICTIM, ATTACKER, own_password))
        )]),
    );
    record(
        "POP3 APOP",
        pop3(&[format!("APOP {VICTIM} 00112233445566778899aabbccddeeff")]),
    );
    record(
        "POP3 AUTH CRAM-MD5 aborted",
        pop3(&["AUTH CRAM-MD5".into()]),
    );
    record("POP3 PASS without USER", pop3(&["PASS wrong".into()]));

    // ManageSieve.
    let sieve = |response: &[u8]| {
        let mut c = Conn::connect(d.sieve);
        while !c.line().starts_with("OK") {}
        c.send(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", base64(response)).as_bytes());
        let mut line = c.line();
        if line.starts_with('"') || line.starts_with('{') {
            c.send(b"\"*\"\r\n");
            line = c.line();
        }
        vec![if line.is_empty() {
            "(closed)".into()
        } else {
            line
        }]
    };
    record(
        "ManageSieve PLAIN authzid=victim",
        sieve(&plain(VICTIM, ATTACKER, own_password)),
    );
    record(
        "ManageSieve PLAIN, wrong password",
        sieve(&plain("", VICTIM, "wrong")),
    );
    out
}

/// Asserts that no attempt got a success, and that no backend let anyone in as [`VICTIM`].
fn assert_nobody_got_in(site: &Site, tried: &[(String, Vec<String>)]) {
    for (what, lines) in tried {
        assert!(!lines.is_empty(), "{what}: no answer");
        for line in lines {
            assert!(!line.is_empty(), "{what}: an empty line");
            assert!(!is_success(line), "{what}: the client got {line:?}");
        }
    }
    settle(&site.pool);
    for b in &site.pool.backends {
        assert_eq!(master_logins(b, VICTIM), Vec::<String>::new(), "{}", b.name);
        for service in ["imap-login", "pop3-login", "managesieve-login"] {
            let logins = login_lines(&b.log(), service, VICTIM);
            assert!(logins.is_empty(), "{} let {VICTIM} in: {logins:?}", b.name);
        }
        assert_eq!(b.who(VICTIM), 0, "doveadm who on {}", b.name);
    }
}

#[test]
fn no_client_without_the_password_gets_a_master_login_in_passthrough_mode() {
    let site = Site::start();
    let tried = attempts(&site, Mode::Passthrough);
    assert_nobody_got_in(&site, &tried);
    assert!(site.passthrough.sessions_of(VICTIM).is_empty());

    // The control: the oracle does see a master login when a client knows the master
    // password (passthrough leaves that to the backend).
    let home = site.ring_home(VICTIM);
    let (mut c, backend) = imap_login(
        site.passthrough.imap,
        &format!("{VICTIM}*{MASTER_USER}"),
        MASTER_PASSWORD,
    );
    assert_eq!(backend, home.name);
    wait_master_logins(home, VICTIM, 1);
    assert_eq!(home.who(VICTIM), 1);
    c.imap_ok("z", "LOGOUT");
}

#[test]
fn no_client_without_the_password_gets_a_master_login_in_dovecot_mode() {
    let mut site = Site::start();
    let mut tried = attempts(&site, Mode::Dovecot);

    // The auth service gone: a temporary failure, never the backend's verdict instead.
    site.auth.kill();
    let d: SocketAddr = site.dovecot.imap;
    let mut c = Conn::imap_greeted(d);
    let unavailable = c.imap("a", &format!("LOGIN {VICTIM} {}", quote(PASSWORD)));
    assert!(
        unavailable
            .last()
            .unwrap()
            .starts_with("a NO [UNAVAILABLE]"),
        "{unavailable:?}"
    );
    let ir = base64(&plain(VICTIM, ATTACKER, ATTACKER_LDAP_PASSWORD));
    let authzid = c.imap("b", &format!("AUTHENTICATE PLAIN {ir}"));
    tried.push((
        "the auth service down".into(),
        vec![
            unavailable.last().unwrap().clone(),
            authzid.last().unwrap().clone(),
        ],
    ));
    assert_nobody_got_in(&site, &tried);
    for b in &site.pool.backends {
        let named = lines_naming(b, VICTIM);
        assert!(named.is_empty(), "{} heard of {VICTIM}: {named:?}", b.name);
    }

    // The control: with the service back, the victim's own password opens a master login.
    site.auth.run();
    let home = site.ring_home(VICTIM);
    let mut c = wait_until(
        "a login once the service is back",
        Duration::from_secs(15),
        || {
            let mut c = Conn::imap_greeted(d);
            let reply = c.imap(
                "a",
                &format!("LOGIN {VICTIM} {}", quote(VICTIM_LDAP_PASSWORD)),
            );
            let last = reply.last().unwrap();
            if last.starts_with("a NO [UNAVAILABLE]") {
                return None;
            }
            assert_ok(&reply, "a", "the victim's own login");
            Some(c)
        },
    );
    assert_eq!(c.imap_backend(), home.name);
    wait_master_logins(home, VICTIM, 1);
    assert_eq!(home.who(VICTIM), 1);
}
