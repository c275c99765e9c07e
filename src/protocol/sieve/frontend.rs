//! The ManageSieve pre-authentication session, as Dovecot's managesieve-login runs it: the
//! capability greeting, CAPABILITY, NOOP, STARTTLS, LOGOUT and AUTHENTICATE "PLAIN" or "LOGIN"
//! (with or without an initial response).
//!
//! ManageSieve's grammar lives in [`super::command`]; this file holds its commands and
//! replies, as a `Dialect` of the pre-authentication core ([`crate::protocol::preauth`]),
//! which owns the connection, the limits, STARTTLS, the SASL exchange and the login.
//!
//! The capabilities offered before login are Dovecot's (Pigeonhole 0.5 on Debian 12), not the
//! backend's: the director has not picked a backend yet. They matter little: RFC 5804 §2.1
//! has clients forget them after login, and after `AUTHENTICATE` (no SASL security layer with
//! PLAIN) a client asks the backend itself with `CAPABILITY` if it needs them. Keeping the
//! real `SIEVE` list lets a client that judges a server by its greeting see what it will get.

use std::io;

use super::command::{
    quote, string_bytes, Command, CommandName, CommandParser, Parse, ParseError, Token,
};
use crate::protocol::decision::Protocol;
use crate::protocol::preauth::{
    printable, Answer, Authenticator, Dialect, Flow, Parsed, PreauthLimits, Reply, Session, Tls,
};

/// The Sieve extensions announced before login: those of Dovecot's Pigeonhole on the
/// backends (see the module documentation).
const SIEVE_EXTENSIONS: &str = "fileinto reject envelope encoded-character vacation \
    subaddress comparator-i;ascii-numeric relational regex imap4flags copy include variables \
    body enotify environment mailbox date index ihave duplicate mime foreverypart extracttext";

/// Dovecot's answer to a command it cannot parse or does not know before login.
const COMMAND_ERROR: &str = "NO \"Error in MANAGESIEVE command received by server.\"";

const ENCRYPT_NEEDED: &str = "NO (ENCRYPT-NEEDED) \"Plaintext authentication disallowed on \
                              non-secure (SSL/TLS) connections.\"";

/// ManageSieve before login.
pub(crate) struct ManageSieve {
    parser: CommandParser,
}

impl<T> Parsed for Parse<T> {
    type Found = Parse<T>;

    fn found(self) -> Option<(usize, Parse<T>)> {
        let consumed = match &self {
            Parse::Incomplete => return None,
            Parse::Done { consumed, .. } => *consumed,
            Parse::Error(error) => error.consumed,
        };
        Some((consumed, self))
    }
}

impl Dialect for ManageSieve {
    const PROTOCOL: Protocol = Protocol::Sieve;
    const TOO_MANY_COMMANDS: &'static str = "Too many invalid MANAGESIEVE commands.";

    type ReadChunk = [u8; 2048];
    type Parse = Parse<Command>;

    fn new(limits: &PreauthLimits) -> Self {
        ManageSieve {
            parser: CommandParser::new(limits.max_line, limits.max_literal),
        }
    }

    fn buffer_cap(limits: &PreauthLimits) -> usize {
        // `+ 1`: room for the byte past a limit that shows it was crossed.
        limits.max_line + limits.max_literal + 1
    }

    fn greeting(s: &Session<Self>) -> String {
        format!("{}OK {}\r\n", capabilities(s), quote(&s.ctx.greeting))
    }

    fn bye(text: &str) -> String {
        format!("BYE {}\r\n", quote(text))
    }

    fn reply(_s: &Session<Self>, reply: Reply<'_>) -> String {
        let line = match reply {
            Reply::TlsActive => "NO \"TLS is already active.\"",
            Reply::TlsDisabled => "NO \"TLS support isn't enabled.\"",
            Reply::TlsBegin => "OK \"Begin TLS negotiation now.\"",
            Reply::PlaintextDisallowed => ENCRYPT_NEEDED,
            Reply::UnsupportedMechanism => "NO \"Unsupported authentication mechanism.\"",
            Reply::Aborted => "NO \"Authentication aborted by client.\"",
            Reply::NotBase64 => "NO \"Invalid base64 data in authentication response.\"",
            Reply::LoggedIn(text) => {
                return match printable(text) {
                    text if text.is_empty() => "OK\r\n".to_owned(),
                    text => format!("OK {text}\r\n"),
                };
            }
            Reply::LoginFailed(message) => {
                let message = trimmed_or(message, "Authentication failed.");
                return format!("NO {}\r\n", quote(message));
            }
            Reply::Unavailable(message) => {
                let message = trimmed_or(message, "Service temporarily unavailable.");
                return format!("NO (TRYLATER) {}\r\n", quote(message));
            }
            Reply::Referral { host, message, .. } => {
                let message = trimmed_or(message, "Try this server instead.");
                let url = format!("sieve://{}", printable(host).replace(' ', ""));
                return format!("NO (REFERRAL {}) {}\r\n", quote(&url), quote(message));
            }
        };
        format!("{line}\r\n")
    }

    fn challenge(challenge: &str) -> String {
        format!("\"{challenge}\"\r\n")
    }

    fn parse(&mut self, buf: &[u8]) -> Parse<Command> {
        self.parser.command(buf)
    }

    async fn execute<A: Authenticator>(
        s: &mut Session<Self>,
        parsed: Parse<Command>,
        auth: &A,
    ) -> io::Result<Flow> {
        let Command { name, args } = match parsed {
            Parse::Done { value, .. } => value,
            Parse::Error(error) => return parse_error(s, error, COMMAND_ERROR).await,
            // Never handed over: the session reads on.
            Parse::Incomplete => return Ok(Flow::Continue),
        };
        match name {
            CommandName::Capability | CommandName::Logout | CommandName::Starttls
                if !args.is_empty() =>
            {
                invalid_arguments(s, &name).await
            }
            CommandName::Capability => {
                let text = format!("{}OK \"Capability completed.\"\r\n", capabilities(s));
                s.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Noop => match args.as_slice() {
                [] => {
                    s.send(b"OK \"NOOP completed.\"\r\n").await?;
                    Ok(Flow::Continue)
                }
                // RFC 5804 §2.14: the tag comes back in a TAG response code.
                [Token::String(tag)] => {
                    let mut line = b"OK (TAG ".to_vec();
                    line.extend_from_slice(&string_bytes(tag));
                    line.extend_from_slice(b") \"Done\"\r\n");
                    s.send(&line).await?;
                    Ok(Flow::Continue)
                }
                _ => invalid_arguments(s, &name).await,
            },
            CommandName::Logout => {
                s.send(b"OK \"Logout completed.\"\r\n").await?;
                Ok(Flow::Close)
            }
            CommandName::Starttls => match s.starttls().await? {
                Tls::Refused => Ok(Flow::Continue),
                Tls::Secured => {
                    // RFC 5804 §2.2: after the handshake the server sends its capabilities
                    // again.
                    let text = format!("{}OK \"TLS negotiation successful.\"\r\n", capabilities(s));
                    s.send(text.as_bytes()).await?;
                    Ok(Flow::Continue)
                }
                Tls::Failed(error) => Ok(s.handshake_failed(&error)),
            },
            // `AUTHENTICATE "PLAIN" [initial-response]` or `AUTHENTICATE "LOGIN"
            // [initial-response]` (RFC 5804 §2.1). Each challenge is a string of base64
            // (PLAIN: empty; LOGIN: `Username:`, then `Password:`; a LOGIN initial response
            // is the username), answered with a string or a literal; `"*"` cancels.
            CommandName::Authenticate => {
                let (mechanism, initial) = match args.as_slice() {
                    [mechanism] => (mechanism.as_string(), None),
                    [mechanism, Token::String(initial)] => {
                        (mechanism.as_string(), Some(initial.clone()))
                    }
                    _ => return invalid_arguments(s, &name).await,
                };
                let Some(mechanism) = mechanism else {
                    return invalid_arguments(s, &name).await;
                };
                s.authenticate(mechanism, initial, auth).await
            }
            CommandName::Other(_) => {
                let line = format!("{COMMAND_ERROR}\r\n");
                s.bad_command(line.as_bytes()).await
            }
        }
    }

    /// The client's answer: one string (quoted or literal) alone on its line.
    async fn sasl_response(s: &mut Session<Self>) -> io::Result<Answer> {
        Ok(
            match s
                .parse(|sieve, buf| sieve.parser.sasl_response(buf))
                .await?
            {
                Some(Parse::Done { value, .. }) if value == b"*" => Answer::Cancel,
                Some(Parse::Done { value, .. }) => Answer::Response(value),
                // Not a string: the exchange is over.
                Some(Parse::Error(error)) => Answer::Stop(
                    parse_error(s, error, "NO \"Invalid authentication response.\"").await?,
                ),
                Some(Parse::Incomplete) | None => Answer::Stop(Flow::Close),
            },
        )
    }

    fn tls_started(&mut self) {
        self.parser.reset();
    }

    /// `"*"` cancels already; an empty LOGIN initial response is none (the username is asked).
    fn initial_response(mechanism: &str, response: Vec<u8>) -> Option<Answer> {
        if response == b"*" {
            Some(Answer::Cancel)
        } else if response.is_empty() && mechanism.eq_ignore_ascii_case("LOGIN") {
            None
        } else {
            Some(Answer::Response(response))
        }
    }
}

/// The capability lines (each ending in CRLF), without the final `OK`. Without plaintext
/// authentication the SASL list is empty, as Dovecot sends it, until STARTTLS.
fn capabilities(s: &Session<ManageSieve>) -> String {
    let mut caps = String::from("\"IMPLEMENTATION\" \"Director\"\r\n");
    caps.push_str(&format!("\"SIEVE\" \"{SIEVE_EXTENSIONS}\"\r\n"));
    caps.push_str("\"NOTIFY\" \"mailto\"\r\n");
    caps.push_str(&format!(
        "\"SASL\" \"{}\"\r\n",
        s.advertised_mechanism_list()
    ));
    if s.offers_starttls() {
        caps.push_str("\"STARTTLS\"\r\n");
    }
    caps.push_str("\"VERSION\" \"1.0\"\r\n");
    caps
}

/// Answers a parse error: BYE and close if it is fatal, else `reply` (counted as an invalid
/// command).
async fn parse_error(
    s: &mut Session<ManageSieve>,
    error: ParseError,
    reply: &str,
) -> io::Result<Flow> {
    if error.fatal {
        s.bye(error.message).await;
        return Ok(Flow::Close);
    }
    s.bad_command(format!("{reply}\r\n").as_bytes()).await
}

/// Answers a command whose arguments are wrong, and counts it.
async fn invalid_arguments(s: &mut Session<ManageSieve>, name: &CommandName) -> io::Result<Flow> {
    let text = format!("Error in MANAGESIEVE command {name}: Invalid arguments.");
    s.bad_command(format!("NO {}\r\n", quote(&text)).as_bytes())
        .await
}

/// `text` without surrounding blanks, or `default` where that leaves nothing.
fn trimmed_or<'a>(text: &'a str, default: &'a str) -> &'a str {
    match text.trim() {
        "" => default,
        text => text,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::protocol::preauth::testing::{
        b64, closed, creds, established, tls_pair, Client, FakeAuth, Running as Session,
    };
    use crate::protocol::preauth::{testing, FrontendContext};

    const IMPLEMENTATION: &str = "\"IMPLEMENTATION\" \"Director\"";
    const SIEVE: &str = "\"SIEVE\" \"fileinto reject envelope encoded-character vacation \
        subaddress comparator-i;ascii-numeric relational regex imap4flags copy include \
        variables body enotify environment mailbox date index ihave duplicate mime \
        foreverypart extracttext\"";
    const NOTIFY: &str = "\"NOTIFY\" \"mailto\"";
    const SASL_PLAIN: &str = "\"SASL\" \"PLAIN LOGIN\"";
    const VERSION: &str = "\"VERSION\" \"1.0\"";

    /// The capability lines of a plain connection that allows plaintext logins.
    const CAPS: [&str; 5] = [IMPLEMENTATION, SIEVE, NOTIFY, SASL_PLAIN, VERSION];

    /// Starts a session on a fresh connection, with `adjust` applied to the context. The
    /// greeting is left for the test to read.
    async fn start(adjust: impl FnOnce(&mut FrontendContext)) -> (Client, Session, Arc<FakeAuth>) {
        let auth = FakeAuth::by_password("\"Logged in.\"");
        let (client, session) = testing::start::<ManageSieve>(&auth, adjust).await;
        (client, session, auth)
    }

    /// `AUTHENTICATE "PLAIN"` with `response` (base64-encoded here) as its initial response.
    fn plain_ir(response: &[u8]) -> String {
        format!("AUTHENTICATE \"PLAIN\" \"{}\"", b64(response))
    }

    /// `text` as a synchronising literal (which ManageSieve reads at once all the same).
    fn literal(text: &str) -> String {
        format!("{{{}}}\r\n{text}", text.len())
    }

    /// `text` as a non-synchronising literal.
    fn literal_plus(text: &str) -> String {
        format!("{{{}+}}\r\n{text}", text.len())
    }

    /// Like [`start`], and reads the usual greeting.
    async fn greeted_with(
        adjust: impl FnOnce(&mut FrontendContext),
    ) -> (Client, Session, Arc<FakeAuth>) {
        let (mut c, session, auth) = start(adjust).await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Director ready.\"").await;
        (c, session, auth)
    }

    /// Expects `last` as the last line, then the end of the connection and of the session,
    /// with no login.
    async fn closes_after(c: &mut Client, session: Session, last: &str) {
        c.expect(last).await;
        c.expect_closed().await;
        closed(session).await;
    }

    /// A session with the default context, greeted.
    async fn greeted() -> (Client, Session, Arc<FakeAuth>) {
        greeted_with(|_| {}).await
    }

    #[tokio::test]
    async fn capability_noop_and_logout() {
        let (mut c, session, auth) = greeted().await;
        c.send(b"capability\r\n").await;
        c.expect_lines(&CAPS).await;
        c.expect("OK \"Capability completed.\"").await;
        c.command("NOOP", "OK \"NOOP completed.\"").await;
        c.send(b"NOOP \"STARTTLS-SYNC-42\"\r\n").await;
        c.expect("OK (TAG \"STARTTLS-SYNC-42\") \"Done\"").await;
        // A tag that cannot be quoted comes back as a literal.
        c.send(b"NOOP {3+}\r\na\r\n\r\n").await;
        c.expect_lines(&["OK (TAG {3}", "a", ") \"Done\""]).await;
        c.command("LOGOUT", "OK \"Logout completed.\"").await;
        c.expect_closed().await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn authenticate_with_initial_response_and_pipelined_bytes() {
        let (mut c, session, auth) = greeted().await;
        let line = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\nLISTSCRIPTS\r\n",
            b64(b"\0alice\0secret")
        );
        c.send(line.as_bytes()).await;
        c.expect("OK \"Logged in.\"").await;
        let est = established(session).await;
        assert_eq!(est.username, "alice");
        assert_eq!(est.client_leftover, b"LISTSCRIPTS\r\n");
        let decisions = auth.decisions();
        assert_eq!(decisions[0].protocol, Protocol::Sieve);
        assert!(!decisions[0].secured);
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_with_literals_of_both_forms() {
        let (mut c, session, auth) = greeted().await;
        let response = b64(b"bob\0master\0pw");
        // `{n}` as Dovecot takes it: no continuation, the bytes follow at once.
        let line = format!(
            "Authenticate {{5}}\r\nPLAIN {{{}+}}\r\n{response}\r\n",
            response.len()
        );
        c.send(line.as_bytes()).await;
        c.expect("OK \"Logged in.\"").await;
        assert_eq!(established(session).await.username, "bob");
        assert_eq!(auth.credentials(), vec![creds("bob", "master", "pw")]);
    }

    #[tokio::test]
    async fn authenticate_login_with_challenges() {
        let (mut c, session, auth) = greeted().await;
        c.command("AUTHENTICATE \"LOGIN\"", "\"VXNlcm5hbWU6\"")
            .await;
        c.command(&format!("\"{}\"", b64(b"alice")), "\"UGFzc3dvcmQ6\"")
            .await;
        c.command("\"*\"", "NO \"Authentication aborted by client.\"")
            .await;
        c.command("authenticate \"login\"", "\"VXNlcm5hbWU6\"")
            .await;
        c.command(&format!("\"{}\"", b64(b"alice")), "\"UGFzc3dvcmQ6\"")
            .await;
        c.send(b"\"!!!\"\r\n").await;
        c.expect("NO \"Invalid base64 data in authentication response.\"")
            .await;
        // Answers as literals of both forms.
        c.command("AUTHENTICATE \"LOGIN\"", "\"VXNlcm5hbWU6\"")
            .await;
        let (user, password) = (b64(b"alice"), b64(b"se cret"));
        c.command(&literal_plus(&user), "\"UGFzc3dvcmQ6\"").await;
        c.command(&literal(&password), "OK \"Logged in.\"").await;
        established(session).await;
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "se cret")]);
    }

    #[tokio::test]
    async fn authenticate_login_with_initial_response() {
        let (mut c, session, auth) = greeted().await;
        let login = format!("AUTHENTICATE \"LOGIN\" \"{}\"", b64(b"alice"));
        c.command(&login, "\"UGFzc3dvcmQ6\"").await;
        let wrong = format!("\"{}\"", b64(b"wrong"));
        c.command(&wrong, "NO \"Authentication failed.\"").await;
        c.command(&login, "\"UGFzc3dvcmQ6\"").await;
        c.send(format!("\"{}\"\r\nLISTSCRIPTS\r\n", b64(b"secret")).as_bytes())
            .await;
        c.expect("OK \"Logged in.\"").await;
        let est = established(session).await;
        assert_eq!(est.client_leftover, b"LISTSCRIPTS\r\n");
        assert_eq!(
            auth.credentials(),
            vec![
                creds("alice", "alice", "wrong"),
                creds("alice", "alice", "secret")
            ]
        );
    }

    #[tokio::test]
    async fn authenticate_with_a_challenge() {
        let (mut c, session, auth) = greeted().await;
        c.command("AUTHENTICATE \"PLAIN\"", "\"\"").await;
        c.command("\"*\"", "NO \"Authentication aborted by client.\"")
            .await;
        c.command("AUTHENTICATE \"PLAIN\"", "\"\"").await;
        c.send(b"bare-base64\r\n").await;
        c.expect("NO \"Invalid authentication response.\"").await;
        c.command("AUTHENTICATE \"PLAIN\"", "\"\"").await;
        let response = b64(b"\0alice\0secret");
        c.command(&literal_plus(&response), "OK \"Logged in.\"")
            .await;
        established(session).await;
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn bad_authentications() {
        let (mut c, session, auth) = greeted().await;
        c.send(b"AUTHENTICATE \"CRAM-MD5\"\r\n").await;
        c.expect("NO \"Unsupported authentication mechanism.\"")
            .await;
        c.send(b"AUTHENTICATE \"PLAIN\" \"!!!\"\r\n").await;
        c.expect("NO \"Invalid base64 data in authentication response.\"")
            .await;
        // A malformed PLAIN response is a failed login, and no login is tried.
        c.command(&plain_ir(b"alice"), "NO \"Authentication failed.\"")
            .await;
        c.send(b"AUTHENTICATE\r\n").await;
        c.expect("NO \"Error in MANAGESIEVE command AUTHENTICATE: Invalid arguments.\"")
            .await;
        c.command("LOGOUT", "OK \"Logout completed.\"").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn plaintext_disabled_on_untrusted_plain_connections() {
        let (mut c, session, auth) = start(|ctx| ctx.disable_plaintext_auth = true).await;
        c.expect_lines(&[IMPLEMENTATION, SIEVE, NOTIFY, "\"SASL\" \"\"", VERSION])
            .await;
        c.expect("OK \"Director ready.\"").await;
        c.command(&plain_ir(b"\0alice\0secret"), ENCRYPT_NEEDED)
            .await;
        c.command("LOGOUT", "OK \"Logout completed.\"").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());

        let (mut c, session, _) = greeted_with(|ctx| {
            ctx.disable_plaintext_auth = true;
            ctx.trusted = true;
        })
        .await;
        c.command(&plain_ir(b"\0alice\0secret"), "OK \"Logged in.\"")
            .await;
        established(session).await;
    }

    #[tokio::test]
    async fn failed_and_unavailable_logins_then_success() {
        let (mut c, session, auth) = greeted().await;
        for (password, reply) in [
            ("wrong", "NO \"Authentication failed.\""),
            ("unavail", "NO (TRYLATER) \"No backend available.\""),
            ("wrong", "NO \"Authentication failed.\""),
            ("secret", "OK \"Logged in.\""),
        ] {
            let response = format!("\0alice\0{password}");
            c.command(&plain_ir(response.as_bytes()), reply).await;
        }
        established(session).await;
        assert_eq!(auth.decisions().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_the_connection_after_a_delay() {
        let (mut c, session, _) = greeted_with(|ctx| {
            ctx.limits.auth_failure_delay = Duration::from_secs(2);
        })
        .await;
        let started = tokio::time::Instant::now();
        let wrong = plain_ir(b"\0alice\0wrong");
        for _ in 0..3 {
            c.command(&wrong, "NO \"Authentication failed.\"").await;
        }
        assert!(started.elapsed() >= Duration::from_secs(6));
        closes_after(
            &mut c,
            session,
            "BYE \"Too many invalid authentication attempts.\"",
        )
        .await;
    }

    #[tokio::test]
    async fn unknown_and_invalid_commands() {
        let (mut c, session, _) = greeted_with(|ctx| ctx.limits.max_bad_commands = 4).await;
        c.command("LISTSCRIPTS", COMMAND_ERROR).await;
        c.command("NOOP \"open", COMMAND_ERROR).await;
        c.send(b"CAPABILITY \"x\"\r\n").await;
        c.expect("NO \"Error in MANAGESIEVE command CAPABILITY: Invalid arguments.\"")
            .await;
        c.command("\"x\"", COMMAND_ERROR).await;
        closes_after(
            &mut c,
            session,
            "BYE \"Too many invalid MANAGESIEVE commands.\"",
        )
        .await;
    }

    #[tokio::test]
    async fn oversized_input_is_refused() {
        let (mut c, session, _) = greeted().await;
        c.send(b"AUTHENTICATE \"PLAIN\" {1000+}\r\n").await;
        closes_after(&mut c, session, "BYE \"Literal too large.\"").await;

        let (mut c, session, _) = greeted().await;
        c.command("AUTHENTICATE \"PLAIN\"", "\"\"").await;
        c.send(&[b'A'; 300]).await;
        closes_after(&mut c, session, "BYE \"Too long command line.\"").await;
    }

    #[tokio::test(start_paused = true)]
    async fn preauth_timeout() {
        let (mut c, session, _) = greeted().await;
        let started = tokio::time::Instant::now();
        c.command("NOOP", "OK \"NOOP completed.\"").await;
        c.expect("BYE \"Disconnected for inactivity.\"").await;
        c.expect_closed().await;
        assert!(started.elapsed() >= Duration::from_secs(59));
        closed(session).await;
    }

    #[tokio::test]
    async fn starttls_without_certificate_is_refused() {
        let (mut c, session, _) = greeted().await;
        c.command("STARTTLS", "NO \"TLS support isn't enabled.\"")
            .await;
        drop(c);
        closed(session).await;
    }

    #[tokio::test]
    async fn starttls_discards_injected_commands_and_resends_capabilities() {
        let (mut c, session, auth) = start(|ctx| {
            ctx.starttls = Some(tls_pair().0);
            ctx.disable_plaintext_auth = true;
        })
        .await;
        c.expect_lines(&[
            IMPLEMENTATION,
            SIEVE,
            NOTIFY,
            "\"SASL\" \"\"",
            "\"STARTTLS\"",
            VERSION,
        ])
        .await;
        c.expect("OK \"Director ready.\"").await;
        // A man in the middle appends a command after STARTTLS, in the same packet.
        let injected = format!(
            "STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            b64(b"\0mallory\0secret")
        );
        c.send(injected.as_bytes()).await;
        c.expect("OK \"Begin TLS negotiation now.\"").await;
        assert!(c.reader.buffer().is_empty());
        let tcp = c.reader.into_inner();
        let tls = tls_pair()
            .1
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client::new(tls);
        // RFC 5804 §2.2: the capabilities again, now with SASL and without STARTTLS.
        c.expect_lines(&CAPS).await;
        c.expect("OK \"TLS negotiation successful.\"").await;
        c.command("STARTTLS", "NO \"TLS is already active.\"").await;
        c.command(&plain_ir(b"\0alice\0secret"), "OK \"Logged in.\"")
            .await;
        let est = established(session).await;
        assert!(est.client.is_tls());
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1, "the injected AUTHENTICATE ran");
        assert_eq!(decisions[0].credentials.username, "alice");
        assert!(decisions[0].secured);
    }
}

/// With an auth service in front: the SASL capability lists its mechanisms, and the
/// exchange is relayed.
#[cfg(test)]
mod auth_service_tests {
    use super::*;
    use crate::protocol::preauth::testing::{self, b64, established, FakeAuth};

    #[tokio::test]
    async fn the_sasl_capability_lists_the_services_mechanisms_and_the_exchange_is_relayed() {
        let auth = FakeAuth::with_service();
        let (mut c, session) = testing::start::<ManageSieve>(&auth, |ctx| {
            ctx.disable_plaintext_auth = true;
        })
        .await;
        let mut caps = Vec::new();
        while let Some(line) = c.line().await {
            if line.starts_with("OK") {
                break;
            }
            caps.push(line);
        }
        // Plaintext logins are not allowed here: only CRAM-MD5 is offered.
        assert!(
            caps.contains(&"\"SASL\" \"CRAM-MD5\"".to_owned()),
            "{caps:?}"
        );
        c.command(
            "AUTHENTICATE \"CRAM-MD5\"",
            &format!("\"{}\"", b64(b"<1.2@fake>")),
        )
        .await;
        c.command(&format!("\"{}\"", b64(b"alice 0123")), "OK Logged in")
            .await;
        assert_eq!(established(session).await.username, "alice");
    }
}
