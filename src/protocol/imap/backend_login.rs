//! Logging in to an IMAP backend on behalf of a client, as Dovecot's imap proxy does: read the
//! greeting and capabilities, STARTTLS if configured, tell the backend who the client is with
//! `ID` (when it is offered and forwarding is `Auto`), then `AUTHENTICATE PLAIN` (or `LOGIN`).
//!
//! Credentials are sent so that no byte of them can become a command of its own: base64 for
//! PLAIN; for LOGIN, quoted strings only when they hold nothing to escape, literals otherwise.
//! Tags: `C` capability, `S` STARTTLS, `I` ID, `L` login.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::stream::BackendStream;
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward,
};
use crate::protocol::decision::{ClientIdentity, Credentials};
use crate::protocol::sasl;

/// Longest line accepted from a backend (a CAPABILITY line of a big server fits many times).
const MAX_LINE: usize = 64 * 1024;

/// Bytes read from the backend at most at once.
const READ_CHUNK: usize = 4096;

/// `NO` response codes that mean "try again later", not "wrong credentials".
const TEMPORARY_CODES: &[&str] = &["UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"];

/// Logs in to the IMAP backend on `stream` (connected; implicit TLS and any PROXY header
/// already done) with the request's credentials. Each reply must come within
/// `req.reply_timeout`.
pub async fn login(
    stream: BackendStream,
    req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    let mut conn = Connection {
        stream,
        buf: Vec::new(),
        timeout: req.reply_timeout,
    };

    let greeting = conn.read_line().await?;
    let mut capabilities = match parse_untagged(&greeting) {
        Some(("OK", text)) => response_code(text)
            .filter(|(code, _)| code.eq_ignore_ascii_case("CAPABILITY"))
            .map(|(_, args)| Capabilities::parse(args)),
        Some(("BYE", text)) => {
            return Ok(BackendLoginResult::TempFailed {
                message: without_code(text).to_owned(),
            })
        }
        _ => return Err(unexpected("greeting", &greeting)),
    };
    if capabilities.is_none() {
        capabilities = Some(conn.capability().await?);
    }
    let mut capabilities = capabilities.unwrap_or_default();

    if let Some(starttls) = &req.starttls {
        if !capabilities.has("STARTTLS") {
            return Err(BackendError::Protocol(
                "the backend does not offer STARTTLS, which is configured for it".into(),
            ));
        }
        conn.write(b"S STARTTLS\r\n").await?;
        let reply = conn.tagged("S").await?;
        if reply.status != Status::Ok {
            return Err(unexpected("STARTTLS reply", &reply.line));
        }
        if !conn.buf.is_empty() {
            // Bytes sent before the handshake would be taken as protected by TLS.
            return Err(BackendError::Protocol(
                "the backend sent data after its STARTTLS reply".into(),
            ));
        }
        conn = conn.start_tls(starttls).await?;
        capabilities = conn.capability().await?;
    }

    let mut parts = login_command(&capabilities, req.credentials)?.into_iter();
    let mut first = Vec::new();
    if req.forward == Forward::Auto && capabilities.has("ID") {
        // Pipelined with the login: its replies are skipped while waiting for the login's.
        first.extend_from_slice(id_command(req.identity).as_bytes());
    }
    first.extend(parts.next().unwrap_or_default());
    req.may_send_credentials()?;
    conn.write(&first).await?;
    for part in parts {
        if let Some(reply) = conn.continuation().await? {
            // The backend answered before taking the rest (e.g. BAD for the literal).
            return Ok(conn.outcome(reply));
        }
        conn.write(&part).await?;
    }
    let reply = conn.tagged("L").await?;
    Ok(conn.outcome(reply))
}

/// What the backend offers, from its greeting or `CAPABILITY`, upper-cased.
#[derive(Debug, Default)]
struct Capabilities(Vec<String>);

impl Capabilities {
    fn parse(list: &str) -> Self {
        Capabilities(
            list.split_ascii_whitespace()
                .map(str::to_ascii_uppercase)
                .collect(),
        )
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|c| c == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    No,
    Bad,
}

/// A tagged reply.
struct Tagged {
    status: Status,
    /// What followed the status and one space.
    text: String,
    /// The whole line, for error messages.
    line: String,
}

/// The backend connection during login, with bytes read but not yet used.
struct Connection {
    stream: BackendStream,
    buf: Vec<u8>,
    /// Time allowed for each reply (and each write).
    timeout: Duration,
}

impl Connection {
    async fn write(&mut self, data: &[u8]) -> Result<(), BackendError> {
        let write = async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(BackendError::Timeout(self.timeout)),
        }
    }

    /// The next line, without its CRLF, as text (invalid UTF-8 replaced).
    async fn read_line(&mut self) -> Result<String, BackendError> {
        loop {
            if let Some(lf) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=lf).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                return Ok(String::from_utf8_lossy(line).into_owned());
            }
            if self.buf.len() > MAX_LINE {
                return Err(BackendError::Protocol(format!(
                    "a reply line longer than {MAX_LINE} bytes"
                )));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let n = match tokio::time::timeout(self.timeout, self.stream.read(&mut chunk)).await {
                Ok(result) => result?,
                Err(_) => return Err(BackendError::Timeout(self.timeout)),
            };
            if n == 0 {
                return Err(BackendError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads up to the tagged reply with `tag`, passing over untagged lines and the replies of the
    /// pipelined ID.
    async fn tagged(&mut self, tag: &str) -> Result<Tagged, BackendError> {
        loop {
            let line = self.read_line().await?;
            if line.starts_with("* ") || is_tagged(&line, "I") {
                continue;
            }
            if is_tagged(&line, tag) {
                return parse_tagged(line);
            }
            return Err(unexpected("reply", &line));
        }
    }

    /// Waits for a `+` continuation. `Some`: the login's tagged reply came instead.
    async fn continuation(&mut self) -> Result<Option<Tagged>, BackendError> {
        loop {
            let line = self.read_line().await?;
            if line == "+" || line.starts_with("+ ") {
                return Ok(None);
            }
            if line.starts_with("* ") || is_tagged(&line, "I") {
                continue;
            }
            if is_tagged(&line, "L") {
                return parse_tagged(line).map(Some);
            }
            return Err(unexpected("reply", &line));
        }
    }

    /// Sends `C CAPABILITY` and collects the untagged CAPABILITY lines.
    async fn capability(&mut self) -> Result<Capabilities, BackendError> {
        self.write(b"C CAPABILITY\r\n").await?;
        let mut capabilities = Capabilities::default();
        loop {
            let line = self.read_line().await?;
            if let Some(("CAPABILITY", list)) = parse_untagged(&line) {
                capabilities.0.extend(Capabilities::parse(list).0);
            } else if line.starts_with("* ") {
                continue;
            } else if is_tagged(&line, "C") {
                let reply = parse_tagged(line)?;
                if reply.status != Status::Ok {
                    return Err(unexpected("CAPABILITY reply", &reply.line));
                }
                return Ok(capabilities);
            } else {
                return Err(unexpected("CAPABILITY reply", &line));
            }
        }
    }

    async fn start_tls(
        self,
        starttls: &crate::protocol::backend_login::StartTls,
    ) -> Result<Self, BackendError> {
        let Connection {
            stream,
            buf,
            timeout,
        } = self;
        let handshake = stream.start_tls(&starttls.connector, starttls.server_name.clone());
        let stream = match tokio::time::timeout(timeout, handshake).await {
            Ok(result) => result?,
            Err(_) => return Err(BackendError::Timeout(timeout)),
        };
        Ok(Connection {
            stream,
            buf,
            timeout,
        })
    }

    /// The result of the login's tagged reply.
    fn outcome(self, reply: Tagged) -> BackendLoginResult {
        match reply.status {
            Status::Ok => BackendLoginResult::LoggedIn {
                stream: self.stream,
                success_text: reply.text,
                leftover: self.buf,
            },
            Status::No => {
                let message = without_code(&reply.text).to_owned();
                let temporary = response_code(&reply.text).is_some_and(|(code, _)| {
                    TEMPORARY_CODES.iter().any(|t| t.eq_ignore_ascii_case(code))
                });
                if temporary {
                    BackendLoginResult::TempFailed { message }
                } else {
                    BackendLoginResult::AuthFailed { message }
                }
            }
            // The form of the credentials was refused: the client's doing, as a failed login.
            Status::Bad => BackendLoginResult::AuthFailed {
                message: without_code(&reply.text).to_owned(),
            },
        }
    }
}

/// The login command, cut where the backend must answer `+` before the next part is sent.
fn login_command(
    capabilities: &Capabilities,
    credentials: &Credentials,
) -> Result<Vec<Vec<u8>>, BackendError> {
    let has_nul = [
        credentials.username.as_str(),
        credentials.auth_username.as_str(),
        credentials.password.expose(),
    ]
    .iter()
    .any(|s| s.contains('\0'));
    if has_nul {
        return Err(BackendError::Unsendable(
            "a NUL byte cannot be sent in an IMAP login".into(),
        ));
    }
    if capabilities.has("AUTH=PLAIN") {
        let response = sasl::encode_plain(credentials);
        return Ok(if capabilities.has("SASL-IR") {
            vec![format!("L AUTHENTICATE PLAIN {response}\r\n").into_bytes()]
        } else {
            vec![
                b"L AUTHENTICATE PLAIN\r\n".to_vec(),
                format!("{response}\r\n").into_bytes(),
            ]
        });
    }
    if capabilities.has("LOGINDISABLED") {
        return Err(BackendError::Protocol(
            "the backend disables LOGIN and offers no AUTH=PLAIN: configure STARTTLS to it, or \
             add the director to its login_trusted_networks"
                .into(),
        ));
    }
    if credentials.username != credentials.auth_username {
        return Err(BackendError::Unsendable(
            "a master-user login needs AUTH=PLAIN on the backend".into(),
        ));
    }
    let literal_plus = capabilities.has("LITERAL+");
    let mut parts = Vec::new();
    let mut current = b"L LOGIN".to_vec();
    for value in [
        credentials.username.as_bytes(),
        credentials.password.expose().as_bytes(),
    ] {
        current.push(b' ');
        if value.iter().all(|b| is_quotable(*b)) {
            current.push(b'"');
            current.extend_from_slice(value);
            current.push(b'"');
        } else if literal_plus {
            current.extend_from_slice(format!("{{{}+}}\r\n", value.len()).as_bytes());
            current.extend_from_slice(value);
        } else {
            current.extend_from_slice(format!("{{{}}}\r\n", value.len()).as_bytes());
            parts.push(std::mem::replace(&mut current, value.to_vec()));
        }
    }
    current.extend_from_slice(b"\r\n");
    parts.push(current);
    Ok(parts)
}

/// Bytes that may stand in a quoted string without escaping (and without 8-bit doubts).
fn is_quotable(b: u8) -> bool {
    (0x01..0x80).contains(&b) && !matches!(b, b'\r' | b'\n' | b'"' | b'\\')
}

/// `ID` with the client's identity, as Dovecot's proxy sends it.
fn id_command(identity: &ClientIdentity) -> String {
    let ip = |ip: IpAddr| ip.to_canonical().to_string();
    let fields = [
        ("x-session-id", identity.session_id.clone()),
        ("x-originating-ip", ip(identity.client.ip())),
        ("x-originating-port", identity.client.port().to_string()),
        ("x-connected-ip", ip(identity.local.ip())),
        ("x-connected-port", identity.local.port().to_string()),
    ];
    let ext = identity
        .session_ext_id
        .as_ref()
        .map(|id| ("x-session-ext-id", id.clone()));
    let list: Vec<String> = fields
        .iter()
        .chain(ext.iter())
        .map(|(key, value)| format!("\"{key}\" {}", quote(value)))
        .collect();
    format!("I ID ({})\r\n", list.join(" "))
}

/// A quoted string; characters that cannot be quoted are left out.
fn quote(value: &str) -> String {
    let mut quoted = String::from("\"");
    for c in value
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
    {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

fn is_tagged(line: &str, tag: &str) -> bool {
    line.strip_prefix(tag)
        .is_some_and(|rest| rest.starts_with(' '))
}

/// `* WORD text` → (WORD upper-cased if it is a status or CAPABILITY, text).
fn parse_untagged(line: &str) -> Option<(&'static str, &str)> {
    let rest = line.strip_prefix("* ")?;
    let (word, text) = rest.split_once(' ').unwrap_or((rest, ""));
    let word = ["OK", "NO", "BAD", "BYE", "PREAUTH", "CAPABILITY"]
        .into_iter()
        .find(|w| w.eq_ignore_ascii_case(word))?;
    Some((word, text))
}

fn parse_tagged(line: String) -> Result<Tagged, BackendError> {
    let rest = line.split_once(' ').map_or("", |(_, rest)| rest);
    let (word, text) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match word.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        "BAD" => Status::Bad,
        _ => return Err(unexpected("tagged reply", &line)),
    };
    Ok(Tagged {
        status,
        text: text.to_owned(),
        line: line.clone(),
    })
}

/// `[CODE args] text` → (CODE, args).
fn response_code(text: &str) -> Option<(&str, &str)> {
    let inner = text.strip_prefix('[')?;
    let inner = &inner[..inner.find(']')?];
    Some(inner.split_once(' ').unwrap_or((inner, "")))
}

/// The human-readable part of a reply text: after its `[CODE]`, if any (the whole text if
/// nothing follows the code).
fn without_code(text: &str) -> &str {
    match text
        .strip_prefix('[')
        .and_then(|inner| inner.split_once(']'))
    {
        Some((_, rest)) if !rest.trim().is_empty() => rest.trim(),
        _ => text,
    }
}

/// A protocol error quoting (the start of) what the backend sent.
fn unexpected(what: &str, line: &str) -> BackendError {
    let mut excerpt: String = line.chars().take(200).collect();
    if excerpt.len() < line.len() {
        excerpt.push_str("...");
    }
    BackendError::Protocol(format!("unexpected {what}: {excerpt:?}"))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::*;

    /// One step of a scripted backend.
    enum Step {
        /// Write these bytes.
        Send(&'static str),
        /// Read one line and check it (given without CRLF).
        Expect(String),
        /// Read exactly these bytes.
        ExpectBytes(Vec<u8>),
        /// Close the sending side (the backend hangs up).
        Hangup,
    }
    use Step::*;

    fn expect(line: &str) -> Step {
        Expect(line.to_owned())
    }

    /// A backend that plays `script` on one connection, then returns whatever else it receives
    /// until the director closes the connection.
    async fn backend(script: Vec<Step>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut socket = BufReader::new(socket);
            for step in script {
                match step {
                    Send(data) => socket.get_mut().write_all(data.as_bytes()).await.unwrap(),
                    Expect(want) => {
                        let mut line = Vec::new();
                        socket.read_until(b'\n', &mut line).await.unwrap();
                        assert_eq!(String::from_utf8_lossy(&line), format!("{want}\r\n"));
                    }
                    ExpectBytes(want) => {
                        let mut got = vec![0; want.len()];
                        socket.read_exact(&mut got).await.unwrap();
                        assert_eq!(got, want);
                    }
                    Hangup => socket.get_mut().shutdown().await.unwrap(),
                }
            }
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
            rest
        });
        (addr, task)
    }

    fn identity() -> ClientIdentity {
        ClientIdentity {
            client: "192.0.2.7:50123".parse().unwrap(),
            local: "[::ffff:198.51.100.1]:143".parse().unwrap(),
            session_id: "sess\"1".into(),
            session_ext_id: None,
        }
    }

    /// A login result without the stream, for comparing.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        LoggedIn { text: String, leftover: Vec<u8> },
        AuthFailed(String),
        TempFailed(String),
    }

    /// Runs a login against `script`; returns the outcome and the bytes the backend received
    /// after its script, until the director closed the connection.
    async fn run(
        script: Vec<Step>,
        credentials: Credentials,
        forward: Forward,
    ) -> (Result<Outcome, BackendError>, Vec<u8>) {
        let (addr, task) = backend(script).await;
        let stream = BackendStream::Plain(TcpStream::connect(addr).await.unwrap());
        let identity = identity();
        let req = BackendLoginRequest {
            credentials: &credentials,
            identity: &identity,
            forward,
            starttls: None,
            reply_timeout: Duration::from_secs(5),
            commit: &crate::protocol::backend_login::always_commit,
        };
        // The stream is dropped here, which lets the backend's read_to_end end.
        let outcome = login(stream, &req).await.map(|result| match result {
            BackendLoginResult::LoggedIn {
                success_text,
                leftover,
                ..
            } => Outcome::LoggedIn {
                text: success_text,
                leftover,
            },
            BackendLoginResult::AuthFailed { message } => Outcome::AuthFailed(message),
            BackendLoginResult::TempFailed { message } => Outcome::TempFailed(message),
        });
        (outcome, task.await.unwrap())
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

    fn plain(credentials: &Credentials) -> String {
        sasl::encode_plain(credentials)
    }

    const DOVECOT_GREETING: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE \
                                    IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";

    #[tokio::test]
    async fn authenticate_plain_with_initial_response_and_leftover() {
        let script = vec![
            Send(DOVECOT_GREETING),
            expect(&format!("L AUTHENTICATE PLAIN {}", plain(&alice()))),
            Send("L OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\n"),
        ];
        let (outcome, rest) = run(script, alice(), Forward::None).await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::LoggedIn {
                text: "[CAPABILITY IMAP4rev1 IDLE] Logged in".into(),
                leftover: b"* 3 EXISTS\r\n".to_vec(),
            }
        );
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn authenticate_plain_without_sasl_ir_asks_for_capabilities() {
        let master = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: crate::protocol::decision::Secret::new("pw"),
        };
        let script = vec![
            Send("* OK ready\r\n"),
            expect("C CAPABILITY"),
            Send("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n* CAPABILITY ID\r\nC OK done\r\n"),
            expect("L AUTHENTICATE PLAIN"),
            Send("+ \r\n"),
            expect(&plain(&master)),
            Send("* CAPABILITY IMAP4rev1\r\nL OK Logged in\r\n"),
        ];
        let (outcome, rest) = run(script, master, Forward::None).await;
        assert_eq!(outcome.unwrap(), logged_in("Logged in"));
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn login_with_quoted_strings() {
        let script = vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            expect("L LOGIN \"alice\" \"sec ret\""),
            Send("L OK Logged in\r\n"),
        ];
        let (outcome, rest) = run(
            script,
            Credentials::plain("alice", "sec ret"),
            Forward::None,
        )
        .await;
        assert_eq!(outcome.unwrap(), logged_in("Logged in"));
        assert!(rest.is_empty());
    }

    const NASTY: &str = "p\"w\\\r\nX DELETE INBOX";

    #[tokio::test]
    async fn login_with_synchronising_literal_cannot_inject() {
        let script = vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            expect(&format!("L LOGIN \"alice\" {{{}}}", NASTY.len())),
            Send("+ OK\r\n"),
            ExpectBytes(format!("{NASTY}\r\n").into_bytes()),
            Send("L OK Logged in\r\n"),
        ];
        let (outcome, rest) = run(script, Credentials::plain("alice", NASTY), Forward::None).await;
        assert_eq!(outcome.unwrap(), logged_in("Logged in"));
        assert!(rest.is_empty(), "a second command was sent: {rest:?}");
    }

    #[tokio::test]
    async fn login_with_non_synchronising_literals() {
        let script = vec![
            Send("* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"),
            expect("L LOGIN {6+}"),
            ExpectBytes("\u{e9}lise ".into()),
            ExpectBytes(format!("{{{}+}}\r\n{NASTY}\r\n", NASTY.len()).into_bytes()),
            Send("L OK Logged in\r\n"),
        ];
        let (outcome, rest) = run(
            script,
            Credentials::plain("\u{e9}lise", NASTY),
            Forward::None,
        )
        .await;
        assert_eq!(outcome.unwrap(), logged_in("Logged in"));
        assert!(rest.is_empty(), "a second command was sent: {rest:?}");
    }

    #[tokio::test]
    async fn refused_literal_ends_the_login() {
        let script = vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            expect(&format!("L LOGIN \"alice\" {{{}}}", NASTY.len())),
            Send("L BAD Literal too large\r\n"),
        ];
        let (outcome, rest) = run(script, Credentials::plain("alice", NASTY), Forward::None).await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::AuthFailed("Literal too large".into())
        );
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn wrong_password_and_temporary_failures() {
        for (reply, want) in [
            (
                "L NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
                Outcome::AuthFailed("Authentication failed.".into()),
            ),
            ("L NO Nope\r\n", Outcome::AuthFailed("Nope".into())),
            (
                "L BAD Invalid characters\r\n",
                Outcome::AuthFailed("Invalid characters".into()),
            ),
            (
                "L NO [UNAVAILABLE] Account is temporarily unavailable.\r\n",
                Outcome::TempFailed("Account is temporarily unavailable.".into()),
            ),
            (
                "L NO [SERVERBUG] Internal error occurred.\r\n",
                Outcome::TempFailed("Internal error occurred.".into()),
            ),
        ] {
            let script = vec![
                Send(DOVECOT_GREETING),
                expect(&format!("L AUTHENTICATE PLAIN {}", plain(&alice()))),
                Send(reply),
            ];
            let (outcome, _) = run(script, alice(), Forward::None).await;
            assert_eq!(outcome.unwrap(), want, "reply {reply:?}");
        }
    }

    #[tokio::test]
    async fn bad_greetings() {
        let (outcome, _) = run(
            vec![Send("* BYE Server shutting down.\r\n")],
            alice(),
            Forward::None,
        )
        .await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::TempFailed("Server shutting down.".into())
        );
        let (outcome, _) = run(
            vec![Send("HTTP/1.1 400 Bad Request\r\n")],
            alice(),
            Forward::None,
        )
        .await;
        assert!(
            matches!(outcome, Err(BackendError::Protocol(_))),
            "{outcome:?}"
        );
        let (outcome, _) = run(
            vec![Send("* OK no end of line"), Hangup],
            alice(),
            Forward::None,
        )
        .await;
        assert!(matches!(outcome, Err(BackendError::Closed)), "{outcome:?}");
        let (outcome, _) = run(vec![Hangup], alice(), Forward::None).await;
        assert!(matches!(outcome, Err(BackendError::Closed)), "{outcome:?}");
    }

    #[test]
    fn id_forwards_a_trusted_clients_session_ext_id_last() {
        // After x-session-id: Dovecot adopts the last session id it is given, so the backend
        // logs the front end's id, as a Dovecot proxy would have.
        let mut id = identity();
        id.session_ext_id = Some("abc123".into());
        assert_eq!(
            id_command(&id),
            "I ID (\"x-session-id\" \"sess\\\"1\" \"x-originating-ip\" \"192.0.2.7\" \
             \"x-originating-port\" \"50123\" \"x-connected-ip\" \"198.51.100.1\" \
             \"x-connected-port\" \"143\" \"x-session-ext-id\" \"abc123\")\r\n"
        );
    }

    #[tokio::test]
    async fn id_forwards_the_client_identity() {
        let script = vec![
            Send(DOVECOT_GREETING),
            expect(
                "I ID (\"x-session-id\" \"sess\\\"1\" \"x-originating-ip\" \"192.0.2.7\" \
                 \"x-originating-port\" \"50123\" \"x-connected-ip\" \"198.51.100.1\" \
                 \"x-connected-port\" \"143\")",
            ),
            expect(&format!("L AUTHENTICATE PLAIN {}", plain(&alice()))),
            Send("* ID NIL\r\nI OK ID completed.\r\nL OK Logged in\r\n"),
        ];
        let (outcome, _) = run(script, alice(), Forward::Auto).await;
        assert_eq!(outcome.unwrap(), logged_in("Logged in"));
        // Without ID in the capabilities, nothing is sent.
        let script = vec![
            Send("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] ready\r\n"),
            expect(&format!("L AUTHENTICATE PLAIN {}", plain(&alice()))),
            Send("L OK Logged in\r\n"),
        ];
        let (outcome, _) = run(script, alice(), Forward::Auto).await;
        assert_eq!(outcome.unwrap(), logged_in("Logged in"));
    }

    #[tokio::test]
    async fn unsendable_credentials() {
        let script = vec![Send(DOVECOT_GREETING)];
        let (outcome, rest) = run(script, Credentials::plain("alice", "a\0b"), Forward::None).await;
        assert!(
            matches!(outcome, Err(BackendError::Unsendable(_))),
            "{outcome:?}"
        );
        assert!(rest.is_empty());
        let master = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: crate::protocol::decision::Secret::new("pw"),
        };
        let script = vec![Send("* OK [CAPABILITY IMAP4rev1] ready\r\n")];
        let (outcome, _) = run(script, master, Forward::None).await;
        assert!(
            matches!(outcome, Err(BackendError::Unsendable(_))),
            "{outcome:?}"
        );
        let script = vec![Send("* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n")];
        let (outcome, _) = run(script, alice(), Forward::None).await;
        assert!(
            matches!(outcome, Err(BackendError::Protocol(_))),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn starttls_required_but_not_offered() {
        let (addr, _task) = backend(vec![Send(DOVECOT_GREETING)]).await;
        let stream = BackendStream::Plain(TcpStream::connect(addr).await.unwrap());
        let credentials = alice();
        let identity = identity();
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(
            std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
        .with_no_client_auth();
        let req = BackendLoginRequest {
            credentials: &credentials,
            identity: &identity,
            forward: Forward::None,
            starttls: Some(crate::protocol::backend_login::StartTls {
                connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
                server_name: "backend.example".try_into().unwrap(),
            }),
            reply_timeout: Duration::from_secs(5),
            commit: &crate::protocol::backend_login::always_commit,
        };
        let outcome = login(stream, &req).await;
        assert!(matches!(outcome, Err(BackendError::Protocol(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_backend_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let _socket = listener.accept().await.unwrap();
        let credentials = alice();
        let identity = identity();
        let req = BackendLoginRequest {
            credentials: &credentials,
            identity: &identity,
            forward: Forward::Auto,
            starttls: None,
            reply_timeout: Duration::from_secs(5),
            commit: &crate::protocol::backend_login::always_commit,
        };
        let outcome = login(BackendStream::Plain(stream), &req).await;
        assert!(matches!(outcome, Err(BackendError::Timeout(_))));
    }

    #[test]
    fn replies_and_codes() {
        assert_eq!(without_code("[UNAVAILABLE] Try later."), "Try later.");
        assert_eq!(without_code("[ALERT]"), "[ALERT]");
        assert_eq!(without_code("Plain text"), "Plain text");
        assert_eq!(
            response_code("[CAPABILITY A B] x"),
            Some(("CAPABILITY", "A B"))
        );
        assert_eq!(response_code("[ALERT] x"), Some(("ALERT", "")));
        assert_eq!(response_code("no code"), None);
        assert!(is_tagged("L OK", "L") && !is_tagged("LL OK", "L") && !is_tagged("L", "L"));
    }
}
