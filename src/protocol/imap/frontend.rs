//! The IMAP pre-authentication session, as Dovecot's imap-login runs it: greeting,
//! CAPABILITY, NOOP, ID, STARTTLS, LOGOUT, and LOGIN / AUTHENTICATE (PLAIN, LOGIN; SASL-IR).
//!
//! IMAP's grammar lives in [`super::command`]; this file holds its commands and replies, as a
//! `Dialect` of the pre-authentication core ([`crate::protocol::preauth`]), which owns the
//! connection, the limits, STARTTLS, the SASL exchange and the login.

use std::borrow::Cow;
use std::io;

use super::command::{Arg, Command, CommandName, CommandParser, Parse, ParseError};
use crate::protocol::decision::{Credentials, Protocol};
use crate::protocol::preauth::{
    printable, Answer, Authenticator, ClientCredentials, Dialect, Flow, Parsed, PreauthLimits,
    Reply, Session, Tls,
};

/// Capabilities offered before login, whatever the connection. STARTTLS and the
/// authentication mechanisms (or LOGINDISABLED) follow, depending on the connection.
const BASE_CAPABILITIES: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+";

const PRIVACY_REQUIRED: &str =
    "NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.";

/// IMAP before login.
pub(crate) struct Imap {
    parser: CommandParser,
    /// The tag of the command being answered.
    tag: String,
}

impl Parsed for Parse {
    type Found = Parse;

    fn found(self) -> Option<(usize, Parse)> {
        let consumed = match &self {
            Parse::Incomplete => return None,
            Parse::NeedContinuation => 0,
            Parse::Command { consumed, .. } => *consumed,
            Parse::Error(error) => error.consumed,
        };
        Some((consumed, self))
    }
}

impl Dialect for Imap {
    const PROTOCOL: Protocol = Protocol::Imap;
    const EVICTED_CODE: &'static str = "[UNAVAILABLE] ";
    const TOO_MANY_COMMANDS: &'static str = "Too many invalid IMAP commands.";

    type ReadChunk = [u8; 2048];
    type Parse = Parse;

    fn new(limits: &PreauthLimits) -> Self {
        Imap {
            parser: CommandParser::new(limits.max_line, limits.max_literal),
            tag: String::new(),
        }
    }

    fn buffer_cap(limits: &PreauthLimits) -> usize {
        // `+ 2`: room for a SASL response line of `max_literal` bytes and its CRLF, and for
        // the byte past a limit that shows it was crossed.
        limits.max_line + limits.max_literal + 2
    }

    fn greeting(s: &Session<Self>) -> String {
        // One per connection: written into one string, without format!.
        let text = printable(&s.ctx.greeting);
        let mut line = String::with_capacity(192 + text.len());
        line.push_str("* OK [CAPABILITY ");
        push_capabilities(s, &mut line);
        line.push_str("] ");
        line.push_str(&text);
        line.push_str("\r\n");
        line
    }

    fn bye(text: &str) -> String {
        format!("* BYE {text}\r\n")
    }

    fn reply(s: &Session<Self>, reply: Reply<'_>) -> String {
        let tag = &s.dialect.tag;
        let text = match reply {
            Reply::TlsActive => "BAD TLS is already active.",
            Reply::TlsDisabled => "BAD TLS support isn't enabled.",
            Reply::TlsBegin => "OK Begin TLS negotiation now.",
            Reply::PlaintextDisallowed => PRIVACY_REQUIRED,
            Reply::UnsupportedMechanism => "NO Unsupported authentication mechanism.",
            Reply::Aborted => "BAD Authentication aborted by client.",
            Reply::NotBase64 => "BAD Invalid base64 data in authentication response.",
            Reply::LoggedIn(text) => {
                // The backend's capability list, sent on every login: built without format!.
                let text = printable(text);
                let mut line = String::with_capacity(tag.len() + text.len() + 6);
                line.push_str(tag);
                line.push_str(" OK ");
                line.push_str(&text);
                line.push_str("\r\n");
                return line;
            }
            Reply::LoginFailed(message) => {
                let message = printable_or(message, "Authentication failed.");
                return format!("{tag} NO [AUTHENTICATIONFAILED] {message}\r\n");
            }
            Reply::Unavailable(message) => {
                let message = printable_or(message, "Service temporarily unavailable.");
                return format!("{tag} NO [UNAVAILABLE] {message}\r\n");
            }
            Reply::Referral {
                user,
                host,
                message,
            } => {
                // RFC 2221 login referral, with an IMAP URL (RFC 5092) naming the user.
                let message = printable_or(message, "Try this server instead.");
                let (user, host) = (url_escaped(user), url_escaped(host));
                return format!("{tag} NO [REFERRAL imap://{user};AUTH=*@{host}/] {message}\r\n");
            }
        };
        format!("{tag} {text}\r\n")
    }

    fn parse(&mut self, buf: &[u8]) -> Parse {
        self.parser.parse(buf)
    }

    async fn execute<A: Authenticator>(
        s: &mut Session<Self>,
        parsed: Parse,
        auth: &A,
    ) -> io::Result<Flow> {
        let Command { tag, name, args } = match parsed {
            Parse::Command { command, .. } => command,
            Parse::NeedContinuation => {
                s.send(b"+ Ready for literal data\r\n").await?;
                return Ok(Flow::Continue);
            }
            Parse::Error(error) => return syntax_error(s, error).await,
            // Never handed over: the session reads on.
            Parse::Incomplete => return Ok(Flow::Continue),
        };
        s.dialect.tag = tag;
        match name {
            CommandName::Capability
            | CommandName::Noop
            | CommandName::Logout
            | CommandName::Starttls
                if !args.is_empty() =>
            {
                invalid_arguments(s, &name).await
            }
            CommandName::Capability => {
                let text = format!(
                    "* CAPABILITY {}\r\n{} OK Pre-login capabilities listed, post-login \
                     capabilities have more.\r\n",
                    capabilities(s),
                    s.dialect.tag
                );
                s.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Noop => {
                let text = format!("{} OK NOOP completed.\r\n", s.dialect.tag);
                s.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Logout => {
                let text = format!(
                    "* BYE Logging out\r\n{} OK Logout completed.\r\n",
                    s.dialect.tag
                );
                s.send(text.as_bytes()).await?;
                Ok(Flow::Close)
            }
            CommandName::Id => {
                if !valid_id_args(&args) {
                    return invalid_arguments(s, &name).await;
                }
                adopt_originating_client(s, &args);
                let text = format!(
                    "* ID (\"name\" \"director\")\r\n{} OK ID completed.\r\n",
                    s.dialect.tag
                );
                s.send(text.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            CommandName::Starttls => match s.starttls().await? {
                Tls::Refused | Tls::Secured => Ok(Flow::Continue),
                Tls::Failed(error) => Ok(s.handshake_failed(&error)),
            },
            CommandName::Login => {
                let [user, password] = args.as_slice() else {
                    return invalid_arguments(s, &name).await;
                };
                let (Some(user), Some(password)) = (user.astring(), password.astring()) else {
                    return invalid_arguments(s, &name).await;
                };
                if !s.plaintext_allowed() {
                    s.answer(Reply::PlaintextDisallowed).await?;
                    return Ok(Flow::Continue);
                }
                let credentials = match (text(user), text(password)) {
                    (Some(user), Some(password)) if !user.is_empty() => {
                        ClientCredentials::Valid(Credentials::plain(user, password))
                    }
                    _ => ClientCredentials::Invalid,
                };
                s.login_with(credentials, auth).await
            }
            CommandName::Authenticate => {
                let (mechanism, initial) = match args.as_slice() {
                    [Arg::Atom(mechanism)] => (mechanism, None),
                    [Arg::Atom(mechanism), Arg::Atom(initial)] => {
                        (mechanism, Some(initial.as_bytes().to_vec()))
                    }
                    _ => return invalid_arguments(s, &name).await,
                };
                s.authenticate(mechanism.as_bytes(), initial, auth).await
            }
            CommandName::Other(_) => {
                let line = format!("{} BAD Unknown command.\r\n", s.dialect.tag);
                s.bad_command(line.as_bytes()).await
            }
        }
    }

    /// One SASL response line, at most `max_literal` bytes.
    async fn sasl_response(s: &mut Session<Self>) -> io::Result<Answer> {
        let max = s.ctx.limits.max_literal;
        let line = s
            .parse(|_, buf| match buf.iter().position(|b| *b == b'\n') {
                Some(lf) => {
                    let line = &buf[..lf];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    Some((lf + 1, Some(line.to_vec())))
                }
                None if buf.len() > max + 1 => Some((0, None)),
                None => None,
            })
            .await?;
        Ok(match line {
            None => Answer::Stop(Flow::Close),
            Some(Some(line)) if line.len() <= max => match line.as_slice() {
                b"*" => Answer::Cancel,
                _ => Answer::Response(line),
            },
            Some(_) => {
                let text = format!(
                    "{} BAD Authentication response too long.\r\n",
                    s.dialect.tag
                );
                s.send(text.as_bytes()).await?;
                s.bye("Too long authentication response.").await;
                Answer::Stop(Flow::Close)
            }
        })
    }

    fn tls_started(&mut self) {
        self.parser.reset();
    }
}

/// The capabilities for this connection.
fn capabilities(s: &Session<Imap>) -> String {
    let mut caps = String::with_capacity(192);
    push_capabilities(s, &mut caps);
    caps
}

/// Appends the pre-login capabilities to `caps`.
fn push_capabilities(s: &Session<Imap>, caps: &mut String) {
    caps.push_str(BASE_CAPABILITIES);
    if s.offers_starttls() {
        caps.push_str(" STARTTLS");
    }
    for mechanism in s.advertised_mechanisms() {
        caps.push_str(" AUTH=");
        caps.push_str(mechanism);
    }
    if !s.plaintext_allowed() {
        caps.push_str(" LOGINDISABLED");
    }
}

/// Answers a parse error. [`Flow::Close`]: close the connection.
async fn syntax_error(s: &mut Session<Imap>, error: ParseError) -> io::Result<Flow> {
    if error.fatal {
        if let (Some(tag), Some(code)) = (&error.tag, error.code) {
            let line = format!("{tag} BAD [{code}] {}\r\n", error.message);
            s.send(line.as_bytes()).await?;
        }
        s.bye(&error.message).await;
        return Ok(Flow::Close);
    }
    let line = match (&error.tag, error.code, &error.command) {
        (None, _, _) => "* BAD Error in IMAP command received by server.\r\n".to_owned(),
        (Some(tag), Some(code), _) => format!("{tag} BAD [{code}] {}\r\n", error.message),
        (Some(tag), None, Some(name)) => {
            format!(
                "{tag} BAD Error in IMAP command {name}: {}\r\n",
                error.message
            )
        }
        (Some(tag), None, None) => {
            format!("{tag} BAD Error in IMAP command received by server.\r\n")
        }
    };
    s.bad_command(line.as_bytes()).await
}

/// Answers `tag BAD Error in IMAP command NAME: Invalid arguments.` and counts it.
async fn invalid_arguments(s: &mut Session<Imap>, name: &CommandName) -> io::Result<Flow> {
    let line = format!(
        "{} BAD Error in IMAP command {name}: Invalid arguments.\r\n",
        s.dialect.tag
    );
    s.bad_command(line.as_bytes()).await
}

/// A trusted client (a webmail front end) tells in `ID` who its user really is: its
/// `x-originating-ip`/`-port` become the client address from then on (the backend's `ID`,
/// the logs) and its `x-session-ext-id` goes to the backend, as Dovecot does for its
/// `login_trusted_networks`. From other clients these fields are ignored.
fn adopt_originating_client(s: &mut Session<Imap>, args: &[Arg]) {
    let fields = super::command::originating_fields(args);
    let session = s.ctx.identity.session_id.clone();
    if !s.ctx.trusted {
        if fields != super::command::OriginatingFields::default() {
            tracing::debug!(session = %session, client = %s.ctx.identity.client,
                "ID originating-client fields from an untrusted client ignored");
        }
        return;
    }
    for (key, value) in &fields.rejected {
        tracing::debug!(session = %session, field = key, value = %crate::untrusted::shown_bytes(value),
            "ID field from a trusted client ignored: not a valid value");
    }
    let identity = &mut s.ctx.identity;
    let before = identity.client;
    if let Some(ip) = fields.ip {
        identity.client.set_ip(ip);
    }
    if let Some(port) = fields.port {
        identity.client.set_port(port);
    }
    if let Some(ext) = fields.session_ext_id {
        tracing::debug!(session = %session, session_ext_id = %crate::untrusted::shown(&ext),
            "session id of the trusted client");
        identity.session_ext_id = Some(ext);
    }
    if identity.client != before {
        tracing::debug!(session = %session, peer = %before, client = %identity.client,
            "client address from a trusted client's ID");
    }
}

/// ID's argument: NIL, or a list of field/value pairs (field a string, value a string or NIL).
fn valid_id_args(args: &[Arg]) -> bool {
    match args {
        [Arg::Nil] => true,
        [Arg::List(items)] => {
            items.len() % 2 == 0
                && items.chunks(2).all(|pair| {
                    matches!(pair[0].nstring(), Some(Some(_))) && pair[1].nstring().is_some()
                })
        }
        _ => false,
    }
}

/// A client's string as text; `None` if it is not UTF-8.
fn text(bytes: &[u8]) -> Option<String> {
    String::from_utf8(bytes.to_vec()).ok()
}

/// `text` made printable, or `default` where that leaves nothing but blanks.
/// `text` for an IMAP URL: what is not unreserved (RFC 3986) or `:` percent-encoded.
fn url_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn printable_or<'a>(text: &'a str, default: &'static str) -> Cow<'a, str> {
    match printable(text) {
        text if text.trim().is_empty() => Cow::Borrowed(default),
        text => text,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::protocol::decision::Secret;
    use crate::protocol::preauth::testing::{
        b64, closed, creds, established, tls_pair, Client, FakeAuth, Running as Session,
    };
    use crate::protocol::preauth::{testing, FrontendContext};

    /// Starts a session on a fresh connection, with `adjust` applied to the context, and reads
    /// the greeting.
    async fn start(
        adjust: impl FnOnce(&mut FrontendContext),
    ) -> (Client, Session, Arc<FakeAuth>, String) {
        let auth = FakeAuth::by_password("[CAPABILITY IMAP4rev1 IDLE] Logged in");
        let (mut client, session) = testing::start::<Imap>(&auth, adjust).await;
        let greeting = client.line().await.unwrap();
        (client, session, auth, greeting)
    }

    const CAPS: &str =
        "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN";

    #[tokio::test]
    async fn greeting_capability_noop_id_logout() {
        let (mut c, session, auth, greeting) = start(|_| {}).await;
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {CAPS}] Director ready.")
        );
        c.command("a CAPABILITY", &format!("* CAPABILITY {CAPS}"))
            .await;
        c.expect("a OK Pre-login capabilities listed, post-login capabilities have more.")
            .await;
        c.send(b"b noop\r\nc ID (\"name\" \"test\" \"version\" NIL)\r\nd ID NIL\r\n")
            .await;
        c.expect("b OK NOOP completed.").await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("c OK ID completed.").await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("d OK ID completed.").await;
        c.send(b"e ID (\"name\")\r\n").await;
        c.expect("e BAD Error in IMAP command ID: Invalid arguments.")
            .await;
        c.command("f LOGOUT", "* BYE Logging out").await;
        c.expect("f OK Logout completed.").await;
        c.expect_closed().await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn id_from_a_trusted_client_changes_its_address() {
        const ID: &[u8] = b"i ID (\"name\" \"webmail\" \"x-originating-ip\" \"192.0.2.9\" \
            \"X-Originating-Port\" \"51234\" \"x-session-ext-id\" \"abc123\")\r\n";
        let (mut c, session, auth, _) = start(|ctx| ctx.trusted = true).await;
        c.send(ID).await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("i OK ID completed.").await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        let d = &auth.decisions()[0];
        assert_eq!(d.identity.client, "192.0.2.9:51234".parse().unwrap());
        assert_eq!(d.identity.session_ext_id.as_deref(), Some("abc123"));
        assert_eq!(d.identity.session_id, "s1", "our own id stays");
        assert_eq!(
            est.identity, d.identity,
            "the session's log line uses it too"
        );

        // From an untrusted client the same ID is answered alike and changes nothing.
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(ID).await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("i OK ID completed.").await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        let d = &auth.decisions()[0];
        let peer = d.identity.client;
        assert_eq!(peer.ip().to_string(), "127.0.0.1", "the TCP peer stays");
        assert_ne!(peer.port(), 51234);
        assert_eq!(d.identity.session_ext_id, None);

        // Invalid values from a trusted client are ignored, valid ones next to them kept.
        let (mut c, session, auth, _) = start(|ctx| ctx.trusted = true).await;
        c.send(
            b"i ID (\"x-originating-ip\" \"192.0.2.999\" \"x-originating-port\" \"70000\" \
            \"x-session-ext-id\" \"a\\\"b c\")\r\nj ID (\"x-originating-port\" \"4000\")\r\n",
        )
        .await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("i OK ID completed.").await;
        c.expect("* ID (\"name\" \"director\")").await;
        c.expect("j OK ID completed.").await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        let d = &auth.decisions()[0];
        assert_eq!(d.identity.client, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(d.identity.session_ext_id, None);
    }

    #[tokio::test]
    async fn login_with_atoms() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        assert_eq!(est.username, "alice");
        assert!(est.client_leftover.is_empty());
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1);
        let d = &decisions[0];
        assert_eq!(d.protocol, Protocol::Imap);
        assert_eq!(d.credentials, Credentials::plain("alice", "secret"));
        assert_eq!(d.identity.session_id, "s1");
        assert!(!d.secured);
    }

    #[tokio::test]
    async fn login_with_quoted_strings() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a login \"al ice\" \"p\\\"w\\\\d\"\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(
            auth.credentials(),
            vec![creds("al ice", "al ice", "p\"w\\d")]
        );
    }

    #[tokio::test]
    async fn login_with_synchronising_literals() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command("a LOGIN {5}", "+ Ready for literal data").await;
        c.command("alice {7}", "+ Ready for literal data").await;
        c.send(b"se\"c\r\nt\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(
            auth.credentials(),
            vec![creds("alice", "alice", "se\"c\r\nt")]
        );
    }

    #[tokio::test]
    async fn login_with_non_synchronising_literals_and_pipelined_bytes() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb SELECT INBOX\r\nc NOOP\r\n")
            .await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        assert_eq!(est.client_leftover, b"b SELECT INBOX\r\nc NOOP\r\n");
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_plain_with_initial_response() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        let line = format!("a AUTHENTICATE PLAIN {}\r\n", b64(b"bob\0master\0pw"));
        c.send(line.as_bytes()).await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        assert_eq!(established(session).await.username, "bob");
        assert_eq!(auth.credentials(), vec![creds("bob", "master", "pw")]);
    }

    #[tokio::test]
    async fn authenticate_plain_with_continuation() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command("a authenticate plain", "+ ").await;
        c.send(format!("{}\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_login() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command("a AUTHENTICATE LOGIN", "+ VXNlcm5hbWU6").await;
        c.command(&b64(b"alice"), "+ UGFzc3dvcmQ6").await;
        c.send(format!("{}\r\n", b64(b"secret")).as_bytes()).await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(auth.credentials(), vec![creds("alice", "alice", "secret")]);
    }

    #[tokio::test]
    async fn authenticate_cancelled_and_bad_responses() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command("a AUTHENTICATE PLAIN", "+ ").await;
        c.command("*", "a BAD Authentication aborted by client.")
            .await;
        c.send(b"b AUTHENTICATE PLAIN !!!\r\n").await;
        c.expect("b BAD Invalid base64 data in authentication response.")
            .await;
        c.send(b"c AUTHENTICATE CRAM-MD5\r\n").await;
        c.expect("c NO Unsupported authentication mechanism.").await;
        // A malformed PLAIN response is a failed login, not a crash.
        c.send(format!("d AUTHENTICATE PLAIN {}\r\n", b64(b"alice")).as_bytes())
            .await;
        c.expect("d NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"e AUTHENTICATE PLAIN =\r\n").await;
        c.expect("e NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.command("f LOGOUT", "* BYE Logging out").await;
        c.expect("f OK Logout completed.").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn plaintext_disabled_on_untrusted_plain_connections() {
        let (mut c, session, auth, greeting) = start(|ctx| ctx.disable_plaintext_auth = true).await;
        let caps = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ LOGINDISABLED";
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {caps}] Director ready.")
        );
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect(&format!("a {PRIVACY_REQUIRED}")).await;
        c.send(format!("b AUTHENTICATE PLAIN {}\r\n", b64(b"\0alice\0secret")).as_bytes())
            .await;
        c.expect(&format!("b {PRIVACY_REQUIRED}")).await;
        c.command("c LOGOUT", "* BYE Logging out").await;
        c.expect("c OK Logout completed.").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());

        let (mut c, session, _, greeting) = start(|ctx| {
            ctx.disable_plaintext_auth = true;
            ctx.trusted = true;
        })
        .await;
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {CAPS}] Director ready.")
        );
        c.send(b"a LOGIN alice secret\r\n").await;
        c.expect("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
    }

    #[tokio::test]
    async fn failed_login_then_success() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN alice wrong\r\n").await;
        c.expect("a NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"b LOGIN alice unavail\r\n").await;
        c.expect("b NO [UNAVAILABLE] No backend available.").await;
        c.send(b"c LOGIN alice wrong\r\n").await;
        c.expect("c NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"d LOGIN alice secret\r\n").await;
        c.expect("d OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        established(session).await;
        assert_eq!(auth.decisions().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_the_connection_after_a_delay() {
        let (mut c, session, _, _) = start(|ctx| {
            ctx.limits.auth_failure_delay = Duration::from_secs(2);
        })
        .await;
        let started = tokio::time::Instant::now();
        for tag in ["a", "b", "c"] {
            c.send(format!("{tag} LOGIN alice wrong\r\n").as_bytes())
                .await;
            c.expect(&format!(
                "{tag} NO [AUTHENTICATIONFAILED] Authentication failed."
            ))
            .await;
        }
        assert!(started.elapsed() >= Duration::from_secs(6));
        c.expect("* BYE Too many invalid authentication attempts.")
            .await;
        c.expect_closed().await;
        closed(session).await;
    }

    #[tokio::test]
    async fn invalid_usernames_fail_without_a_login() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.send(b"a LOGIN {2+}\r\n\xff\xfe secret\r\n").await;
        c.expect("a NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"b LOGIN \"\" secret\r\n").await;
        c.expect("b NO [AUTHENTICATIONFAILED] Authentication failed.")
            .await;
        c.send(b"c LOGIN alice\r\n").await;
        c.expect("c BAD Error in IMAP command LOGIN: Invalid arguments.")
            .await;
        c.command("d LOGOUT", "* BYE Logging out").await;
        c.expect("d OK Logout completed.").await;
        closed(session).await;
        assert!(auth.decisions().is_empty());
    }

    #[tokio::test]
    async fn unknown_and_invalid_commands() {
        let (mut c, session, _, _) = start(|ctx| ctx.limits.max_bad_commands = 4).await;
        c.command("a SELECT INBOX", "a BAD Unknown command.").await;
        c.send(b"garbage\r\n").await;
        c.expect("garbage BAD Error in IMAP command received by server.")
            .await;
        c.send(b"* x\r\n").await;
        c.expect("* BAD Error in IMAP command received by server.")
            .await;
        c.send(b"b LOGIN \"open\r\n").await;
        c.expect("b BAD Error in IMAP command LOGIN: Missing '\"'.")
            .await;
        c.expect("* BYE Too many invalid IMAP commands.").await;
        c.expect_closed().await;
        closed(session).await;
    }

    #[tokio::test]
    async fn oversized_input_is_refused() {
        let (mut c, session, _, _) = start(|_| {}).await;
        c.command("a LOGIN {1000}", "a BAD [TOOBIG] Literal too large.")
            .await;
        c.command("b AUTHENTICATE PLAIN", "+ ").await;
        c.send(&[b'A'; 300]).await;
        c.expect("b BAD Authentication response too long.").await;
        c.expect("* BYE Too long authentication response.").await;
        c.expect_closed().await;
        closed(session).await;

        let (mut c, session, _, _) = start(|_| {}).await;
        c.send(&[b'a'; 400]).await;
        c.expect("* BYE Too long command line.").await;
        c.expect_closed().await;
        closed(session).await;
    }

    #[tokio::test(start_paused = true)]
    async fn preauth_timeout() {
        let (mut c, session, _, _) = start(|_| {}).await;
        let started = tokio::time::Instant::now();
        c.command("a NOOP", "a OK NOOP completed.").await;
        c.expect("* BYE Disconnected for inactivity.").await;
        c.expect_closed().await;
        assert!(started.elapsed() >= Duration::from_secs(59));
        closed(session).await;
    }

    #[tokio::test]
    async fn starttls_without_certificate_is_refused() {
        let (mut c, session, _, _) = start(|_| {}).await;
        c.command("a STARTTLS", "a BAD TLS support isn't enabled.")
            .await;
        drop(c);
        closed(session).await;
    }

    #[tokio::test]
    async fn starttls_discards_injected_commands_and_enables_login() {
        let (acceptor, connector) = tls_pair();
        let (mut c, session, auth, greeting) = start(|ctx| {
            ctx.starttls = Some(acceptor);
            ctx.disable_plaintext_auth = true;
        })
        .await;
        let plain_caps =
            "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED";
        assert_eq!(
            greeting,
            format!("* OK [CAPABILITY {plain_caps}] Director ready.")
        );
        // A man in the middle appends a command after STARTTLS, in the same packet.
        c.send(b"a STARTTLS\r\nx LOGIN mallory secret\r\n").await;
        c.expect("a OK Begin TLS negotiation now.").await;
        assert!(c.reader.buffer().is_empty());
        let tcp = c.reader.into_inner();
        let tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client::new(tls);
        c.command("b CAPABILITY", &format!("* CAPABILITY {CAPS}"))
            .await;
        c.expect("b OK Pre-login capabilities listed, post-login capabilities have more.")
            .await;
        c.command("c STARTTLS", "c BAD TLS is already active.")
            .await;
        c.send(b"d LOGIN alice secret\r\n").await;
        c.expect("d OK [CAPABILITY IMAP4rev1 IDLE] Logged in").await;
        let est = established(session).await;
        assert!(est.client.is_tls());
        let decisions = auth.decisions();
        assert_eq!(decisions.len(), 1, "the injected LOGIN ran");
        assert_eq!(decisions[0].credentials.username, "alice");
        assert!(decisions[0].secured);
    }

    #[test]
    fn secrets_stay_hidden() {
        assert!(!format!("{:?}", Secret::new("hunter2")).contains("hunter2"));
    }
}

/// With an auth service in front: what is advertised, and the SASL exchange relayed.
#[cfg(test)]
mod auth_service_tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::preauth::testing::{self, b64, closed, established, Client, FakeAuth};
    use crate::protocol::preauth::FrontendContext;

    async fn start(
        adjust: impl FnOnce(&mut FrontendContext),
    ) -> (Client, testing::Running, Arc<FakeAuth>, String) {
        let auth = FakeAuth::with_service();
        let (mut client, session) = testing::start::<Imap>(&auth, adjust).await;
        let greeting = client.line().await.unwrap();
        (client, session, auth, greeting)
    }

    #[tokio::test]
    async fn the_services_mechanisms_are_advertised_plaintext_ones_only_where_allowed() {
        let (_, _, _, greeting) = start(|_| {}).await;
        assert!(
            greeting.contains("AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5]"),
            "{greeting}"
        );
        let (mut c, _, _, greeting) = start(|ctx| ctx.disable_plaintext_auth = true).await;
        assert!(
            greeting.contains(" AUTH=CRAM-MD5 LOGINDISABLED]") && !greeting.contains("AUTH=PLAIN"),
            "{greeting}"
        );
        // PLAIN is refused there; CRAM-MD5 is not a plaintext mechanism and goes on.
        c.command(
            "a AUTHENTICATE PLAIN",
            "a NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
        )
        .await;
        c.command(
            "b AUTHENTICATE CRAM-MD5",
            &format!("+ {}", b64(b"<1.2@fake>")),
        )
        .await;
    }

    #[tokio::test]
    async fn a_challenge_mechanism_is_relayed_and_the_service_decides() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command(
            "a AUTHENTICATE cram-md5",
            &format!("+ {}", b64(b"<1.2@fake>")),
        )
        .await;
        c.send(format!("{}\r\n", b64(b"alice 0123")).as_bytes())
            .await;
        c.expect("a OK Logged in").await;
        let est = established(session).await;
        assert_eq!(est.username, "alice");
        assert_eq!(
            auth.sasl(),
            vec![
                ("CRAM-MD5".into(), Vec::new()),
                (String::new(), b"alice 0123".to_vec())
            ]
        );
        // The backend login uses what the service said, not anything the client sent.
        let d = &auth.decisions()[0];
        assert_eq!(d.credentials.password.expose(), "frompassdb");
        assert_eq!(d.verified.as_ref().unwrap().user, "alice");
    }

    #[tokio::test]
    async fn a_wrong_answer_fails_and_no_backend_login_is_tried() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command(
            "a AUTHENTICATE CRAM-MD5",
            &format!("+ {}", b64(b"<1.2@fake>")),
        )
        .await;
        c.command(&b64(b"alice ffff"), "a NO [AUTHENTICATIONFAILED] Wrong.")
            .await;
        c.command(
            "b AUTHENTICATE CRAM-MD5",
            &format!("+ {}", b64(b"<1.2@fake>")),
        )
        .await;
        c.command("*", "b BAD Authentication aborted by client.")
            .await;
        c.command(
            "c AUTHENTICATE SCRAM-SHA-1",
            "c NO Unsupported authentication mechanism.",
        )
        .await;
        c.command(
            "d AUTHENTICATE CRAM-MD5",
            &format!("+ {}", b64(b"<1.2@fake>")),
        )
        .await;
        c.command(
            "!!",
            "d BAD Invalid base64 data in authentication response.",
        )
        .await;
        assert!(auth.decisions().is_empty());
        drop(c);
        closed(session).await;
    }

    #[tokio::test]
    async fn login_goes_to_the_service_as_plain_and_its_user_is_routed() {
        let (mut c, session, auth, _) = start(|_| {}).await;
        c.command(
            "a LOGIN Alice wrong",
            "a NO [AUTHENTICATIONFAILED] Authentication failed.",
        )
        .await;
        c.command("b LOGIN Alice right", "b OK Logged in").await;
        assert_eq!(established(session).await.username, "alice");
        assert_eq!(
            auth.sasl(),
            vec![
                ("PLAIN".into(), b"\0Alice\0wrong".to_vec()),
                ("PLAIN".into(), b"\0Alice\0right".to_vec())
            ]
        );
        assert_eq!(auth.decisions().len(), 1);
    }

    #[tokio::test]
    async fn nologin_with_a_host_is_a_referral_and_a_temporary_failure_says_so() {
        let (mut c, _, auth, _) = start(|_| {}).await;
        c.command(
            "a LOGIN moved right",
            "a NO [REFERRAL imap://moved;AUTH=*@new.example/] Moved",
        )
        .await;
        c.command("b LOGIN busy right", "b NO [UNAVAILABLE] Auth busy")
            .await;
        let line = format!("c AUTHENTICATE PLAIN {}", b64(b"\0moved\0x"));
        c.command(
            &line,
            "c NO [REFERRAL imap://moved;AUTH=*@new.example/] Moved",
        )
        .await;
        assert!(auth.decisions().is_empty());
    }
}
