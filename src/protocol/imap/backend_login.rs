//! Logging in to an IMAP backend on behalf of a client, as Dovecot's imap proxy does: read the
//! greeting and capabilities, STARTTLS if configured, tell the backend who the client is with
//! `ID` (when it is offered and forwarding is `Auto`), then `AUTHENTICATE PLAIN` (or `LOGIN`).
//!
//! Credentials are sent so that no byte of them can become a command of its own: base64 for
//! PLAIN; for LOGIN, quoted strings only when they hold nothing to escape, literals otherwise.
//! Tags: `C` capability, `S` STARTTLS, `I` ID, `L` login.

use std::cell::RefCell;

use crate::net::stream::BackendStream;
use crate::protocol::backend_dialogue::Dialogue;
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward,
};
use crate::protocol::decision::{ClientIdentity, Credentials};
use crate::protocol::sasl;

/// Longest line accepted from a backend (a CAPABILITY line of a big server fits many times).
const MAX_LINE: usize = 64 * 1024;

/// `NO` response codes that mean "try again later", not "wrong credentials".
const TEMPORARY_CODES: &[&str] = &["UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"];

/// Logs in to the IMAP backend on `stream` (connected; implicit TLS and any PROXY header
/// already done) with the request's credentials. Each reply must come within
/// `req.reply_timeout` (if set).
pub async fn login(
    stream: BackendStream,
    req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    let mut conn = Dialogue::new(stream, req);

    let greeting = conn.timed(read_line).await?;
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
        capabilities = Some(capability(&mut conn).await?);
    }
    let mut capabilities = capabilities.unwrap_or_default();

    if let Some(starttls) = &req.starttls {
        if !capabilities.has(Cap::StartTls) {
            return Err(BackendError::Protocol(
                "the backend does not offer STARTTLS, which is configured for it".into(),
            ));
        }
        let reply = conn
            .exchange(b"S STARTTLS\r\n", async |c| tagged(c, "S").await)
            .await?;
        if reply.status != Status::Ok {
            return Err(unexpected("STARTTLS reply", &reply.line));
        }
        conn = conn
            .start_tls(starttls, "the backend sent data after its STARTTLS reply")
            .await?;
        capabilities = capability(&mut conn).await?;
    }

    let mut parts = login_command(&capabilities, req.credentials)?.into_iter();
    let mut first = Vec::new();
    if req.forward == Forward::Auto && capabilities.has(Cap::Id) {
        // Pipelined with the login: its replies are skipped while waiting for the login's.
        first.extend_from_slice(id_command(req.identity, req.forward_fields).as_bytes());
    }
    first.extend(parts.next().unwrap_or_default());
    req.may_send_credentials()?;
    // The whole login, literals and all, is one exchange: its answer is due within the time
    // allowed for a reply.
    let reply = conn
        .timed(async |c| {
            c.send(&first).await?;
            for part in parts {
                if let Some(reply) = continuation(c).await? {
                    // The backend answered before taking the rest (e.g. BAD for the literal).
                    return Ok(reply);
                }
                c.send(&part).await?;
            }
            tagged(c, "L").await
        })
        .await?;
    Ok(outcome(conn, reply))
}

/// What the backend offers, from its greeting or `CAPABILITY`: of the names a login asks
/// about ([`Cap`]), which the lists hold (without regard to case), found in one pass.
#[derive(Debug, Default, Clone, Copy)]
struct Capabilities(u8);

/// The capabilities a login asks about.
#[derive(Debug, Clone, Copy)]
enum Cap {
    StartTls,
    Id,
    AuthPlain,
    SaslIr,
    LoginDisabled,
    LiteralPlus,
}

impl Cap {
    #[cfg(test)]
    const ALL: [Cap; 6] = [
        Cap::StartTls,
        Cap::Id,
        Cap::AuthPlain,
        Cap::SaslIr,
        Cap::LoginDisabled,
        Cap::LiteralPlus,
    ];

    fn name(self) -> &'static str {
        match self {
            Cap::StartTls => "STARTTLS",
            Cap::Id => "ID",
            Cap::AuthPlain => "AUTH=PLAIN",
            Cap::SaslIr => "SASL-IR",
            Cap::LoginDisabled => "LOGINDISABLED",
            Cap::LiteralPlus => "LITERAL+",
        }
    }
}

impl Capabilities {
    /// What `list` holds. The backends of a pool greet alike, and every login reads a
    /// greeting: the list last read on this thread is kept with what it holds, and a list
    /// that is the same is not read again.
    fn parse(list: &str) -> Self {
        thread_local! {
            static LAST: RefCell<(String, Capabilities)> =
                const { RefCell::new((String::new(), Capabilities(0))) };
        }
        /// Longer lists are read each time (no backend sends such).
        const KEPT_MAX: usize = 2048;
        let read = || {
            let mut c = Capabilities::default();
            c.extend(list);
            c
        };
        LAST.with(|last| {
            let Ok(mut last) = last.try_borrow_mut() else {
                return read();
            };
            if last.0 != list {
                let c = read();
                if list.len() <= KEPT_MAX {
                    last.0.clear();
                    last.0.push_str(list);
                    last.1 = c;
                }
                return c;
            }
            last.1
        })
    }

    /// Adds a further list (a `CAPABILITY` reply may have several lines).
    fn extend(&mut self, list: &str) {
        // Words are separated by spaces (RFC 9051 `capability-data`; tabs taken too): memchr
        // finds them a word at a time, not a byte at a time.
        let list = list.as_bytes();
        let mut start = 0;
        let ends = memchr::memchr2_iter(b' ', b'\t', list).chain(std::iter::once(list.len()));
        for end in ends {
            let word = &list[start..end];
            start = end + 1;
            // A Dovecot greeting lists some thirty: most are told apart by their length.
            let candidates: &[Cap] = match word.len() {
                2 => &[Cap::Id],
                7 => &[Cap::SaslIr],
                8 => &[Cap::StartTls, Cap::LiteralPlus],
                10 => &[Cap::AuthPlain],
                13 => &[Cap::LoginDisabled],
                _ => continue,
            };
            for cap in candidates {
                if word.eq_ignore_ascii_case(cap.name().as_bytes()) {
                    self.0 |= 1 << *cap as u8;
                }
            }
        }
    }

    fn has(&self, cap: Cap) -> bool {
        self.0 & (1 << cap as u8) != 0
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

/// The next line, without its CRLF, as text (invalid UTF-8 replaced).
async fn read_line(conn: &mut Dialogue) -> Result<String, BackendError> {
    Ok(text(conn.read_line(MAX_LINE, "a reply line").await?))
}

/// A line read as text (invalid UTF-8 replaced).
fn text(line: Vec<u8>) -> String {
    String::from_utf8(line).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The next line that is neither untagged (`* `) nor a reply to the pipelined ID (`I `):
/// those are passed over without being copied out of the buffer.
async fn next_reply(conn: &mut Dialogue) -> Result<String, BackendError> {
    let line = conn
        .read_line_where(MAX_LINE, "a reply line", |l| {
            !(l.starts_with(b"* ") || l.starts_with(b"I "))
        })
        .await?;
    Ok(text(line))
}

/// Reads up to the tagged reply with `tag`, passing over untagged lines and the replies of the
/// pipelined ID.
async fn tagged(conn: &mut Dialogue, tag: &str) -> Result<Tagged, BackendError> {
    let line = next_reply(conn).await?;
    if is_tagged(&line, tag) {
        return parse_tagged(line);
    }
    Err(unexpected("reply", &line))
}

/// Waits for a `+` continuation. `Some`: the login's tagged reply came instead.
async fn continuation(conn: &mut Dialogue) -> Result<Option<Tagged>, BackendError> {
    let line = next_reply(conn).await?;
    if line == "+" || line.starts_with("+ ") {
        return Ok(None);
    }
    if is_tagged(&line, "L") {
        return parse_tagged(line).map(Some);
    }
    Err(unexpected("reply", &line))
}

/// Sends `C CAPABILITY` and collects the untagged CAPABILITY lines.
async fn capability(conn: &mut Dialogue) -> Result<Capabilities, BackendError> {
    conn.exchange(b"C CAPABILITY\r\n", async |c| {
        let mut capabilities = Capabilities::default();
        loop {
            let line = read_line(c).await?;
            if let Some(("CAPABILITY", list)) = parse_untagged(&line) {
                capabilities.extend(list);
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
    })
    .await
}

/// The result of the login's tagged reply.
fn outcome(conn: Dialogue, reply: Tagged) -> BackendLoginResult {
    match reply.status {
        Status::Ok => conn.logged_in(reply.text),
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
    if capabilities.has(Cap::AuthPlain) {
        return Ok(if capabilities.has(Cap::SaslIr) {
            let mut line = String::with_capacity(64);
            line.push_str("L AUTHENTICATE PLAIN ");
            sasl::push_plain(credentials, &mut line);
            line.push_str("\r\n");
            vec![line.into_bytes()]
        } else {
            let mut response = sasl::encode_plain(credentials);
            response.push_str("\r\n");
            vec![b"L AUTHENTICATE PLAIN\r\n".to_vec(), response.into_bytes()]
        });
    }
    if capabilities.has(Cap::LoginDisabled) {
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
    let literal_plus = capabilities.has(Cap::LiteralPlus);
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

/// `ID` with the client's identity, as Dovecot's proxy sends it, and the fields an auth
/// service asked to forward (`x-forward-NAME`).
fn id_command(identity: &ClientIdentity, forward: &[(String, String)]) -> String {
    use crate::addr_text::{ip, port};
    let mut line = String::with_capacity(256);
    line.push_str("I ID (\"x-session-id\" ");
    push_quoted(&mut line, &identity.session_id);
    // One per login: pieces pushed, not formatted.
    for (name, value) in [
        ("x-originating-ip", ip(identity.client.ip().to_canonical())),
        ("x-originating-port", port(identity.client.port())),
        ("x-connected-ip", ip(identity.local.ip().to_canonical())),
        ("x-connected-port", port(identity.local.port())),
    ] {
        line.push_str(" \"");
        line.push_str(name);
        line.push_str("\" \"");
        line.push_str(value.as_str());
        line.push('"');
    }
    if let Some(id) = &identity.session_ext_id {
        line.push_str(" \"x-session-ext-id\" ");
        push_quoted(&mut line, id);
    }
    for (name, value) in forward {
        line.push(' ');
        push_quoted(&mut line, &format!("x-forward-{name}"));
        line.push(' ');
        push_quoted(&mut line, value);
    }
    line.push_str(")\r\n");
    line
}

/// Appends `value` as a quoted string; characters that cannot be quoted are left out.
fn push_quoted(out: &mut String, value: &str) {
    out.reserve(value.len() + 2);
    out.push('"');
    // Mostly nothing to leave out or escape (a session id, an address, a username).
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(value);
        out.push('"');
        return;
    }
    for c in value
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
    {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
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
    use super::*;
    use crate::protocol::fake_backend::{
        self, alice, fake_backend, logged_in, Attempt, Backend, Outcome, CLOSE,
    };

    fn identity() -> ClientIdentity {
        fake_backend::identity("[::ffff:198.51.100.1]:143", "sess\"1")
    }

    /// Runs a login through `backend`; returns the outcome and every line the backend read
    /// until the director closed the connection.
    async fn run(
        backend: Backend,
        credentials: Credentials,
        forward: Forward,
    ) -> (Outcome, Vec<String>) {
        let attempt = Attempt::new(&credentials, identity(), forward);
        attempt.run(|s, r| Box::pin(login(s, r)), backend).await
    }

    /// A backend that greets with `greeting` and then expects `script`'s lines in turn,
    /// answering each with its reply.
    async fn scripted(greeting: &str, script: &[(&str, &str)]) -> Backend {
        let mut script: Vec<(String, String)> = script
            .iter()
            .map(|(line, reply)| (line.to_string(), reply.to_string()))
            .collect();
        script.reverse();
        fake_backend(greeting, move |line| {
            let Some((want, reply)) = script.pop() else {
                panic!("a line after the script: {line:?}");
            };
            assert_eq!(line, want);
            reply
        })
        .await
    }

    /// Logs in with `credentials` (no forwarding) through a backend that greets with
    /// `greeting` and plays `script`; checks that the backend read the script's lines and
    /// nothing more.
    async fn plays(greeting: &str, script: &[(&str, &str)], credentials: Credentials) -> Outcome {
        let backend = scripted(greeting, script).await;
        let (outcome, seen) = run(backend, credentials, Forward::None).await;
        assert_eq!(
            seen.len(),
            script.len(),
            "a second command was sent: {seen:?}"
        );
        outcome
    }

    fn plain(credentials: &Credentials) -> String {
        sasl::encode_plain(credentials)
    }

    /// A greeting with capabilities but no SASL-IR nor LITERAL+.
    const GREETING: &str = "* OK [CAPABILITY IMAP4rev1] ready\r\n";

    const DOVECOT_GREETING: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE \
                                    IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";

    #[test]
    fn capabilities_are_found_in_any_case_and_over_several_lists() {
        let mut c = Capabilities::parse("IMAP4rev1 sasl-ir auth=plain ID");
        assert!(c.has(Cap::SaslIr) && c.has(Cap::AuthPlain) && c.has(Cap::Id));
        assert!(!c.has(Cap::StartTls) && !c.has(Cap::LiteralPlus));
        assert!(!c.has(Cap::LoginDisabled));
        c.extend("LITERAL+\tSTARTTLS  LOGINDISABLED");
        assert!(c.has(Cap::LiteralPlus) && c.has(Cap::StartTls) && c.has(Cap::LoginDisabled));
        let all = Cap::ALL.map(Cap::name).join(" ");
        assert!(Cap::ALL
            .iter()
            .all(|cap| Capabilities::parse(&all).has(*cap)));
        let near = Capabilities::parse("AUTH=PLAINX IDS XSTARTTLS SASL-IR+ AUTH=PLAIN=");
        assert!(Cap::ALL.iter().all(|cap| !near.has(*cap)), "{near:?}");
        // The same list again (kept from the last one read), then another.
        for _ in 0..2 {
            let again = Capabilities::parse("IMAP4rev1 sasl-ir auth=plain ID");
            assert!(again.has(Cap::SaslIr) && again.has(Cap::AuthPlain) && again.has(Cap::Id));
            assert!(!again.has(Cap::StartTls) && !again.has(Cap::LoginDisabled));
            let other = Capabilities::parse("IMAP4rev1 STARTTLS LOGINDISABLED");
            assert!(other.has(Cap::StartTls) && other.has(Cap::LoginDisabled));
            assert!(!other.has(Cap::SaslIr) && !other.has(Cap::Id));
        }
        let long = format!("{} STARTTLS", "X ".repeat(2000));
        assert!(Capabilities::parse(&long).has(Cap::StartTls));
        assert!(!Capabilities::parse("IMAP4rev1").has(Cap::StartTls));
    }

    #[tokio::test]
    async fn authenticate_plain_with_initial_response_and_leftover() {
        let auth = format!("L AUTHENTICATE PLAIN {}", plain(&alice()));
        let script = [(
            auth.as_str(),
            "L OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\n",
        )];
        let outcome = plays(DOVECOT_GREETING, &script, alice()).await;
        assert_eq!(
            outcome,
            Outcome::LoggedIn {
                text: "[CAPABILITY IMAP4rev1 IDLE] Logged in".into(),
                leftover: b"* 3 EXISTS\r\n".to_vec(),
            }
        );
    }

    #[tokio::test]
    async fn authenticate_plain_without_sasl_ir_asks_for_capabilities() {
        let master = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: crate::protocol::decision::Secret::new("pw"),
        };
        let response = plain(&master);
        let script = [
            (
                "C CAPABILITY",
                "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n* CAPABILITY ID\r\nC OK done\r\n",
            ),
            ("L AUTHENTICATE PLAIN", "+ \r\n"),
            (
                response.as_str(),
                "* CAPABILITY IMAP4rev1\r\nL OK Logged in\r\n",
            ),
        ];
        let outcome = plays("* OK ready\r\n", &script, master).await;
        assert_eq!(outcome, logged_in("Logged in"));
    }

    #[tokio::test]
    async fn login_with_quoted_strings() {
        let script = [("L LOGIN \"alice\" \"sec ret\"", "L OK Logged in\r\n")];
        let outcome = plays(GREETING, &script, Credentials::plain("alice", "sec ret")).await;
        assert_eq!(outcome, logged_in("Logged in"));
    }

    const NASTY: &str = "p\"w\\\r\nX DELETE INBOX";

    /// [`NASTY`] as the lines a backend reads it in.
    const NASTY_LINES: [&str; 2] = ["p\"w\\", "X DELETE INBOX"];

    #[tokio::test]
    async fn login_with_synchronising_literal_cannot_inject() {
        let login = format!("L LOGIN \"alice\" {{{}}}", NASTY.len());
        let script = [
            (login.as_str(), "+ OK\r\n"),
            (NASTY_LINES[0], ""),
            (NASTY_LINES[1], "L OK Logged in\r\n"),
        ];
        let outcome = plays(GREETING, &script, Credentials::plain("alice", NASTY)).await;
        assert_eq!(outcome, logged_in("Logged in"));
    }

    #[tokio::test]
    async fn login_with_non_synchronising_literals() {
        let password = format!("\u{e9}lise {{{}+}}", NASTY.len());
        let script = [
            ("L LOGIN {6+}", ""),
            (password.as_str(), ""),
            (NASTY_LINES[0], ""),
            (NASTY_LINES[1], "L OK Logged in\r\n"),
        ];
        let outcome = plays(
            "* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n",
            &script,
            Credentials::plain("\u{e9}lise", NASTY),
        )
        .await;
        assert_eq!(outcome, logged_in("Logged in"));
    }

    #[tokio::test]
    async fn refused_literal_ends_the_login() {
        let login = format!("L LOGIN \"alice\" {{{}}}", NASTY.len());
        let script = [(login.as_str(), "L BAD Literal too large\r\n")];
        let outcome = plays(GREETING, &script, Credentials::plain("alice", NASTY)).await;
        assert_eq!(outcome, Outcome::AuthFailed("Literal too large".into()));
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
            let auth = format!("L AUTHENTICATE PLAIN {}", plain(&alice()));
            let backend = scripted(DOVECOT_GREETING, &[(auth.as_str(), reply)]).await;
            let (outcome, _) = run(backend, alice(), Forward::None).await;
            assert_eq!(outcome, want, "reply {reply:?}");
        }
    }

    #[test]
    fn quoted_strings_escape_quotes_and_leave_out_what_cannot_be_quoted() {
        for (value, quoted) in [
            ("0123456789abcdef", "\"0123456789abcdef\""),
            ("", "\"\""),
            (" ~!", "\" ~!\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("tab\there\u{7f}\r\n", "\"tabhere\""),
            ("caf\u{e9}", "\"caf\""),
        ] {
            let mut out = String::from("x ");
            push_quoted(&mut out, value);
            assert_eq!(out, format!("x {quoted}"), "{value:?}");
        }
    }

    /// Untagged lines and the ID's replies before the login's reply are passed over, each
    /// still bounded by the line limit; a line that is none of these is an error.
    #[tokio::test]
    async fn replies_before_the_login_reply_are_passed_over_within_the_line_limit() {
        let auth = format!("L AUTHENTICATE PLAIN {}", plain(&alice()));
        let many = format!(
            "* ID NIL\r\nI OK ID completed.\r\n* {}\r\n* \u{ff}\n* OK [ALERT] hi\r\nL OK Logged in\r\n* 1 EXISTS\r\n",
            "x".repeat(MAX_LINE - 5)
        );
        let backend = scripted(DOVECOT_GREETING, &[(auth.as_str(), many.as_str())]).await;
        let (outcome, _) = run(backend, alice(), Forward::None).await;
        assert_eq!(
            outcome,
            Outcome::LoggedIn {
                text: "Logged in".into(),
                leftover: b"* 1 EXISTS\r\n".to_vec(),
            }
        );
        for reply in [
            format!("* {}\r\nL OK Logged in\r\n", "x".repeat(MAX_LINE)),
            "I OK ID completed.\r\nX OK what\r\nL OK Logged in\r\n".to_owned(),
        ] {
            let backend = scripted(DOVECOT_GREETING, &[(auth.as_str(), reply.as_str())]).await;
            let (outcome, _) = run(backend, alice(), Forward::None).await;
            assert_eq!(outcome, Outcome::Protocol, "{:.40}", reply);
        }
    }

    #[tokio::test]
    async fn bad_greetings() {
        let backend = scripted("* BYE Server shutting down.\r\n", &[]).await;
        let (outcome, _) = run(backend, alice(), Forward::None).await;
        assert_eq!(outcome, Outcome::TempFailed("Server shutting down.".into()));
        let backend = scripted("HTTP/1.1 400 Bad Request\r\n", &[]).await;
        let (outcome, _) = run(backend, alice(), Forward::None).await;
        assert_eq!(outcome, Outcome::Protocol);
        let backend = scripted(&format!("* OK no end of line{CLOSE}"), &[]).await;
        let (outcome, _) = run(backend, alice(), Forward::None).await;
        assert_eq!(outcome, Outcome::Closed);
        let backend = scripted(CLOSE, &[]).await;
        let (outcome, _) = run(backend, alice(), Forward::None).await;
        assert_eq!(outcome, Outcome::Closed);
    }

    #[test]
    fn id_forwards_a_trusted_clients_session_ext_id_last() {
        // After x-session-id: Dovecot adopts the last session id it is given, so the backend
        // logs the front end's id, as a Dovecot proxy would have.
        let mut id = identity();
        id.session_ext_id = Some("abc123".into());
        assert_eq!(
            id_command(&id, &[]),
            "I ID (\"x-session-id\" \"sess\\\"1\" \"x-originating-ip\" \"192.0.2.7\" \
             \"x-originating-port\" \"50123\" \"x-connected-ip\" \"198.51.100.1\" \
             \"x-connected-port\" \"143\" \"x-session-ext-id\" \"abc123\")\r\n"
        );
    }

    #[tokio::test]
    async fn id_forwards_the_client_identity() {
        let auth = format!("L AUTHENTICATE PLAIN {}", plain(&alice()));
        let script = [
            (
                "I ID (\"x-session-id\" \"sess\\\"1\" \"x-originating-ip\" \"192.0.2.7\" \
                 \"x-originating-port\" \"50123\" \"x-connected-ip\" \"198.51.100.1\" \
                 \"x-connected-port\" \"143\")",
                "",
            ),
            (
                auth.as_str(),
                "* ID NIL\r\nI OK ID completed.\r\nL OK Logged in\r\n",
            ),
        ];
        let backend = scripted(DOVECOT_GREETING, &script).await;
        let (outcome, _) = run(backend, alice(), Forward::Auto).await;
        assert_eq!(outcome, logged_in("Logged in"));
        // Without ID in the capabilities, nothing is sent.
        let backend = scripted(
            "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] ready\r\n",
            &[(auth.as_str(), "L OK Logged in\r\n")],
        )
        .await;
        let (outcome, _) = run(backend, alice(), Forward::Auto).await;
        assert_eq!(outcome, logged_in("Logged in"));
    }

    #[tokio::test]
    async fn unsendable_credentials() {
        let backend = scripted(DOVECOT_GREETING, &[]).await;
        let (outcome, seen) =
            run(backend, Credentials::plain("alice", "a\0b"), Forward::None).await;
        assert_eq!(outcome, Outcome::Unsendable);
        assert!(seen.is_empty());
        let master = Credentials {
            username: "bob".into(),
            auth_username: "master".into(),
            password: crate::protocol::decision::Secret::new("pw"),
        };
        let backend = scripted(GREETING, &[]).await;
        let (outcome, _) = run(backend, master, Forward::None).await;
        assert_eq!(outcome, Outcome::Unsendable);
        let backend = scripted("* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n", &[]).await;
        let (outcome, _) = run(backend, alice(), Forward::None).await;
        assert_eq!(outcome, Outcome::Protocol);
    }

    #[tokio::test]
    async fn starttls_required_but_not_offered() {
        let backend = scripted(DOVECOT_GREETING, &[]).await;
        let attempt = Attempt::new(&alice(), identity(), Forward::None).with_starttls();
        let (outcome, _) = attempt.run(|s, r| Box::pin(login(s, r)), backend).await;
        assert_eq!(outcome, Outcome::Protocol);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_backend_times_out() {
        let backend = scripted("", &[]).await;
        let (outcome, _) = run(backend, alice(), Forward::Auto).await;
        assert_eq!(outcome, Outcome::Timeout);
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
