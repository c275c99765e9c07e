//! LMTP listeners of the running director (config → listener → LMTP service): TCP with
//! `allow_from`, and a unix socket that still delivers to the backends' LMTP TCP port (the
//! Dovecot director's unix listener tried backend port 0).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::director::{config_yaml, DirectorOptions, TestDirector};
use support::dovecot::{user, Pool};

fn swaks(target: &[&str], to: &str, body: &str) -> (bool, String) {
    let out = Command::new("swaks")
        .args(["--protocol", "LMTP", "--helo", "mta.test"])
        .args(["--from", "sender@example.org", "--timeout", "30"])
        .args(target)
        .args(["--to", to, "--body", body])
        .output()
        .expect("swaks runs (installed by ./scripts/test)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn wait_for_message(pool: &Pool, u: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(m) = pool
            .inbox_contents(u)
            .into_iter()
            .find(|m| m.contains(needle))
        {
            return m;
        }
        assert!(Instant::now() < deadline, "{u} never got {needle:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let backend = pool
        .by_ip(
            d.router
                .route(&format!("{u}@example.org"), "")
                .unwrap()
                .backend
                .ip,
        )
        .unwrap()
        .name
        .clone();
    let (ok, out) = swaks(
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &allowed.port().to_string(),
        ],
        &format!("{u}@example.org"),
        "via tcp",
    );
    assert!(ok, "{out}");
    let msg = wait_for_message(&pool, &u, "via tcp");
    assert!(msg.contains(&format!("by {backend}")), "{msg}");

    // Not in allow_from: a 554 and nothing delivered.
    let (ok, out) = swaks(
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &refused.port().to_string(),
        ],
        &format!("{u}@example.org"),
        "must not arrive",
    );
    assert!(!ok, "a client outside allow_from delivered:\n{out}");
    assert!(out.contains("554"), "{out}");

    // The unix socket routes to the backend's LMTP TCP port.
    let u2 = user(8);
    let (ok, out) = swaks(
        &["--socket", sock.to_str().unwrap()],
        &format!("{u2}@example.org"),
        "via unix",
    );
    assert!(ok, "{out}");
    wait_for_message(&pool, &u2, "via unix");
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
        &DirectorOptions {
            backend_extra: "    tls: starttls\n".into(),
            ..DirectorOptions::default()
        },
    );
    let yaml = base.replacen(
        "listeners:\n",
        "listeners:\n  - {protocol: lmtp, address: 127.0.0.1:0}\n",
        1,
    );
    let d = TestDirector::start_yaml(&yaml);
    let u = user(9);
    let (ok, out) = swaks(
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &d.lmtp[0].port().to_string(),
        ],
        &format!("{u}@example.org"),
        "over tls",
    );
    assert!(ok, "{out}");
    let msg = wait_for_message(&pool, &u, "over tls");
    assert!(
        msg.contains("LMTPS"),
        "the backend did not receive it over TLS:\n{msg}"
    );
}
