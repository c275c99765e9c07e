//! Logging in to a POP3 backend on the client's behalf, the way Dovecot's pop3 proxy does:
//! greeting, `CAPA`, optional `STLS` (then `CAPA` again), `XCLIENT` with the client's address
//! when the backend offers it, then `AUTH PLAIN` with an initial response, or `USER`/`PASS`
//! when the backend has no SASL PLAIN.
//!
//! Credentials are never logged, and never sent in a form that could smuggle a second command
//! to the backend: a CR, LF or NUL that the chosen login command cannot carry makes the login
//! fail with [`BackendError::Unsendable`] before anything is sent.

use crate::net::stream::BackendStream;
use crate::protocol::backend_dialogue::{
    excerpt, plain_response, Answer, Dialogue, MAX_CAPABILITY_LINES, MAX_LINE,
};
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward,
};
use crate::protocol::decision::Credentials;

/// Logs in to a POP3 backend. `stream` is connected, with implicit TLS and any PROXY header
/// already done. Each reply must come within
/// `req.reply_timeout` (if set).
pub async fn login(
    stream: BackendStream,
    req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    let mut conn = Dialogue::new(stream, req);

    // Dovecot announces XCLIENT in its greeting (`+OK [XCLIENT] ...`), not in CAPA.
    let greeting_xclient = match conn.timed(reply).await? {
        Reply::Ok(text) => split_code(&text)
            .0
            .is_some_and(|c| c.eq_ignore_ascii_case("XCLIENT")),
        Reply::Err(text) => return Ok(BackendLoginResult::TempFailed { message: text }),
    };

    let mut caps = capabilities(&mut conn).await?;

    if let Some(starttls) = &req.starttls {
        conn = conn.start_tls_by(starttls, "STLS", caps.stls, ask).await?;
        caps = capabilities(&mut conn).await?;
    }

    if req.forward == Forward::Auto && (caps.xclient || greeting_xclient) {
        conn.xclient(req.identity, ask).await?;
    }

    req.may_send_credentials()?;
    let reply = if caps.sasl_plain {
        auth_plain(&mut conn, req.credentials).await?
    } else {
        user_pass(&mut conn, req.credentials).await?
    };

    Ok(match reply {
        Reply::Ok(text) => conn.logged_in(text),
        Reply::Err(text) => failure(&text),
    })
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
                excerpt(line)
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

/// Reads one status reply.
async fn reply(conn: &mut Dialogue) -> Result<Reply, BackendError> {
    Reply::parse(&conn.read_line(MAX_LINE, "reply line").await?)
}

/// Sends one command line (CRLF included) and reads its status reply.
async fn command(conn: &mut Dialogue, line: &[u8]) -> Result<Reply, BackendError> {
    conn.exchange(line, reply).await
}

/// A command the backend may only take or refuse.
async fn ask(conn: &mut Dialogue, line: &[u8]) -> Result<Answer, BackendError> {
    Ok(match command(conn, line).await? {
        Reply::Ok(_) => Ok(()),
        Reply::Err(text) => Err(text),
    })
}

/// Sends `CAPA` and reads the list. A backend that refuses `CAPA` has no capabilities.
async fn capabilities(conn: &mut Dialogue) -> Result<Capabilities, BackendError> {
    conn.exchange(b"CAPA\r\n", async |c| {
        let mut caps = Capabilities::default();
        if let Reply::Err(_) = reply(c).await? {
            return Ok(caps);
        }
        for _ in 0..MAX_CAPABILITY_LINES {
            let line = c.read_line(MAX_LINE, "reply line").await?;
            if line == b"." {
                return Ok(caps);
            }
            // Dot-stuffing (RFC 1939): a leading dot is doubled.
            let line = line.strip_prefix(b".").unwrap_or(&line);
            caps.add(&String::from_utf8_lossy(line));
        }
        Err(BackendError::Protocol(format!(
            "CAPA reply longer than {MAX_CAPABILITY_LINES} lines"
        )))
    })
    .await
}

/// `AUTH PLAIN <initial response>` (RFC 5034).
async fn auth_plain(conn: &mut Dialogue, credentials: &Credentials) -> Result<Reply, BackendError> {
    let line = format!("AUTH PLAIN {}\r\n", plain_response(credentials)?);
    command(conn, line.as_bytes()).await
}

/// `USER name` then `PASS password`, for backends without SASL PLAIN. Neither may hold a
/// line end (it would start a second command) or a NUL, and a master-user login (a
/// different authentication identity) cannot be expressed at all.
async fn user_pass(conn: &mut Dialogue, credentials: &Credentials) -> Result<Reply, BackendError> {
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
    if let Reply::Err(text) = command(conn, user.as_bytes()).await? {
        return Ok(Reply::Err(text));
    }
    let pass = format!("PASS {}\r\n", credentials.password.expose());
    command(conn, pass.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decision::{ClientIdentity, Secret};
    use crate::protocol::fake_backend::{
        self, alice, fake_backend, logged_in, Attempt, Backend, Outcome, CLOSE,
    };
    use crate::protocol::sasl;

    /// Dovecot 2.3's pop3-login capabilities, with and without the extras a test needs.
    const CAPA_PLAIN: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
                              AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
    const CAPA_XCLIENT: &str = "+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\nXCLIENT\r\n.\r\n";
    const CAPA_USER_ONLY: &str = "+OK\r\nCAPA\r\nTOP\r\nUSER\r\n.\r\n";

    /// A backend that answers like Dovecot with the given CAPA reply and login reply.
    async fn dovecot_like(capa: &'static str, login_reply: &'static str) -> Backend {
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

    /// A backend that answers CAPA with `capa` and any other command with `reply`.
    async fn answers_capa(capa: &'static str, reply: &'static str) -> Backend {
        fake_backend("+OK ready\r\n", move |line| match line {
            "CAPA" => capa.into(),
            _ => reply.into(),
        })
        .await
    }

    fn identity() -> ClientIdentity {
        fake_backend::identity("198.51.100.1:110", "dir-1a2b")
    }

    fn attempt(credentials: &Credentials, forward: Forward) -> Attempt {
        Attempt::new(credentials, identity(), forward)
    }

    /// Logs in with `credentials`; returns the outcome and the lines the backend read.
    async fn run(
        backend: Backend,
        credentials: &Credentials,
        forward: Forward,
    ) -> (Outcome, Vec<String>) {
        attempt(credentials, forward)
            .run(|s, r| Box::pin(login(s, r)), backend)
            .await
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
        let backend = answers_capa(CAPA_XCLIENT, "-ERR You are not from trusted IP\r\n").await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!(result, Outcome::Protocol);
        assert_eq!(
            seen.len(),
            2,
            "no credentials after a refused XCLIENT: {seen:?}"
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
        let backend = answers_capa(
            CAPA_USER_ONLY,
            "-ERR [AUTH] Plaintext authentication disallowed.\r\n",
        )
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

        let long = format!("+OK {}\r\n", "x".repeat(MAX_LINE));
        let backend = fake_backend(&long, |_| String::new()).await;
        assert_eq!(
            run(backend, &alice(), Forward::Auto).await.0,
            Outcome::Protocol
        );
    }

    #[tokio::test]
    async fn closed_before_or_during_login() {
        // Accepts and closes at once.
        let backend = fake_backend(CLOSE, |_| String::new()).await;
        let (result, seen) = run(backend, &alice(), Forward::Auto).await;
        assert_eq!((result, seen.len()), (Outcome::Closed, 0));

        // Closes instead of answering the login.
        let backend = answers_capa(CAPA_PLAIN, CLOSE).await;
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

    #[tokio::test]
    async fn starttls_required_but_not_offered() {
        let backend = dovecot_like(CAPA_PLAIN, "+OK Logged in.\r\n").await;
        let attempt = attempt(&alice(), Forward::Auto).with_starttls();
        let (result, seen) = attempt.run(|s, r| Box::pin(login(s, r)), backend).await;
        assert_eq!(result, Outcome::Protocol);
        assert_eq!(seen, ["CAPA"]);
    }

    #[tokio::test]
    async fn bytes_after_the_stls_reply_are_refused() {
        let backend = fake_backend("+OK ready\r\n", |line| match line {
            "CAPA" => "+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n".into(),
            "STLS" => "+OK Begin TLS negotiation now.\r\n+OK injected\r\n".into(),
            _ => "-ERR\r\n".into(),
        })
        .await;
        let attempt = attempt(&alice(), Forward::Auto).with_starttls();
        let (result, seen) = attempt.run(|s, r| Box::pin(login(s, r)), backend).await;
        assert_eq!(result, Outcome::Protocol);
        assert_eq!(seen, ["CAPA", "STLS"]);
    }
}
