//! The grammar of IMAP commands before login (RFC 9051 / RFC 3501 syntax, with LITERAL+ from
//! RFC 7888). No I/O: a [`CommandParser`] is shown the front of the session's read buffer and
//! says whether a whole command is there, whether the client waits for a continuation
//! (`+ Ready for literal data`), or what was wrong.
//!
//! Parsing runs in two steps. *Framing* ([`crate::protocol::literal::Framer`], shared with
//! ManageSieve) finds where a command ends: its line, and for each line that ends in a literal
//! header (`{n}` or `{n+}`) the `n` bytes of the literal and the line after it, within the
//! limits. *Grammar* then reads the tag, the command name and the arguments of the framed
//! bytes. A grammar error consumes the whole framed command, literals included, so the session
//! stays in step with the client.

use std::fmt;

use crate::protocol::literal::{Cursor, Frame, Framer};

crate::protocol::preauth::command_names! {
    /// The commands a front end answers before login. Anything else is kept by name, so the
    /// session can answer "Unknown command".
    Capability = "CAPABILITY", Noop = "NOOP", Logout = "LOGOUT", Id = "ID",
    Starttls = "STARTTLS", Login = "LOGIN", Authenticate = "AUTHENTICATE",
}

/// One argument of a command.
#[derive(Clone, PartialEq, Eq)]
pub enum Arg {
    /// A bare word (ASCII only), e.g. a mechanism name or a base64 initial response.
    Atom(String),
    /// A quoted string, escapes removed. Any byte but CR, LF and NUL.
    Quoted(Vec<u8>),
    /// A literal (`{n}` or `{n+}`): any bytes.
    Literal(Vec<u8>),
    /// The atom `NIL` (any case).
    Nil,
    /// A parenthesised list, e.g. the parameters of ID.
    List(Vec<Arg>),
}

impl Arg {
    /// The value of an `astring` (atom, quoted string or literal; `NIL` is the string "NIL"
    /// there). `None` for a list.
    pub fn astring(&self) -> Option<&[u8]> {
        match self {
            Arg::Atom(atom) => Some(atom.as_bytes()),
            Arg::Quoted(bytes) | Arg::Literal(bytes) => Some(bytes),
            Arg::Nil => Some(b"NIL"),
            Arg::List(_) => None,
        }
    }

    /// The value of an `nstring`: `Some(None)` for NIL, `None` for an atom or a list (which
    /// an nstring cannot be).
    pub fn nstring(&self) -> Option<Option<&[u8]>> {
        match self {
            Arg::Nil => Some(None),
            Arg::Quoted(bytes) | Arg::Literal(bytes) => Some(Some(bytes)),
            Arg::Atom(_) | Arg::List(_) => None,
        }
    }
}

// Arguments may hold passwords: show their shape and length, never their bytes.
impl fmt::Debug for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Atom(atom) => write!(f, "Atom(<{} bytes>)", atom.len()),
            Arg::Quoted(bytes) => write!(f, "Quoted(<{} bytes>)", bytes.len()),
            Arg::Literal(bytes) => write!(f, "Literal(<{} bytes>)", bytes.len()),
            Arg::Nil => f.write_str("Nil"),
            Arg::List(items) => f.debug_tuple("List").field(items).finish(),
        }
    }
}

/// A complete command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The client's tag, echoed in the tagged reply. Only tag characters (ASCII, no space).
    pub tag: String,
    pub name: CommandName,
    pub args: Vec<Arg>,
}

/// Why bytes from the client are not a command. The session answers `BAD` (tagged when the
/// tag could be read, else untagged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Bytes to drop from the front of the buffer before parsing again.
    pub consumed: usize,
    /// The tag, if the line started with a valid one.
    pub tag: Option<String>,
    /// The command name, if it could be read.
    pub command: Option<CommandName>,
    /// A response code for the BAD reply, e.g. `TOOBIG`.
    pub code: Option<&'static str>,
    /// What was wrong, for the client ("Missing arguments.").
    pub message: String,
    /// The session cannot find the start of the next command (a line or a non-synchronising
    /// literal over the limits): it must say `* BYE` and close.
    pub fatal: bool,
}

/// What [`CommandParser::parse`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// No complete command yet: read more bytes, append them and call again.
    Incomplete,
    /// The client announced a synchronising literal and waits for `+ Ready for literal
    /// data\r\n` before sending it: send that, then call again (reading more if that returns
    /// `Incomplete`). Returned once per synchronising literal.
    NeedContinuation,
    /// A complete command; drop `consumed` bytes from the front of the buffer.
    Command { consumed: usize, command: Command },
    /// Not a command; see [`ParseError`].
    Error(ParseError),
}

/// The streaming command parser of one session.
///
/// Contract: the caller passes its whole read buffer each time, only appends to it between
/// calls that return [`Parse::Incomplete`] or [`Parse::NeedContinuation`], and drops exactly
/// `consumed` bytes from the front after a command or an error (or calls [`reset`] when it
/// throws the buffer away, e.g. at STARTTLS).
///
/// [`reset`]: CommandParser::reset
#[derive(Debug, Clone)]
pub struct CommandParser {
    /// Finds where a command ends: its lines and literals, within the limits.
    framer: Framer,
}

impl CommandParser {
    /// A parser that accepts command lines up to `max_line` bytes (literal contents excluded)
    /// and literals up to `max_literal` bytes in total per command. A session's buffer then
    /// never needs more than `max_line + max_literal` bytes.
    pub fn new(max_line: usize, max_literal: usize) -> Self {
        CommandParser {
            framer: Framer::new(max_line, max_literal, true),
        }
    }

    /// Forgets the partly framed command: the buffer was emptied.
    pub fn reset(&mut self) {
        self.framer.reset();
    }

    /// Looks at the front of `buf` (the session's read buffer).
    pub fn parse(&mut self, buf: &[u8]) -> Parse {
        let (consumed, code, message, fatal) = match self.framer.frame(buf) {
            Frame::Incomplete => return Parse::Incomplete,
            Frame::Continuation => return Parse::NeedContinuation,
            Frame::Complete(end) => return grammar(&buf[..end]),
            Frame::TooLong => (buf.len(), None, "Too long command line.", true),
            // A synchronising literal was not sent: the client waits for `+`, so dropping the
            // line keeps us in step. A non-synchronising one is on its way, and passing over
            // it is not worth the trouble.
            Frame::LiteralTooLarge { line_end, sync } => (
                if sync { line_end } else { buf.len() },
                Some("TOOBIG"),
                "Literal too large.",
                !sync,
            ),
        };
        let (tag, command) = tag_and_name(&mut Cursor::new(buf));
        Parse::Error(ParseError {
            consumed,
            tag,
            command,
            code,
            message: message.to_owned(),
            fatal,
        })
    }
}

/// The command in a framed unit, or what is wrong with it.
fn grammar(unit: &[u8]) -> Parse {
    match command(&mut Cursor::new(unit)) {
        Ok(command) => Parse::Command {
            consumed: unit.len(),
            command,
        },
        Err(failure) => Parse::Error(ParseError {
            consumed: unit.len(),
            tag: failure.tag,
            command: failure.command,
            code: None,
            message: failure.message.to_owned(),
            fatal: false,
        }),
    }
}

/// The longest `x-session-ext-id` taken from a client (Dovecot's `LOGIN_MAX_SESSION_ID_LEN`).
pub const MAX_SESSION_EXT_ID: usize = 64;

/// What a client's `ID` says about the real client behind it: a webmail front end or a proxy
/// sends its own user's address (`x-originating-ip`, `x-originating-port`) and its session id
/// (`x-session-ext-id`). Only a trusted client may be believed; the front end decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginatingFields {
    /// `x-originating-ip`, parsed.
    pub ip: Option<std::net::IpAddr>,
    /// `x-originating-port`, 0-65535.
    pub port: Option<u16>,
    /// `x-session-ext-id`: at most [`MAX_SESSION_EXT_ID`] visible ASCII characters.
    pub session_ext_id: Option<String>,
    /// Fields present but unusable (key, raw value), for a debug line; they are ignored.
    pub rejected: Vec<(&'static str, Vec<u8>)>,
}

/// Reads the originating-client fields of `ID`'s arguments (keys in any case; NIL values and
/// other keys are skipped; a value that does not parse lands in `rejected`).
pub fn originating_fields(args: &[Arg]) -> OriginatingFields {
    let mut out = OriginatingFields::default();
    let [Arg::List(items)] = args else {
        return out;
    };
    for pair in items.chunks(2) {
        let [key, value] = pair else { continue };
        let (Some(Some(key)), Some(Some(value))) = (key.nstring(), value.nstring()) else {
            continue;
        };
        let text = std::str::from_utf8(value).ok();
        if key.eq_ignore_ascii_case(b"x-originating-ip") {
            // Dovecot also takes an IPv6 address in brackets.
            let ip = text
                .map(|t| {
                    t.strip_prefix('[')
                        .and_then(|t| t.strip_suffix(']'))
                        .unwrap_or(t)
                })
                .and_then(|t| t.parse().ok());
            match ip {
                Some(ip) => out.ip = Some(ip),
                None => out.rejected.push(("x-originating-ip", value.to_vec())),
            }
        } else if key.eq_ignore_ascii_case(b"x-originating-port") {
            let port = text
                .filter(|t| !t.is_empty() && t.len() <= 5 && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u16>().ok());
            match port {
                Some(port) => out.port = Some(port),
                None => out.rejected.push(("x-originating-port", value.to_vec())),
            }
        } else if key.eq_ignore_ascii_case(b"x-session-ext-id") {
            let ok = !value.is_empty()
                && value.len() <= MAX_SESSION_EXT_ID
                && value.iter().all(u8::is_ascii_graphic);
            match text.filter(|_| ok) {
                Some(id) => out.session_ext_id = Some(id.to_owned()),
                None => out.rejected.push(("x-session-ext-id", value.to_vec())),
            }
        }
    }
    out
}

/// Deepest nesting of parenthesised lists accepted (ID needs one level).
const MAX_LIST_DEPTH: usize = 8;

/// A grammar error inside a framed command.
struct Failure {
    tag: Option<String>,
    command: Option<CommandName>,
    message: &'static str,
}

/// The tag and the command name at the cursor, as far as they can be read (for error
/// replies).
fn tag_and_name(c: &mut Cursor<'_>) -> (Option<String>, Option<CommandName>) {
    let Some(tag) = word(c, is_tag_char) else {
        return (None, None);
    };
    if c.at_eol() {
        return (Some(tag), None);
    }
    if c.peek() != Some(b' ') {
        return (None, None);
    }
    c.pos += 1;
    let name = word(c, is_atom_char).map(|n| CommandName::from_atom(&n));
    (Some(tag), name)
}

/// The grammar of one framed command (whose literals are known to be complete).
fn command(c: &mut Cursor<'_>) -> Result<Command, Failure> {
    let (tag, name) = tag_and_name(c);
    let fail = |message| Failure {
        tag: tag.clone(),
        command: name.clone(),
        message,
    };
    let Some(tag) = tag.clone() else {
        return Err(fail("Invalid tag."));
    };
    let Some(name) = name.clone() else {
        return Err(fail("Missing command name."));
    };
    let mut args = Vec::new();
    loop {
        match c.peek() {
            Some(b' ') => {
                c.pos += 1;
                args.push(arg(c, 0).map_err(fail)?);
            }
            _ if c.at_eol() => break,
            _ => return Err(fail("Unexpected characters after arguments.")),
        }
    }
    Ok(Command { tag, name, args })
}

/// The non-empty word of `accept` characters at the cursor (ASCII only, so always text).
fn word(c: &mut Cursor<'_>, accept: fn(u8) -> bool) -> Option<String> {
    let word = std::str::from_utf8(c.take_while(accept)).ok()?;
    (!word.is_empty()).then(|| word.to_owned())
}

fn arg(c: &mut Cursor<'_>, depth: usize) -> Result<Arg, &'static str> {
    match c.peek() {
        Some(b'"') => c.quoted().map(Arg::Quoted),
        Some(b'{') => c.literal().map(Arg::Literal),
        Some(b'(') => list(c, depth),
        _ => match word(c, is_atom_char) {
            Some(atom) if atom.eq_ignore_ascii_case("NIL") => Ok(Arg::Nil),
            Some(atom) => Ok(Arg::Atom(atom)),
            None if c.at_eol() || c.peek().is_none() => Err("Missing argument."),
            None => Err("Invalid characters in argument."),
        },
    }
}

fn list(c: &mut Cursor<'_>, depth: usize) -> Result<Arg, &'static str> {
    if depth >= MAX_LIST_DEPTH {
        return Err("Lists nested too deeply.");
    }
    c.pos += 1;
    let mut items = Vec::new();
    if c.peek() == Some(b')') {
        c.pos += 1;
        return Ok(Arg::List(items));
    }
    loop {
        items.push(arg(c, depth + 1)?);
        match c.peek() {
            Some(b' ') => c.pos += 1,
            Some(b')') => {
                c.pos += 1;
                return Ok(Arg::List(items));
            }
            _ => return Err("Missing ')'."),
        }
    }
}

/// ATOM-CHAR plus `]` (ASTRING-CHAR) and the list wildcards `%` `*`, which some commands use.
fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'"' | b'\\')
}

/// Characters allowed in a tag: ASTRING-CHAR except `+`, and not the wildcards.
fn is_tag_char(b: u8) -> bool {
    is_atom_char(b) && !matches!(b, b'+' | b'%' | b'*')
}

#[cfg(test)]
mod tests {
    #[test]
    fn originating_fields_are_read_and_checked() {
        use std::net::IpAddr;
        let list = |pairs: &[(&str, Option<&[u8]>)]| {
            let mut items = Vec::new();
            for (k, v) in pairs {
                items.push(Arg::Quoted(k.as_bytes().to_vec()));
                items.push(v.map_or(Arg::Nil, |v| Arg::Literal(v.to_vec())));
            }
            vec![Arg::List(items)]
        };
        let f = originating_fields(&list(&[
            ("name", Some(b"roundcube")),
            ("X-Originating-IP", Some(b"192.0.2.7")),
            ("x-originating-port", Some(b"51234")),
            ("x-session-ext-id", Some(b"abc123")),
        ]));
        assert_eq!(f.ip, Some("192.0.2.7".parse::<IpAddr>().unwrap()));
        assert_eq!(f.port, Some(51234));
        assert_eq!(f.session_ext_id.as_deref(), Some("abc123"));
        assert!(f.rejected.is_empty());
        let f = originating_fields(&list(&[("x-originating-ip", Some(b"[2001:db8::1]"))]));
        assert_eq!(f.ip, Some("2001:db8::1".parse::<IpAddr>().unwrap()));
        // Unusable values are reported and ignored; NIL is skipped.
        let long = [b'a'; MAX_SESSION_EXT_ID + 1];
        for (key, value) in [
            ("x-originating-ip", b"192.0.2.300".as_slice()),
            ("x-originating-ip", b"host.example"),
            ("x-originating-port", b"65536"),
            ("x-originating-port", b"+80"),
            ("x-originating-port", b""),
            ("x-session-ext-id", b"a b"),
            ("x-session-ext-id", b"a\r\nb"),
            ("x-session-ext-id", &long),
            ("x-session-ext-id", b""),
        ] {
            let f = originating_fields(&list(&[(key, Some(value))]));
            assert_eq!(
                f,
                OriginatingFields {
                    rejected: vec![(key, value.to_vec())],
                    ..OriginatingFields::default()
                },
                "{key} {value:?}"
            );
        }
        let f = originating_fields(&list(&[("x-originating-port", Some(b"0"))]));
        assert_eq!(f.port, Some(0));
        let f = originating_fields(&list(&[("x-originating-ip", None)]));
        assert_eq!(f, OriginatingFields::default());
        assert_eq!(
            originating_fields(&[Arg::Nil]),
            OriginatingFields::default()
        );
    }

    use super::*;
    use crate::protocol::literal::testing::{self, Step};

    /// What a session would do with each parse result, for comparing runs.
    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Continuation,
        Command(Command),
        Error {
            tag: Option<String>,
            code: Option<&'static str>,
            fatal: bool,
        },
    }

    /// Replays `script` through a parser in chunks of 1, 2, 4, … 512 bytes, as a session
    /// reads it, and checks that every run sees the same events; returns them. Stops at a
    /// fatal error.
    fn replay_all(script: &[u8], max_line: usize, max_literal: usize) -> Vec<Event> {
        testing::replay_all(script, |chunk| {
            let mut parser = CommandParser::new(max_line, max_literal);
            let cap = max_line + max_literal;
            testing::replay(script, chunk, cap, |buf| match parser.parse(buf) {
                Parse::Incomplete => Step::Incomplete,
                Parse::NeedContinuation => Step::Waiting(Event::Continuation),
                Parse::Command { consumed, command } => {
                    Step::consumed(consumed, Event::Command(command))
                }
                Parse::Error(e) => Step::Consumed {
                    consumed: e.consumed,
                    fatal: e.fatal,
                    event: Event::Error {
                        tag: e.tag,
                        code: e.code,
                        fatal: e.fatal,
                    },
                },
            })
        })
    }

    fn commands(script: &[u8]) -> Vec<Event> {
        replay_all(script, 1024, 1024)
    }

    fn cmd(tag: &str, name: CommandName, args: Vec<Arg>) -> Event {
        Event::Command(Command {
            tag: tag.to_owned(),
            name,
            args,
        })
    }

    fn login(tag: &str, username: Arg, password: Arg) -> Event {
        cmd(tag, CommandName::Login, vec![username, password])
    }

    fn atom(s: &str) -> Arg {
        Arg::Atom(s.to_owned())
    }

    fn quoted(s: &[u8]) -> Arg {
        Arg::Quoted(s.to_vec())
    }

    fn literal(s: &[u8]) -> Arg {
        Arg::Literal(s.to_vec())
    }

    fn error(tag: Option<&str>) -> Event {
        Event::Error {
            tag: tag.map(str::to_owned),
            code: None,
            fatal: false,
        }
    }

    #[test]
    fn atoms_and_case_insensitive_names() {
        let events = commands(
            b"a1 CAPABILITY\r\na2 noop\r\nA3 LoGiN alice secret\r\n\
              a4 authenticate PLAIN AGFsaWNlAHNlY3JldA==\r\na5 logout\nx starttls\r\n",
        );
        assert_eq!(
            events,
            vec![
                cmd("a1", CommandName::Capability, vec![]),
                cmd("a2", CommandName::Noop, vec![]),
                login("A3", atom("alice"), atom("secret")),
                cmd(
                    "a4",
                    CommandName::Authenticate,
                    vec![atom("PLAIN"), atom("AGFsaWNlAHNlY3JldA==")]
                ),
                cmd("a5", CommandName::Logout, vec![]),
                cmd("x", CommandName::Starttls, vec![]),
            ]
        );
    }

    #[test]
    fn quoted_strings_with_escapes() {
        let events =
            commands(b"a LOGIN \"al ice\" \"p\\\"w\\\\d\"\r\nb LOGIN \"\" \"\xc3\xa9\"\r\n");
        assert_eq!(
            events,
            vec![
                login("a", quoted(b"al ice"), quoted(b"p\"w\\d")),
                login("b", quoted(b""), quoted("é".as_bytes())),
            ]
        );
    }

    #[test]
    fn synchronising_literals_wait_for_continuation() {
        let events = commands(b"a LOGIN {5}\r\nalice {6}\r\nsecret\r\nb NOOP\r\n");
        assert_eq!(
            events,
            vec![
                Event::Continuation,
                Event::Continuation,
                login("a", literal(b"alice"), literal(b"secret")),
                cmd("b", CommandName::Noop, vec![]),
            ]
        );
    }

    #[test]
    fn non_synchronising_literals() {
        let events = commands(b"a LOGIN {5+}\r\nalice {0+}\r\n\r\n");
        assert_eq!(events, vec![login("a", literal(b"alice"), literal(b""))]);
    }

    #[test]
    fn literal_holding_crlf_nul_and_quotes() {
        let events = commands(b"a LOGIN alice {22+}\r\np\"w\r\nb LOGOUT\r\n\0\\{3}\r\n\r\n");
        assert_eq!(
            events,
            vec![login(
                "a",
                atom("alice"),
                literal(b"p\"w\r\nb LOGOUT\r\n\0\\{3}\r\n")
            )]
        );
    }

    #[test]
    fn id_with_list_and_nil() {
        let events = commands(
            b"i1 ID (\"name\" \"mutt\" \"version\" NIL)\r\ni2 ID NIL\r\ni3 id ()\r\n\
              i4 ID (\"os\" {5}\r\nLinux)\r\n",
        );
        assert_eq!(
            events,
            vec![
                cmd(
                    "i1",
                    CommandName::Id,
                    vec![Arg::List(vec![
                        quoted(b"name"),
                        quoted(b"mutt"),
                        quoted(b"version"),
                        Arg::Nil
                    ])]
                ),
                cmd("i2", CommandName::Id, vec![Arg::Nil]),
                cmd("i3", CommandName::Id, vec![Arg::List(vec![])]),
                Event::Continuation,
                cmd(
                    "i4",
                    CommandName::Id,
                    vec![Arg::List(vec![quoted(b"os"), literal(b"Linux")])]
                ),
            ]
        );
    }

    #[test]
    fn unknown_command_and_syntax_errors() {
        let events = commands(
            b"a SELECT INBOX\r\n\r\n* LOGIN a b\r\nb\r\nc LOGIN \"open\r\n\
              d LOGIN a  b\r\ne LOGIN \"a\\x\" b\r\nf LOGIN (a b\r\ng NOOP\r\n",
        );
        assert_eq!(
            events,
            vec![
                cmd(
                    "a",
                    CommandName::Other("SELECT".into()),
                    vec![atom("INBOX")]
                ),
                error(None),
                error(None),
                error(Some("b")),
                error(Some("c")),
                error(Some("d")),
                error(Some("e")),
                error(Some("f")),
                cmd("g", CommandName::Noop, vec![]),
            ]
        );
    }

    #[test]
    fn syntax_error_before_a_literal_skips_the_literal() {
        // The bad command's literal must not be read as a command.
        let events = commands(b"a LOGIN \"x {10+}\r\nb LOGOUT\r\n\r\nc NOOP\r\n");
        assert_eq!(
            events,
            vec![error(Some("a")), cmd("c", CommandName::Noop, vec![])]
        );
    }

    #[test]
    fn too_long_line_is_fatal() {
        let mut script = b"a LOGIN ".to_vec();
        script.extend(std::iter::repeat_n(b'x', 200));
        script.extend_from_slice(b" y\r\nb NOOP\r\n");
        let events = replay_all(&script, 64, 64);
        assert_eq!(
            events,
            vec![Event::Error {
                tag: Some("a".into()),
                code: None,
                fatal: true
            }]
        );
        // A line exactly at the limit is fine.
        let events = replay_all(b"a NOOP\r\n", 8, 0);
        assert_eq!(events, vec![cmd("a", CommandName::Noop, vec![])]);
    }

    #[test]
    fn too_big_literals() {
        // Synchronising: the client has not sent it; answer and go on.
        let events = replay_all(b"a LOGIN {100}\r\nb NOOP\r\n", 64, 64);
        let toobig = |fatal| Event::Error {
            tag: Some("a".into()),
            code: Some("TOOBIG"),
            fatal,
        };
        assert_eq!(
            events,
            vec![toobig(false), cmd("b", CommandName::Noop, vec![])]
        );
        // Non-synchronising: its bytes are coming, the session must close.
        let mut script = b"a LOGIN {100+}\r\n".to_vec();
        script.extend(std::iter::repeat_n(b'x', 100));
        script.extend_from_slice(b"\r\n");
        assert_eq!(replay_all(&script, 64, 64), vec![toobig(true)]);
        // Two literals that each fit but together do not.
        let mut script = b"a LOGIN {40}\r\n".to_vec();
        script.extend(std::iter::repeat_n(b'x', 40));
        script.extend_from_slice(b" {40}\r\nb NOOP\r\n");
        assert_eq!(
            replay_all(&script, 64, 64),
            vec![
                Event::Continuation,
                toobig(false),
                cmd("b", CommandName::Noop, vec![])
            ]
        );
        // A size that does not fit in usize.
        let events = replay_all(b"a LOGIN {99999999999999999999999}\r\n", 64, 64);
        assert_eq!(events, vec![toobig(false)]);
    }

    #[test]
    fn arguments_never_show_in_debug_output() {
        let arg = quoted(b"hunter2");
        assert!(!format!("{arg:?}").contains("hunter2"));
    }
}
