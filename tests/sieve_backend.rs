//! `sieve::backend_login` against a real Dovecot managesieve-login (Debian's Pigeonhole):
//! the capability greeting is understood, XCLIENT passes the client's address, a right
//! password logs in to a working session and a wrong one is refused.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use director::net::stream::BackendStream;
use director::protocol::backend_login::{
    BackendLoginRequest, BackendLoginResult, Forward, StartTls,
};
use director::protocol::decision::{ClientIdentity, Credentials};
use director::protocol::sieve::backend_login::login;

use support::dovecot::{user, Pool, PASSWORD};

/// Logs in with `credentials` to the pool's first backend, as client `client_ip` with session
/// id `session_id`, after STARTTLS when `starttls` is given.
async fn try_login(
    pool: &Pool,
    credentials: Credentials,
    client_ip: &str,
    session_id: &str,
    starttls: Option<StartTls>,
) -> BackendLoginResult {
    let tcp = TcpStream::connect(pool.backend(0).sieve()).await.unwrap();
    let identity = ClientIdentity {
        client: format!("{client_ip}:50123").parse().unwrap(),
        local: "127.0.0.1:4190".parse().unwrap(),
        session_id: session_id.to_owned(),
        session_ext_id: None,
    };
    let req = BackendLoginRequest {
        credentials: &credentials,
        identity: &identity,
        forward: Forward::Auto,
        forward_fields: &[],
        starttls,
        reply_timeout: Some(Duration::from_secs(20)),
        commit: &director::protocol::backend_login::always_commit,
    };
    login(BackendStream::Plain(tcp), &req).await.unwrap()
}

/// On a logged-in session: `LISTSCRIPTS` gets Dovecot's answer.
async fn assert_listscripts(stream: BackendStream) -> BufReader<BackendStream> {
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"LISTSCRIPTS\r\n")
        .await
        .unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert_eq!(line, "OK \"Listscripts completed.\"\r\n");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_to_dovecot_and_forwards_the_client_address() {
    let pool = tokio::task::spawn_blocking(|| Pool::start(1))
        .await
        .unwrap();

    let ip = "192.0.2.61";
    let right = Credentials::plain(user(1), PASSWORD);
    match try_login(&pool, right, ip, &format!("sieve-{ip}"), None).await {
        BackendLoginResult::LoggedIn {
            stream,
            success_text,
            leftover,
        } => {
            assert_eq!(success_text, "\"Logged in.\"");
            assert!(leftover.is_empty());
            let mut stream = assert_listscripts(stream).await;
            stream.get_mut().write_all(b"LOGOUT\r\n").await.unwrap();
        }
        _ => panic!("the right password did not log in"),
    }

    // A wrong password from another address (Dovecot delays logins from an address that
    // failed, so the two logins must not share one).
    let ip = "192.0.2.62";
    let wrong = Credentials::plain(user(2), "wrong");
    let result = try_login(&pool, wrong, ip, &format!("sieve-{ip}"), None).await;
    let BackendLoginResult::AuthFailed { message } = result else {
        panic!("a wrong password was not refused");
    };
    assert_eq!(message, "Authentication failed.");

    // XCLIENT reached Dovecot: it logged the forwarded address and our session id.
    let log = pool.backend(0).log();
    let login_line = log
        .lines()
        .find(|l| l.contains("managesieve-login: Info: Login:"))
        .unwrap_or_else(|| panic!("no login line in:\n{log}"));
    assert!(login_line.contains("rip=192.0.2.61"), "{login_line}");
    assert!(
        login_line.contains("session=<sieve-192.0.2.61>"),
        "{login_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_then_login() {
    let pool = tokio::task::spawn_blocking(|| Pool::start(1))
        .await
        .unwrap();
    let pem = std::fs::read(&pool.tls.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let starttls = StartTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name: "localhost".try_into().unwrap(),
    };

    let right = Credentials::plain(user(3), PASSWORD);
    let result = try_login(&pool, right, "192.0.2.63", "sieve-tls", Some(starttls)).await;
    let BackendLoginResult::LoggedIn { stream, .. } = result else {
        panic!("no login over STARTTLS");
    };
    assert!(stream.is_tls());
    assert_listscripts(stream).await;
}
