//! LMTP listeners of the running director (config → listener → LMTP service): TCP with
//! `allow_from`, and a unix socket that still delivers to the backends' LMTP TCP port (the
//! Dovecot director's unix listener tried backend port 0).

mod support;

use support::director::{config_yaml, with_listener, DirectorOptions, TestDirector};
use support::dovecot::{user, Pool};
use support::swaks::{self, Target};

/// Delivers a message to `to` with `body` through `target`.
fn swaks(target: Target, to: &str, body: &str) -> (bool, String) {
    swaks::lmtp(target, &["--to", to, "--body", body])
}

#[test]
fn tcp_with_allow_from_and_unix_socket_listeners() {
    let pool = Pool::start(2);
    let sock = pool.dir().join("lmtp/director.sock");
    let base = config_yaml(&pool, &DirectorOptions::default());
    let yaml = base.replacen(
        "listeners:\n",
        &format!(
            "listeners:\n  - {{protocol: lmtp, address: 127.0.0.1:0, allow_from: [127.0.0.0/8]}}\n  \
             - {{protocol: lmtp, address: 127.0.0.1:0, allow_from: [192.0.2.0/24]}}\n  \
             - {{protocol: lmtp, socket: {}}}\n",
            sock.display()
        ),
        1,
    );
    let d = TestDirector::start_yaml(&yaml);
    let lmtp = d.lmtp.clone();
    assert_eq!(lmtp.len(), 2, "two TCP LMTP listeners: {lmtp:?}");
    let (allowed, refused) = (lmtp[0], lmtp[1]);

    // Allowed: delivered to the backend the recipient routes to (the whole address is the
    // username by default, so that is what is routed).
    let u = user(7);
    let backend = d.home(&pool, &format!("{u}@example.org")).name.clone();
    let (ok, out) = swaks(Target::Tcp(allowed), &format!("{u}@example.org"), "via tcp");
    assert!(ok, "{out}");
    let msg = pool.wait_for_message(&u, "via tcp");
    assert!(msg.contains(&format!("by {backend}")), "{msg}");

    // Not in allow_from: a 554 and nothing delivered.
    let (ok, out) = swaks(
        Target::Tcp(refused),
        &format!("{u}@example.org"),
        "must not arrive",
    );
    assert!(!ok, "a client outside allow_from delivered:\n{out}");
    assert!(out.contains("554"), "{out}");

    // The unix socket routes to the backend's LMTP TCP port.
    let u2 = user(8);
    let (ok, out) = swaks(
        Target::Socket(&sock),
        &format!("{u2}@example.org"),
        "via unix",
    );
    assert!(ok, "{out}");
    pool.wait_for_message(&u2, "via unix");
    assert!(pool
        .inbox_contents(&u)
        .iter()
        .all(|m| !m.contains("must not arrive")));
}

#[test]
fn starttls_to_the_backends_lmtp() {
    let pool = Pool::start(2);
    let base = config_yaml(
        &pool,
        &DirectorOptions::with_backend_extra("    tls: starttls\n"),
    );
    let yaml = with_listener(&base, "{protocol: lmtp, address: 127.0.0.1:0}");
    let d = TestDirector::start_yaml(&yaml);
    let u = user(9);
    let (ok, out) = swaks(
        Target::Tcp(d.lmtp[0]),
        &format!("{u}@example.org"),
        "over tls",
    );
    assert!(ok, "{out}");
    let msg = pool.wait_for_message(&u, "over tls");
    assert!(
        msg.contains("LMTPS"),
        "the backend did not receive it over TLS:\n{msg}"
    );
}
