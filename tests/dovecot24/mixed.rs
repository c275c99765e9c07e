//! One Dovecot 2.3 and one 2.4 backend behind one director, users on both: what a pool looks
//! like in the middle of a rolling upgrade. IMAP, POP3 and LMTP through the director reach
//! each user's backend whatever Dovecot it runs, `doveadm who` of each version lists the
//! sessions it holds, and the shared store reads the same through both versions (the 2.4
//! backend writes it as 2.3 can read it: `dovecot_storage_version = 2.3.0`).

use std::net::SocketAddr;

use crate::support::client::{assert_ok, imap_append, imap_login, pop3_login, Conn};
use crate::support::director::{config_yaml, with_listener, DirectorOptions, TestDirector};
use crate::support::dovecot::{user, Backend, DovecotVersion, Pool, PoolOptions, PASSWORD};
use crate::support::swaks::{self, Target};

/// Users picked per backend.
const USERS_PER_BACKEND: usize = 2;

/// Every message of `user`'s INBOX as the IMAP server at `addr` (the director or a backend)
/// returns it (`BODY.PEEK[]`), in order.
fn inbox(addr: SocketAddr, user: &str) -> Vec<Vec<u8>> {
    let mut c = Conn::imap_greeted(addr);
    c.imap_login_as("a1", user, PASSWORD);
    c.imap_ok("a2", "SELECT INBOX");
    c.send(b"a3 FETCH 1:* BODY.PEEK[]\r\n");
    let (lines, literals) = c.until_tagged_with_literals("a3");
    assert_ok(&lines, "a3", &format!("FETCH of {user}'s INBOX on {addr}"));
    c.imap_ok("a4", "LOGOUT");
    literals
}

/// A message whose bytes a server could easily change: a dot-started line, trailing
/// spaces, a tab, 8-bit text and a long line.
fn appended_message(user: &str, via: &Backend) -> Vec<u8> {
    format!(
        "From: tester@example.org\r\nTo: {user}@example.org\r\n\
         Subject: appended via {} (Dovecot {})\r\n\r\n\
         .a line that starts with a dot\r\ntrailing spaces   \r\n\ttab first\r\n\
         caf\u{e9} na\u{ef}ve\r\n{}\r\n",
        via.name,
        via.version(),
        "0123456789".repeat(30)
    )
    .into_bytes()
}

#[test]
fn a_2_3_and_a_2_4_backend_serve_their_users_over_one_store() {
    let pool = Pool::start_with(PoolOptions {
        backends: 2,
        versions: vec![DovecotVersion::V2_3, DovecotVersion::V2_4],
        ..PoolOptions::default()
    });
    // Recipients `userNNNN@example.org` are routed as the logins `userNNNN` are.
    let options = DirectorOptions::with_extra("lmtp:\n  recipient_username: local_part\n");
    let yaml = with_listener(
        &config_yaml(&pool, &options),
        "{protocol: lmtp, address: 127.0.0.1:0}",
    );
    let d = TestDirector::start_yaml(&yaml);

    // The first users whose home is each backend.
    let homes: Vec<(String, &Backend)> = (1..=40)
        .map(|i| {
            let u = user(i);
            let home = d.home(&pool, &u);
            (u, home)
        })
        .collect();
    let picked: Vec<(String, &Backend)> = pool
        .backends
        .iter()
        .flat_map(|b| {
            homes
                .iter()
                .filter(|(_, h)| h.ip == b.ip)
                .take(USERS_PER_BACKEND)
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    for version in [DovecotVersion::V2_3, DovecotVersion::V2_4] {
        let n = picked
            .iter()
            .filter(|(_, h)| h.version() == version)
            .count();
        assert_eq!(
            n,
            USERS_PER_BACKEND,
            "users on the Dovecot {version} backend among the first 40: {:?}",
            homes.iter().map(|(u, h)| (u, &h.name)).collect::<Vec<_>>()
        );
    }
    let other = |home: &Backend| -> &Backend {
        pool.backends
            .iter()
            .find(|b| b.ip != home.ip)
            .expect("two backends")
    };

    // IMAP and POP3 through the director, held together: each lands on the user's backend,
    // and `doveadm who` of that backend's Dovecot lists both sessions, the other none.
    let mut held = Vec::new();
    for (u, home) in &picked {
        let (imap, on) = imap_login(d.imap, u, PASSWORD);
        assert_eq!(
            on,
            home.name,
            "{u}'s IMAP login (home {} on Dovecot {})",
            home.name,
            home.version()
        );
        let mut pop3 = pop3_login(d.pop3, u, PASSWORD);
        pop3.pop3_ok("STAT");
        held.push((imap, pop3));
    }
    for (u, home) in &picked {
        assert_eq!(
            home.who(u),
            2,
            "doveadm who of Dovecot {} on {} lists {u}'s IMAP and POP3 sessions",
            home.version(),
            home.name
        );
        let o = other(home);
        assert_eq!(
            o.who(u),
            0,
            "doveadm who of Dovecot {} on {} lists {u}, whose home is {}",
            o.version(),
            o.name,
            home.name
        );
    }
    for (mut imap, mut pop3) in held {
        imap.imap_ok("z", "LOGOUT");
        pop3.pop3_ok("QUIT");
    }

    // LMTP through the director: delivered by the user's backend into its Maildir.
    let lmtp = d.lmtp[0];
    for (u, home) in &picked {
        let marker = format!("delivered to {u} through the director");
        let (ok, out) = swaks::lmtp(
            Target::Tcp(lmtp),
            &["--to", &format!("{u}@example.org"), "--body", &marker],
        );
        assert!(ok, "LMTP to {u} (home {}):\n{out}", home.name);
        let stored = pool.wait_for_message(u, &marker);
        assert!(
            stored.contains(&format!("by {} ", home.name)),
            "{u}'s message was not delivered by {} (Dovecot {}):\n{stored}",
            home.name,
            home.version()
        );
    }

    // The store is shared across versions: a message APPENDed through the user's backend
    // and the one its backend delivered read the same, byte for byte, through the director
    // and straight from the backend of the other version.
    for (u, home) in &picked {
        let message = appended_message(u, home);
        imap_append(d.imap, u, PASSWORD, &message);
        let through_director = inbox(d.imap, u);
        let o = other(home);
        let elsewhere = inbox(o.imap(), u);
        assert_eq!(
            through_director.len(),
            2,
            "{u}'s INBOX through the director (home {}): {through_director:?}",
            home.name
        );
        assert!(
            through_director.contains(&message),
            "the message APPENDed through Dovecot {} on {} did not come back as sent:\n{:?}",
            home.version(),
            home.name,
            through_director
                .iter()
                .map(|m| String::from_utf8_lossy(m))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            elsewhere,
            through_director,
            "{u}'s INBOX as Dovecot {} on {} reads it differs from what Dovecot {} on {} wrote",
            o.version(),
            o.name,
            home.version(),
            home.name
        );
        let delivered = String::from_utf8_lossy(
            elsewhere
                .iter()
                .find(|m| *m != &message)
                .expect("the delivered message"),
        )
        .into_owned();
        assert!(
            delivered.contains(&format!("by {} ", home.name))
                && delivered.contains(&format!("delivered to {u} through the director")),
            "{u}'s delivered message as Dovecot {} on {} reads it:\n{delivered}",
            o.version(),
            o.name
        );
    }

    // Neither version complained about what the other wrote (indexes, uidlist).
    for b in &pool.backends {
        let log = b.log();
        let trouble: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("Error:") || l.contains("Panic:") || l.contains("Fatal:"))
            .collect();
        assert!(
            trouble.is_empty(),
            "Dovecot {} on {} logged errors:\n{}",
            b.version(),
            b.name,
            trouble.join("\n")
        );
    }
}
