//! The auth-client of `director::auth::dovecot` against a real Dovecot 2.3 auth service: an
//! instance of its own (`dovecot -F -c CONF`, no mail protocols) with a passwd-file passdb
//! whose users carry extra fields, reached on a unix socket (`auth-client`, authentication
//! only) and on TCP (`inet_listener director-login`: a login socket, which also returns the
//! password of a proxied login).
//!
//! The penalty and the failure delay are off (`auth_failure_delay = 0`, no
//! `anvil-auth-penalty` socket), as in the other tests: failed logins from one address would
//! slow the later ones down. Dovecot still flushes failures every 500 ms.

mod support;

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use director::auth::dovecot::{
    AuthClient, AuthClientOptions, AuthError, AuthFields, Endpoint, RequestInfo, Step, Transport,
};
use md5::{Digest, Md5};
use support::dovecot::{
    allocate_block, command_stdout, current_uid, kill_children, signal, spawn_dovecot,
};

/// The TCP port of the auth service's login listener, on the instance's own address.
const AUTH_PORT: u16 = 10990;

const USERS: &str = "\
user0001:{PLAIN}pass1::::::proxy=y host=127.0.0.2 port=10143 destuser=u1@backend
user0002:{PLAIN}pass2::::::nologin=y reason=Moved_to_the_new_site
user0003:{PLAIN}pa ss\"3::::::
";

/// One Dovecot instance that runs only the auth service. Dropping it kills it.
struct AuthService {
    dir: PathBuf,
    ip: IpAddr,
    config: PathBuf,
    master: Option<Child>,
}

impl AuthService {
    fn start() -> AuthService {
        let (ip, dir) = allocate();
        fs::write(dir.join("passwd"), USERS).unwrap();
        let config = dir.join("dovecot.conf");
        fs::write(&config, config_text(ip, &dir)).unwrap();
        let mut service = AuthService {
            dir,
            ip,
            config,
            master: None,
        };
        service.run();
        service
    }

    /// The unix socket that only authenticates.
    fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.dir.join("run").join("auth-client"))
    }

    /// The TCP login listener.
    fn tcp(&self) -> Endpoint {
        Endpoint::Tcp(SocketAddr::new(self.ip, AUTH_PORT).to_string())
    }

    fn client(&self, endpoint: Endpoint, request_timeout: Duration) -> AuthClient {
        AuthClient::new(AuthClientOptions {
            request_timeout,
            ..AuthClientOptions::new(endpoint)
        })
    }

    fn log(&self) -> String {
        let mut log = fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default();
        log.push_str(&fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default());
        log
    }

    /// Starts the master and waits until both listeners accept connections.
    fn run(&mut self) {
        let child = spawn_dovecot(&self.config, &self.dir);
        self.master = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let socket = self.dir.join("run").join("auth-client");
        while UnixStream::connect(&socket).is_err()
            || TcpStream::connect((self.ip, AUTH_PORT)).is_err()
        {
            let exited = self.master.as_mut().unwrap().try_wait().unwrap().is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "Dovecot did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills the master and all its children (SIGKILL): the listeners close.
    fn kill(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let pid = master.id();
        signal(pid, "STOP");
        kill_children(pid, "KILL");
        signal(pid, "KILL");
        let _ = master.wait();
    }

    /// The pid of the auth process (the master starts it on the first connection).
    fn auth_pid(&self) -> u32 {
        let master = self.master.as_ref().expect("running").id();
        children(master)
            .into_iter()
            .find(|&pid| {
                // Its title is `<instance_name>/auth`.
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).next().unwrap().ends_with(b"/auth"))
            })
            .expect("an auth process")
    }
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.kill();
        if std::env::var("DIRECTOR_TEST_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn config_text(ip: IpAddr, dir: &Path) -> String {
    let d = dir.display();
    let mut out = format!(
        "base_dir = {d}/run\n\
         state_dir = {d}/state\n\
         instance_name = director-authtest-{}\n\
         log_path = {d}/dovecot.log\n\
         listen = {ip}\n\
         protocols =\n\
         shutdown_clients = yes\n",
        dir.file_name().unwrap().to_string_lossy()
    );
    if current_uid() != 0 {
        let user = command_stdout("id", &["-un"]);
        let _ = writeln!(
            out,
            "default_internal_user = {user}\ndefault_login_user = {user}"
        );
    }
    let _ = write!(
        out,
        r#"auth_mechanisms = plain login cram-md5 scram-sha-1 scram-sha-256
disable_plaintext_auth = no
auth_failure_delay = 0
auth_verbose = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Ln {d}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
  inet_listener director-login {{
    port = {AUTH_PORT}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"#
    );
    out
}

/// A free `127.X.Y.1` (the harness's own address blocks) and a fresh directory for it.
fn allocate() -> (IpAddr, PathBuf) {
    let ((x, y), dir) = allocate_block(1);
    fs::create_dir_all(dir.join("state")).unwrap();
    // The auth process runs as Dovecot's internal user and reads the passwd-file.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.join("state"), fs::Permissions::from_mode(0o755)).unwrap();
    (IpAddr::V4(Ipv4Addr::new(127, x, y, 1)), dir)
}

/// The direct children of `pid` (every Dovecot service is a child of the master).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let status = fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"));
        if ppid.and_then(|p| p.trim().parse().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
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

fn hmac<const BLOCK: usize>(hash: impl Fn(&[u8]) -> Vec<u8>, key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut k = if key.len() > BLOCK {
        hash(key)
    } else {
        key.to_vec()
    };
    k.resize(BLOCK, 0);
    let pad = |byte: u8| k.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = hash(&[pad(0x36), data.to_vec()].concat());
    hash(&[pad(0x5c), inner].concat())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[tokio::test]
async fn the_handshake_lists_the_configured_mechanisms_on_both_listeners() {
    let service = AuthService::start();
    for endpoint in [service.unix(), service.tcp()] {
        let client = service.client(endpoint, Duration::from_secs(10));
        let handshake = client.handshake().await.unwrap();
        let names: Vec<&str> = handshake
            .mechanisms
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
        );
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
        let insecure: Vec<&str> = handshake
            .advertisable(false, false)
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(insecure, ["CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]);
        assert_eq!(handshake.version.0, 1);
        assert!(handshake.server_pid > 0 && !handshake.cookie.is_empty());
    }
}

#[tokio::test]
async fn plain_returns_the_user_and_the_passdb_extra_fields() {
    let service = AuthService::start();
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
    let service = AuthService::start();
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
    let service = AuthService::start();
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
    let service = AuthService::start();
    let client = service.client(service.unix(), Duration::from_secs(10));
    let info = RequestInfo::new("imap");
    let md5 = |data: &[u8]| Md5::digest(data).to_vec();
    for (pass, ok) in [("pass1", true), ("wrong", false)] {
        let Step::Continue(challenge) = client.start("CRAM-MD5", None, &info).await.unwrap() else {
            panic!("CRAM-MD5 sent no challenge");
        };
        assert!(challenge.data().starts_with(b"<"), "{challenge:?}");
        let digest = hmac::<64>(md5, pass.as_bytes(), challenge.data());
        let response = format!("user0001 {}", hex(&digest));
        let step = challenge.respond(response.as_bytes()).await;
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
    use ring::{digest, pbkdf2};
    let sha256 = |data: &[u8]| digest::digest(&digest::SHA256, data).as_ref().to_vec();
    let client_first_bare = format!("n={user},r=rOprNGfwEbeRWgbNEkqO");
    let first = client
        .start(
            "SCRAM-SHA-256",
            Some(format!("n,,{client_first_bare}").as_bytes()),
            info,
        )
        .await?;
    let Step::Continue(server_first) = first else {
        return Ok(first);
    };
    let server_first_text = String::from_utf8(server_first.data().to_vec()).unwrap();
    let attr = |name: &str| {
        server_first_text
            .split(',')
            .find_map(|a| a.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {server_first_text:?}"))
            .to_owned()
    };
    let (nonce, salt, iterations) = (attr("r="), attr("s="), attr("i="));
    assert!(nonce.starts_with("rOprNGfwEbeRWgbNEkqO"));
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations.parse().unwrap(),
        &STANDARD.decode(salt).unwrap(),
        pass.as_bytes(),
        &mut salted,
    );
    let mac = |key: &[u8], data: &[u8]| hmac::<64>(sha256, key, data);
    let client_key = mac(&salted, b"Client Key");
    let without_proof = format!("c=biws,r={nonce}");
    let auth_message = format!("{client_first_bare},{server_first_text},{without_proof}");
    let signature = mac(&sha256(&client_key), auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(a, b)| a ^ b)
        .collect();
    let client_final = format!("{without_proof},p={}", STANDARD.encode(proof));
    let server_signature = mac(&mac(&salted, b"Server Key"), auth_message.as_bytes());
    let expected_final = format!("v={}", STANDARD.encode(server_signature));
    match server_first.respond(client_final.as_bytes()).await? {
        // Without final-resp-ok the server-final-message comes as one more challenge.
        Step::Continue(server_final) => {
            assert_eq!(server_final.data(), expected_final.as_bytes());
            server_final.respond(b"").await
        }
        Step::Ok(fields) => {
            assert_eq!(fields.final_response(), Some(expected_final.into_bytes()));
            Ok(Step::Ok(fields))
        }
        fail => Ok(fail),
    }
}

#[tokio::test]
async fn scram_sha_256_proves_both_sides() {
    let service = AuthService::start();
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
    let service = AuthService::start();
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
    let service = AuthService::start();
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
    let mut service = AuthService::start();
    let client = service.client(service.tcp(), Duration::from_millis(1500));
    let info = RequestInfo::new("imap");
    expect_ok(
        client
            .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
            .await,
    );

    let auth = service.auth_pid();
    signal(auth, "STOP");
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
    signal(auth, "CONT");
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

    service.run();
    expect_ok(
        client
            .start("PLAIN", Some(&plain("user0001", "pass1")), &info)
            .await,
    );
}
