//! The seed memo's LDAP passdb on real programs: Debian's slapd ([`support::slapd`]) behind a
//! Dovecot 2.3 instance that runs only the auth service, with `pass_attrs` that hand the
//! director `proxy`, a master user and its password, and routing fields from the user's
//! entry (`mailHost` → `host`, `employeeType` → `director_tag`).
//!
//! What Dovecot answers is read with `doveadm auth test` (the auth-client socket, as a login
//! would), `doveadm auth lookup` (the auth-userdb socket, a passdb lookup without password, as
//! Dovecot's LMTP proxy does) and, for CRAM-MD5, which doveadm cannot speak, the crate's own
//! [`AuthClient`].

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use director::auth::dovecot::{AuthClient, AuthClientOptions, Endpoint, RequestInfo, Step};
use support::auth_service::{AuthService, AuthServiceConfig};
use support::command::{run, Ran};
use support::slapd::{LdapUser, Slapd};
use support::wait::wait_until;

/// The seed memo's `pass_attrs`, plus the name as the directory spells it (`uid=user`) and
/// two routing fields.
const PASS_ATTRS: &str = "uid=user, userPassword=password, mailHost=host, \
     employeeType=director_tag, =proxy=y, =master=dirmaster, =pass=dirmaster-secret";

const ALICE_PASSWORD: &str = "Alice's pass 1";
/// Not ASCII: the fixture writes it to LDIF in base64.
const BOB_PASSWORD: &str = "bøb-sëcret";

/// `doveadm auth test`'s exit code for a refused login.
const AUTH_FAILED: i32 = 77;
/// `doveadm auth lookup`'s exit code for an unknown user.
const NO_SUCH_USER: i32 = 67;

fn users() -> Vec<LdapUser> {
    vec![
        LdapUser::new("alice", ALICE_PASSWORD)
            .with("mailHost", "127.0.0.2")
            .with("employeeType", "fast-disks"),
        LdapUser::new("bob", BOB_PASSWORD),
    ]
}

/// A Dovecot instance running only the auth service ([`AuthService`]), with the LDAP passdb
/// of [`Slapd::dovecot_passdb`] before its (empty) passwd-file. Dropping it kills it.
struct LdapAuth {
    service: AuthService,
}

impl LdapAuth {
    fn start(slapd: &Slapd) -> LdapAuth {
        let passdb = slapd.dovecot_passdb(slapd.dir(), PASS_ATTRS);
        let service = AuthService::start(AuthServiceConfig {
            extra_passdb: Some(passdb),
            extra_settings: "auth_verbose = yes\n".into(),
            ..AuthServiceConfig::default()
        });
        LdapAuth { service }
    }

    fn auth_client(&self) -> PathBuf {
        match self.service.unix() {
            Endpoint::Unix(path) => path,
            other => panic!("not a unix socket: {other:?}"),
        }
    }

    fn log(&self) -> String {
        self.service.log()
    }

    /// `doveadm -c CONF ARGS...`, however it ends.
    fn doveadm(&self, args: &[&str]) -> Ran {
        run(
            Command::new("doveadm")
                .arg("-c")
                .arg(self.service.config_path())
                .args(args),
            None,
        )
        .expect("run doveadm")
    }

    /// `doveadm auth test` as an IMAP login would ask.
    fn auth_test(&self, user: &str, password: &str) -> Ran {
        self.doveadm(&["auth", "test", "-x", "service=imap", user, password])
    }

    /// Waits until Dovecot has logged `line` (its log process writes a moment later).
    fn wait_log(&self, line: &str) {
        wait_until(
            &format!("{line:?} in Dovecot's log"),
            Duration::from_secs(5),
            || self.log().contains(line).then_some(()),
        );
    }
}

/// The `extra fields:` of `doveadm auth test`, sorted.
fn extra_fields(out: &str) -> Vec<&str> {
    let mut fields: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "extra fields:")
        .skip(1)
        .map(str::trim)
        .collect();
    fields.sort_unstable();
    fields
}

/// The `key : value` lines under `passdb: USER` of `doveadm auth lookup`, as `key=value`,
/// sorted. Keys longer than the padding come as `key: value`.
fn lookup_fields(out: &str) -> Vec<String> {
    let mut fields: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("passdb: "))
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| format!("{}={}", k.trim(), v.trim()))
        .collect();
    fields.sort_unstable();
    fields
}

/// A CRAM-MD5 response (RFC 2195), its HMAC-MD5 computed by `openssl dgst`.
fn cram_md5(user: &str, password: &str, challenge: &[u8]) -> Vec<u8> {
    let out = run(
        Command::new("openssl").args(["dgst", "-md5", "-hmac", password]),
        Some(challenge),
    )
    .expect("run openssl");
    assert!(out.ok, "openssl dgst: {}", out.text());
    // `MD5(stdin)= 0123...`
    let digest = out.stdout.split_whitespace().last().expect("a digest");
    format!("{user} {digest}").into_bytes()
}

#[test]
fn the_right_password_authenticates_and_returns_the_pass_attrs_fields() {
    let slapd = Slapd::start(&users());
    let auth = LdapAuth::start(&slapd);

    // Dovecot reports the name as the client gave it (`original_user`) and as the directory
    // spells it (`uid=user`).
    let out = auth.auth_test("Alice", ALICE_PASSWORD);
    assert!(out.ok, "{}\n{}", out.text(), auth.log());
    assert!(out.stdout.contains("auth succeeded"), "{}", out.text());
    assert_eq!(
        extra_fields(&out.stdout),
        [
            "director_tag=fast-disks",
            "host=127.0.0.2",
            "master=dirmaster",
            "original_user=Alice",
            "pass=dirmaster-secret",
            "proxy",
            "user=alice",
        ]
    );

    // A user without the routing attributes gets no routing fields.
    let out = auth.auth_test("bob", BOB_PASSWORD);
    assert!(out.ok, "{}\n{}", out.text(), auth.log());
    assert_eq!(
        extra_fields(&out.stdout),
        [
            "master=dirmaster",
            "pass=dirmaster-secret",
            "proxy",
            "user=bob"
        ]
    );

    // Dovecot searched with the fixture's filter, the name lowercased (its default
    // `auth_username_format = %Lu`). Only the rootdn may read userPassword, so the logins
    // above also show that Dovecot bound with `dn`/`dnpass`.
    let log = slapd.log();
    assert!(
        log.contains("filter=\"(&(objectClass=inetOrgPerson)(uid=alice))\""),
        "{log}"
    );
}

#[test]
fn a_wrong_password_or_an_unknown_user_fails() {
    let slapd = Slapd::start(&users());
    let auth = LdapAuth::start(&slapd);

    let out = auth.auth_test("alice", "Alice's pass 2");
    assert_eq!(out.code, Some(AUTH_FAILED), "{}", out.text());
    assert!(out.stdout.contains("auth failed"), "{}", out.text());
    assert!(!out.stdout.contains("proxy"), "{}", out.text());
    auth.wait_log("ldap(alice): Password mismatch");

    let out = auth.auth_test("nobody", ALICE_PASSWORD);
    assert_eq!(out.code, Some(AUTH_FAILED), "{}", out.text());
    auth.wait_log("ldap(nobody): unknown user");
}

#[test]
fn a_passdb_lookup_without_password_returns_the_routing_fields() {
    let slapd = Slapd::start(&users());
    let auth = LdapAuth::start(&slapd);

    let out = auth.doveadm(&["auth", "lookup", "alice"]);
    assert!(out.ok, "{}\n{}", out.text(), auth.log());
    assert_eq!(
        lookup_fields(&out.stdout),
        [
            "director_tag=fast-disks",
            "host=127.0.0.2",
            "master=dirmaster",
            "pass=dirmaster-secret",
            "proxy=y",
            "user=alice",
        ]
    );
    assert!(!out.stdout.contains(ALICE_PASSWORD), "{}", out.text());

    let out = auth.doveadm(&["auth", "lookup", "nobody"]);
    assert_eq!(out.code, Some(NO_SUCH_USER), "{}", out.text());
    assert!(out.stdout.contains("doesn't exist"), "{}", out.text());
}

#[tokio::test]
async fn cram_md5_works_from_the_cleartext_password_in_ldap() {
    let slapd = Slapd::start(&users());
    let auth = LdapAuth::start(&slapd);
    let client = AuthClient::new(AuthClientOptions {
        request_timeout: Duration::from_secs(10),
        ..AuthClientOptions::new(Endpoint::Unix(auth.auth_client()))
    });
    let info = RequestInfo::new("imap");

    for (user, password, accepted) in [
        ("alice", ALICE_PASSWORD, true),
        ("bob", BOB_PASSWORD, true),
        ("bob", ALICE_PASSWORD, false),
    ] {
        let Step::Continue(challenge) = client.start("CRAM-MD5", None, &info).await.unwrap() else {
            panic!("CRAM-MD5 sent no challenge");
        };
        let response = cram_md5(user, password, challenge.data());
        match (challenge.respond(&response).await.unwrap(), accepted) {
            (Step::Ok(fields), true) => {
                assert_eq!(fields.user(), Some(user));
                assert!(fields.proxy(), "{fields:?}");
                assert_eq!(fields.master(), Some("dirmaster"));
                assert_eq!(fields.pass().unwrap().expose(), "dirmaster-secret");
                let host = (user == "alice").then_some("127.0.0.2");
                assert_eq!(fields.host(), host);
            }
            (Step::Fail(fields), false) => assert!(!fields.temp(), "{fields:?}"),
            (step, _) => panic!("{user} with accepted={accepted}: {step:?}\n{}", auth.log()),
        }
    }
}
