//! The POP3 pre-authentication dialogue, as Dovecot's pop3-login speaks it: greeting, `CAPA`,
//! `STLS`, `USER`/`PASS`, `AUTH PLAIN`/`AUTH LOGIN`, `NOOP`, `QUIT`. It ends when a login
//! succeeds (the session goes to the relay) or the client leaves or is sent away.
//!
//! POP3's grammar lives in [`super::command`]; this file holds its commands and replies, as a
//! `Dialect` of the pre-authentication core ([`crate::protocol::preauth`]), which owns the
//! connection, the limits, STLS (bytes a client pipelines after it are thrown away rather than
//! read as if TLS protected them), the SASL exchange and the login. The director checks no
//! password: credentials go to [`Authenticator::login`], which lets the backend decide.
//! Passwords are never logged.

use std::io;

use crate::protocol::decision::{Credentials, Protocol};
use crate::protocol::pop3::command::{next_line, parse_line, Command, Line, Parse};
use crate::protocol::preauth::{
    printable, Answer, Authenticator, ClientCredentials, Dialect, Flow, LoginFailure, Parsed,
    PreauthLimits, Reply, Responses, Session, Tls,
};
use crate::protocol::sasl::{self, SaslError};

const PLAINTEXT_DISALLOWED: &str =
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.";
const AUTH_FAILED: &str = "Authentication failed.";

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 1024;

/// POP3 before login.
pub(crate) struct Pop3 {
    /// Longest command line accepted, CRLF included.
    max_line: usize,
    /// The name given by `USER`, for the next `PASS`.
    user: Option<String>,
}

impl Parsed for Parse {
    type Found = Parse;

    fn found(self) -> Option<(usize, Parse)> {
        match self {
            Parse::Incomplete => None,
            Parse::Line { consumed, .. } => Some((consumed, self)),
            // The session closes: nothing to drop.
            Parse::TooLong => Some((0, self)),
        }
    }
}

impl Dialect for Pop3 {
    const PROTOCOL: Protocol = Protocol::Pop3;
    const TIMEOUT_LOG: &'static str = "pop3: disconnected for inactivity before login";
    const EVICTED_CODE: &'static str = "[SYS/TEMP] ";
    const TOO_MANY_COMMANDS: &'static str = "Too many invalid commands.";
    const BYE_ON_LIMITS: bool = false;

    type ReadChunk = [u8; READ_CHUNK];
    type Parse = Parse;

    fn new(limits: &PreauthLimits) -> Self {
        Pop3 {
            max_line: limits.max_line,
            user: None,
        }
    }

    fn buffer_cap(limits: &PreauthLimits) -> usize {
        // The line limits bound the buffer: more is read only while less than a command line
        // (or a SASL response line, CRLF included) is buffered. This leaves a whole read of
        // room above them.
        let line = limits.max_line.max(limits.max_literal.saturating_add(2));
        line.saturating_add(READ_CHUNK)
    }

    fn greeting(s: &Session<Self>) -> String {
        format!("+OK {}\r\n", printable(&s.ctx.greeting))
    }

    fn bye(text: &str) -> String {
        format!("-ERR {text}\r\n")
    }

    fn reply(_s: &Session<Self>, reply: Reply<'_>) -> String {
        let line = match reply {
            Reply::TlsActive => "-ERR TLS is already active.",
            Reply::TlsDisabled => "-ERR TLS support isn't enabled.",
            Reply::TlsBegin => "+OK Begin TLS negotiation now.",
            Reply::PlaintextDisallowed => PLAINTEXT_DISALLOWED,
            Reply::UnsupportedMechanism => "-ERR Unsupported authentication mechanism.",
            Reply::Aborted => "-ERR Authentication aborted by client.",
            Reply::NotBase64 => "-ERR Invalid base64 data in response.",
            Reply::LoggedIn(text) => {
                return match printable(text) {
                    text if text.is_empty() => "+OK\r\n".to_owned(),
                    text => format!("+OK {text}\r\n"),
                };
            }
            // POP3 has no referral: the auth service's reason is the refusal.
            Reply::LoginFailed(message) | Reply::Referral { message, .. } => {
                let message = if message.is_empty() {
                    AUTH_FAILED
                } else {
                    message
                };
                return format!("-ERR [AUTH] {}\r\n", printable(message));
            }
            Reply::Unavailable(message) => {
                return match printable(message) {
                    m if m.is_empty() => {
                        "-ERR [SYS/TEMP] Temporary failure, try again later.\r\n".to_owned()
                    }
                    m => format!("-ERR [SYS/TEMP] {m}\r\n"),
                };
            }
        };
        format!("{line}\r\n")
    }

    fn parse(&mut self, buf: &[u8]) -> Parse {
        parse_line(buf, self.max_line)
    }

    async fn execute<A: Authenticator>(
        s: &mut Session<Self>,
        parsed: Parse,
        auth: &A,
    ) -> io::Result<Flow> {
        let command = match parsed {
            Parse::Line { command, .. } => command,
            Parse::TooLong => {
                s.send(b"-ERR Input line too long.\r\n").await?;
                return Ok(Flow::Close);
            }
            // Never handed over: the session reads on.
            Parse::Incomplete => return Ok(Flow::Continue),
        };
        match command {
            Command::Capa => {
                let capabilities = capabilities(s);
                s.send(capabilities.as_bytes()).await?;
            }
            Command::Noop => s.send(b"+OK\r\n").await?,
            Command::Quit => {
                s.send(b"+OK Logging out\r\n").await?;
                return Ok(Flow::Close);
            }
            // RFC 2595. A USER given in the clear is forgotten (`tls_started`).
            Command::Stls => match s.starttls().await? {
                Tls::Refused | Tls::Secured => {}
                Tls::Failed(error) => return Err(error),
            },
            Command::User(name) => {
                if !s.plaintext_allowed() {
                    s.answer(Reply::PlaintextDisallowed).await?;
                } else if name.is_empty() {
                    return bad_command(s, "No username given.").await;
                } else {
                    s.dialect.user = Some(name);
                    s.send(b"+OK\r\n").await?;
                }
            }
            Command::Pass(password) => {
                if !s.plaintext_allowed() {
                    s.answer(Reply::PlaintextDisallowed).await?;
                } else if let Some(user) = s.dialect.user.clone() {
                    return s.login(Credentials::plain(user, password), auth).await;
                } else {
                    s.send(b"-ERR No username given.\r\n").await?;
                }
            }
            Command::AuthList => {
                let list = if s.plaintext_allowed() {
                    "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
                } else {
                    "+OK\r\n.\r\n"
                };
                s.send(list.as_bytes()).await?;
            }
            // `AUTH <mechanism> [initial-response]` (RFC 5034).
            Command::Auth {
                mechanism,
                initial_response,
            } => {
                let initial = initial_response.map(String::into_bytes);
                return s.authenticate(mechanism.as_bytes(), initial, auth).await;
            }
            Command::NotUtf8 { keyword } => {
                tracing::debug!(session = %s.ctx.identity.session_id, keyword, "pop3: argument is not UTF-8");
                return bad_command(s, "Invalid characters in argument.").await;
            }
            Command::Other(keyword) => {
                tracing::debug!(session = %s.ctx.identity.session_id, keyword, "pop3: unknown command");
                return bad_command(s, "Unknown command.").await;
            }
        }
        Ok(Flow::Continue)
    }

    /// One response line, as long as the literal limit allows (CRLF aside).
    async fn sasl_response(s: &mut Session<Self>) -> io::Result<Answer> {
        let max = s.ctx.limits.max_literal.saturating_add(2);
        let line = s
            .parse(|_, buf| match next_line(buf, max) {
                Line::Incomplete => None,
                Line::Complete { consumed, line } => Some((consumed, Some(line.to_vec()))),
                Line::TooLong => Some((0, None)),
            })
            .await?;
        Ok(match line {
            Some(Some(line)) if line == b"*" => Answer::Cancel,
            Some(Some(line)) => Answer::Response(line),
            Some(None) => {
                s.send(b"-ERR Input line too long.\r\n").await?;
                Answer::Stop(Flow::Close)
            }
            None => Answer::Stop(Flow::Close),
        })
    }

    fn tls_started(&mut self) {
        self.user = None;
    }

    /// LOGIN's responses are read in turn: a username that is not text is a failed login even
    /// when the password is not base64.
    fn credentials(responses: Responses) -> ClientCredentials {
        match responses {
            Responses::Login { user, password } => decode_login(&user, &password).into(),
            plain => plain.decode(),
        }
    }

    fn logged(s: &Session<Self>, user: &str, outcome: Result<(), &LoginFailure>) {
        let session = &s.ctx.identity.session_id;
        let user = crate::untrusted::shown(user);
        match outcome {
            Ok(()) => tracing::debug!(session = %session, user = %user, "pop3: logged in"),
            Err(LoginFailure::AuthFailed { .. }) => {
                tracing::debug!(session = %session, user = %user, "pop3: login failed");
            }
            Err(LoginFailure::Unavailable { message }) => {
                tracing::debug!(session = %session, user = %user, "pop3: no backend: {message}");
            }
            Err(LoginFailure::Referral { .. }) => {
                tracing::debug!(session = %session, user = %user, "pop3: served elsewhere");
            }
        }
    }
}

/// The `CAPA` reply (RFC 2449), as Dovecot's pop3-login gives it before login.
fn capabilities(s: &Session<Pop3>) -> String {
    let mut capa = String::from(
        "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n",
    );
    if s.offers_starttls() {
        capa.push_str("STLS\r\n");
    }
    if s.plaintext_allowed() {
        capa.push_str("USER\r\n");
    }
    let mechanisms = s.advertised_mechanism_list();
    if !mechanisms.is_empty() {
        capa.push_str(&format!("SASL {mechanisms}\r\n"));
    }
    capa.push_str(".\r\n");
    capa
}

/// Answers an invalid command with `-ERR message`, counted.
async fn bad_command(s: &mut Session<Pop3>, message: &str) -> io::Result<Flow> {
    s.bad_command(format!("-ERR {message}\r\n").as_bytes())
        .await
}

/// The two decoded `AUTH LOGIN` responses: user name, then password.
fn decode_login(user: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    let text = |b64: &[u8]| -> Result<String, SaslError> {
        String::from_utf8(sasl::decode_base64(b64)?).map_err(|_| SaslError::Utf8)
    };
    let (user, password) = (text(user)?, text(password)?);
    if user.is_empty() {
        return Err(SaslError::EmptyUser);
    }
    Ok(Credentials::plain(user, password))
}

#[cfg(test)]
mod tests {
    use std::ops::{Deref, DerefMut};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::net::stream::ClientStream;
    use crate::protocol::preauth::testing::{self, b64, tls_pair, FakeAuth, Running, Scripted};
    use crate::protocol::preauth::{self, FrontendContext};

    fn context() -> FrontendContext {
        let client = "192.0.2.7:50123".parse().unwrap();
        let mut ctx = testing::context(client, "198.51.100.1:110".parse().unwrap());
        ctx.identity.session_id = "dir-1".into();
        ctx.limits = PreauthLimits {
            auth_failure_delay: Duration::from_millis(1),
            timeout: Duration::from_secs(30),
            ..PreauthLimits::default()
        };
        ctx
    }

    /// What the dialogue came to, in a form tests can compare.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Established { username: String, leftover: Vec<u8> },
        NoSession,
        Error,
    }

    /// The test's end of the connection, and the dialogue it talks to.
    struct Client {
        client: testing::Client,
        session: Running,
    }

    impl Deref for Client {
        type Target = testing::Client;

        fn deref(&self) -> &testing::Client {
            &self.client
        }
    }

    impl DerefMut for Client {
        fn deref_mut(&mut self) -> &mut testing::Client {
            &mut self.client
        }
    }

    impl Client {
        /// Connects a client to a front end running `ctx` against `auth`.
        async fn start(ctx: FrontendContext, auth: &Arc<FakeAuth>) -> Client {
            let (client, session) = testing::start::<Pop3>(auth, |c| *c = ctx).await;
            Client { client, session }
        }

        /// Connects and reads the greeting.
        async fn greeted(ctx: FrontendContext, auth: &Arc<FakeAuth>) -> Client {
            let mut client = Client::start(ctx, auth).await;
            client.expect("+OK Director ready.").await;
            client
        }

        /// What the dialogue came to.
        async fn outcome(self) -> Outcome {
            match self.session.await.unwrap() {
                Ok(Some(est)) => Outcome::Established {
                    username: est.username,
                    leftover: est.client_leftover,
                },
                Ok(None) => Outcome::NoSession,
                Err(_) => Outcome::Error,
            }
        }

        /// Expects the server to close, and returns what the session came to.
        async fn finish(mut self) -> Outcome {
            self.expect_closed().await;
            self.outcome().await
        }
    }

    /// A client greeted in the [`context`] with `adjust` applied, whose logins are answered
    /// with `answers`.
    async fn greeted_with(
        answers: impl IntoIterator<Item = Scripted>,
        adjust: impl FnOnce(&mut FrontendContext),
    ) -> (Client, Arc<FakeAuth>) {
        let auth = FakeAuth::scripted(answers);
        let mut ctx = context();
        adjust(&mut ctx);
        let client = Client::greeted(ctx, &auth).await;
        (client, auth)
    }

    /// A client greeted in the default context, whose logins are answered with `answers`.
    async fn greeted(answers: impl IntoIterator<Item = Scripted>) -> (Client, Arc<FakeAuth>) {
        greeted_with(answers, |_| {}).await
    }

    /// Expects the session established, and the first login to have been alice's.
    async fn logged_in_as_alice(c: Client, auth: &FakeAuth) {
        assert!(matches!(c.outcome().await, Outcome::Established { .. }));
        assert_eq!(
            auth.decisions()[0].credentials,
            Credentials::plain("alice", "secret")
        );
    }

    /// The `CAPA` reply: the lines every connection gets, then `extra`, then the final dot.
    fn capa<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut lines = vec![
            "+OK",
            "CAPA",
            "TOP",
            "UIDL",
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
        ];
        lines.extend_from_slice(extra);
        lines.push(".");
        lines
    }

    /// The `CAPA` reply where plaintext logins are allowed and STLS is not offered.
    fn full_capa() -> Vec<&'static str> {
        capa(&["USER", "SASL PLAIN LOGIN"])
    }

    #[tokio::test]
    async fn greeting_capa_noop_quit() {
        let (mut c, auth) = greeted([]).await;
        c.send(b"capa\r\n").await;
        c.expect_lines(&full_capa()).await;
        c.command("NOOP", "+OK").await;
        c.command("QUIT", "+OK Logging out").await;
        assert_eq!(c.finish().await, Outcome::NoSession);
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn plaintext_disallowed_on_an_insecure_connection() {
        let (mut c, auth) = greeted_with([Scripted::Ok("Logged in.")], |ctx| {
            ctx.disable_plaintext_auth = true
        })
        .await;
        c.send(b"CAPA\r\n").await;
        c.expect_lines(&capa(&[])).await;
        c.command("USER alice", PLAINTEXT_DISALLOWED).await;
        c.command("PASS secret", PLAINTEXT_DISALLOWED).await;
        c.command("AUTH PLAIN AGFsaWNlAHB3", PLAINTEXT_DISALLOWED)
            .await;
        c.send(b"AUTH\r\n").await;
        c.expect_lines(&["+OK", "."]).await;
        c.command("QUIT", "+OK Logging out").await;
        assert_eq!(c.finish().await, Outcome::NoSession);
        assert!(auth.decisions().is_empty());

        // From a trusted network it is allowed.
        let mut ctx = context();
        ctx.disable_plaintext_auth = true;
        ctx.trusted = true;
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(b"CAPA\r\n").await;
        c.expect_lines(&full_capa()).await;
        c.command("USER alice", "+OK").await;
        c.command("PASS secret", "+OK Logged in.").await;
    }

    #[tokio::test]
    async fn user_pass_logs_in_with_spaces_in_the_password() {
        let (mut c, auth) = greeted([Scripted::Ok("Logged in.")]).await;
        c.command("USER alice", "+OK").await;
        c.command("PASS  correct horse ", "+OK Logged in.").await;
        assert_eq!(
            c.outcome().await,
            Outcome::Established {
                username: "alice".into(),
                leftover: Vec::new()
            }
        );
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1);
        let d = &decisions[0];
        assert_eq!(d.protocol, Protocol::Pop3);
        assert_eq!(
            d.credentials,
            Credentials::plain("alice", " correct horse ")
        );
        assert_eq!(d.identity, context().identity);
        assert!(!d.secured);
    }

    #[tokio::test]
    async fn pass_needs_user() {
        let (mut c, auth) = greeted([]).await;
        c.command("PASS secret", "-ERR No username given.").await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn auth_plain_with_initial_response() {
        let (mut c, auth) = greeted([Scripted::Ok("Logged in.")]).await;
        let ir = b64(b"\0alice\0secret");
        c.command(&format!("AUTH PLAIN {ir}"), "+OK Logged in.")
            .await;
        logged_in_as_alice(c, &auth).await;
    }

    #[tokio::test]
    async fn auth_plain_with_a_continuation_and_authzid() {
        let (mut c, auth) = greeted([Scripted::Ok("Logged in.")]).await;
        c.command("auth plain", "+ ").await;
        c.command(&b64(b"bob\0master\0pw"), "+OK Logged in.").await;
        assert_eq!(
            c.outcome().await,
            Outcome::Established {
                username: "bob".into(),
                leftover: Vec::new()
            }
        );
        let creds = &auth.decisions()[0].credentials;
        assert_eq!(
            (creds.username.as_str(), creds.auth_username.as_str()),
            ("bob", "master")
        );
    }

    #[tokio::test]
    async fn auth_login() {
        let (mut c, auth) = greeted([Scripted::Ok("Logged in.")]).await;
        c.command("AUTH LOGIN", "+ VXNlcm5hbWU6").await;
        c.command(&b64(b"alice"), "+ UGFzc3dvcmQ6").await;
        c.command(&b64(b"secret"), "+OK Logged in.").await;
        logged_in_as_alice(c, &auth).await;
    }

    #[tokio::test]
    async fn auth_cancel_list_and_unknown_mechanism() {
        let (mut c, auth) = greeted([]).await;
        c.command("AUTH PLAIN", "+ ").await;
        c.command("*", "-ERR Authentication aborted by client.")
            .await;
        c.command("AUTH LOGIN", "+ VXNlcm5hbWU6").await;
        c.command("*", "-ERR Authentication aborted by client.")
            .await;
        c.send(b"AUTH\r\n").await;
        c.expect_lines(&["+OK", "PLAIN", "LOGIN", "."]).await;
        c.command(
            "AUTH CRAM-MD5",
            "-ERR Unsupported authentication mechanism.",
        )
        .await;
        c.command("NOOP", "+OK").await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn failed_login_then_success() {
        let (mut c, auth) = greeted([
            Scripted::AuthFailed("Authentication failed."),
            Scripted::Ok("Logged in."),
        ])
        .await;
        c.command("USER alice", "+OK").await;
        c.command("PASS wrong", "-ERR [AUTH] Authentication failed.")
            .await;
        c.command("PASS right", "+OK Logged in.").await;
        assert!(matches!(c.outcome().await, Outcome::Established { .. }));
        assert_eq!(auth.decisions().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_after_a_delay_each() {
        let (mut c, auth) = greeted_with(
            [Scripted::AuthFailed("Password mismatch\r\n+OK fake")],
            |ctx| {
                ctx.limits.auth_failure_delay = Duration::from_secs(2);
                ctx.limits.max_auth_failures = 3;
            },
        )
        .await;
        c.command("USER alice", "+OK").await;
        let started = tokio::time::Instant::now();
        // The backend's text cannot add a line of its own.
        c.command("PASS a", "-ERR [AUTH] Password mismatch  +OK fake")
            .await;
        assert!(started.elapsed() >= Duration::from_secs(2));
        c.command("PASS b", "-ERR [AUTH] Authentication failed.")
            .await;
        c.command("PASS c", "-ERR [AUTH] Authentication failed.")
            .await;
        assert_eq!(c.finish().await, Outcome::NoSession);
        assert_eq!(auth.decisions().len(), 3);
    }

    #[tokio::test]
    async fn unavailable_is_not_an_auth_failure() {
        let (mut c, _auth) = greeted_with(
            [
                Scripted::Unavailable("No backend available."),
                Scripted::Unavailable(""),
                Scripted::Ok("Logged in."),
            ],
            |ctx| ctx.limits.max_auth_failures = 1,
        )
        .await;
        c.command("USER alice", "+OK").await;
        c.command("PASS pw", "-ERR [SYS/TEMP] No backend available.")
            .await;
        c.command(
            "PASS pw",
            "-ERR [SYS/TEMP] Temporary failure, try again later.",
        )
        .await;
        c.command("PASS pw", "+OK Logged in.").await;
    }

    #[tokio::test]
    async fn unknown_commands_until_too_many() {
        let (mut c, _auth) = greeted_with([], |ctx| ctx.limits.max_bad_commands = 3).await;
        c.command("APOP alice 0123456789abcdef", "-ERR Unknown command.")
            .await;
        c.command("", "-ERR Unknown command.").await;
        c.command("STAT", "-ERR Too many invalid commands.").await;
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test]
    async fn bad_usernames_are_refused() {
        let (mut c, auth) = greeted([]).await;
        c.send(b"USER \xff\xfe\r\n").await;
        c.expect("-ERR Invalid characters in argument.").await;
        c.command("USER ", "-ERR No username given.").await;
        c.command(
            &format!("AUTH PLAIN {}", b64(b"\0\0pw")),
            "-ERR [AUTH] Authentication failed.",
        )
        .await;
        c.command(
            &format!("AUTH PLAIN {}", b64(b"\0\xff\0pw")),
            "-ERR [AUTH] Authentication failed.",
        )
        .await;
        c.command("AUTH PLAIN !!!", "-ERR Invalid base64 data in response.")
            .await;
        c.command("AUTH LOGIN", "+ VXNlcm5hbWU6").await;
        c.command("=", "+ UGFzc3dvcmQ6").await;
        c.command("=", "-ERR [AUTH] Authentication failed.").await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn pipelined_commands_after_login_are_handed_over() {
        let (mut c, _auth) = greeted([Scripted::Ok("Logged in.")]).await;
        c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\n")
            .await;
        c.expect_lines(&["+OK", "+OK Logged in."]).await;
        assert_eq!(
            c.outcome().await,
            Outcome::Established {
                username: "alice".into(),
                leftover: b"STAT\r\nLIST\r\n".to_vec()
            }
        );
    }

    #[tokio::test]
    async fn over_long_lines_close_the_connection() {
        let (mut c, auth) = greeted_with([], |ctx| ctx.limits.max_line = 64).await;
        c.send(format!("USER {}", "a".repeat(100)).as_bytes()).await;
        c.expect("-ERR Input line too long.").await;
        assert_eq!(c.finish().await, Outcome::NoSession);

        // A SASL response is capped by max_literal.
        let mut ctx = context();
        ctx.limits.max_literal = 16;
        let mut c = Client::greeted(ctx, &auth).await;
        c.command("AUTH PLAIN", "+ ").await;
        c.command(&"A".repeat(40), "-ERR Input line too long.")
            .await;
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test(start_paused = true)]
    async fn inactivity_ends_the_dialogue() {
        let (mut c, _auth) = greeted([]).await;
        c.command("USER alice", "+OK").await;
        let started = tokio::time::Instant::now();
        c.expect("-ERR Disconnected for inactivity.").await;
        assert!(started.elapsed() >= Duration::from_secs(29));
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test]
    async fn client_leaving_is_no_session() {
        let (mut c, _auth) = greeted([]).await;
        c.send(b"USER alice\r\nPASS").await;
        c.expect("+OK").await;
        c.close_write().await;
        assert_eq!(c.finish().await, Outcome::NoSession);
    }

    #[tokio::test]
    async fn stls_offered_only_when_configured() {
        let (mut c, auth) = greeted([]).await;
        c.command("STLS", "-ERR TLS support isn't enabled.").await;

        let mut ctx = context();
        ctx.starttls = Some(tls_pair().0);
        ctx.disable_plaintext_auth = true;
        let mut c = Client::greeted(ctx, &auth).await;
        c.send(b"CAPA\r\n").await;
        c.expect_lines(&capa(&["STLS"])).await;
    }

    #[tokio::test]
    async fn commands_pipelined_after_stls_are_discarded() {
        let (mut c, auth) = greeted_with([Scripted::Ok("Logged in.")], |ctx| {
            ctx.starttls = Some(tls_pair().0)
        })
        .await;
        c.send(b"STLS\r\nUSER alice\r\nPASS secret\r\n").await;
        c.expect("+OK Begin TLS negotiation now.").await;
        // No reply to USER or PASS: they were thrown away, and the handshake then fails
        // on the client's silence.
        c.close_write().await;
        assert_eq!(c.finish().await, Outcome::Error);
        assert!(auth.decisions().is_empty());
    }

    /// Reads one CRLF-terminated line a byte at a time, so that nothing after it (the TLS
    /// handshake) is consumed.
    async fn read_line_exactly<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(
                stream.read(&mut byte).await.unwrap(),
                1,
                "unexpected end of stream"
            );
            line.push(byte[0]);
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).unwrap()
    }

    #[tokio::test]
    async fn stls_discards_pipelined_commands_and_secures_the_login() {
        let auth = FakeAuth::scripted([Scripted::Ok("Logged in.")]);
        let mut ctx = context();
        ctx.starttls = Some(tls_pair().0);
        ctx.disable_plaintext_auth = true;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sock = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let auth2 = auth.clone();
        let session = tokio::spawn(async move {
            let est = preauth::run::<Pop3, _>(ClientStream::Plain(server), ctx, &*auth2)
                .await
                .unwrap();
            est.map(|e| (e.client.is_tls(), e.username))
        });

        assert_eq!(read_line_exactly(&mut sock).await, "+OK Director ready.");
        // An attacker in the middle appends commands after STLS, in the clear.
        sock.write_all(b"STLS\r\nUSER mallory\r\nQUIT\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_line_exactly(&mut sock).await,
            "+OK Begin TLS negotiation now."
        );
        let name = "localhost".try_into().unwrap();
        let mut tls = tls_pair().1.connect(name, sock).await.unwrap();

        // Neither USER nor QUIT was executed: PASS has no user, the session is alive.
        tls.write_all(b"PASS secret\r\n").await.unwrap();
        assert_eq!(read_line_exactly(&mut tls).await, "-ERR No username given.");
        // Over TLS, plaintext logins are allowed and STLS is no longer offered.
        tls.write_all(b"CAPA\r\n").await.unwrap();
        let mut capa = Vec::new();
        loop {
            let line = read_line_exactly(&mut tls).await;
            if line == "." {
                break;
            }
            capa.push(line);
        }
        assert!(capa.contains(&"USER".to_owned()));
        assert!(!capa.contains(&"STLS".to_owned()));
        tls.write_all(b"STLS\r\n").await.unwrap();
        assert_eq!(
            read_line_exactly(&mut tls).await,
            "-ERR TLS is already active."
        );

        tls.write_all(b"USER alice\r\nPASS secret\r\n")
            .await
            .unwrap();
        assert_eq!(read_line_exactly(&mut tls).await, "+OK");
        assert_eq!(read_line_exactly(&mut tls).await, "+OK Logged in.");
        assert_eq!(session.await.unwrap(), Some((true, "alice".to_owned())));
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1);
        assert!(decisions[0].secured);
    }
}

/// With an auth service in front: CAPA lists its mechanisms, and logins go through it.
#[cfg(test)]
mod auth_service_tests {
    use super::*;
    use crate::protocol::preauth::testing::{self, b64, established, FakeAuth};

    #[tokio::test]
    async fn capa_lists_the_services_mechanisms_and_user_pass_goes_through_it() {
        let auth = FakeAuth::with_service();
        let (mut c, session) = testing::start::<Pop3>(&auth, |_| {}).await;
        c.expect("+OK Director ready.").await;
        c.send(b"CAPA\r\n").await;
        let mut capa = Vec::new();
        while let Some(line) = c.line().await {
            if line == "." {
                break;
            }
            capa.push(line);
        }
        assert!(
            capa.contains(&"SASL PLAIN LOGIN CRAM-MD5".to_owned()),
            "{capa:?}"
        );
        c.command("USER moved", "+OK").await;
        c.command("PASS right", "-ERR [AUTH] Moved").await;
        c.command("AUTH CRAM-MD5", &format!("+ {}", b64(b"<1.2@fake>")))
            .await;
        c.command(&b64(b"alice 0123"), "+OK Logged in").await;
        assert_eq!(established(session).await.username, "alice");
        assert_eq!(auth.sasl()[0], ("PLAIN".into(), b"\0moved\0right".to_vec()));
    }
}
