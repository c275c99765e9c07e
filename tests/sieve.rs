//! ManageSieve through the director with a real client (sieve-connect): a script uploaded,
//! listed, activated and fetched back is stored for that user and seen by its own backend.
//! Both SASL mechanisms Dovecot offers (PLAIN, LOGIN) work through the director.

mod support;

use support::client::{base64, Conn};
use support::director::TestDirector;
use support::dovecot::{user, PASSWORD};
use support::logs::{assert_logins_only_on, wait_logins};
use support::sieve_connect::{assert_active, sieve_connect, sieve_connect_with};

#[test]
fn sieve_connect_uploads_lists_activates_and_fetches_through_the_director() {
    let (pool, d) = TestDirector::with_pool(3);
    let u = user(21);
    let home = d.home(&pool, &u);
    let script = "require \"fileinto\";\r\nif header :contains \"subject\" \"[list]\" {\r\n  fileinto \"INBOX\";\r\n}\r\n";
    let local = pool.dir().join("filter.sieve");
    std::fs::write(&local, script).unwrap();
    let local = local.to_str().unwrap();

    let (ok, out) = sieve_connect(
        d.sieve,
        &u,
        &["--upload", "--localsieve", local, "--remotesieve", "lists"],
    );
    assert!(ok, "upload: {out}");
    let (ok, out) = sieve_connect(d.sieve, &u, &["--activate", "--remotesieve", "lists"]);
    assert!(ok, "activate: {out}");
    let (ok, out) = sieve_connect(d.sieve, &u, &["--list"]);
    assert!(ok, "list: {out}");
    let line = out
        .lines()
        .find(|l| l.contains("lists"))
        .unwrap_or_else(|| panic!("script not listed: {out}"));
    assert!(line.contains("ACTIVE"), "not active: {out}");
    let fetched = pool.dir().join("fetched.sieve");
    let (ok, out) = sieve_connect(
        d.sieve,
        &u,
        &[
            "--download",
            "--remotesieve",
            "lists",
            "--localsieve",
            fetched.to_str().unwrap(),
        ],
    );
    assert!(ok, "download: {out}");
    assert_eq!(std::fs::read_to_string(&fetched).unwrap(), script);

    // Every session went to the user's backend, and that backend sees the active script when
    // the client talks to it directly.
    assert_active(home.sieve(), &u, "lists");
    assert_logins_only_on(&pool, home, "managesieve-login", &u, 4);
    // A wrong password is a failed login, not an error of the director.
    let (ok, _) = sieve_connect_with(d.sieve, &u, "wrong", &["--list"]);
    assert!(!ok);
}

#[test]
fn sasl_login_through_the_director() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(22);
    let home = d.home(&pool, &u);
    // sieve-connect told to use LOGIN (after STARTTLS, as it does when offered).
    let (ok, out) = sieve_connect(d.sieve, &u, &["--authmech", "LOGIN", "--list"]);
    assert!(ok, "list with LOGIN: {out}");

    // A raw client: the capability names LOGIN; the challenges come as strings, the answers
    // go as a literal and a quoted string; then the session is the backend's.
    let (mut c, greeting) = Conn::sieve_greeted(d.sieve);
    assert!(
        greeting.iter().any(|l| l == "\"SASL\" \"PLAIN LOGIN\""),
        "{greeting:?}"
    );
    c.send(b"AUTHENTICATE \"LOGIN\"\r\n");
    assert_eq!(c.line(), "\"VXNlcm5hbWU6\"");
    let name = base64(u.as_bytes());
    c.send(format!("{{{}+}}\r\n{name}\r\n", name.len()).as_bytes());
    assert_eq!(c.line(), "\"UGFzc3dvcmQ6\"");
    c.send(format!("\"{}\"\r\n", base64(PASSWORD.as_bytes())).as_bytes());
    let ok = c.line();
    assert!(ok.starts_with("OK"), "{ok}");
    c.send(b"LISTSCRIPTS\r\n");
    let listed = c.line();
    assert!(
        listed.starts_with("OK"),
        "the backend answers LISTSCRIPTS: {listed}"
    );
    // Both sessions reached the user's backend (sieve-connect's and this one).
    let logins = wait_logins(home, "managesieve-login", &u, 2);
    assert_eq!(logins.len(), 2, "{logins:?}");

    // With an initial response, and a wrong password: a failed login.
    let (mut c, _) = Conn::sieve_greeted(d.sieve);
    c.send(format!("AUTHENTICATE \"LOGIN\" \"{name}\"\r\n").as_bytes());
    assert_eq!(c.line(), "\"UGFzc3dvcmQ6\"");
    c.send(format!("\"{}\"\r\n", base64(b"wrong")).as_bytes());
    let no = c.line();
    assert!(no.starts_with("NO"), "{no}");
}
