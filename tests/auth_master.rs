//! The auth-master client of `director::auth::dovecot` ([`AuthMaster`]) against a real Dovecot
//! 2.3 auth service (`support::auth_service`): passdb lookups without a password, as Dovecot's
//! LMTP proxy makes them for a recipient, on the `auth-master` socket and on a TCP
//! `inet_listener director-master`.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use director::auth::dovecot::{
    AuthError, AuthMaster, AuthMasterOptions, Endpoint, Lookup, LookupInfo,
};
use support::auth_service::{AuthService, AuthServiceConfig, Listener};
use support::dovecot::signal;

const USERS: &str = "\
user0001:{PLAIN}pass1::::::proxy=y host=127.0.0.2 port=10024 destuser=u1@backend
user0002:{PLAIN}pass2::::::nologin=y reason=Moved_to_the_new_site
user0003:{PLAIN}pa ss\"3::::::
";

/// A TCP auth-master listener (Dovecot types a listener by its name's suffix).
const TCP_MASTER_PORT: u16 = 10991;

fn start() -> AuthService {
    AuthService::start(AuthServiceConfig {
        extra_listeners: vec![Listener::Inet("director-master".into(), TCP_MASTER_PORT)],
        ..AuthServiceConfig::with_users(USERS)
    })
}

fn master(endpoint: Endpoint, request_timeout: Duration) -> AuthMaster {
    AuthMaster::new(AuthMasterOptions {
        request_timeout,
        ..AuthMasterOptions::new(endpoint)
    })
}

/// A client of the service's `auth-master` socket.
fn socket_master(service: &AuthService, request_timeout: Duration) -> AuthMaster {
    master(Endpoint::Unix(service.master_socket()), request_timeout)
}

/// A recipient's lookup as an LMTP proxy makes it.
fn lmtp() -> LookupInfo {
    LookupInfo {
        session_id: Some("lmtp-sess-1".into()),
        local: Some("192.0.2.1:24".parse().unwrap()),
        remote: Some("198.51.100.7:51000".parse().unwrap()),
        ..LookupInfo::new("lmtp")
    }
}

async fn found(master: &AuthMaster, user: &str) -> director::auth::dovecot::AuthFields {
    match master.pass_lookup(user, &lmtp()).await {
        Ok(Lookup::Found(fields)) => fields,
        other => panic!("{user:?}: expected Found, got {other:?}"),
    }
}

/// A lookup of user0001 on its own task.
fn lookup_in_flight(master: &AuthMaster) -> tokio::task::JoinHandle<Result<Lookup, AuthError>> {
    let master = master.clone();
    tokio::spawn(async move { master.pass_lookup("user0001", &lmtp()).await })
}

/// No line of the service's log says it took something we sent for a broken request.
fn assert_no_protocol_complaint(service: &AuthService) {
    let log = service.log();
    assert!(
        !log.contains("BUG") && !log.contains("Unknown command"),
        "{log}"
    );
}

#[tokio::test]
async fn a_known_user_is_found_with_its_extra_fields_on_the_socket_and_over_tcp() {
    let service = start();
    let tcp = service.endpoint("director-master");
    for endpoint in [Endpoint::Unix(service.master_socket()), tcp] {
        let master = master(endpoint, Duration::from_secs(10));
        let fields = found(&master, "User0001").await;
        assert_eq!(fields.user(), Some("user0001"));
        assert!(fields.proxy() && !fields.nologin());
        assert_eq!(
            (fields.host(), fields.port(), fields.destuser()),
            (Some("127.0.0.2"), Some(10024), Some("u1@backend"))
        );
        // A lookup without a password never hands the password out.
        assert!(fields.pass().is_none(), "{fields:?}");

        let fields = found(&master, "user0002").await;
        assert!(fields.nologin());
        assert_eq!(fields.reason(), Some("Moved_to_the_new_site"));

        // The userdb answers with its own fields.
        let Ok(Lookup::Found(fields)) = master.user_lookup("USER0003", &lmtp()).await else {
            panic!("user0003 not in the userdb");
        };
        assert_eq!(fields.user(), Some("user0003"));
        assert_eq!(
            (fields.get("uid"), fields.get("home")),
            (Some("65534"), Some("/nonexistent"))
        );
    }
    assert_no_protocol_complaint(&service);
}

#[tokio::test]
async fn an_unknown_user_is_not_found() {
    let service = start();
    let master = socket_master(&service, Duration::from_secs(10));
    for user in ["nobody", "user0001x", ""] {
        assert_eq!(
            master.pass_lookup(user, &lmtp()).await,
            Ok(Lookup::NotFound),
            "{user:?}"
        );
    }
    assert_eq!(
        master.user_lookup("nobody", &lmtp()).await,
        Ok(Lookup::NotFound)
    );
    assert_no_protocol_complaint(&service);
}

#[tokio::test]
async fn names_with_separators_cannot_add_parameters_or_requests() {
    let service = start();
    let master = socket_master(&service, Duration::from_secs(10));
    // Sent raw, each of these would make the service look up user0001 (or cut the name there).
    for user in [
        "user0001\tservice=lmtp\n",
        "nobody\nPASS\t1\tuser0001\tservice=lmtp",
        "user0001\r",
        "user0001\0",
        "user0001\x01",
    ] {
        assert_eq!(
            master.pass_lookup(user, &lmtp()).await,
            Ok(Lookup::NotFound),
            "{user:?}"
        );
    }
    assert_no_protocol_complaint(&service);
    found(&master, "user0001").await;
}

#[tokio::test]
async fn the_service_takes_a_request_line_of_1024_bytes_and_no_more() {
    let service = start();
    let master = socket_master(&service, Duration::from_secs(10));
    let info = LookupInfo::new("lmtp");
    // `PASS\t1\t` + name + `\tservice=lmtp\n`: 21 bytes + the name.
    let longest = "u".repeat(1024 - 21);
    assert_eq!(
        master.pass_lookup(&longest, &info).await,
        Ok(Lookup::NotFound)
    );
    assert_no_protocol_complaint(&service);
    let err = master
        .pass_lookup(&format!("{longest}u"), &info)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AuthError::TooLong {
                len: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
}

/// A directory nobody but root may enter (mode 0): a passwd-file inside cannot even be
/// stat'ed by the auth process, which runs as Dovecot's internal user, or as us when we are
/// not root. Removed on drop.
struct LockedDir(PathBuf);

impl LockedDir {
    fn new() -> LockedDir {
        let dir = std::env::temp_dir().join(format!("director-test-locked-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o000)).unwrap();
        LockedDir(dir)
    }
}

impl Drop for LockedDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_failing_passdb_is_a_temporary_lookup_failure() {
    // A missing passwd-file means no users; one that cannot be stat'ed is an internal failure,
    // which by default only moves on to the next passdb.
    let locked = LockedDir::new();
    let service = AuthService::start(AuthServiceConfig {
        extra_passdb: Some(format!(
            "passdb {{\n  driver = passwd-file\n  args = {}/passwd\n  \
             result_internalfail = return-fail\n}}",
            locked.0.display()
        )),
        ..AuthServiceConfig::with_users(USERS)
    });
    let master = socket_master(&service, Duration::from_secs(10));
    let err = master.pass_lookup("user0001", &lmtp()).await.unwrap_err();
    assert!(
        matches!(err, AuthError::LookupFailed { .. }) && err.is_temporary(),
        "{err}\n{}",
        service.log()
    );
}

#[tokio::test]
async fn the_auth_client_socket_is_named_as_the_wrong_one() {
    let service = start();
    for endpoint in [service.unix(), service.tcp()] {
        let err = master(endpoint, Duration::from_secs(10))
            .pass_lookup("user0001", &lmtp())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AuthError::Protocol { detail, .. } if detail.contains("auth-client socket")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_frozen_service_times_out_within_the_timeout_and_answers_once_thawed() {
    let service = start();
    let timeout = Duration::from_millis(1500);
    let master = socket_master(&service, timeout);
    found(&master, "user0001").await;

    service.freeze();
    let started = Instant::now();
    let err = master.pass_lookup("user0001", &lmtp()).await.unwrap_err();
    let elapsed = started.elapsed();
    service.thaw();
    assert!(
        matches!(err, AuthError::Timeout { .. }) && err.is_temporary(),
        "{err}"
    );
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
    found(&master, "user0001").await;
}

#[tokio::test]
async fn a_killed_service_is_a_clear_error_and_a_restarted_one_answers() {
    let mut service = start();
    let timeout = Duration::from_secs(10);
    let master = socket_master(&service, timeout);
    found(&master, "user0001").await;

    // A frozen auth process leaves connections in the listener's queue; when it dies, the
    // master's next auth process takes them and answers.
    let auth = service.auth_pid();
    signal(auth, "STOP");
    let queued = lookup_in_flight(&master);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(auth, "KILL");
    assert!(matches!(queued.await.unwrap(), Ok(Lookup::Found(_))));

    // The whole service killed with a lookup in flight: the queued connection is reset.
    service.freeze();
    let started = Instant::now();
    let in_flight = lookup_in_flight(&master);
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.kill();
    let err = in_flight.await.unwrap().unwrap_err();
    assert!(
        matches!(err, AuthError::ConnectionLost { .. }) && err.is_temporary(),
        "{err}"
    );
    assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());

    // Gone: refused at once.
    let started = Instant::now();
    let err = master.pass_lookup("user0001", &lmtp()).await.unwrap_err();
    assert!(
        matches!(err, AuthError::Connect { .. }) && err.is_temporary(),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // Nothing to reconnect: the next lookup after a restart just works.
    service.run();
    found(&master, "user0001").await;
}
