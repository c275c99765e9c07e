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

use super::command::{tokens, Framer, Token};
use crate::net::stream::BackendStream;
use crate::protocol::backend_dialogue::{
    excerpt, plain_response, Answer, Dialogue, MAX_CAPABILITY_LINES, MAX_LINE,
};
use crate::protocol::backend_login::{
    BackendError, BackendLoginRequest, BackendLoginResult, Forward,
};
use crate::protocol::decision::Credentials;

/// Largest literal accepted in a backend's response (a message or a capability value); the
/// cap only stops a broken backend from filling our memory.
const MAX_LITERAL: usize = 65536;

/// Logs in to a ManageSieve backend. `stream` is connected, with implicit TLS and any PROXY
/// header already done. Each reply must come within
/// `req.reply_timeout` (if set).
pub async fn login(
    stream: BackendStream,
    req: &BackendLoginRequest<'_>,
) -> Result<BackendLoginResult, BackendError> {
    let mut conn = Dialogue::new(stream, req);

    let mut caps = match capabilities(&mut conn).await? {
        Ok(caps) => caps,
        Err(status) => return Ok(temp_failed(status)),
    };

    if let Some(starttls) = &req.starttls {
        conn = conn
            .start_tls_by(starttls, "STARTTLS", caps.starttls, ask)
            .await?;
        // RFC 5804 §2.2: the server sends its capabilities again, unasked.
        caps = match capabilities(&mut conn).await? {
            Ok(caps) => caps,
            Err(status) => return Ok(temp_failed(status)),
        };
    }

    if req.forward == Forward::Auto && caps.xclient {
        conn.xclient(req.identity, ask).await?;
    }

    if !caps.sasl_plain {
        return Err(BackendError::Protocol(
            "backend does not offer SASL PLAIN (\"SASL\" capability), the only mechanism the \
             director logs in with"
                .into(),
        ));
    }
    req.may_send_credentials()?;
    let status = authenticate_plain(&mut conn, req.credentials).await?;
    Ok(match status.kind {
        StatusKind::Ok => conn.logged_in(status.rest),
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
        let bad =
            || BackendError::Protocol(format!("malformed {word} response: {:?}", excerpt(unit)));
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

/// Reads one response unit (a line and any literals it announces) and its tokens.
async fn read_unit(conn: &mut Dialogue) -> Result<(Vec<u8>, Vec<Token>), BackendError> {
    let mut framer = Framer::new(MAX_LINE, MAX_LITERAL);
    let unit = conn
        .read_unit(|buf| {
            framer.frame(buf).map_err(|error| {
                BackendError::Protocol(format!(
                    "response over the limits ({MAX_LINE} bytes a line, {MAX_LITERAL} of \
                     literals): {}",
                    error.message
                ))
            })
        })
        .await?;
    let tokens = tokens(&unit)
        .map_err(|message| BackendError::Protocol(format!("{message} in {:?}", excerpt(&unit))))?;
    Ok((unit, tokens))
}

/// Reads one status response.
async fn status(conn: &mut Dialogue) -> Result<Status, BackendError> {
    let (unit, tokens) = read_unit(conn).await?;
    Status::parse(&unit, &tokens).unwrap_or_else(|| {
        Err(BackendError::Protocol(format!(
            "expected OK, NO or BYE, got {:?}",
            excerpt(&unit)
        )))
    })
}

/// A command the backend may only take or refuse.
async fn ask(conn: &mut Dialogue, line: &[u8]) -> Result<Answer, BackendError> {
    let status = conn.exchange(line, status).await?;
    Ok(match status.kind {
        StatusKind::Ok => Ok(()),
        _ => Err(status.message),
    })
}

/// Reads capability lines up to the status that ends them (the greeting, or what follows
/// STARTTLS). `Err(status)`: the backend ended them with `NO` or `BYE`.
async fn capabilities(conn: &mut Dialogue) -> Result<Result<Capabilities, Status>, BackendError> {
    conn.timed(async |c| {
        let mut caps = Capabilities::default();
        for _ in 0..MAX_CAPABILITY_LINES {
            let (unit, tokens) = read_unit(c).await?;
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
                        excerpt(&unit)
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

/// `AUTHENTICATE "PLAIN" "<initial response>"` (RFC 5804 §2.1).
async fn authenticate_plain(
    conn: &mut Dialogue,
    credentials: &Credentials,
) -> Result<Status, BackendError> {
    let line = format!(
        "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
        plain_response(credentials)?
    );
    conn.exchange(line.as_bytes(), status).await
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;
    use crate::protocol::decision::ClientIdentity;
    use crate::protocol::fake_backend::{self, alice, fake_backend, Attempt, Backend, CLOSE};
    use crate::protocol::sasl;

    /// The capability greeting of Dovecot 2.3's managesieve-login for a trusted network,
    /// as a real one sent it (SIEVE list shortened).
    const GREETING: &str = "\"IMPLEMENTATION\" \"Dovecot (Debian) Pigeonhole\"\r\n\
        \"SIEVE\" \"fileinto reject envelope\"\r\n\"NOTIFY\" \"mailto\"\r\n\
        \"SASL\" \"PLAIN LOGIN\"\r\n\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\n\"XCLIENT\"\r\n\
        OK \"backend1 ready.\"\r\n";
    /// The same without XCLIENT (the director is not in `login_trusted_networks`).
    const GREETING_NO_XCLIENT: &str = "\"IMPLEMENTATION\" \"Dovecot\"\r\n\
        \"SASL\" \"PLAIN\"\r\n\"VERSION\" \"1.0\"\r\nOK \"Ready.\"\r\n";

    /// A backend that greets with `greeting`, accepts XCLIENT and answers AUTHENTICATE with
    /// `auth_reply`.
    async fn dovecot_like(greeting: &'static str, auth_reply: &'static str) -> Backend {
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
        fake_backend::identity("127.0.0.1:4190", "sess1")
    }

    async fn run_login(
        tcp: TcpStream,
        credentials: &Credentials,
        forward: Forward,
    ) -> Result<BackendLoginResult, BackendError> {
        let attempt = Attempt::new(credentials, identity(), forward);
        login(BackendStream::Plain(tcp), &attempt.request()).await
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
        // Not offered; offered but another way of forwarding is configured.
        for (greeting, reply, forward, text) in [
            (GREETING_NO_XCLIENT, "OK\r\n", Forward::Auto, ""),
            (
                GREETING,
                "OK (SASL \"\") \"Logged in.\"\r\n",
                Forward::ProxyV2,
                "(SASL \"\") \"Logged in.\"",
            ),
        ] {
            let (tcp, backend) = dovecot_like(greeting, reply).await;
            let result = run_login(tcp, &alice(), forward).await.unwrap();
            let BackendLoginResult::LoggedIn {
                ref success_text, ..
            } = result
            else {
                panic!("not logged in: {reply:?}");
            };
            assert_eq!(success_text, text);
            drop(result);
            assert_eq!(
                backend.await.unwrap(),
                vec![AUTH_ALICE.to_owned()],
                "{reply:?}"
            );
        }
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
        let attempt = Attempt::new(&alice(), identity(), Forward::Auto).with_starttls();
        let error = login(BackendStream::Plain(tcp), &attempt.request())
            .await
            .err()
            .unwrap();
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
