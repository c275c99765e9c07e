//! The auth-client of `director::auth::dovecot` against a real Dovecot 2.3 auth service
//! (`support::auth_service`) with a passwd-file passdb whose users carry extra fields, reached
//! on a unix socket (`auth-client`, authentication only) and on TCP (`inet_listener
//! director-login`: a login socket, which also returns the password of a proxied login).

mod support;

use std::time::{Duration, Instant};

use director::auth::dovecot::{AuthClient, AuthError, AuthFields, RequestInfo, Step, Transport};
use support::auth_service::{AuthService, AuthServiceConfig, MECHANISMS};
use support::dovecot::signal;
use support::sasl::{cram_md5, ScramSha256};

const USERS: &str = "\
user0001:{PLAIN}pass1::::::proxy=y host=127.0.0.2 port=10143 destuser=u1@backend
user0002:{PLAIN}pass2::::::nologin=y reason=Moved_to_the_new_site
user0003:{PLAIN}pa ss\"3::::::
";

fn start() -> AuthService {
    AuthService::start(AuthServiceConfig::with_users(USERS))
}

fn plain(user: &str, pass: &str) -> Vec<u8> {
    format!("\0{user}\0{pass}").into_bytes()
}

/// A request as a login process on a TLS connection would make it.
fn client_info(session: &str) -> RequestInfo {
    RequestInfo {
        session_id: Some(session.into()),
        local: Some("192.0.2.1:143".parse().unwrap()),
        remote: Some("198.51.100.7:51000".parse().unwrap()),
        transport: Transport::Tls,
        ..RequestInfo::new("imap")
    }
}

fn expect_ok(step: Result<Step, AuthError>) -> AuthFields {
    match step {
        Ok(Step::Ok(fields)) => fields,
        other => panic!("expected OK, got {other:?}"),
    }
}

fn expect_fail(step: Result<Step, AuthError>) -> AuthFields {
    match step {
        Ok(Step::Fail(fields)) => fields,
        other => panic!("expected FAIL, got {other:?}"),
    }
}

#[tokio::test]
async fn the_handshake_lists_the_configured_mechanisms_on_both_listeners() {
    let service = start();
    for endpoint in [service.unix(), service.tcp()] {
        let client = service.client(endpoint, Duration::from_secs(10));
        let handshake = client.handshake().await.unwrap();
        let names: Vec<&str> = handshake
            .mechanisms
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, MECHANISMS);
        let plain = handshake.mechanism("plain").unwrap();
        assert!(plain.flags.plaintext && !plain.flags.private);
        assert!(
            handshake
                .mechanism("SCRAM-SHA-256")
                .unwrap()
                .flags
                .mutual_auth
        );
        assert!(handshake.mechanism("CRAM-MD5").unwrap().flags.dictionary);
        assert!(handshake.mechanism("DIGEST-MD5").unwrap().flags.mutual_auth);
        let insecure: Vec<&str> = handshake
            .advertisable(false, false)
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            insecure,
            ["CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
        );
        assert_eq!(handshake.version.0, 1);
        assert!(handshake.server_pid > 0 && !handshake.cookie.is_empty());
    }
}

#[tokio::test]
async fn plain_returns_the_user_and_the_passdb_extra_fields() {
    let service = start();
    let login = service.client(service.tcp(), Duration::from_secs(10));
    let info = client_info("sess-plain");
    let fields = expect_ok(
        login
            .start("PLAIN", Some(&plain("User0001", "pass1")), &info)
            .await,
    );
    assert_eq!(fields.user(), Some("user0001"));
    assert_eq!(fields.original_user(), Some("User0001"));
    assert!(fields.proxy() && !fields.nologin());
    assert_eq!(
        (fields.host(), fields.port(), fields.destuser()),
        (Some("127.0.0.2"), Some(10143), Some("u1@backend"))
    );
    // A login socket hands a proxy the client's password; Debug never shows it.
    assert_eq!(fields.pass().unwrap().expose(), "pass1");
    assert!(!format!("{fields:?}").contains("pass1"), "{fields:?}");

    let fields = expect_ok(
        login
            .start("PLAIN", Some(&plain("user0002", "pass2")), &info)
            .await,
    );
    assert!(fields.nologin() && !fields.proxy());
    assert_eq!(fields.reason(), Some("Moved_to_the_new_site"));

    // The authentication-only socket never returns a password.
    let only = service.client(service.unix(), Duration::from_secs(10));
    let fields = expect_ok(
        only.start("PLAIN", Some(&plain("user0001", "pass1")), &info)
            .await,
    );
    assert!(fields.proxy() && fields.pass().is_none());
    let fields = expect_ok(
        only.start("plain", Some(&plain("user0003", "pa ss\"3")), &info)
            .await,
    );
    assert_eq!(fields.user(), Some("user0003"));
}

#[tokio::test]
async fn a_wrong_password_fails_and_is_not_temporary() {
    let service = start();
    let client = service.client(service.unix(), Duration::from_secs(10));
    let info = client_info("sess-wrong");
    for (user, pass) in [("user0003", "nope"), ("nobody", "x")] {
        let fields = expect_fail(client.start("PLAIN", Some(&plain(user, pass)), &info).await);
        assert!(!fields.temp() && !fields.authz(), "{fields:?}");
    }
    // The client's address and session reached the service (its log names them; the log
    // process writes a moment later).
    let expected = "passwd-file(user0003,198.51.100.7,<sess-wrong>): Password mismatch";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !service.log().contains(expected) {
        assert!(Instant::now() < deadline, "{}", service.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn login_takes_two_challenges() {
    let service = start();
    let client = service.client(service.unix(), Duration::from_secs(10));
    let info = RequestInfo::new("pop3");
    let Step::Continue(username) = client.start("LOGIN", None, &info).await.unwrap() else {
        panic!("LOGIN did not ask for the user name");
    };
    assert_eq!(username.data(), b"Username:");
    let Step::Continue(password) = username.respond(b"user0003").await.unwrap() else {
        panic!("LOGIN did not ask for the password");
    };
    assert_eq!(password.data(), b"Password:");
    let fields = expect_ok(password.respond(b"pa ss\"3").await);
    assert_eq!(fields.user(), Some("user0003"));
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn cram_md5_accepts_a_computed_response() {
    let service = start();
    let client = service.client(service.unix(), Duration::from_secs(10));
    let info = RequestInfo::new("imap");
    for (pass, ok) in [("pass1", true), ("wrong", false)] {
        let Step::Continue(challenge) = client.start("CRAM-MD5", None, &info).await.unwrap() else {
            panic!("CRAM-MD5 sent no challenge");
        };
        assert!(challenge.data().starts_with(b"<"), "{challenge:?}");
        let response = cram_md5("user0001", pass, challenge.data());
        let step = challenge.respond(&response).await;
        if ok {
            assert_eq!(expect_ok(step).user(), Some("user0001"));
        } else {
            assert!(!expect_fail(step).temp());
        }
    }
}

/// Runs SCRAM-SHA-256 for `user`, checking the server's signature; returns the last step.
async fn scram_sha_256(
    client: &AuthClient,
    info: &RequestInfo,
    user: &str,
    pass: &str,
) -> Result<Step, AuthError> {
    let mut scram = ScramSha256::new(user, pass);
    let first = client
        .start("SCRAM-SHA-256", Some(&scram.client_first()), info)
        .await?;
    let Step::Continue(server_first) = first else {
        return Ok(first);
    };
    let client_final = scram.client_final(server_first.data());
    match server_first.respond(&client_final).await? {
        // Without final-resp-ok the server-final-message comes as one more challenge.
        Step::Continue(server_final) => {
            assert_eq!(server_final.data(), scram.server_final());
            server_final.respond(b"").await
        }
        Step::Ok(fields) => {
            assert_eq!(
                fields.final_response().as_deref(),
                Some(scram.server_final())
            );
            Ok(Step::Ok(fields))
        }
        fail => Ok(fail),
    }
}

#[tokio::test]
async fn scram_sha_256_proves_both_sides() {
    let service = start();
    let client = service.client(service.unix(), Duration::from_secs(10));
    let info = RequestInfo::new("imap");
    let fields = expect_ok(scram_sha_256(&client, &info, "user0003", "pa ss\"3").await);
    assert_eq!(fields.user(), Some("user0003"));
    // With final-resp-ok the server-final-message comes with OK.
    let info = RequestInfo {
        final_response_ok: true,
        ..info
    };
    let fields = expect_ok(scram_sha_256(&client, &info, "user0001", "pass1").await);
    assert_eq!(fields.user(), Some("user0001"));
    assert!(!expect_fail(scram_sha_256(&client, &info, "user0001", "bad").await).temp());
}

#[tokio::test]
async fn fifty_concurrent_requests_share_one_connection_and_get_their_own_answers() {
    let service = start();
    let client = service.client(service.tcp(), Duration::from_secs(20));
    let before = client.handshake().await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let (user, pass, ok) = match i % 3 {
                    0 => ("user0001", "pass1", true),
                    1 => ("user0003", "pa ss\"3", true),
                    _ => ("user0003", "wrong", false),
                };
                let info = client_info(&format!("sess-{i}"));
                let step = client.start("PLAIN", Some(&plain(user, pass)), &info).await;
                (user, ok, step)
            })
        })
        .collect();
    for task in tasks {
        let (user, ok, step) = task.await.unwrap();
        if ok {
            assert_eq!(expect_ok(step).user(), Some(user));
        } else {
            assert_eq!(expect_fail(step).user(), Some(user));
        }
    }
    let after = client.handshake().await.unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&before, &after),
        "one connection for all"
    );
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn a_killed_auth_process_fails_requests_in_flight_and_the_next_request_reconnects() {
    let service = start();
    let timeout = Duration::from_secs(10);
    let client = service.client(service.unix(), timeout);
    let first = client.handshake().await.unwrap();
    // Frozen, the auth process takes the requests into its socket buffer and answers none.
    let auth = service.auth_pid();
    signal(auth, "STOP");
    let started = Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let info = RequestInfo::new("imap");
                client
                    .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.in_flight(), 10);
    signal(auth, "KILL");
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(
            matches!(err, AuthError::ConnectionLost { .. }) && err.is_temporary(),
            "{err}"
        );
    }
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    // Dovecot's master starts a new auth process for the next connection.
    let fields = expect_ok(
        client
            .start(
                "PLAIN",
                Some(&plain("user0001", "pass1")),
                &RequestInfo::new("imap"),
            )
            .await,
    );
    assert_eq!(fields.user(), Some("user0001"));
    let second = client.handshake().await.unwrap();
    assert_ne!(first.server_pid, second.server_pid);
}

#[tokio::test]
async fn a_frozen_service_times_out_and_a_restarted_one_is_reconnected() {
    let mut service = start();
    let client = service.client(service.tcp(), Duration::from_millis(1500));
    let info = RequestInfo::new("imap");
    expect_ok(
        client
            .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
            .await,
    );

    service.freeze();
    let err = client
        .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AuthError::Timeout { .. }) && err.is_temporary(),
        "{err}"
    );
    assert_eq!(client.in_flight(), 0);
    // Thawed, it answers the late request (ignored) and the next one on the same connection.
    service.thaw();
    let fields = expect_ok(
        client
            .start("PLAIN", Some(&plain("user0003", "pa ss\"3")), &info)
            .await,
    );
    assert_eq!(fields.user(), Some("user0003"));

    service.kill();
    let err = client
        .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
        .await
        .unwrap_err();
    assert!(err.is_temporary(), "{err}");
    let err = client.handshake().await.unwrap_err();
    assert!(matches!(err, AuthError::Connect { .. }), "{err}");

    // Back again, it is reconnected once the client's back-off after the failed attempts
    // (100 ms, doubling, at most 5 s) has passed; until then the last failure is repeated at
    // once, without an attempt.
    service.run();
    let started = Instant::now();
    let step = loop {
        match client
            .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
            .await
        {
            Err(AuthError::Connect { .. }) if started.elapsed() < Duration::from_secs(6) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    expect_ok(step);
}
