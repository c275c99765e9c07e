//! A scripted fake backend for the unit tests of the backend logins (`imap`, `pop3` and
//! `sieve` `::backend_login`), and the parts of a login attempt those tests share.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::net::stream::BackendStream;
use crate::protocol::backend_login::{
    always_commit, BackendError, BackendLoginRequest, BackendLoginResult, Forward, StartTls,
};
use crate::protocol::decision::{ClientIdentity, Credentials};

/// A greeting or answer that ends with this hangs up after sending the text before it.
pub const CLOSE: &str = "<close>";

/// The director's end of a fake backend's connection, and the backend's task, which yields
/// every line it read once the director closes the connection.
pub type Backend = (TcpStream, JoinHandle<Vec<String>>);

/// A backend that sends `greeting`, then answers each line it reads with `respond(line)`
/// (nothing if empty); see [`CLOSE`]. Lines are recorded, and given to `respond`, without
/// their CRLF; a line with another ending (or none, at the end) keeps it, so that a bare LF
/// never passes for a line end.
pub async fn fake_backend(
    greeting: &str,
    mut respond: impl FnMut(&str) -> String + Send + 'static,
) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let greeting = greeting.to_owned();
    let task = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = socket.into_split();
        let mut rd = BufReader::new(rd);
        let mut open = say(&mut wr, &greeting).await;
        let mut seen = Vec::new();
        loop {
            let mut raw = Vec::new();
            if !matches!(rd.read_until(b'\n', &mut raw).await, Ok(1..)) {
                return seen;
            }
            let raw = String::from_utf8_lossy(&raw);
            let line = raw.strip_suffix("\r\n").unwrap_or(&raw).to_owned();
            if open {
                open = say(&mut wr, &respond(&line)).await;
            }
            seen.push(line);
        }
    });
    (TcpStream::connect(addr).await.unwrap(), task)
}

/// Sends `text` (up to a final [`CLOSE`], then hangs up). `false`: the backend no longer
/// sends.
async fn say(wr: &mut OwnedWriteHalf, text: &str) -> bool {
    let (text, close) = match text.strip_suffix(CLOSE) {
        Some(text) => (text, true),
        None => (text, false),
    };
    if wr.write_all(text.as_bytes()).await.is_err() {
        return false;
    }
    if close {
        let _ = wr.shutdown().await;
    }
    !close
}

/// The client 192.0.2.7:50123, connected to the director at `local`, in session `session_id`.
pub fn identity(local: &str, session_id: &str) -> ClientIdentity {
    ClientIdentity {
        client: "192.0.2.7:50123".parse().unwrap(),
        local: local.parse().unwrap(),
        session_id: session_id.into(),
        session_ext_id: None,
    }
}

pub fn alice() -> Credentials {
    Credentials::plain("alice", "secret")
}

/// A protocol's `login`, boxed so that one [`Attempt::run`] drives them all (as
/// `|stream, req| Box::pin(login(stream, req))`); the box also proves the login future is
/// `Send`, as the director needs.
pub type Login = for<'a> fn(
    BackendStream,
    &'a BackendLoginRequest<'a>,
) -> Pin<Box<dyn Future<Output = LoginResult> + Send + 'a>>;

pub type LoginResult = Result<BackendLoginResult, BackendError>;

/// The parts of a login request that the tests vary; each reply may take 5 s, and the
/// credentials always go out.
pub struct Attempt {
    pub credentials: Credentials,
    pub identity: ClientIdentity,
    pub forward: Forward,
    pub starttls: Option<StartTls>,
}

impl Attempt {
    pub fn new(credentials: &Credentials, identity: ClientIdentity, forward: Forward) -> Self {
        Attempt {
            credentials: credentials.clone(),
            identity,
            forward,
            starttls: None,
        }
    }

    /// The attempt with STARTTLS required, to a backend whose certificate nothing verifies.
    pub fn with_starttls(self) -> Self {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
            .with_no_client_auth();
        Attempt {
            starttls: Some(StartTls {
                connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name: "backend.example".try_into().unwrap(),
            }),
            ..self
        }
    }

    pub fn request(&self) -> BackendLoginRequest<'_> {
        BackendLoginRequest {
            credentials: &self.credentials,
            identity: &self.identity,
            forward: self.forward,
            forward_fields: &[],
            starttls: self.starttls.clone(),
            reply_timeout: Some(Duration::from_secs(5)),
            commit: &always_commit,
        }
    }

    /// Logs in with `login` through `backend`: what it came to, and the lines the backend
    /// read until the director closed the connection.
    pub async fn run(self, login: Login, backend: Backend) -> (Outcome, Vec<String>) {
        let (sock, task) = backend;
        let result = tokio::spawn(async move {
            outcome(login(BackendStream::Plain(sock), &self.request()).await)
        });
        (result.await.unwrap(), task.await.unwrap())
    }
}

/// What a login came to, without the stream (dropped, so the fake backend's task ends).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    LoggedIn { text: String, leftover: Vec<u8> },
    AuthFailed(String),
    TempFailed(String),
    Unsendable,
    Protocol,
    Closed,
    Timeout,
    Cancelled,
    Io,
}

pub fn outcome(result: LoginResult) -> Outcome {
    match result {
        Ok(BackendLoginResult::LoggedIn {
            success_text,
            leftover,
            ..
        }) => Outcome::LoggedIn {
            text: success_text,
            leftover,
        },
        Ok(BackendLoginResult::AuthFailed { message }) => Outcome::AuthFailed(message),
        Ok(BackendLoginResult::TempFailed { message }) => Outcome::TempFailed(message),
        Err(BackendError::Unsendable(_)) => Outcome::Unsendable,
        Err(BackendError::Protocol(_)) => Outcome::Protocol,
        Err(BackendError::Closed) => Outcome::Closed,
        Err(BackendError::Timeout(_)) => Outcome::Timeout,
        Err(BackendError::Cancelled) => Outcome::Cancelled,
        Err(BackendError::Io(_)) => Outcome::Io,
    }
}

/// Logged in, with nothing after the success reply.
pub fn logged_in(text: &str) -> Outcome {
    Outcome::LoggedIn {
        text: text.into(),
        leftover: Vec::new(),
    }
}
