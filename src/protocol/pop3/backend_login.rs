//! Logging in to a POP3 backend on the client's behalf, the way Dovecot's pop3 proxy does:
//! greeting, `CAPA`, optional `STLS` (then `CAPA` again), `XCLIENT` with the client's address
//! when the backend offers it, then `AUTH PLAIN` with an initial response, or `USER`/`PASS`
//! when the backend has no SASL PLAIN.
//!
//! Credentials are never logged, and never sent in a form that could smuggle a second command
//! to the backend: a CR, LF or NUL that the chosen login command cannot carry makes the login
//! fail with [`BackendError::Unsendable`] before anything is sent.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::stream::BackendStream;
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward,
};
use crate::protocol::decision::Credentials;
use crate::protocol::pop3::command::{next_line, Line};
use crate::protocol::sasl;

/// Longest line accepted from a backend, CRLF included. Dovecot's replies are far shorter;
/// the cap only stops a broken backend from filling our memory.
const MAX_LINE: usize = 8192;

/// Most capability lines accepted in one `CAPA` reply, for the same reason.
const MAX_CAPA_LINES: usize = 256;

/// The `TTL` sent in `XCLIENT`. A Dovecot proxy starts at 5 (`LOGIN_PROXY_TTL`) and sends one
/// less at each hop, so a backend that proxies again stops loops; we are the first hop.
const XCLIENT_TTL: u32 = 4;

/// Logs in to a POP3 backend. `stream` is connected, with implicit TLS and any PROXY header
/// already done. Each reply must come within `req.reply_timeout`.
pub async fn login(
    stream: BackendStream,
    req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        reply_timeout: req.reply_timeout,
    };

    // Dovecot announces XCLIENT in its greeting (`+OK [XCLIENT] ...`), not in CAPA.
    let greeting_xclient = match conn.reply().await? {
        Reply::Ok(text) => split_code(&text)
            .0
            .is_some_and(|c| c.eq_ignore_ascii_case("XCLIENT")),
        Reply::Err(text) => return Ok(BackendLoginResult::TempFailed { message: text }),
    };

    let mut caps = conn.capabilities().await?;

    if let Some(starttls) = &req.starttls {
        if !caps.stls {
            return Err(BackendError::Protocol(
                "backend does not offer STLS, but starttls is configured for it".into(),
            ));
        }
        if let Reply::Err(text) = conn.command(b"STLS\r\n").await? {
            return Err(BackendError::Protocol(format!(
                "backend refused STLS: {text}"
            )));
        }
        if !conn.buf.is_empty() {
            // Anything sent after the STLS reply was not protected by TLS.
            return Err(BackendError::Protocol(
                "backend sent data between its STLS reply and the TLS handshake".into(),
            ));
        }
        conn.stream = conn
            .stream
            .start_tls(&starttls.connector, starttls.server_name.clone())
            .await?;
        caps = conn.capabilities().await?;
    }

    if req.forward == Forward::Auto && (caps.xclient || greeting_xclient) {
        let line = xclient_line(req.identity.client, &req.identity.session_id);
        if let Reply::Err(text) = conn.command(line.as_bytes()).await? {
            return Err(BackendError::Protocol(format!(
                "backend refused XCLIENT (is the director in the backend's \
                 login_trusted_networks?): {text}"
            )));
        }
    }

    req.may_send_credentials()?;
    let reply = if caps.sasl_plain {
        conn.auth_plain(req.credentials).await?
    } else {
        conn.user_pass(req.credentials).await?
    };

    Ok(match reply {
        Reply::Ok(text) => BackendLoginResult::LoggedIn {
            stream: conn.stream,
            success_text: text,
            leftover: conn.buf,
        },
        Reply::Err(text) => failure(&text),
    })
}

/// The `XCLIENT` command that tells the backend who the client really is, as Dovecot's pop3
/// proxy writes it. The session id is ours; it is left out should it ever hold a character
/// that does not belong in one.
fn xclient_line(client: SocketAddr, session_id: &str) -> String {
    let mut line = format!(
        "XCLIENT ADDR={} PORT={}",
        client.ip().to_canonical(),
        client.port()
    );
    if !session_id.is_empty() && session_id.bytes().all(|b| b.is_ascii_graphic()) {
        line.push_str(" SESSION=");
        line.push_str(session_id);
    }
    line.push_str(&format!(" TTL={XCLIENT_TTL}\r\n"));
    line
}

/// Classifies a login's `-ERR` text. Dovecot marks temporary trouble with a response code
/// (RFC 2449, 3206): `[SYS/TEMP]`, `[IN-USE]` (mailbox locked) and `[SYS/PERM]` are not the
/// client's credentials at fault, so another try (or another backend) may work; anything else,
/// `[AUTH]` or no code, is a refused login.
fn failure(text: &str) -> BackendLoginResult {
    let (code, message) = split_code(text);
    let temporary = code.is_some_and(|c| {
        ["SYS/TEMP", "IN-USE", "SYS/PERM"]
            .iter()
            .any(|t| c.eq_ignore_ascii_case(t))
    });
    let message = message.to_owned();
    if temporary {
        BackendLoginResult::TempFailed { message }
    } else {
        BackendLoginResult::AuthFailed { message }
    }
}

/// Splits `[CODE] text` into the code and the text; text without a code is returned whole.
fn split_code(text: &str) -> (Option<&str>, &str) {
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((code, message)) = rest.split_once(']') {
            return (Some(code), message.trim_start_matches(' '));
        }
    }
    (None, text)
}

/// A backend's one-line status reply, with the text after `+OK `/`-ERR `.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok(String),
    Err(String),
}

impl Reply {
    /// Parses a status line; anything else is the backend breaking the protocol.
    fn parse(line: &[u8]) -> Result<Reply, BackendError> {
        let status_text = |status: &str| -> Option<String> {
            let head = line.get(..status.len())?;
            if !head.eq_ignore_ascii_case(status.as_bytes()) {
                return None;
            }
            match &line[status.len()..] {
                [] => Some(String::new()),
                [b' ', text @ ..] => Some(String::from_utf8_lossy(text).into_owned()),
                _ => None,
            }
        };
        if let Some(text) = status_text("+OK") {
            Ok(Reply::Ok(text))
        } else if let Some(text) = status_text("-ERR") {
            Ok(Reply::Err(text))
        } else {
            Err(BackendError::Protocol(format!(
                "expected +OK or -ERR, got {:?}",
                String::from_utf8_lossy(&line[..line.len().min(100)])
            )))
        }
    }
}

/// What the backend's `CAPA` said, as far as logging in is concerned.
#[derive(Debug, Default, PartialEq, Eq)]
struct Capabilities {
    /// `STLS`: STARTTLS is possible.
    stls: bool,
    /// `SASL ... PLAIN ...`: `AUTH PLAIN` is possible; otherwise we fall back to USER/PASS.
    sasl_plain: bool,
    /// `XCLIENT`: the backend takes the client's address from us (it trusts the director).
    xclient: bool,
}

impl Capabilities {
    fn add(&mut self, line: &str) {
        let mut words = line.split_ascii_whitespace();
        let Some(name) = words.next() else { return };
        match name.to_ascii_uppercase().as_str() {
            "STLS" => self.stls = true,
            "XCLIENT" => self.xclient = true,
            "SASL" => {
                self.sasl_plain |= words.any(|m| m.eq_ignore_ascii_case("PLAIN"));
            }
            _ => {}
        }
    }
}

/// The backend connection during login: the stream and the bytes read but not yet used.
struct Conn {
    stream: BackendStream,
    buf: Vec<u8>,
    reply_timeout: Duration,
}

impl Conn {
    /// Reads one line, without its line end.
    async fn read_line(&mut self) -> Result<Vec<u8>, BackendError> {
        loop {
            match next_line(&self.buf, MAX_LINE) {
                Line::Complete { consumed, line } => {
                    let line = line.to_vec();
                    self.buf.drain(..consumed);
                    return Ok(line);
                }
                Line::TooLong => {
                    return Err(BackendError::Protocol(format!(
                        "reply line longer than {MAX_LINE} bytes"
                    )))
                }
                Line::Incomplete => {
                    let mut chunk = [0u8; 1024];
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(BackendError::Closed);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// Runs `step` (a write and/or a read) under the reply timeout.
    async fn timed<T>(
        &mut self,
        step: impl AsyncFnOnce(&mut Self) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let limit = self.reply_timeout;
        tokio::time::timeout(limit, step(self))
            .await
            .map_err(|_| BackendError::Timeout(limit))?
    }

    /// Reads one status reply.
    async fn reply(&mut self) -> Result<Reply, BackendError> {
        self.timed(async |c| Reply::parse(&c.read_line().await?))
            .await
    }

    /// Sends one command line (CRLF included) and reads its status reply. The line may hold
    /// credentials: it is never logged, and errors never quote it.
    async fn command(&mut self, line: &[u8]) -> Result<Reply, BackendError> {
        self.timed(async |c| {
            c.stream.write_all(line).await?;
            c.stream.flush().await?;
            Reply::parse(&c.read_line().await?)
        })
        .await
    }

    /// Sends `CAPA` and reads the list. A backend that refuses `CAPA` has no capabilities.
    async fn capabilities(&mut self) -> Result<Capabilities, BackendError> {
        self.timed(async |c| {
            c.stream.write_all(b"CAPA\r\n").await?;
            c.stream.flush().await?;
            let mut caps = Capabilities::default();
            if let Reply::Err(_) = Reply::parse(&c.read_line().await?)? {
                return Ok(caps);
            }
            for _ in 0..MAX_CAPA_LINES {
                let line = c.read_line().await?;
                if line == b"." {
                    return Ok(caps);
                }
                // Dot-stuffing (RFC 1939): a leading dot is doubled.
                let line = line.strip_prefix(b".").unwrap_or(&line);
                caps.add(&String::from_utf8_lossy(line));
            }
            Err(BackendError::Protocol(format!(
                "CAPA reply longer than {MAX_CAPA_LINES} lines"
            )))
        })
        .await
    }

    /// `AUTH PLAIN <initial response>` (RFC 5034). Base64 carries any byte safely, but PLAIN
    /// separates its fields with NUL, so a NUL inside one cannot be sent.
    async fn auth_plain(&mut self, credentials: &Credentials) -> Result<Reply, BackendError> {
        let fields = [
            &credentials.username,
            &credentials.auth_username,
            credentials.password.expose(),
        ];
        if fields.iter().any(|f| f.contains('\0')) {
            return Err(BackendError::Unsendable(
                "the username or password holds a NUL byte".into(),
            ));
        }
        let line = format!("AUTH PLAIN {}\r\n", sasl::encode_plain(credentials));
        self.command(line.as_bytes()).await
    }

    /// `USER name` then `PASS password`, for backends without SASL PLAIN. Neither may hold a
    /// line end (it would start a second command) or a NUL, and a master-user login (a
    /// different authentication identity) cannot be expressed at all.
    async fn user_pass(&mut self, credentials: &Credentials) -> Result<Reply, BackendError> {
        let unsafe_text = |s: &str| s.contains(['\r', '\n', '\0']);
        if unsafe_text(&credentials.username) || unsafe_text(credentials.password.expose()) {
            return Err(BackendError::Unsendable(
                "the username or password holds CR, LF or NUL, which USER/PASS cannot carry \
                 (the backend offers no SASL PLAIN)"
                    .into(),
            ));
        }
        if credentials.username != credentials.auth_username {
            return Err(BackendError::Unsendable(
                "a master-user login needs SASL PLAIN, which the backend does not offer".into(),
            ));
        }
        let user = format!("USER {}\r\n", credentials.username);
        if let Reply::Err(text) = self.command(user.as_bytes()).await? {
            return Ok(Reply::Err(text));
        }
        let pass = format!("PASS {}\r\n", credentials.password.expose());
        self.command(pass.as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::protocol::backend_login::StartTls;
    use crate::protocol::decision::{ClientIdentity, Secret};

    /// Dovecot 2.3's pop3-login capabilities, with and without the extras a test needs.
    const CAPA_PLAIN: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
                              AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
    const CAPA_XCLIENT: &str = "+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\nXCLIENT\r\n.\r\n";
    const CAPA_USER_ONLY: &str = "+OK\r\nCAPA\r\nTOP\r\nUSER\r\n.\r\n";

    /// What a fake backend's script answers to close the connection instead.
    const CLOSE: &str = "<close>";

    /// A scripted backend: sends `greeting`, then answers each line it reads with
    /// `respond(line)`: nothing if empty, and it closes the connection on [`CLOSE`]. The handle yields every line it read, once the
    /// director closes the connection.
    async fn fake_backend(
        greeting: &'static str,
        respond: impl Fn(&str) -> String + Send + 'static,
    ) -> (TcpStream, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = sock.into_split();
            wr.write_all(greeting.as_bytes()).await.unwrap();
            let mut lines = BufReader::new(rd).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = respond(&line);
                seen.push(line);
                if reply == CLOSE {
                    break;
                }
                if !reply.is_empty() && wr.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
            seen
        });
        (TcpStream::connect(addr).await.unwrap(), task)
    }

    /// A backend that answers like Dovecot with the given CAPA reply and login reply.
    async fn dovecot_like(
        capa: &'static str,
        login_reply: &'static str,
    ) -> (TcpStream, JoinHandle<Vec<String>>) {
        fake_backend("+OK Dovecot ready.\r\n", move |line| {
            let keyword = line.split(' ').next().unwrap_or_default();
            match keyword {
                "CAPA" => capa.to_owned(),
                "XCLIENT" | "USER" => "+OK\r\n".to_owned(),
                "AUTH" | "PASS" => login_reply.to_owned(),
                _ => "-ERR Unknown command.\r\n".to_owned(),
            }
        })
        .await
    }

    fn identity() -> ClientIdentity {
        ClientIdentity {
            client: "192.0.2.7:50123".parse().unwrap(),
            local: "198.51.100.1:110".parse().unwrap(),
            session_id: "dir-1a2b".into(),
            session_ext_id: None,
        }
    }

    fn request<'a>(
        credentials: &'a Credentials,
        identity: &'a ClientIdentity,
        forward: Forward,
    ) -> BackendLoginRequest<'a> {
        BackendLoginRequest {
            credentials,
            identity,
            forward,
            starttls: None,
            reply_timeout: Duration::from_secs(5),
            commit: &crate::protocol::backend_login::always_commit,
        }
    }

    /// What a login came to, without the stream (dropped, so the fake backend stops).
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        LoggedIn { text: String, leftover: Vec<u8> },
        AuthFailed(String),
        TempFailed(String),
        Unsendable,
        Protocol,
        Closed,
        Timeout,
        Io,
    }

    fn outcome(result: Result<BackendLoginResult, BackendError>) -> Outcome {
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
            Err(BackendError::Timeout(_) | BackendError::Cancelled) => Outcome::Timeout,
            Err(BackendError::Io(_)) => Outcome::Io,
        }
    }

    /// Logs in with `credentials`; returns the outcome and the lines the backend read.
    async fn run(
        backend: (TcpStream, JoinHandle<Vec<String>>),
        credentials: &Credentials,
        forward: Forward,
    ) -> (Outcome, Vec<String>) {
        let (sock, task) = backend;
        let credentials = credentials.clone();
        // Spawned, which also proves the login future is `Send`, as the director needs.
        let result = tokio::spawn(async move {
            let id = identity();
            let req = request(&credentials, &id, forward);
            outcome(login(BackendStream::Plain(sock), &req).await)
        });
        (result.await.unwrap(), task.await.unwrap())
    }

    fn alice() -> Credentials {
        Credentials::plain("alice", "secret")
    }

    fn logged_in(text: &str) -> Outcome {
        Outcome::LoggedIn {
            text: text.into(),
            leftover: Vec::new(),
        }
    }

    #[tokio::test]
    async fn auth_plain_when_offered() {
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, logged_in("Logged in."));
        // "\0alice\0secret"
        assert_eq!(seen, ["CAPA", "AUTH PLAIN AGFsaWNlAHNlY3JldA=="]);
    }

    #[tokio::test]
    async fn master_user_login_sends_authzid() {
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let creds = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: Secret::new("pw"),
        };
        let (result, seen) = run(backend, &creds, Forward::None).await;
        assert_eq!(result, logged_in("Logged in."));
        let b64 = seen[1].strip_prefix("AUTH PLAIN ").unwrap();
        assert_eq!(
            sasl::decode_base64(b64.as_bytes()).unwrap(),
            b"bob\0master\0pw"
        );
    }

    #[tokio::test]
    async fn xclient_only_when_advertised_and_wanted() {
        let backend = dovecot_like(CAPA_XCLIENT, "+OK Logged in.\r\n").await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, logged_in("Logged in."));
        assert_eq!(
            seen[..2],
            [
                "CAPA",
                "XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=dir-1a2b TTL=4"
            ]
        );
        assert!(seen[2].starts_with("AUTH PLAIN "));

        // Not advertised: not sent.
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let (_, seen) = run(backend, &alice(), Forward::Auto).await;
        assert!(!seen.iter().any(|l| l.starts_with("XCLIENT")));

        // Advertised the way Dovecot 2.3 does it, in the greeting's response code.
        let backend = fake_backend("+OK [XCLIENT] Dovecot ready.\r\n", |line| {
            match line.split(' ').next().unwrap_or_default() {
                "CAPA" => CAPA_PLAIN.to_owned(),
                "XCLIENT" => "+OK Updated\r\n".to_owned(),
                "AUTH" => "+OK Logged in.\r\n".to_owned(),
                _ => "-ERR Unknown command.\r\n".to_owned(),
            }
        })
        .await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, logged_in("Logged in."));
        assert_eq!(
            seen[1],
            "XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=dir-1a2b TTL=4"
        );

        // Advertised but another way of forwarding is configured: not sent.
        let backend = dovecot_like(CAPA_XCLIENT, "+OK Logged in.\r\n").await;
        let (_, seen) = run(backend, &alice(), Forward::ProxyV2).await;
        assert!(!seen.iter().any(|l| l.starts_with("XCLIENT")));
    }

    #[tokio::test]
    async fn xclient_refused_is_a_backend_error() {
        let backend = fake_backend("+OK ready\r\n", |line| match line {
            "CAPA" => CAPA_XCLIENT.into(),
            _ => "-ERR You are not from trusted IP\r\n".into(),
        })
        .await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, Outcome::Protocol);
        assert_eq!(
            seen.len(),
            2,
            "no credentials after a refused XCLIENT: {seen:?}"
        );
    }

    #[test]
    fn xclient_line_forms() {
        let v6: SocketAddr = "[2001:db8::1]:993".parse().unwrap();
        assert_eq!(
            xclient_line(v6, "s1"),
            "XCLIENT ADDR=2001:db8::1 PORT=993 SESSION=s1 TTL=4\r\n"
        );
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:1000".parse().unwrap();
        assert_eq!(
            xclient_line(mapped, "bad id\r\nX"),
            "XCLIENT ADDR=192.0.2.9 PORT=1000 TTL=4\r\n"
        );
    }

    #[tokio::test]
    async fn user_pass_without_sasl_plain() {
        let backend = dovecot_like(CAPA_USER_ONLY, "+OK Logged in.\r\n").await;
        let creds = Credentials::plain("alice", "correct horse battery");
        let (result, seen) = run(backend, &creds, Forward::Auto).await;
        assert_eq!(result, logged_in("Logged in."));
        assert_eq!(seen, ["CAPA", "USER alice", "PASS correct horse battery"]);
    }

    #[tokio::test]
    async fn user_refused_is_an_auth_failure() {
        let backend = fake_backend("+OK ready\r\n", |line| match line {
            "CAPA" => CAPA_USER_ONLY.into(),
            _ => "-ERR [AUTH] Plaintext authentication disallowed.\r\n".into(),
        })
        .await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(
            result,
            Outcome::AuthFailed("Plaintext authentication disallowed.".into())
        );
        assert_eq!(seen, ["CAPA", "USER alice"]);
    }

    #[tokio::test]
    async fn line_ends_in_credentials_are_never_sent() {
        for creds in [
            Credentials::plain("alice", "pw\r\nDELE 1"),
            Credentials::plain("alice\nDELE 1", "pw"),
            Credentials::plain("alice", "pw\0x"),
        ] {
            let backend = dovecot_like(CAPA_USER_ONLY, "+OK Logged in.\r\n").await;
            let (result, seen) = run(backend, &creds, Forward::Auto).await;
            assert_eq!(result, Outcome::Unsendable);
            assert_eq!(seen, ["CAPA"]);
        }
        // Master-user logins cannot go through USER/PASS either.
        let creds = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: Secret::new("pw"),
        };
        let backend = dovecot_like(CAPA_USER_ONLY, "+OK Logged in.\r\n").await;
        let (result, seen) = run(backend, &creds, Forward::Auto).await;
        assert_eq!((result, seen.len()), (Outcome::Unsendable, 1));
    }

    #[tokio::test]
    async fn nul_cannot_go_through_plain() {
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let creds = Credentials::plain("alice", "pw\0x");
        let (result, seen) = run(backend, &creds, Forward::Auto).await;
        assert_eq!(
            (result, seen),
            (Outcome::Unsendable, vec!["CAPA".to_owned()])
        );
        // CR LF are harmless inside base64.
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let creds = Credentials::plain("alice", "pw\r\nDELE 1");
        let (result, seen) = run(backend, &creds, Forward::Auto).await;
        assert_eq!(result, logged_in("Logged in."));
        assert_eq!(seen.len(), 2);
    }

    #[tokio::test]
    async fn wrong_password_is_auth_failed() {
        let backend = dovecot_like(CAPA_PLAIN, "-ERR [AUTH] Authentication failed.\r\n").await;
        let (result, _) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, Outcome::AuthFailed("Authentication failed.".into()));

        let backend = dovecot_like(CAPA_USER_ONLY, "-ERR No such user\r\n").await;
        let (result, _) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, Outcome::AuthFailed("No such user".into()));
    }

    #[tokio::test]
    async fn temporary_failures() {
        for (reply, message) in [
            (
                "-ERR [SYS/TEMP] Temporary authentication failure.\r\n",
                "Temporary authentication failure.",
            ),
            ("-ERR [IN-USE] Mailbox is locked.\r\n", "Mailbox is locked."),
            ("-ERR [sys/perm] Broken.\r\n", "Broken."),
        ] {
            let backend = dovecot_like(CAPA_PLAIN, reply).await;
            let (result, _) = run(backend, &alice(), Forward::Auto).await;
            assert_eq!(result, Outcome::TempFailed(message.into()));
        }
    }

    #[tokio::test]
    async fn bad_greetings() {
        let backend = fake_backend("-ERR [SYS/TEMP] Server shutting down.\r\n", |_| {
            String::new()
        })
        .await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(
            result,
            Outcome::TempFailed("[SYS/TEMP] Server shutting down.".into())
        );
        assert!(seen.is_empty());

        let backend = fake_backend("* OK IMAP4rev1 ready\r\n", |_| String::new()).await;
        assert_eq!(
            run(backend, &alice(), Forward::Auto).await.0,
            Outcome::Protocol
        );

        let backend = fake_backend("+OKAY\r\n", |_| String::new()).await;
        assert_eq!(
            run(backend, &alice(), Forward::Auto).await.0,
            Outcome::Protocol
        );

        let long: &'static str = format!("+OK {}\r\n", "x".repeat(MAX_LINE)).leak();
        let backend = fake_backend(long, |_| String::new()).await;
        assert_eq!(
            run(backend, &alice(), Forward::Auto).await.0,
            Outcome::Protocol
        );
    }

    #[tokio::test]
    async fn closed_before_or_during_login() {
        // Accepts and closes at once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { drop(listener.accept().await) });
        let sock = TcpStream::connect(addr).await.unwrap();
        let id = identity();
        let creds = alice();
        let result = login(
            BackendStream::Plain(sock),
            &request(&creds, &id, Forward::Auto),
        )
        .await;
        assert_eq!(outcome(result), Outcome::Closed);

        // Closes instead of answering the login.
        let backend = fake_backend("+OK ready\r\n", |line| match line {
            "CAPA" => CAPA_PLAIN.into(),
            _ => CLOSE.into(),
        })
        .await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!((result, seen.len()), (Outcome::Closed, 2));
    }

    #[tokio::test]
    async fn leftover_after_the_success_line_is_kept() {
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n+OK 2 messages\r\n").await;
        let (result, _) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(
            result,
            Outcome::LoggedIn {
                text: "Logged in.".into(),
                leftover: b"+OK 2 messages\r\n".to_vec(),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_backend_times_out() {
        let backend = fake_backend("", |_| String::new()).await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!((result, seen.len()), (Outcome::Timeout, 0));

        // Greets, then never answers CAPA.
        let backend = fake_backend("+OK ready\r\n", |_| String::new()).await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!((result, seen), (Outcome::Timeout, vec!["CAPA".to_owned()]));
    }

    fn starttls() -> StartTls {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
            .with_no_client_auth();
        StartTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: "backend.example".try_into().unwrap(),
        }
    }

    #[tokio::test]
    async fn starttls_required_but_not_offered() {
        let (sock, task) = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let (creds, id) = (alice(), identity());
        let mut req = request(&creds, &id, Forward::Auto);
        req.starttls = Some(starttls());
        let result = login(BackendStream::Plain(sock), &req).await;
        assert_eq!(outcome(result), Outcome::Protocol);
        assert_eq!(task.await.unwrap(), ["CAPA"]);
    }

    #[tokio::test]
    async fn bytes_after_the_stls_reply_are_refused() {
        let backend = fake_backend("+OK ready\r\n", |line| match line {
            "CAPA" => "+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n".into(),
            "STLS" => "+OK Begin TLS negotiation now.\r\n+OK injected\r\n".into(),
            _ => "-ERR\r\n".into(),
        })
        .await;
        let (sock, task) = backend;
        let (creds, id) = (alice(), identity());
        let mut req = request(&creds, &id, Forward::Auto);
        req.starttls = Some(starttls());
        let result = login(BackendStream::Plain(sock), &req).await;
        assert_eq!(outcome(result), Outcome::Protocol);
        assert_eq!(task.await.unwrap(), ["CAPA", "STLS"]);
    }
}
