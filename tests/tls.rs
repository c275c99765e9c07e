//! TLS on both sides of the director, against real Dovecot and real curl: clients reach the
//! director with implicit TLS or STARTTLS/STLS; the director reaches backends in plaintext,
//! with STARTTLS or with implicit TLS, verifying their certificates unless told not to.

mod support;

use std::path::{Path, PathBuf};

use support::backend_tls::{login_both_ways, logins_are_tls, IMPLICIT_TLS, STARTTLS};
use support::client::{curl, imap_append, quote, Conn};
use support::command::openssl;
use support::director::{ready, DirectorOptions, TestDirector};
use support::dovecot::{user, Pool, PASSWORD};
use support::logs::{login_lines, tls_flag};

/// A CA of our own that signed nothing the pool uses: backends cannot be verified with it.
fn other_ca(dir: &Path) -> PathBuf {
    let dir = dir.join("other-ca");
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "other-ca.key",
            "-out",
            "other-ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=some other CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join("other-ca.pem")
}

fn ca(pool: &Pool) -> &str {
    pool.tls.ca.to_str().unwrap()
}

/// A message to find with curl.
const MESSAGE: &[u8] = b"Subject: tls\r\n\r\nover TLS\r\n";

#[test]
fn clients_use_implicit_tls_imaps_and_pop3s() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(20);
    let login = format!("{u}:{PASSWORD}");
    imap_append(pool.backend(0).imap(), &u, PASSWORD, MESSAGE);

    let imaps = format!("imaps://127.0.0.1:{}/", d.imaps.port());
    let (ok, out, err) = curl(&["--cacert", ca(&pool), &imaps, "-u", &login, "-v"]);
    assert!(ok, "curl imaps: {err}");
    assert!(out.contains("INBOX"), "LIST over imaps: {out}");
    assert!(err.contains("SSL connection using"), "{err}");
    let (ok, out, err) = curl(&[
        "--cacert",
        ca(&pool),
        &format!("{imaps}INBOX"),
        "-u",
        &login,
        "-X",
        "ID NIL",
    ]);
    assert!(ok, "curl imaps ID: {err}");
    let route = ready(d.router.route(&u, "")).unwrap();
    let home = pool.by_ip(route.backend.ip).unwrap();
    assert!(
        out.contains(&format!("\"x-backend\" \"{}\"", home.name)),
        "{out}"
    );

    let pop3s = format!("pop3s://127.0.0.1:{}/", d.pop3s.port());
    let (ok, out, err) = curl(&["--cacert", ca(&pool), &pop3s, "-u", &login]);
    assert!(ok, "curl pop3s: {err}");
    assert_eq!(out, format!("1 {}\r\n", MESSAGE.len()));
    let (ok, out, err) = curl(&["--cacert", ca(&pool), &format!("{pop3s}1"), "-u", &login]);
    assert!(ok, "curl pop3s RETR: {err}");
    assert_eq!(out.as_bytes(), MESSAGE);

    // The director presents the configured certificate: without its CA, curl refuses.
    for url in [&imaps, &pop3s] {
        let (ok, _, err) = curl(&[url, "-u", &login]);
        assert!(!ok, "{url} verified without the CA");
        assert!(err.contains("(60)") || err.contains("certificate"), "{err}");
    }
}

#[test]
fn clients_use_starttls_and_stls_where_plaintext_is_refused() {
    let pool = Pool::start(2);
    // No trusted networks: the plain listeners refuse logins before STARTTLS/STLS.
    let d = TestDirector::start(
        &pool,
        &DirectorOptions {
            trusted_networks: Vec::new(),
            ..DirectorOptions::default()
        },
    );
    let u = user(21);
    let login = format!("{u}:{PASSWORD}");
    imap_append(pool.backend(1).imap(), &u, PASSWORD, MESSAGE);

    // What a client sees in the clear.
    let mut c = Conn::imap_greeted(d.imap);
    let caps = c.imap("a", "CAPABILITY").join("\n");
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    let r = c.imap("b", &format!("LOGIN {} {}", quote(&u), quote(PASSWORD)));
    assert!(r.last().unwrap().starts_with("b NO"), "{r:?}");
    let mut c = Conn::pop3_greeted(d.pop3);
    assert!(c.pop3(&format!("USER {u}")).starts_with("-ERR"));

    let imap = format!("imap://127.0.0.1:{}/", d.imap.port());
    let pop3 = format!("pop3://127.0.0.1:{}/", d.pop3.port());
    let (ok, out, err) = curl(&[
        "--ssl-reqd",
        "--cacert",
        ca(&pool),
        &imap,
        "-u",
        &login,
        "-v",
    ]);
    assert!(ok, "curl imap --ssl-reqd: {err}");
    assert!(out.contains("INBOX"), "{out}");
    assert!(
        err.contains("STARTTLS") && err.contains("SSL connection using"),
        "{err}"
    );
    let (ok, out, err) = curl(&[
        "--ssl-reqd",
        "--cacert",
        ca(&pool),
        &pop3,
        "-u",
        &login,
        "-v",
    ]);
    assert!(ok, "curl pop3 --ssl-reqd: {err}");
    assert_eq!(out, format!("1 {}\r\n", MESSAGE.len()));
    assert!(
        err.contains("STLS") && err.contains("SSL connection using"),
        "{err}"
    );
    // Without TLS, curl cannot log in at all.
    for url in [&imap, &pop3] {
        let (ok, _, err) = curl(&[url, "-u", &login]);
        assert!(!ok, "{url}: a plaintext login was accepted");
        assert!(!err.is_empty());
    }
}

#[test]
fn backend_starttls() {
    logins_are_tls(&Pool::start(2), STARTTLS, &[22, 23]);
}

#[test]
fn backend_implicit_tls() {
    logins_are_tls(&Pool::start(2), IMPLICIT_TLS, &[24, 25]);
}

#[test]
fn plaintext_backend_login_is_not_tls() {
    // The control for the two tests above: without backend TLS, Dovecot does not say TLS.
    let (pool, d) = TestDirector::with_pool(1);
    let (imap, pop3) = login_both_ways(&pool, &d, &user(26));
    assert!(!tls_flag(&imap), "{imap}");
    assert!(!tls_flag(&pop3), "{pop3}");
}

/// A backend whose certificate does not verify is unavailable, not a wrong password: IMAP
/// `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, and nothing reaches Dovecot's login.
#[test]
fn backend_with_unverifiable_certificate_is_unavailable() {
    let pool = Pool::start(2);
    let wrong = other_ca(pool.dir());
    for (mode, extra) in [("starttls", STARTTLS), ("implicit", IMPLICIT_TLS)] {
        let d = TestDirector::start(
            &pool,
            &DirectorOptions::with_backend_extra(&format!(
                "{extra}    tls_ca_file: {}\n",
                wrong.display()
            )),
        );
        let u = user(if mode == "starttls" { 27 } else { 28 });
        let mut c = Conn::imap_greeted(d.imap);
        let r = c.imap("a", &format!("LOGIN {} {}", quote(&u), quote(PASSWORD)));
        let last = r.last().unwrap();
        assert!(last.starts_with("a NO [UNAVAILABLE]"), "{mode}: {r:?}");
        // The connection stays usable.
        c.imap_ok("b", "NOOP");

        let mut c = Conn::pop3_greeted(d.pop3);
        c.pop3_ok(&format!("USER {u}"));
        let e = c.pop3(&format!("PASS {PASSWORD}"));
        assert!(e.starts_with("-ERR [SYS/TEMP]"), "{mode}: {e}");
        c.pop3_ok("NOOP");

        for b in &pool.backends {
            let log = b.log();
            assert!(login_lines(&log, "imap-login", &u).is_empty(), "{log}");
            assert!(login_lines(&log, "pop3-login", &u).is_empty(), "{log}");
        }
    }
}

/// A wrong server name fails verification the same way.
#[test]
fn backend_certificate_for_another_name_is_unavailable() {
    let (_pool, d) = TestDirector::start_with_pool(
        1,
        &DirectorOptions::with_backend_extra(
            "    tls: starttls\n    tls_server_name: mail.example.org\n",
        ),
    );
    let mut c = Conn::imap_greeted(d.imap);
    let r = c.imap(
        "a",
        &format!("LOGIN {} {}", quote(&user(29)), quote(PASSWORD)),
    );
    assert!(r.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{r:?}");
}

/// `tls_verify: false` accepts the backend whatever CA is configured, and still encrypts.
#[test]
fn tls_verify_false_accepts_any_backend_certificate() {
    let pool = Pool::start(2);
    let wrong = other_ca(pool.dir());
    for (i, extra) in [STARTTLS, IMPLICIT_TLS].iter().enumerate() {
        let verify_false = format!(
            "{extra}    tls_verify: false\n    tls_ca_file: {}\n",
            wrong.display()
        );
        logins_are_tls(&pool, &verify_false, &[30 + i]);
    }
}
