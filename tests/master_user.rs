//! Master-user logins against real Dovecot backends whose master passdb takes `user*master`
//! with the master password as a login for `user` (`auth_master_user_separator = *`). With
//! the director's `auth_master_user_separator: "*"`, such a login is routed, registered and
//! kicked as `user`, so an admin or a migration tool lands on the backend that holds the
//! user's own sessions; the backend gets the login as the client sent it.

mod support;

use support::admin_cli::AdminCli;
use support::client::{base64, imap_login, pop3_login, Conn};
use support::director::{ready, DirectorOptions, TestDirector};
use support::director_log::{capture_director_log, director_log};
use support::dovecot::{user, Pool, MASTER_PASSWORD, MASTER_USER, PASSWORD};
use support::logs::LOG_WAIT;
use support::wait::wait_until;

/// A director over `pool` that knows Dovecot's master user separator.
fn director(pool: &Pool) -> TestDirector {
    TestDirector::start(
        pool,
        &DirectorOptions::with_extra("auth_master_user_separator: \"*\"\n"),
    )
}

/// `user*master`: the login of the master user acting for `u`.
fn master_login(u: &str) -> String {
    format!("{u}*{MASTER_USER}")
}

/// A user whose whole master login string hashes to another backend than the user's own
/// name: the case where hashing the whole string splits one mailbox over two backends.
fn split_user(d: &TestDirector) -> String {
    (1..=200)
        .map(user)
        .find(|u| {
            let own = ready(d.router.route(u, "")).unwrap().backend.ip;
            let whole = ready(d.router.route(&master_login(u), ""))
                .unwrap()
                .backend
                .ip;
            own != whole
        })
        .expect("some user's master login hashes elsewhere")
}

#[test]
fn a_master_login_lands_on_the_users_backend_and_is_kicked_with_it() {
    capture_director_log();
    let pool = Pool::start(2);
    let d = director(&pool);
    let u = split_user(&d);
    let home = d.home(&pool, &u);
    let other = pool.backends.iter().find(|b| b.ip != home.ip).unwrap();

    let (mut own, own_backend) = imap_login(d.imap, &u, PASSWORD);
    assert_eq!(own_backend, home.name);
    // IMAP LOGIN as user*master with the master password: Dovecot logs it in as the user.
    let (mut master, master_backend) = imap_login(d.imap, &master_login(&u), MASTER_PASSWORD);
    assert_eq!(
        master_backend, home.name,
        "the master login is with the user"
    );
    master.imap_ok("s", "SELECT INBOX");
    // SASL PLAIN with the authorization identity: routed by it, as before.
    let mut plain = Conn::imap_greeted(d.imap);
    let ir = base64(format!("{u}\0{MASTER_USER}\0{MASTER_PASSWORD}").as_bytes());
    plain.imap_ok("p", &format!("AUTHENTICATE PLAIN {ir}"));
    assert_eq!(plain.imap_backend(), home.name);
    // POP3 USER user*master goes through the same login.
    let mut pop3 = pop3_login(d.pop3, &master_login(&u), MASTER_PASSWORD);
    pop3.pop3_ok("STAT");

    // The backends agree: the user is on one of them only.
    assert_eq!(home.who(&u), 4, "doveadm who on {}", home.name);
    assert_eq!(other.who(&u), 0, "{u} also on {}", other.name);

    // The director registered every session under the user's name.
    let sessions = d.sessions_of(&u);
    assert_eq!(sessions.len(), 4, "{sessions:?}");
    assert!(sessions.iter().all(|s| s.backend.ip() == home.ip));

    // `director kick USER` ends the master sessions too.
    let text = AdminCli::of(&d).ok(&["kick", &u]);
    assert!(text.contains("4 sessions ended"), "{text}");
    for (what, c) in [
        ("own", &mut own),
        ("master", &mut master),
        ("plain", &mut plain),
        ("pop3", &mut pop3),
    ] {
        assert!(c.ended(), "the {what} session survived the kick");
    }
    // The director's log names the user, and the master login as given.
    let master = master_login(&u);
    let ends = wait_until("the end lines of the master sessions", LOG_WAIT, || {
        let log = director_log();
        let ends: Vec<String> = log
            .lines()
            .filter(|l| l.contains("session ended") && l.contains(&format!(" login={master} ")))
            .map(str::to_owned)
            .collect();
        (ends.len() == 2).then_some(ends)
    });
    for end in ends {
        assert!(end.contains(&format!(" user={u} ")), "{end}");
    }
}

#[test]
fn without_the_separator_a_master_login_is_routed_whole() {
    // The default (no separator) keeps the old behaviour: the control for the test above,
    // showing that the user picked there really is split when the option is off.
    let (pool, d) = TestDirector::with_pool(2);
    let u = split_user(&d);
    let whole = d.home(&pool, &master_login(&u));
    let (_c, backend) = imap_login(d.imap, &master_login(&u), MASTER_PASSWORD);
    assert_eq!(backend, whole.name);
    let listed: Vec<_> = d.sessions.list().into_iter().map(|s| s.username).collect();
    assert_eq!(listed, vec![master_login(&u)]);
}
