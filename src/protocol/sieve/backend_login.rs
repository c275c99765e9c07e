//! Logging in to a ManageSieve backend on the client's behalf, the way Dovecot's
//! managesieve proxy does: read the capability greeting, optional `STARTTLS` (after which the
//! backend sends its capabilities again), `XCLIENT` with the client's address when the
//! backend offers it, then `AUTHENTICATE "PLAIN"` with an initial response.
//!
//! Dovecot 2.3's managesieve-login announces `"XCLIENT"` in its capabilities and accepts
//! `XCLIENT ADDR=... PORT=... SESSION=... TTL=...` from `login_trusted_networks` (answering
//! `OK "Updated"`); its log then shows the client's address as `rip`.
//!
//! Credentials are never logged; base64 carries any byte, but PLAIN separates its fields with
//! NUL, so a NUL inside one fails with [`BackendError::Unsendable`] before anything is sent.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::command::{tokens, Framer, Token};
use crate::net::stream::BackendStream;
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward,
};
use crate::protocol::decision::Credentials;
use crate::protocol::sasl;

/// Longest response line accepted from a backend, CRLF included. Dovecot's are far shorter;
/// the cap only stops a broken backend from filling our memory.
const MAX_LINE: usize = 8192;

/// Largest literal accepted in a backend's response (a message or a capability value).
const MAX_LITERAL: usize = 65536;

/// Most capability lines accepted before the `OK`, for the same reason.
const MAX_CAPABILITY_LINES: usize = 256;

/// The `TTL` sent in `XCLIENT`. A Dovecot proxy starts at 5 (`LOGIN_PROXY_TTL`) and sends one
/// less at each hop, so a backend that proxies again stops loops; we are the first hop.
const XCLIENT_TTL: u32 = 4;

/// Logs in to a ManageSieve backend. `stream` is connected, with implicit TLS and any PROXY
/// header already done. Each reply must come within `req.reply_timeout`.
pub async fn login(
    stream: BackendStream,
    req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        framer: Framer::new(MAX_LINE, MAX_LITERAL),
        reply_timeout: req.reply_timeout,
    };

    let mut caps = match conn.capabilities().await? {
        Ok(caps) => caps,
        Err(status) => return Ok(temp_failed(status)),
    };

    if let Some(starttls) = &req.starttls {
        if !caps.starttls {
            return Err(BackendError::Protocol(
                "backend does not offer STARTTLS, but starttls is configured for it".into(),
            ));
        }
        let status = conn.command(b"STARTTLS\r\n").await?;
        if status.kind != StatusKind::Ok {
            return Err(BackendError::Protocol(format!(
                "backend refused STARTTLS: {}",
                status.message
            )));
        }
        if !conn.buf.is_empty() {
            // Anything sent after the STARTTLS reply was not protected by TLS.
            return Err(BackendError::Protocol(
                "backend sent data between its STARTTLS reply and the TLS handshake".into(),
            ));
        }
        conn.stream = conn
            .stream
            .start_tls(&starttls.connector, starttls.server_name.clone())
            .await?;
        // RFC 5804 §2.2: the server sends its capabilities again, unasked.
        caps = match conn.capabilities().await? {
            Ok(caps) => caps,
            Err(status) => return Ok(temp_failed(status)),
        };
    }

    if req.forward == Forward::Auto && caps.xclient {
        let line = xclient_line(req.identity.client, &req.identity.session_id);
        let status = conn.command(line.as_bytes()).await?;
        if status.kind != StatusKind::Ok {
            return Err(BackendError::Protocol(format!(
                "backend refused XCLIENT (is the director in the backend's \
                 login_trusted_networks?): {}",
                status.message
            )));
        }
    }

    if !caps.sasl_plain {
        return Err(BackendError::Protocol(
            "backend does not offer SASL PLAIN (\"SASL\" capability), the only mechanism the \
             director logs in with"
                .into(),
        ));
    }
    req.may_send_credentials()?;
    let status = conn.authenticate_plain(req.credentials).await?;
    Ok(match status.kind {
        StatusKind::Ok => BackendLoginResult::LoggedIn {
            stream: conn.stream,
            success_text: status.rest,
            leftover: conn.buf,
        },
        StatusKind::Bye => temp_failed(status),
        StatusKind::No if status.is_temporary() => temp_failed(status),
        StatusKind::No => BackendLoginResult::AuthFailed {
            message: status.message,
        },
    })
}

fn temp_failed(status: Status) -> BackendLoginResult {
    BackendLoginResult::TempFailed {
        message: status.message,
    }
}

/// The `XCLIENT` command that tells the backend who the client really is. The session id is
/// ours; it is left out should it ever hold a character that does not belong in one.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusKind {
    Ok,
    No,
    Bye,
}

/// A backend's status response: `OK`, `NO` or `BYE`, an optional `(CODE ...)` and an optional
/// human-readable string.
#[derive(Debug)]
struct Status {
    kind: StatusKind,
    /// The response code's name, upper-cased (`TRYLATER`), if any.
    code: Option<String>,
    /// The human-readable string, unquoted; empty if none.
    message: String,
    /// Everything after the status word and its space, as sent, without the final CRLF:
    /// what a client must see after its own `OK`.
    rest: String,
}

impl Status {
    /// Whether a `NO` is not about the credentials: `TRYLATER` (RFC 5804 §1.3: temporary
    /// failure, e.g. Dovecot's internal errors) or `REFERRAL` (the user lives elsewhere, which
    /// the director cannot pass on). Anything else, `AUTH-TOO-WEAK`, `ENCRYPT-NEEDED`,
    /// `TRANSITION-NEEDED` or no code, is a refused login.
    fn is_temporary(&self) -> bool {
        matches!(self.code.as_deref(), Some("TRYLATER" | "REFERRAL"))
    }

    /// Parses a framed response whose first token is an atom; `None` if it is not a status.
    fn parse(unit: &[u8], tokens: &[Token]) -> Option<Result<Status, BackendError>> {
        let Some(Token::Atom(word)) = tokens.first() else {
            return None;
        };
        let kind = match word.to_ascii_uppercase().as_str() {
            "OK" => StatusKind::Ok,
            "NO" => StatusKind::No,
            "BYE" => StatusKind::Bye,
            _ => return None,
        };
        let bad = || {
            BackendError::Protocol(format!(
                "malformed {word} response: {:?}",
                String::from_utf8_lossy(&unit[..unit.len().min(100)])
            ))
        };
        let mut rest = &tokens[1..];
        let mut code = None;
        if let [Token::Open, inner @ ..] = rest {
            let Some(close) = inner.iter().position(|t| *t == Token::Close) else {
                return Some(Err(bad()));
            };
            let Some(Token::Atom(name)) = inner.first() else {
                return Some(Err(bad()));
            };
            code = Some(name.to_ascii_uppercase());
            rest = &inner[close + 1..];
        }
        let message = match rest {
            [] => String::new(),
            [Token::String(text)] => String::from_utf8_lossy(text).into_owned(),
            _ => return Some(Err(bad())),
        };
        let start = unit.iter().position(|b| *b != b' ').unwrap_or(0) + word.len();
        let after_word = unit[start..].strip_prefix(b" ").unwrap_or_default();
        let after_word = after_word.strip_suffix(b"\n").unwrap_or(after_word);
        let after_word = after_word.strip_suffix(b"\r").unwrap_or(after_word);
        Some(Ok(Status {
            kind,
            code,
            message,
            rest: String::from_utf8_lossy(after_word).into_owned(),
        }))
    }
}

/// What the backend's capabilities say, as far as logging in is concerned.
#[derive(Debug, Default, PartialEq, Eq)]
struct Capabilities {
    /// `"STARTTLS"`.
    starttls: bool,
    /// `"SASL" "... PLAIN ..."`: the one mechanism we log in with.
    sasl_plain: bool,
    /// `"XCLIENT"`: the backend takes the client's address from us (it trusts the director).
    xclient: bool,
}

impl Capabilities {
    fn add(&mut self, name: &[u8], value: Option<&[u8]>) {
        if name.eq_ignore_ascii_case(b"STARTTLS") {
            self.starttls = true;
        } else if name.eq_ignore_ascii_case(b"XCLIENT") {
            self.xclient = true;
        } else if name.eq_ignore_ascii_case(b"SASL") {
            let value = String::from_utf8_lossy(value.unwrap_or_default());
            self.sasl_plain |= value
                .split_ascii_whitespace()
                .any(|m| m.eq_ignore_ascii_case("PLAIN"));
        }
    }
}

/// The backend connection during login: the stream and the bytes read but not yet used.
struct Conn {
    stream: BackendStream,
    buf: Vec<u8>,
    framer: Framer,
    reply_timeout: Duration,
}

impl Conn {
    /// Reads one response unit (a line and any literals it announces) and its tokens.
    async fn read_unit(&mut self) -> Result<(Vec<u8>, Vec<Token>), BackendError> {
        loop {
            match self.framer.frame(&self.buf) {
                Ok(Some(end)) => {
                    let unit: Vec<u8> = self.buf.drain(..end).collect();
                    let tokens = tokens(&unit).map_err(|message| {
                        BackendError::Protocol(format!(
                            "{message} in {:?}",
                            String::from_utf8_lossy(&unit[..unit.len().min(100)])
                        ))
                    })?;
                    return Ok((unit, tokens));
                }
                Ok(None) => {
                    let mut chunk = [0u8; 1024];
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(BackendError::Closed);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(error) => {
                    return Err(BackendError::Protocol(format!(
                        "response over the limits ({MAX_LINE} bytes a line, {MAX_LITERAL} of \
                         literals): {}",
                        error.message
                    )))
                }
            }
        }
    }

    /// Reads one status response.
    async fn status(&mut self) -> Result<Status, BackendError> {
        let (unit, tokens) = self.read_unit().await?;
        Status::parse(&unit, &tokens).unwrap_or_else(|| {
            Err(BackendError::Protocol(format!(
                "expected OK, NO or BYE, got {:?}",
                String::from_utf8_lossy(&unit[..unit.len().min(100)])
            )))
        })
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

    /// Reads capability lines up to the status that ends them (the greeting, or what follows
    /// STARTTLS). `Err(status)`: the backend ended them with `NO` or `BYE`.
    async fn capabilities(&mut self) -> Result<Result<Capabilities, Status>, BackendError> {
        self.timed(async |c| {
            let mut caps = Capabilities::default();
            for _ in 0..MAX_CAPABILITY_LINES {
                let (unit, tokens) = c.read_unit().await?;
                if let Some(status) = Status::parse(&unit, &tokens) {
                    let status = status?;
                    return Ok(match status.kind {
                        StatusKind::Ok => Ok(caps),
                        _ => Err(status),
                    });
                }
                match tokens.as_slice() {
                    [Token::String(name)] => caps.add(name, None),
                    [Token::String(name), Token::String(value)] => caps.add(name, Some(value)),
                    _ => {
                        return Err(BackendError::Protocol(format!(
                            "expected a capability line, got {:?}",
                            String::from_utf8_lossy(&unit[..unit.len().min(100)])
                        )))
                    }
                }
            }
            Err(BackendError::Protocol(format!(
                "more than {MAX_CAPABILITY_LINES} capability lines"
            )))
        })
        .await
    }

    /// Sends one command line (CRLF included) and reads its status. The line may hold
    /// credentials: it is never logged, and errors never quote it.
    async fn command(&mut self, line: &[u8]) -> Result<Status, BackendError> {
        self.timed(async |c| {
            c.stream.write_all(line).await?;
            c.stream.flush().await?;
            c.status().await
        })
        .await
    }

    /// `AUTHENTICATE "PLAIN" "<initial response>"` (RFC 5804 §2.1).
    async fn authenticate_plain(
        &mut self,
        credentials: &Credentials,
    ) -> Result<Status, BackendError> {
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
        let line = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            sasl::encode_plain(credentials)
        );
        self.command(line.as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::protocol::decision::ClientIdentity;

    /// The capability greeting of Dovecot 2.3's managesieve-login for a trusted network,
    /// as a real one sent it (SIEVE list shortened).
    const GREETING: &str = "\"IMPLEMENTATION\" \"Dovecot (Debian) Pigeonhole\"\r\n\
        \"SIEVE\" \"fileinto reject envelope\"\r\n\"NOTIFY\" \"mailto\"\r\n\
        \"SASL\" \"PLAIN LOGIN\"\r\n\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\n\"XCLIENT\"\r\n\
        OK \"backend1 ready.\"\r\n";
    /// The same without XCLIENT (the director is not in `login_trusted_networks`).
    const GREETING_NO_XCLIENT: &str = "\"IMPLEMENTATION\" \"Dovecot\"\r\n\
        \"SASL\" \"PLAIN\"\r\n\"VERSION\" \"1.0\"\r\nOK \"Ready.\"\r\n";

    /// What a fake backend's script answers to close the connection instead.
    const CLOSE: &str = "<close>";

    /// A scripted backend: sends `greeting`, then answers each line it reads with
    /// `respond(line)`: nothing if empty, and it closes the connection on [`CLOSE`]. The
    /// handle yields every line it read once the director closes the connection.
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

    /// A backend that greets with `greeting`, accepts XCLIENT and answers AUTHENTICATE with
    /// `auth_reply`.
    async fn dovecot_like(
        greeting: &'static str,
        auth_reply: &'static str,
    ) -> (TcpStream, JoinHandle<Vec<String>>) {
        fake_backend(greeting, move |line| {
            match line.split(' ').next().unwrap_or_default() {
                "XCLIENT" => "OK \"Updated\"\r\n".to_owned(),
                "AUTHENTICATE" => auth_reply.to_owned(),
                _ => "NO \"Unexpected.\"\r\n".to_owned(),
            }
        })
        .await
    }

    fn identity() -> ClientIdentity {
        ClientIdentity {
            client: "192.0.2.7:50123".parse().unwrap(),
            local: "127.0.0.1:4190".parse().unwrap(),
            session_id: "sess1".into(),
            session_ext_id: None,
        }
    }

    async fn run_login(
        tcp: TcpStream,
        credentials: &Credentials,
        forward: Forward,
    ) -> Result<BackendLoginResult, BackendError> {
        let identity = identity();
        let req = BackendLoginRequest {
            credentials,
            identity: &identity,
            forward,
            starttls: None,
            reply_timeout: Duration::from_secs(5),
            commit: &crate::protocol::backend_login::always_commit,
        };
        login(BackendStream::Plain(tcp), &req).await
    }

    fn alice() -> Credentials {
        Credentials::plain("alice", "secret")
    }

    const AUTH_ALICE: &str = "AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHNlY3JldA==\"";

    #[tokio::test]
    async fn forwards_the_client_and_logs_in() {
        let (tcp, backend) =
            dovecot_like(GREETING, "OK \"Logged in.\"\r\nOK \"pipelined\"\r\n").await;
        let result = run_login(tcp, &alice(), Forward::Auto).await.unwrap();
        let BackendLoginResult::LoggedIn {
            stream,
            success_text,
            leftover,
        } = result
        else {
            panic!("not logged in");
        };
        assert_eq!(success_text, "\"Logged in.\"");
        // Whatever followed the OK in the same read is kept for the client (it may or may
        // not have arrived in that read).
        assert!(b"OK \"pipelined\"\r\n".starts_with(&leftover));
        drop(stream);
        assert_eq!(
            backend.await.unwrap(),
            vec![
                "XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=sess1 TTL=4".to_owned(),
                AUTH_ALICE.to_owned(),
            ]
        );
    }

    #[tokio::test]
    async fn no_xclient_unless_offered_and_wanted() {
        let (tcp, backend) = dovecot_like(GREETING_NO_XCLIENT, "OK\r\n").await;
        let result = run_login(tcp, &alice(), Forward::Auto).await.unwrap();
        let BackendLoginResult::LoggedIn {
            ref success_text, ..
        } = result
        else {
            panic!("not logged in");
        };
        assert_eq!(success_text, "");
        drop(result);
        assert_eq!(backend.await.unwrap(), vec![AUTH_ALICE.to_owned()]);

        let (tcp, backend) = dovecot_like(GREETING, "OK (SASL \"\") \"Logged in.\"\r\n").await;
        let result = run_login(tcp, &alice(), Forward::ProxyV2).await.unwrap();
        let BackendLoginResult::LoggedIn {
            ref success_text, ..
        } = result
        else {
            panic!("not logged in");
        };
        assert_eq!(success_text, "(SASL \"\") \"Logged in.\"");
        drop(result);
        assert_eq!(backend.await.unwrap(), vec![AUTH_ALICE.to_owned()]);
    }

    #[tokio::test]
    async fn master_user_logins_send_the_authorization_identity() {
        let (tcp, backend) = dovecot_like(GREETING_NO_XCLIENT, "OK \"Logged in.\"\r\n").await;
        let credentials = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: crate::protocol::decision::Secret::new("pw"),
        };
        let result = run_login(tcp, &credentials, Forward::None).await.unwrap();
        assert!(matches!(result, BackendLoginResult::LoggedIn { .. }));
        drop(result);
        let expected = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"",
            sasl::encode_base64(b"bob\0master\0pw")
        );
        assert_eq!(backend.await.unwrap(), vec![expected]);
    }

    #[tokio::test]
    async fn refusals_and_temporary_failures() {
        let cases: [(&'static str, &str, bool); 6] = [
            (
                "NO \"Authentication failed.\"\r\n",
                "Authentication failed.",
                false,
            ),
            (
                "NO \"a \\\"quoted\\\" word\"\r\n",
                "a \"quoted\" word",
                false,
            ),
            ("NO {7}\r\nmulti\r\n\r\n", "multi\r\n", false),
            ("NO (AUTH-TOO-WEAK) \"Weak.\"\r\n", "Weak.", false),
            (
                "no (TRYLATER) \"Internal error.\"\r\n",
                "Internal error.",
                true,
            ),
            ("BYE \"Shutting down.\"\r\n", "Shutting down.", true),
        ];
        for (reply, want, temporary) in cases {
            let (tcp, _backend) = dovecot_like(GREETING, reply).await;
            match run_login(tcp, &alice(), Forward::Auto).await.unwrap() {
                BackendLoginResult::AuthFailed { message } if !temporary => {
                    assert_eq!(message, want, "{reply:?}")
                }
                BackendLoginResult::TempFailed { message } if temporary => {
                    assert_eq!(message, want, "{reply:?}")
                }
                _ => panic!("wrong outcome for {reply:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_greeting_that_is_not_ok_is_a_temporary_failure() {
        let (tcp, backend) = fake_backend(
            "\"SASL\" \"PLAIN\"\r\nBYE \"Too many connections.\"\r\n",
            |_| String::new(),
        )
        .await;
        let result = run_login(tcp, &alice(), Forward::Auto).await.unwrap();
        let BackendLoginResult::TempFailed { message } = result else {
            panic!("not a temporary failure");
        };
        assert_eq!(message, "Too many connections.");
        assert!(backend.await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn broken_backends() {
        let refused_xclient = fake_backend(GREETING, |_| "NO \"Not trusted.\"\r\n".into()).await;
        let no_plain = fake_backend("\"SASL\" \"LOGIN\"\r\nOK\r\n", |_| String::new()).await;
        let garbage = fake_backend("* OK IMAP4rev1 ready\r\n", |_| String::new()).await;
        let bad_status = fake_backend("OK (TRYLATER \"x\"\r\n", |_| String::new()).await;
        let closes = fake_backend(GREETING, |_| CLOSE.into()).await;
        for ((tcp, _), want) in [
            (refused_xclient, "XCLIENT"),
            (no_plain, "SASL PLAIN"),
            (garbage, "capability line"),
            (bad_status, "malformed OK"),
            (closes, "closed"),
        ] {
            let error = run_login(tcp, &alice(), Forward::Auto)
                .await
                .err()
                .expect("an error");
            assert!(error.to_string().contains(want), "{error} lacks {want:?}");
        }
    }

    #[tokio::test]
    async fn nul_in_credentials_is_unsendable() {
        let (tcp, backend) = dovecot_like(GREETING_NO_XCLIENT, "OK\r\n").await;
        let result = run_login(tcp, &Credentials::plain("alice", "a\0b"), Forward::Auto).await;
        assert!(matches!(result, Err(BackendError::Unsendable(_))));
        assert!(backend.await.unwrap().is_empty(), "something was sent");
    }

    #[tokio::test]
    async fn starttls_required_but_not_offered() {
        let (tcp, backend) = dovecot_like(GREETING_NO_XCLIENT, "OK\r\n").await;
        let identity = identity();
        let credentials = alice();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
            .with_no_client_auth(),
        ));
        let req = BackendLoginRequest {
            credentials: &credentials,
            identity: &identity,
            forward: Forward::Auto,
            starttls: Some(crate::protocol::backend_login::StartTls {
                connector,
                server_name: "backend".try_into().unwrap(),
            }),
            reply_timeout: Duration::from_secs(5),
            commit: &crate::protocol::backend_login::always_commit,
        };
        let error = login(BackendStream::Plain(tcp), &req).await.err().unwrap();
        assert!(error.to_string().contains("STARTTLS"), "{error}");
        assert!(backend.await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_backend_times_out() {
        let (tcp, _backend) = fake_backend("\"SASL\" \"PLAIN\"\r\n", |_| String::new()).await;
        let error = run_login(tcp, &alice(), Forward::Auto).await.err().unwrap();
        assert!(matches!(error, BackendError::Timeout(_)), "{error}");
    }
}
