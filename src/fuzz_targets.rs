//! Fuzz targets for every parser that reads client bytes before login: the IMAP, POP3,
//! ManageSieve and LMTP command parsers, the PROXY header parser and SASL decoding.
//!
//! This module exists so that two callers run exactly the same checks: the cargo-fuzz crate in
//! `fuzz/` (coverage-guided, nightly-only, run by `scripts/fuzz`) and the ordinary integration
//! test `tests/fuzz_corpus.rs`, which replays the committed seeds and every input the fuzzer
//! ever found (`fuzz/regressions/`) in a normal `cargo test`. It is not an API.
//!
//! Each target drives its parser the way the protocol's front end does (same buffer limits,
//! same handling of `consumed`, of resets and of SASL response lines) and checks properties,
//! not only that nothing panics. A violated property panics, which is what the fuzzer
//! reports. The main one: a script cut into reads at other places gives the same dialogue as
//! the script delivered as fast as the buffer allows.
//!
//! Input layout of the stream targets (`imap_command`, `pop3_command`, `sieve_command`,
//! `lmtp_command`, `proxy_header`): byte 0 picks the limits, bytes 1 to 4 say where reads are
//! cut (each byte one read length, used in turn), and the rest is what the client sends.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use crate::protocol::imap::command as imap;
use crate::protocol::lmtp::command as lmtp;
use crate::protocol::pop3::command as pop3;
use crate::protocol::proxy_protocol;
use crate::protocol::sasl;
use crate::protocol::sieve::command as sieve;

/// Bytes at the front of an input that steer the target rather than being sent.
const HEADER_LEN: usize = 5;

/// The steering bytes and the client's bytes of one input.
struct Input<'a> {
    /// Picks the limits (line and literal sizes).
    limits: u8,
    /// Read lengths, used in turn.
    cuts: &'a [u8],
    script: &'a [u8],
}

impl<'a> Input<'a> {
    fn split(data: &'a [u8]) -> Input<'a> {
        let mut header = [0u8; HEADER_LEN];
        let n = data.len().min(HEADER_LEN);
        header[..n].copy_from_slice(&data[..n]);
        Input {
            limits: header[0],
            cuts: data.get(1..n).unwrap_or_default(),
            script: &data[n..],
        }
    }

    /// A line limit: small ones reach the limit paths with short inputs, 8192 is the default.
    fn max_line(&self) -> usize {
        [24, 64, 512, 8192][usize::from(self.limits & 3)]
    }

    fn max_literal(&self) -> usize {
        [16, 100, 512, 8192][usize::from((self.limits >> 2) & 3)]
    }
}

/// Read lengths: either as much as the caller has room for ("whole"), or lengths taken in turn
/// from the input's cut bytes.
#[derive(Clone)]
struct Cuts<'a> {
    lengths: Option<&'a [u8]>,
    next: usize,
}

impl<'a> Cuts<'a> {
    fn whole() -> Self {
        Cuts {
            lengths: None,
            next: 0,
        }
    }

    fn from(lengths: &'a [u8]) -> Self {
        Cuts {
            lengths: (!lengths.is_empty()).then_some(lengths),
            next: 0,
        }
    }

    /// The length of the next read (at least 1).
    fn next_len(&mut self) -> usize {
        let Some(lengths) = self.lengths else {
            return usize::MAX;
        };
        let b = lengths[self.next % lengths.len()];
        self.next += 1;
        let b = usize::from(b);
        match b % 4 {
            0 => 1,
            1 => 1 + b / 4 % 8,
            2 => 1 + b,
            _ => 1 + b * 16,
        }
    }
}

/// The client side of a connection: hands out the script one read at a time.
struct Client<'a> {
    script: &'a [u8],
    sent: usize,
    cuts: Cuts<'a>,
}

impl<'a> Client<'a> {
    fn new(script: &'a [u8], cuts: Cuts<'a>) -> Self {
        Client {
            script,
            sent: 0,
            cuts,
        }
    }

    /// Appends the next read of at most `room` bytes to `buf`, as a front end's `fill` does.
    /// `false`: the client has nothing more to send (it closed the connection).
    fn fill(&mut self, buf: &mut Vec<u8>, room: usize) -> bool {
        assert!(room > 0, "the parser let the read buffer fill up");
        let n = self
            .cuts
            .next_len()
            .min(room)
            .min(self.script.len() - self.sent);
        buf.extend_from_slice(&self.script[self.sent..self.sent + n]);
        self.sent += n;
        n > 0
    }

    /// [`Client::fill`] for a front end whose buffer holds at most `cap` bytes.
    fn fill_to(&mut self, buf: &mut Vec<u8>, cap: usize) -> bool {
        self.fill(buf, cap.saturating_sub(buf.len()))
    }
}

/// Takes the `consumed` bytes a parser used off the front of `buf`: at least one, and no more
/// than it was given.
fn take(buf: &mut Vec<u8>, consumed: usize) -> Vec<u8> {
    assert!(
        consumed > 0 && consumed <= buf.len(),
        "bad consumed {consumed} of {}",
        buf.len()
    );
    buf.drain(..consumed).collect()
}

/// Takes the bytes of a parse error off `buf` (see [`take`]). A literal is framed before it is
/// parsed, so the grammar never finds one cut short.
fn take_error(buf: &mut Vec<u8>, consumed: usize, message: &str) {
    take(buf, consumed);
    assert_ne!(
        message, "Truncated literal.",
        "framing and grammar disagree on a literal"
    );
}

/// Runs `session` over the script of the input `data` delivered whole and cut into reads, and
/// checks that the client sees the same dialogue both ways. Returns the input, for further
/// checks.
fn same_dialogue<E: std::fmt::Debug + PartialEq>(
    data: &[u8],
    session: impl Fn(Client<'_>, &Input<'_>) -> Vec<E>,
) -> Input<'_> {
    let input = Input::split(data);
    let whole = session(Client::new(input.script, Cuts::whole()), &input);
    let cut = session(Client::new(input.script, Cuts::from(input.cuts)), &input);
    assert_eq!(
        whole, cut,
        "the dialogue depends on how the client's bytes were cut into reads"
    );
    input
}

// ---------------------------------------------------------------------------------------------
// IMAP

/// What an IMAP client sees of one step of the pre-login dialogue.
#[derive(Debug, PartialEq, Eq)]
enum ImapEvent {
    /// `+ Ready for literal data`.
    Continuation,
    Command(imap::Command),
    /// The reply lines to a syntax error (the last one `* BYE` when fatal).
    Error(Vec<String>),
    /// A SASL response line, or why there was none.
    SaslResponse(Result<Vec<u8>, &'static str>),
    /// What the credentials of LOGIN or AUTHENTICATE decoded to.
    Credentials(Result<(String, String), String>),
}

/// The IMAP command parser, driven as `imap::frontend` drives it.
pub fn imap_command(data: &[u8]) {
    same_dialogue(data, |client, input| {
        imap_session(client, input.max_line(), input.max_literal())
    });
}

fn imap_session(mut client: Client<'_>, max_line: usize, max_literal: usize) -> Vec<ImapEvent> {
    // As the IMAP dialect (`imap::frontend`, `Dialect::new` and `buffer_cap`) sets up.
    let cap = max_line + max_literal + 2;
    let mut parser = imap::CommandParser::new(max_line, max_literal);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    loop {
        match parser.parse(&buf) {
            imap::Parse::Incomplete => {
                if !client.fill_to(&mut buf, cap) {
                    return events;
                }
            }
            imap::Parse::NeedContinuation => events.push(ImapEvent::Continuation),
            imap::Parse::Command { consumed, command } => {
                take(&mut buf, consumed);
                check_imap_command(&command);
                let auth = imap_credentials(&command, &mut client, &mut buf, cap, max_literal);
                events.push(ImapEvent::Command(command));
                match auth {
                    ImapAuth::None => {}
                    ImapAuth::Steps(steps) => events.extend(steps),
                    ImapAuth::Close(steps) => {
                        events.extend(steps);
                        return events;
                    }
                }
            }
            imap::Parse::Error(error) => {
                take_error(&mut buf, error.consumed, &error.message);
                let fatal = error.fatal;
                events.push(ImapEvent::Error(imap_error_reply(error)));
                if fatal {
                    return events;
                }
            }
        }
    }
}

/// The lines `imap::frontend` answers a parse error with.
fn imap_error_reply(error: imap::ParseError) -> Vec<String> {
    if error.fatal {
        let mut lines = Vec::new();
        if let (Some(tag), Some(code)) = (&error.tag, error.code) {
            lines.push(format!("{tag} BAD [{code}] {}", error.message));
        }
        lines.push(format!("* BYE {}", error.message));
        return lines;
    }
    let line = match (&error.tag, error.code, &error.command) {
        (None, _, _) => "* BAD Error in IMAP command received by server.".to_owned(),
        (Some(tag), Some(code), _) => format!("{tag} BAD [{code}] {}", error.message),
        (Some(tag), None, Some(name)) => {
            format!("{tag} BAD Error in IMAP command {name}: {}", error.message)
        }
        (Some(tag), None, None) => format!("{tag} BAD Error in IMAP command received by server."),
    };
    vec![line]
}

/// What a command's grammar promises, and that it survives being written out and read back.
fn check_imap_command(command: &imap::Command) {
    assert!(!command.tag.is_empty(), "empty tag");
    assert!(
        command
            .tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"(){\"\\+%*".contains(&b)),
        "bad tag character in {:?}",
        command.tag
    );
    fn check(arg: &imap::Arg, out: &mut Vec<u8>) {
        match arg {
            imap::Arg::Atom(atom) => {
                assert!(!atom.is_empty(), "empty atom");
                assert!(!atom.eq_ignore_ascii_case("NIL"), "NIL parsed as an atom");
                assert!(
                    atom.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"(){\"\\".contains(&b)),
                    "bad atom {atom:?}"
                );
                out.extend_from_slice(atom.as_bytes());
            }
            imap::Arg::Quoted(bytes) => {
                assert!(
                    !bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                    "CR, LF or NUL in a quoted string"
                );
                out.push(b'"');
                for &b in bytes {
                    if b == b'"' || b == b'\\' {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out.push(b'"');
            }
            imap::Arg::Literal(bytes) => {
                out.extend_from_slice(format!("{{{}+}}\r\n", bytes.len()).as_bytes());
                out.extend_from_slice(bytes);
            }
            imap::Arg::Nil => out.extend_from_slice(b"NIL"),
            imap::Arg::List(items) => {
                out.push(b'(');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b' ');
                    }
                    check(item, out);
                }
                out.push(b')');
            }
        }
    }
    let mut wire = format!("{} {}", command.tag, command.name).into_bytes();
    for arg in &command.args {
        wire.push(b' ');
        check(arg, &mut wire);
    }
    wire.extend_from_slice(b"\r\n");
    let mut parser = imap::CommandParser::new(usize::MAX / 4, usize::MAX / 4);
    match parser.parse(&wire) {
        imap::Parse::Command {
            consumed,
            command: again,
        } => {
            assert_eq!(
                consumed,
                wire.len(),
                "re-read {:?}",
                String::from_utf8_lossy(&wire)
            );
            assert_eq!(
                &again, command,
                "a command written out reads back differently"
            );
        }
        other => panic!(
            "a command written out does not read back: {:?} gives {other:?}",
            String::from_utf8_lossy(&wire)
        ),
    }
}

/// What follows a command that carries credentials.
enum ImapAuth {
    None,
    Steps(Vec<ImapEvent>),
    /// The session closes after these.
    Close(Vec<ImapEvent>),
}

/// LOGIN's arguments and AUTHENTICATE's SASL exchange, as `imap::frontend` reads them.
fn imap_credentials(
    command: &imap::Command,
    client: &mut Client<'_>,
    buf: &mut Vec<u8>,
    cap: usize,
    max_literal: usize,
) -> ImapAuth {
    match (&command.name, command.args.as_slice()) {
        (imap::CommandName::Login, [user, password]) => {
            let (Some(user), Some(password)) = (user.astring(), password.astring()) else {
                return ImapAuth::None;
            };
            let credentials = match (std::str::from_utf8(user), std::str::from_utf8(password)) {
                (Ok(user), Ok(password)) => Ok((user.to_owned(), password.to_owned())),
                _ => Err("not UTF-8".to_owned()),
            };
            ImapAuth::Steps(vec![ImapEvent::Credentials(credentials)])
        }
        (imap::CommandName::Authenticate, [imap::Arg::Atom(mechanism), rest @ ..])
            if rest.len() <= 1 =>
        {
            let initial = match rest {
                [imap::Arg::Atom(initial)] => Some(initial.as_bytes().to_vec()),
                [] => None,
                _ => return ImapAuth::None,
            };
            let mut steps = Vec::new();
            let mut responses = Vec::new();
            let needed = match mechanism.to_ascii_uppercase().as_str() {
                "PLAIN" => 1,
                "LOGIN" => 2,
                _ => return ImapAuth::None,
            };
            responses.extend(initial);
            while responses.len() < needed {
                let response = imap_sasl_response(client, buf, cap, max_literal);
                steps.push(ImapEvent::SaslResponse(response.clone()));
                match response {
                    Ok(line) => responses.push(line),
                    Err("cancel") => return ImapAuth::Steps(steps),
                    Err(_) => return ImapAuth::Close(steps),
                }
            }
            let credentials = if needed == 1 {
                plain_credentials(&responses[0])
            } else {
                match (
                    sasl::decode_base64(&responses[0]),
                    sasl::decode_base64(&responses[1]),
                ) {
                    (Ok(user), Ok(password)) => {
                        match (String::from_utf8(user), String::from_utf8(password)) {
                            (Ok(user), Ok(password)) => Ok((user, password)),
                            _ => Err("not UTF-8".to_owned()),
                        }
                    }
                    _ => Err("invalid base64".to_owned()),
                }
            };
            steps.push(ImapEvent::Credentials(credentials));
            ImapAuth::Steps(steps)
        }
        _ => ImapAuth::None,
    }
}

/// One SASL response line, as the IMAP dialect's `Dialect::sasl_response` reads it.
fn imap_sasl_response(
    client: &mut Client<'_>,
    buf: &mut Vec<u8>,
    cap: usize,
    max: usize,
) -> Result<Vec<u8>, &'static str> {
    loop {
        if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            let mut line = take(buf, lf + 1);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return match line.as_slice() {
                _ if line.len() > max => Err("too long"),
                b"*" => Err("cancel"),
                _ => Ok(line),
            };
        }
        if buf.len() > max + 1 {
            return Err("too long");
        }
        if !client.fill_to(buf, cap) {
            return Err("closed");
        }
    }
}

/// A base64 PLAIN response decoded to (username, password), checking the SASL properties on
/// the way.
fn plain_credentials(response: &[u8]) -> Result<(String, String), String> {
    let decoded = sasl::decode_base64(response).map_err(|e| e.to_string())?;
    let credentials = sasl::parse_plain(&decoded).map_err(|e| e.to_string())?;
    check_plain_round_trip(&credentials);
    Ok((
        credentials.username,
        credentials.password.expose().to_owned(),
    ))
}

// ---------------------------------------------------------------------------------------------
// POP3

/// What a POP3 client sees of one step of the pre-login dialogue.
#[derive(Debug, PartialEq, Eq)]
enum Pop3Event {
    Command(pop3::Command),
    /// The line was too long: the session closes.
    TooLong,
    SaslResponse(Result<Vec<u8>, &'static str>),
    Credentials(Result<(String, String), String>),
}

/// The POP3 command parser, driven as `pop3::frontend` drives it.
pub fn pop3_command(data: &[u8]) {
    same_dialogue(data, |client, input| {
        pop3_session(client, input.max_line(), input.max_literal())
    });
}

/// `pop3::frontend` reads 1024 bytes at a time and bounds its buffer through the parser.
const POP3_READ_CHUNK: usize = 1024;

fn pop3_session(mut client: Client<'_>, max_line: usize, max_literal: usize) -> Vec<Pop3Event> {
    let mut buf = Vec::new();
    let mut events = Vec::new();
    loop {
        // The front end's buffer is bounded by the parser: it never holds more than a line
        // limit plus one read.
        assert!(buf.len() < max_line.max(max_literal + 2) + POP3_READ_CHUNK);
        match pop3::parse_line(&buf, max_line) {
            pop3::Parse::Incomplete => {
                if !client.fill(&mut buf, POP3_READ_CHUNK) {
                    return events;
                }
            }
            pop3::Parse::TooLong => {
                events.push(Pop3Event::TooLong);
                return events;
            }
            pop3::Parse::Line { consumed, command } => {
                assert!(consumed <= max_line, "a line over the limit was accepted");
                take(&mut buf, consumed);
                let auth = match &command {
                    pop3::Command::User(name) | pop3::Command::Pass(name) => {
                        assert!(!name.contains(['\n']), "line end inside a line");
                        None
                    }
                    pop3::Command::Auth {
                        mechanism,
                        initial_response,
                    } => Some((mechanism.clone(), initial_response.clone())),
                    _ => None,
                };
                events.push(Pop3Event::Command(command));
                let Some((mechanism, initial)) = auth else {
                    continue;
                };
                let needed = match mechanism.as_str() {
                    "PLAIN" => 1,
                    "LOGIN" => 2,
                    _ => continue,
                };
                let mut responses: Vec<Vec<u8>> =
                    initial.into_iter().map(String::into_bytes).collect();
                while responses.len() < needed {
                    let response = pop3_sasl_response(&mut client, &mut buf, max_literal);
                    events.push(Pop3Event::SaslResponse(response.clone()));
                    match response {
                        Ok(line) => responses.push(line),
                        Err("cancel") => break,
                        Err(_) => return events,
                    }
                }
                if responses.len() < needed {
                    continue;
                }
                let credentials = if needed == 1 {
                    plain_credentials(&responses[0])
                } else {
                    let decode = |b64: &[u8]| {
                        sasl::decode_base64(b64)
                            .map_err(|e| e.to_string())
                            .and_then(|raw| String::from_utf8(raw).map_err(|e| e.to_string()))
                    };
                    decode(&responses[0]).and_then(|u| Ok((u, decode(&responses[1])?)))
                };
                events.push(Pop3Event::Credentials(credentials));
            }
        }
    }
}

/// One SASL response line, as the POP3 dialect's `Dialect::sasl_response` reads it.
fn pop3_sasl_response(
    client: &mut Client<'_>,
    buf: &mut Vec<u8>,
    max_literal: usize,
) -> Result<Vec<u8>, &'static str> {
    let max = max_literal.saturating_add(2);
    loop {
        match pop3::next_line(buf, max) {
            pop3::Line::Complete { consumed, line } => {
                assert!(!line.contains(&b'\n'));
                let line = line.to_vec();
                take(buf, consumed);
                return if line == b"*" {
                    Err("cancel")
                } else {
                    Ok(line)
                };
            }
            pop3::Line::TooLong => return Err("too long"),
            pop3::Line::Incomplete => {
                if !client.fill(buf, POP3_READ_CHUNK) {
                    return Err("closed");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ManageSieve

/// What a ManageSieve client sees of one step of the pre-login dialogue.
#[derive(Debug, PartialEq, Eq)]
enum SieveEvent {
    Command(sieve::Command),
    /// A parse error: its message, and whether the session says BYE and closes.
    Error(&'static str, bool),
    SaslResponse(Vec<u8>),
    Credentials(Result<(String, String), String>),
}

/// The ManageSieve command parser (framing, tokens, commands and SASL responses), driven as
/// `sieve::frontend` drives it; plus the quoting the server uses in its own replies.
pub fn sieve_command(data: &[u8]) {
    let input = same_dialogue(data, |client, input| {
        sieve_session(client, input.max_line(), input.max_literal())
    });
    // What the server quotes for a client (`string_bytes`, `quote`) reads back as the same
    // string.
    let tokens = sieve::tokens(&[sieve::string_bytes(input.script), b"\r\n".to_vec()].concat());
    assert_eq!(
        tokens,
        Ok(vec![sieve::Token::String(input.script.to_vec())]),
        "string_bytes does not read back"
    );
    let text = String::from_utf8_lossy(input.script);
    let expected: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    assert_eq!(
        sieve::tokens(format!("{}\r\n", sieve::quote(&text)).as_bytes()),
        Ok(vec![sieve::Token::String(expected.into_bytes())]),
        "quote does not read back"
    );
}

fn sieve_session(mut client: Client<'_>, max_line: usize, max_literal: usize) -> Vec<SieveEvent> {
    // As the ManageSieve dialect (`sieve::frontend`, `Dialect::new` and `buffer_cap`) sets up.
    let cap = max_line + max_literal + 1;
    let mut parser = sieve::CommandParser::new(max_line, max_literal);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    loop {
        let command = match parser.command(&buf) {
            sieve::Parse::Incomplete => {
                if !client.fill_to(&mut buf, cap) {
                    return events;
                }
                continue;
            }
            sieve::Parse::Error(error) => {
                if sieve_error(&error, &mut buf, &mut events) {
                    return events;
                }
                continue;
            }
            sieve::Parse::Done { consumed, value } => {
                take(&mut buf, consumed);
                check_sieve_command(&value);
                events.push(SieveEvent::Command(value.clone()));
                value
            }
        };
        if command.name != sieve::CommandName::Authenticate {
            continue;
        }
        let (mechanism, initial) = match command.args.as_slice() {
            [mechanism] => (mechanism.as_string(), None),
            [mechanism, sieve::Token::String(initial)] => (mechanism.as_string(), Some(initial)),
            _ => continue,
        };
        if !mechanism.is_some_and(|m| m.eq_ignore_ascii_case(b"PLAIN")) {
            continue;
        }
        let response = match initial {
            Some(initial) => Some(initial.clone()),
            None => {
                // The empty challenge, then the client's string.
                loop {
                    match parser.sasl_response(&buf) {
                        sieve::Parse::Incomplete => {
                            if !client.fill_to(&mut buf, cap) {
                                return events;
                            }
                        }
                        sieve::Parse::Error(error) => {
                            if sieve_error(&error, &mut buf, &mut events) {
                                return events;
                            }
                            break None;
                        }
                        sieve::Parse::Done { consumed, value } => {
                            take(&mut buf, consumed);
                            events.push(SieveEvent::SaslResponse(value.clone()));
                            break Some(value);
                        }
                    }
                }
            }
        };
        if let Some(response) = response.filter(|r| r != b"*") {
            events.push(SieveEvent::Credentials(plain_credentials(&response)));
        }
    }
}

/// Drops an error's bytes and records it. `true`: the session closes.
fn sieve_error(error: &sieve::ParseError, buf: &mut Vec<u8>, events: &mut Vec<SieveEvent>) -> bool {
    take_error(buf, error.consumed, error.message);
    events.push(SieveEvent::Error(error.message, error.fatal));
    error.fatal
}

/// A command written out (strings as the server would write them) reads back the same.
fn check_sieve_command(command: &sieve::Command) {
    let mut wire = command.name.as_str().as_bytes().to_vec();
    for arg in &command.args {
        wire.push(b' ');
        match arg {
            sieve::Token::Atom(atom) => {
                assert!(!atom.is_empty(), "empty atom");
                wire.extend_from_slice(atom.as_bytes());
            }
            sieve::Token::String(bytes) => wire.extend_from_slice(&sieve::string_bytes(bytes)),
            sieve::Token::Open | sieve::Token::Close => panic!("parenthesis in arguments"),
        }
    }
    wire.extend_from_slice(b"\r\n");
    let mut parser = sieve::CommandParser::new(usize::MAX / 4, usize::MAX / 4);
    assert_eq!(
        parser.command(&wire),
        sieve::Parse::Done {
            consumed: wire.len(),
            value: command.clone()
        },
        "a command written out reads back differently: {:?}",
        String::from_utf8_lossy(&wire)
    );
}

// ---------------------------------------------------------------------------------------------
// LMTP

/// What an LMTP client sees of one step of a session, and what reaches the backends.
#[derive(Debug, PartialEq, Eq)]
enum LmtpEvent {
    Command(lmtp::Command),
    Error(String),
    /// The usernames a recipient routes as, one per (mode, delimiter) setting.
    Recipient(Vec<Option<String>>),
    /// A whole message, as streamed to the backends (final dot included).
    Message(Vec<u8>),
}

/// The LMTP command parser, the DATA scanner and `username_of`, driven as `lmtp::session`
/// drives them.
pub fn lmtp_command(data: &[u8]) {
    let input = same_dialogue(data, |client, input| lmtp_session(client, input.max_line()));
    // The scanner alone, on the whole input as a message body.
    check_scanner(input.script, &mut Cuts::from(input.cuts));
}

fn lmtp_session(mut client: Client<'_>, max_line: usize) -> Vec<LmtpEvent> {
    let mut parser = lmtp::CommandParser::new(max_line);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    // A simplified transaction, enough to know when DATA streams a message.
    let (mut lhlo, mut mail, mut recipients) = (false, false, 0);
    loop {
        match parser.parse(&buf) {
            lmtp::Parse::Incomplete => {
                // `lmtp::session` reads 64 KiB at a time.
                if !client.fill(&mut buf, 64 * 1024) {
                    return events;
                }
            }
            lmtp::Parse::Skip { consumed } => {
                take(&mut buf, consumed);
            }
            lmtp::Parse::Error { consumed, error } => {
                take(&mut buf, consumed);
                events.push(LmtpEvent::Error(error.reply()));
            }
            lmtp::Parse::Command { consumed, command } => {
                assert!(consumed <= max_line, "a line over the limit was accepted");
                take(&mut buf, consumed);
                let mut data = false;
                let mut usernames = None;
                match &command {
                    lmtp::Command::Lhlo(_) => lhlo = true,
                    lmtp::Command::Mail(_) if lhlo && !mail => mail = true,
                    lmtp::Command::Rcpt(rcpt) if mail => {
                        let names = recipient_usernames(&rcpt.path);
                        if names[0].is_some() {
                            recipients += 1;
                        }
                        usernames = Some(names);
                    }
                    lmtp::Command::Data if recipients > 0 => data = true,
                    lmtp::Command::Rset => (mail, recipients) = (false, 0),
                    _ => {}
                }
                events.push(LmtpEvent::Command(command));
                events.extend(usernames.map(LmtpEvent::Recipient));
                if data {
                    (mail, recipients) = (false, 0);
                    match lmtp_message(&mut client, &mut buf) {
                        Some(message) => events.push(LmtpEvent::Message(message)),
                        None => return events,
                    }
                    parser.reset();
                }
            }
        }
    }
}

/// Streams one message as `lmtp::session::stream_message` does. `None`: the client left.
fn lmtp_message(client: &mut Client<'_>, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut scanner = lmtp::DataScanner::new();
    let mut message = Vec::new();
    loop {
        if buf.is_empty() && !client.fill(buf, 64 * 1024) {
            return None;
        }
        let end = scanner.scan(buf);
        let n = end.unwrap_or(buf.len());
        assert!(n <= buf.len() && (end.is_none() || n > 0));
        message.extend(buf.drain(..n));
        if end.is_some() {
            assert_eq!(
                Some(message.len()),
                message_end(&message),
                "the DATA scanner ended the message elsewhere than at the first CRLF.CRLF"
            );
            return Some(message);
        }
    }
}

/// Where a message that starts just after a line end ends: after the first `CRLF . CRLF`
/// (whose first CRLF may be the one before the message). A plain search, to check the
/// scanner's state machine against.
fn message_end(body: &[u8]) -> Option<usize> {
    let with_eol = [b"\r\n".as_slice(), body].concat();
    with_eol
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|at| at + 5 - 2)
}

/// The scanner fed `body` in reads gives the same ends as the plain search, message after
/// message.
fn check_scanner(mut body: &[u8], cuts: &mut Cuts<'_>) {
    let mut scanner = lmtp::DataScanner::new();
    loop {
        let expected = message_end(body);
        let mut found = None;
        let mut pos = 0;
        while pos < body.len() {
            let n = cuts.next_len().min(body.len() - pos).min(4096);
            if let Some(end) = scanner.scan(&body[pos..pos + n]) {
                assert!(end > 0 && end <= n);
                found = Some(pos + end);
                break;
            }
            pos += n;
        }
        assert_eq!(
            found, expected,
            "the DATA scanner missed the end of a message"
        );
        // The next message starts after the final dot's CRLF, as after a DATA line.
        match found {
            Some(end) if end < body.len() => body = &body[end..],
            _ => return,
        }
    }
}

/// `username_of` of a recipient path in every setting: whole address or local part, with no
/// delimiter, `+` or `-`. Checks how the results relate.
fn recipient_usernames(path: &str) -> Vec<Option<String>> {
    use lmtp::RecipientUsername::{LocalPart, WholeAddress};
    let mut out = Vec::new();
    for delimiter in [None, Some('+'), Some('-')] {
        let whole = lmtp::username_of(path, WholeAddress, delimiter);
        let local = lmtp::username_of(path, LocalPart, delimiter);
        assert_eq!(
            whole.is_some(),
            local.is_some(),
            "{path:?}: a username in one mode and none in the other"
        );
        if let (Some(whole), Some(local)) = (&whole, &local) {
            assert!(!local.is_empty() && !whole.is_empty(), "empty username");
            assert!(
                whole == local || whole.starts_with(&format!("{local}@")),
                "{path:?}: whole address {whole:?} does not start with local part {local:?}"
            );
            if let Some(d) = delimiter {
                assert!(
                    !local.contains(d),
                    "{path:?}: delimiter {d:?} left in {local:?}"
                );
            }
        }
        out.push(whole);
        out.push(local);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

/// The PROXY header parser: the consumed length stays within the input, a header's verdict
/// only depends on its own bytes (no prefix of a header is an error, bytes after it change
/// nothing), errors are final, and `read_header` reads exactly the header however the bytes
/// arrive.
pub fn proxy_header(data: &[u8]) {
    let input = Input::split(data);
    let buf = input.script;
    let full = proxy_protocol::parse(buf);
    if let Ok(Some((header, len))) = &full {
        assert!(
            *len > 0 && *len <= buf.len(),
            "consumed {len} of {}",
            buf.len()
        );
        assert!(
            matches!(proxy_protocol::parse(&buf[..*len]), Ok(Some((h, l))) if h == *header && l == *len),
            "the header alone parses differently"
        );
    }
    // Every prefix: incomplete, then either an error for good or the same header for good.
    let mut verdict: Option<Result<(proxy_protocol::ProxyHeader, usize), ()>> = None;
    for k in 0..=buf.len() {
        if k > 300 && k < buf.len() {
            continue;
        }
        let now = match proxy_protocol::parse(&buf[..k]) {
            Ok(None) => {
                assert!(
                    verdict.is_none(),
                    "a longer prefix is incomplete again at {k}"
                );
                continue;
            }
            Ok(Some(found)) => Ok(found),
            Err(_) => Err(()),
        };
        match &verdict {
            None => verdict = Some(now),
            Some(before) => assert_eq!(before, &now, "prefix {k} changed the verdict"),
        }
    }
    // `read_header` over a stream that delivers the input in reads of any size.
    let mut stream = SliceStream {
        data: buf,
        pos: 0,
        cuts: Cuts::from(input.cuts),
    };
    let read = RUNTIME.with(|rt| {
        rt.block_on(proxy_protocol::read_header(
            &mut stream,
            Duration::from_secs(3600),
        ))
    });
    match (read, full) {
        (Ok(header), Ok(Some((expected, len)))) => {
            assert_eq!(header, expected);
            assert_eq!(
                stream.pos, len,
                "read_header did not read exactly the header"
            );
        }
        (Err(proxy_protocol::ProxyError::Truncated(n)), Ok(None)) => {
            assert_eq!(n, buf.len());
        }
        (Err(error), Err(_)) => assert!(
            !matches!(
                error,
                proxy_protocol::ProxyError::Truncated(_) | proxy_protocol::ProxyError::Timeout(_)
            ),
            "read_header: {error}"
        ),
        (read, full) => panic!("read_header gave {read:?}, parse gave {full:?}"),
    }
    // What the director sends to backends reads back.
    if buf.len() >= 36 {
        let v6 = |at: usize| -> [u8; 16] { buf[at..at + 16].try_into().expect("16 bytes") };
        let port = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
        let (src, dst) = if input.limits & 1 == 0 {
            (
                std::net::SocketAddr::from((v6(0), port(32))),
                std::net::SocketAddr::from((v6(16), port(34))),
            )
        } else {
            let v4 = |at: usize| -> [u8; 4] { buf[at..at + 4].try_into().expect("4 bytes") };
            (
                std::net::SocketAddr::from((v4(0), port(32))),
                std::net::SocketAddr::from((v4(16), port(34))),
            )
        };
        let wire = proxy_protocol::encode_v2(src, dst);
        let parsed = proxy_protocol::parse(&wire).expect("encode_v2 output parses");
        assert_eq!(
            parsed,
            Some((
                proxy_protocol::ProxyHeader {
                    source: Some(src),
                    destination: Some(dst)
                },
                wire.len()
            ))
        );
    }
}

thread_local! {
    /// `read_header` runs under a tokio timeout, which needs a runtime with a timer. One per
    /// thread, not one per input: building it is slower than a parse.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

/// A stream that delivers a slice in reads of the lengths the input asks for.
struct SliceStream<'a> {
    data: &'a [u8],
    pos: usize,
    cuts: Cuts<'a>,
}

impl AsyncRead for SliceStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let n = this
            .cuts
            .next_len()
            .min(out.remaining())
            .min(this.data.len() - this.pos);
        out.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------------
// SASL

/// SASL decoding: base64 round-trips, and PLAIN credentials survive being encoded for a
/// backend and decoded again.
pub fn sasl(data: &[u8]) {
    // The input as a client's base64 response line.
    if let Ok(decoded) = sasl::decode_base64(data) {
        let again = sasl::encode_base64(&decoded);
        assert_eq!(sasl::decode_base64(again.as_bytes()), Ok(decoded.clone()));
        if let Ok(credentials) = sasl::parse_plain(&decoded) {
            check_plain_round_trip(&credentials);
        }
    }
    // The input as a decoded PLAIN response.
    if let Ok(credentials) = sasl::parse_plain(data) {
        check_plain_round_trip(&credentials);
    }
    // The input encoded by us, as a client would.
    let encoded = sasl::encode_base64(data);
    assert_eq!(sasl::decode_base64(encoded.as_bytes()), Ok(data.to_vec()));
    assert_eq!(encoded.len(), data.len().div_ceil(3) * 4);
}

/// Credentials that PLAIN produced: a username and an authentication identity, and encoding
/// them for a backend and decoding that gives them back.
fn check_plain_round_trip(credentials: &crate::protocol::decision::Credentials) {
    assert!(
        !credentials.username.is_empty(),
        "PLAIN gave an empty username"
    );
    assert!(
        !credentials.auth_username.is_empty(),
        "PLAIN gave an empty authentication identity"
    );
    let wire = sasl::encode_plain(credentials);
    let decoded = sasl::decode_base64(wire.as_bytes()).expect("encode_plain gives base64");
    assert_eq!(
        sasl::parse_plain(&decoded).as_ref(),
        Ok(credentials),
        "PLAIN credentials do not survive encode_plain"
    );
}
