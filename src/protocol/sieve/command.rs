//! The grammar of ManageSieve (RFC 5804) as the director needs it: the commands a client may
//! send before login, the client's SASL responses, and the response lines of a backend. No
//! I/O: a [`Framer`] is shown the front of a read buffer and says whether a whole unit (a line
//! and the literals it announces) is there yet, so bytes cut across TCP reads parse the same
//! as bytes that came in one piece.
//!
//! ManageSieve strings are quoted (`"..."`, with `\"` and `\\` escapes) or literals. RFC 5804
//! §4 lets a client send only non-synchronising literals (`{n+}`) and a server only `{n}`;
//! there is no continuation request. Dovecot's managesieve-login nevertheless reads a client's
//! `{n}` at once, without sending anything, and so do we: a client that sends `{n}` and
//! waits is a client no ManageSieve server answers, while one that sends `{n}` and its bytes
//! must not have those bytes read as commands.
//!
//! Parsing runs in two steps, as in `imap::command`. *Framing* ([`literal::Framer`], shared
//! with IMAP) finds where a unit ends and enforces the limits before anything is buffered
//! beyond them. *Tokenising* then reads the atoms, strings and parentheses of the framed bytes.

use std::fmt;

use crate::protocol::literal::{self, Cursor, Frame};

/// One word of a framed unit.
#[derive(Clone, PartialEq, Eq)]
pub enum Token {
    /// A bare word: a command name, a status (`OK`), a response code, a number.
    Atom(String),
    /// A quoted string (escapes removed) or a literal: any bytes.
    String(Vec<u8>),
    /// `(`, which opens a response code (`NO (TRYLATER) "..."`).
    Open,
    /// `)`.
    Close,
}

impl Token {
    /// The value of a string, or of an atom read as a string (lenient clients send
    /// `AUTHENTICATE PLAIN`); `None` for a parenthesis.
    pub fn as_string(&self) -> Option<&[u8]> {
        match self {
            Token::Atom(atom) => Some(atom.as_bytes()),
            Token::String(bytes) => Some(bytes),
            Token::Open | Token::Close => None,
        }
    }
}

// Strings may hold passwords: show their length, never their bytes.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Atom(atom) => write!(f, "Atom({atom:?})"),
            Token::String(bytes) => write!(f, "String(<{} bytes>)", bytes.len()),
            Token::Open => f.write_str("Open"),
            Token::Close => f.write_str("Close"),
        }
    }
}

crate::protocol::preauth::command_names! {
    /// The commands a front end answers before login. Anything else is kept by name.
    Capability = "CAPABILITY", Noop = "NOOP", Logout = "LOGOUT", Starttls = "STARTTLS",
    Authenticate = "AUTHENTICATE",
}

/// A complete client command: its name and its arguments (atoms or strings, never
/// parentheses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: CommandName,
    pub args: Vec<Token>,
}

/// What a parser found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// No complete unit yet: read more bytes, append them and call again.
    Incomplete,
    /// A complete unit; drop `consumed` bytes from the front of the buffer.
    Done { consumed: usize, value: T },
    /// Not valid; see [`ParseError`].
    Error(ParseError),
}

/// Why bytes are not a valid unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Bytes to drop from the front of the buffer before parsing again.
    pub consumed: usize,
    /// What was wrong, for the peer ("Too long command line.").
    pub message: &'static str,
    /// The start of the next unit cannot be found (a line or a literal over the limits): the
    /// session must say `BYE` and close.
    pub fatal: bool,
}

/// Finds where a unit (a line, and after each literal header the literal and the rest of the
/// line) ends, keeping its position between calls: [`literal::Framer`] without continuations,
/// so `{n}` is read at once like `{n+}`.
///
/// Contract: the caller passes its whole read buffer each time, only appends to it between
/// calls that return `Ok(None)`, and drops the unit's bytes (or calls [`Framer::reset`] when
/// it throws the buffer away, e.g. at STARTTLS) after a unit or an error.
#[derive(Debug, Clone)]
pub struct Framer(literal::Framer);

impl Framer {
    /// A framer for units of at most `max_line` bytes outside literals and `max_literal`
    /// bytes of literals. A buffer then never needs more than `max_line + max_literal` bytes.
    pub fn new(max_line: usize, max_literal: usize) -> Self {
        Framer(literal::Framer::new(max_line, max_literal, false))
    }

    /// Forgets the partly framed unit: the buffer was emptied.
    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// `Ok(Some(end))`: a whole unit is `buf[..end]`; `Ok(None)`: read more.
    pub fn frame(&mut self, buf: &[u8]) -> Result<Option<usize>, ParseError> {
        let message = match self.0.frame(buf) {
            // No continuation without continuations: only `Incomplete` asks for more.
            Frame::Incomplete | Frame::Continuation => return Ok(None),
            Frame::Complete(end) => return Ok(Some(end)),
            Frame::TooLong => "Too long command line.",
            // The literal's bytes are on their way (no client waits for a continuation), and
            // passing over them is not worth the trouble: close.
            Frame::LiteralTooLarge { .. } => "Literal too large.",
        };
        Err(ParseError {
            consumed: buf.len(),
            message,
            fatal: true,
        })
    }
}

/// Splits a framed unit (whose literals are known to be complete, line end included) into
/// tokens. Tokens are separated by spaces; parentheses need none.
pub fn tokens(unit: &[u8]) -> Result<Vec<Token>, &'static str> {
    let mut cursor = Cursor::new(unit);
    let mut out = Vec::new();
    loop {
        while cursor.peek() == Some(b' ') {
            cursor.pos += 1;
        }
        if cursor.eat_eol() {
            return if cursor.pos == unit.len() {
                Ok(out)
            } else {
                Err("Line end inside the line.")
            };
        }
        let token = match cursor.peek() {
            None => return Err("Missing line end."),
            Some(b'"') => Token::String(cursor.quoted()?),
            Some(b'{') => Token::String(cursor.literal()?),
            Some(b'(') => {
                cursor.pos += 1;
                Token::Open
            }
            Some(b')') => {
                cursor.pos += 1;
                Token::Close
            }
            Some(_) => atom(&mut cursor)?,
        };
        out.push(token);
        // A token must be followed by a space, a parenthesis or the line end.
        match (token_is_word(out.last()), cursor.peek()) {
            (true, Some(b' ' | b'(' | b')' | b'\r' | b'\n')) | (false, _) => {}
            _ => return Err("Missing space between arguments."),
        }
    }
}

fn token_is_word(token: Option<&Token>) -> bool {
    matches!(token, Some(Token::Atom(_) | Token::String(_)))
}

fn atom(cursor: &mut Cursor<'_>) -> Result<Token, &'static str> {
    // Only ASCII characters are accepted, so this cannot fail.
    let word = std::str::from_utf8(cursor.take_while(is_atom_char)).unwrap_or_default();
    if word.is_empty() {
        return Err("Invalid characters in command.");
    }
    Ok(Token::Atom(word.to_owned()))
}

/// Visible ASCII except the characters that start or end other tokens.
fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'}' | b'"' | b'\\')
}

/// The streaming parser of one client session: the [`Framer`], with the grammar of commands
/// and of SASL responses (while an AUTHENTICATE is under way). Same contract.
pub type CommandParser = Framer;

impl Framer {
    /// Looks for a command at the front of `buf`. A grammar error consumes the whole framed
    /// unit, literals included, so the session stays in step with the client.
    pub fn command(&mut self, buf: &[u8]) -> Parse<Command> {
        self.unit(buf, |tokens| {
            let mut tokens = tokens.into_iter();
            let Some(Token::Atom(name)) = tokens.next() else {
                return Err("Missing command name.");
            };
            let args: Vec<Token> = tokens.collect();
            if args.iter().any(|t| matches!(t, Token::Open | Token::Close)) {
                return Err("Unexpected parenthesis.");
            }
            Ok(Command {
                name: CommandName::from_atom(&name),
                args,
            })
        })
    }

    /// Looks for a client's answer to a SASL challenge: one string (quoted or literal) alone
    /// on its line. The value is returned as sent; `"*"` (cancel) is for the caller to see.
    pub fn sasl_response(&mut self, buf: &[u8]) -> Parse<Vec<u8>> {
        self.unit(buf, |tokens| match <[Token; 1]>::try_from(tokens) {
            Ok([Token::String(value)]) => Ok(value),
            _ => Err("Expected one string as the authentication response."),
        })
    }

    fn unit<T>(
        &mut self,
        buf: &[u8],
        grammar: impl FnOnce(Vec<Token>) -> Result<T, &'static str>,
    ) -> Parse<T> {
        let end = match self.frame(buf) {
            Ok(Some(end)) => end,
            Ok(None) => return Parse::Incomplete,
            Err(error) => return Parse::Error(error),
        };
        match tokens(&buf[..end]).and_then(grammar) {
            Ok(value) => Parse::Done {
                consumed: end,
                value,
            },
            Err(message) => Parse::Error(ParseError {
                consumed: end,
                message,
                fatal: false,
            }),
        }
    }
}

/// `text` as a ManageSieve quoted string: `"` and `\` escaped, and control characters
/// (which a quoted string cannot hold) replaced by spaces.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `bytes` as a string a client can read back exactly: quoted when that is possible, else a
/// literal (`{n}` CRLF bytes, the server-to-client form).
pub fn string_bytes(bytes: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(bytes) {
        // `quote` replaces control characters: those strings go as literals.
        Ok(text) if !text.contains(char::is_control) && text.len() <= 1024 => {
            quote(text).into_bytes()
        }
        _ => {
            let mut out = format!("{{{}}}\r\n", bytes.len()).into_bytes();
            out.extend_from_slice(bytes);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::literal::testing::{self, Step};

    /// What a session would see, for comparing runs.
    #[derive(Debug, PartialEq, Eq)]
    enum Event<T> {
        Value(T),
        Error { fatal: bool },
    }

    /// Replays `script` through `parse` in chunks of 1, 2, 4, … 512 bytes, as a session reads
    /// it (never buffering more than the limits allow); every run must see the same events as
    /// one read of the whole script. Returns them. Stops at a fatal error.
    fn replay_all<T: PartialEq + fmt::Debug>(
        script: &[u8],
        max_line: usize,
        max_literal: usize,
        parse: fn(&mut CommandParser, &[u8]) -> Parse<T>,
    ) -> Vec<Event<T>> {
        testing::replay_all(script, |chunk| {
            let mut parser = CommandParser::new(max_line, max_literal);
            let cap = max_line + max_literal + 1;
            testing::replay(script, chunk, cap, |buf| match parse(&mut parser, buf) {
                Parse::Incomplete => Step::Incomplete,
                Parse::Done { consumed, value } => Step::consumed(consumed, Event::Value(value)),
                Parse::Error(e) => Step::Consumed {
                    consumed: e.consumed,
                    event: Event::Error { fatal: e.fatal },
                    fatal: e.fatal,
                },
            })
        })
    }

    fn commands(script: &[u8]) -> Vec<Event<Command>> {
        replay_all(script, 1024, 1024, CommandParser::command)
    }

    fn cmd(name: CommandName, args: Vec<Token>) -> Event<Command> {
        Event::Value(Command { name, args })
    }

    fn s(bytes: &[u8]) -> Token {
        Token::String(bytes.to_vec())
    }

    fn atom(word: &str) -> Token {
        Token::Atom(word.to_owned())
    }

    const ERROR: Event<Command> = Event::Error { fatal: false };

    #[test]
    fn commands_as_clients_send_them() {
        let events = commands(
            b"CAPABILITY\r\nnoop\r\nNoop \"sync-42\"\r\nSTARTTLS\r\n\
              AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHNlY3JldA==\"\r\nauthenticate PLAIN\nLOGOUT\r\n",
        );
        assert_eq!(
            events,
            vec![
                cmd(CommandName::Capability, vec![]),
                cmd(CommandName::Noop, vec![]),
                cmd(CommandName::Noop, vec![s(b"sync-42")]),
                cmd(CommandName::Starttls, vec![]),
                cmd(
                    CommandName::Authenticate,
                    vec![s(b"PLAIN"), s(b"AGFsaWNlAHNlY3JldA==")]
                ),
                cmd(CommandName::Authenticate, vec![atom("PLAIN")]),
                cmd(CommandName::Logout, vec![]),
            ]
        );
    }

    #[test]
    fn literals_of_both_forms_and_escapes() {
        // `{n}` is read at once like `{n+}`: no continuation exists in ManageSieve.
        let events = commands(
            b"AUTHENTICATE {5+}\r\nPLAIN {12}\r\nAG\r\nLOGOUT\r\n\r\n\
              PUTSCRIPT \"a\\\"b\\\\\" {0+}\r\n\r\n",
        );
        assert_eq!(
            events,
            vec![
                cmd(
                    CommandName::Authenticate,
                    vec![s(b"PLAIN"), s(b"AG\r\nLOGOUT\r\n")]
                ),
                cmd(
                    CommandName::Other("PUTSCRIPT".into()),
                    vec![s(b"a\"b\\"), s(b"")]
                ),
            ]
        );
    }

    #[test]
    fn syntax_errors_consume_the_unit_and_its_literals() {
        let events = commands(
            b"\r\n\"quoted\"\r\nNOOP \"open\r\nNOOP \"a\\x\"\r\nNOOP (x)\r\nNOOP \"a\"\"b\"\r\n\
              NOOP \"bad {9+}\r\nLOGOUT\r\n\r\nNOOP\r\n",
        );
        assert_eq!(
            events,
            vec![
                ERROR,
                ERROR,
                ERROR,
                ERROR,
                ERROR,
                ERROR,
                ERROR,
                cmd(CommandName::Noop, vec![])
            ]
        );
    }

    #[test]
    fn sasl_responses() {
        let events = replay_all(
            b"\"AGFsaWNlAHNlY3JldA==\"\r\n{4+}\r\nAGE=\r\n\"*\"\r\nAGE=\r\n\"a\" \"b\"\r\n\"\"\r\n",
            1024,
            1024,
            CommandParser::sasl_response,
        );
        assert_eq!(
            events,
            vec![
                Event::Value(b"AGFsaWNlAHNlY3JldA==".to_vec()),
                Event::Value(b"AGE=".to_vec()),
                Event::Value(b"*".to_vec()),
                Event::Error { fatal: false },
                Event::Error { fatal: false },
                Event::Value(Vec::new()),
            ]
        );
    }

    const FATAL: Event<Command> = Event::Error { fatal: true };

    /// The commands of `script` read with lines and literals of at most 64 bytes.
    fn commands_within_64(script: &[u8]) -> Vec<Event<Command>> {
        replay_all(script, 64, 64, CommandParser::command)
    }

    /// `head`, then `n` times `x`, then `tail`.
    fn padded(head: &[u8], n: usize, tail: &[u8]) -> Vec<u8> {
        [head, &vec![b'x'; n], tail].concat()
    }

    #[test]
    fn line_limit_counts_the_line_end_and_is_fatal() {
        assert_eq!(
            replay_all(b"NOOP\r\n", 6, 0, CommandParser::command),
            vec![cmd(CommandName::Noop, vec![])]
        );
        assert_eq!(
            replay_all(b"NOOP\r\n", 5, 0, CommandParser::command),
            vec![FATAL]
        );
        assert_eq!(
            commands_within_64(&padded(b"NOOP \"", 200, b"\"\r\nNOOP\r\n")),
            vec![FATAL]
        );
    }

    #[test]
    fn literal_limit_is_fatal_and_counts_every_literal() {
        // One literal too large, two that are too large together, and a size beyond usize.
        for script in [
            padded(b"AUTHENTICATE \"PLAIN\" {100+}\r\n", 100, b"\r\n"),
            padded(b"X {40+}\r\n", 40, b" {40+}\r\n"),
            b"X {99999999999999999999999+}\r\n".to_vec(),
        ] {
            assert_eq!(
                commands_within_64(&script),
                vec![FATAL],
                "{}",
                String::from_utf8_lossy(&script)
            );
        }
        // Exactly at the limit is fine.
        assert_eq!(
            commands_within_64(&padded(b"X {64+}\r\n", 64, b"\r\n")),
            vec![cmd(CommandName::Other("X".into()), vec![s(&[b'x'; 64])])]
        );
    }

    #[test]
    fn backend_responses_tokenise() {
        assert_eq!(
            tokens(b"NO (TRYLATER) \"Try again.\"\r\n").unwrap(),
            vec![
                atom("NO"),
                Token::Open,
                atom("TRYLATER"),
                Token::Close,
                s(b"Try again.")
            ]
        );
        assert_eq!(
            tokens(b"OK (TAG {3}\r\na b) \"Done\"\r\n").unwrap(),
            vec![
                atom("OK"),
                Token::Open,
                atom("TAG"),
                s(b"a b"),
                Token::Close,
                s(b"Done")
            ]
        );
        assert_eq!(
            tokens(b"\"SASL\" \"PLAIN LOGIN\"\n").unwrap(),
            vec![s(b"SASL"), s(b"PLAIN LOGIN")]
        );
        assert!(tokens(b"OK \"x\"").is_err());
        assert!(tokens(b"OK \xff\r\n").is_err());
    }

    #[test]
    fn quoting_for_replies() {
        assert_eq!(quote("a \"b\" \\ c\r\n"), "\"a \\\"b\\\" \\\\ c  \"");
        assert_eq!(string_bytes(b"sync-42"), b"\"sync-42\"");
        assert_eq!(string_bytes(b"a\r\nb"), b"{4}\r\na\r\nb");
        assert_eq!(string_bytes(b"\xff"), b"{1}\r\n\xff");
    }

    #[test]
    fn strings_never_show_in_debug_output() {
        assert!(!format!("{:?}", s(b"hunter2")).contains("hunter2"));
    }
}
