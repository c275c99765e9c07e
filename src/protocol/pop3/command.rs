//! The POP3 commands a client may send before it has logged in (RFC 1939, 2449, 5034), and
//! the line framing both POP3 sides share. No I/O: the parsers are fed whatever bytes have
//! arrived and answer "need more data" until a whole line is there, so a command cut across
//! TCP reads parses the same as one that came in one piece.
//!
//! Lines end in CRLF; a bare LF is accepted too, as Dovecot does. Keywords are
//! case-insensitive. Arguments are split the way Dovecot's pop3-login splits them: the keyword
//! ends at the first space and the argument is the rest of the line, spaces included (so a
//! password may hold spaces).

/// The result of looking for one line at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// No line end yet and the line may still fit: read more bytes and look again.
    Incomplete,
    /// A whole line: `line` is its content without CRLF/LF; `consumed` is how many bytes of
    /// the buffer it took, line end included.
    Complete { consumed: usize, line: &'a [u8] },
    /// The line, line end included, is longer than the limit (or will be: no line end was found
    /// within the limit). The caller should give up on the connection.
    TooLong,
}

/// Finds the first line in `buf`. `max_line` is the longest line accepted, line end included.
pub fn next_line(buf: &[u8], max_line: usize) -> Line<'_> {
    let window = &buf[..buf.len().min(max_line)];
    match window.iter().position(|b| *b == b'\n') {
        Some(lf) => {
            let mut line = &buf[..lf];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            Line::Complete {
                consumed: lf + 1,
                line,
            }
        }
        // Even if the next byte were LF, the line would be `max_line + 1` bytes long.
        None if buf.len() >= max_line => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// A pre-authentication command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `CAPA` (RFC 2449): list capabilities.
    Capa,
    /// `USER name`: the name for a following `PASS`. May be empty (the session refuses it).
    User(String),
    /// `PASS password`: the password is the rest of the line after one space, spaces included.
    Pass(String),
    /// `AUTH` without arguments: the old-style SASL discovery some clients (Outlook) use,
    /// answered with the list of mechanisms.
    AuthList,
    /// `AUTH mechanism [initial-response]` (RFC 5034).
    Auth {
        /// The mechanism name, upper-cased (`PLAIN`, `LOGIN`, ...).
        mechanism: String,
        /// The base64 initial response (`=` stands for an empty one), not decoded.
        initial_response: Option<String>,
    },
    /// `STLS` (RFC 2595).
    Stls,
    /// `QUIT`.
    Quit,
    /// `NOOP`.
    Noop,
    /// A known command whose argument is not UTF-8. Names and passwords are UTF-8 strings
    /// everywhere after the front end, so the session refuses it.
    NotUtf8 {
        /// The upper-cased keyword (`USER`, `PASS`, `AUTH`).
        keyword: &'static str,
    },
    /// Any other command, or an empty line. Holds the upper-cased keyword (lossily decoded)
    /// for logs.
    Other(String),
}

impl Command {
    /// Parses one line, without its line end.
    pub fn parse(line: &[u8]) -> Command {
        let (keyword, args) = match line.iter().position(|b| *b == b' ') {
            Some(sp) => (&line[..sp], Some(&line[sp + 1..])),
            None => (line, None),
        };
        let keyword = keyword.to_ascii_uppercase();
        let text = |kw: &'static str| -> Result<String, Command> {
            let raw = args.unwrap_or_default();
            String::from_utf8(raw.to_vec()).map_err(|_| Command::NotUtf8 { keyword: kw })
        };
        let parsed = match keyword.as_slice() {
            b"CAPA" => Ok(Command::Capa),
            b"STLS" => Ok(Command::Stls),
            b"QUIT" => Ok(Command::Quit),
            b"NOOP" => Ok(Command::Noop),
            b"USER" => text("USER").map(Command::User),
            b"PASS" => text("PASS").map(Command::Pass),
            b"AUTH" => text("AUTH").map(|args| Self::auth(&args)),
            _ => Ok(Command::Other(
                String::from_utf8_lossy(&keyword).into_owned(),
            )),
        };
        parsed.unwrap_or_else(|invalid| invalid)
    }

    /// `AUTH`'s arguments: the mechanism, then, after one space, the initial response.
    fn auth(args: &str) -> Command {
        if args.is_empty() {
            return Command::AuthList;
        }
        let (mechanism, initial_response) = match args.split_once(' ') {
            Some((m, ir)) => (m, Some(ir.to_owned())),
            None => (args, None),
        };
        Command::Auth {
            mechanism: mechanism.to_ascii_uppercase(),
            initial_response,
        }
    }
}

/// The result of looking for one command at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// No whole line yet: read more bytes and call again with the same buffer, extended.
    Incomplete,
    /// A command, which took the first `consumed` bytes of the buffer (line end included).
    Line { consumed: usize, command: Command },
    /// The line is longer than allowed; see [`Line::TooLong`].
    TooLong,
}

/// Parses the first command line in `buf`; `max_line` is the longest line accepted, line end
/// included.
pub fn parse_line(buf: &[u8], max_line: usize) -> Parse {
    match next_line(buf, max_line) {
        Line::Incomplete => Parse::Incomplete,
        Line::TooLong => Parse::TooLong,
        Line::Complete { consumed, line } => Parse::Line {
            consumed,
            command: Command::parse(line),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `script` in chunks of `chunk` bytes, as TCP reads might deliver it, and parses
    /// every command as soon as its line is complete. Stops at the first `TooLong`.
    fn replay(script: &[u8], chunk: usize, max_line: usize) -> Vec<Parse> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for piece in script.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match parse_line(&buf, max_line) {
                    Parse::Incomplete => break,
                    Parse::TooLong => {
                        out.push(Parse::TooLong);
                        return out;
                    }
                    Parse::Line { consumed, command } => {
                        buf.drain(..consumed);
                        out.push(Parse::Line { consumed, command });
                    }
                }
            }
        }
        out
    }

    /// Replays `script` cut into chunks of 1, 2, 4, ... 512 bytes; all must agree with `want`.
    fn check(script: &[u8], max_line: usize, want: &[Parse]) {
        let mut chunk = 1;
        while chunk <= 512 {
            assert_eq!(
                replay(script, chunk, max_line),
                want,
                "{}, chunk size {chunk}",
                String::from_utf8_lossy(script).escape_debug()
            );
            chunk *= 2;
        }
    }

    fn line(consumed: usize, command: Command) -> Parse {
        Parse::Line { consumed, command }
    }

    fn auth(mechanism: &str, initial_response: Option<&str>) -> Command {
        Command::Auth {
            mechanism: mechanism.into(),
            initial_response: initial_response.map(Into::into),
        }
    }

    #[test]
    fn scripts_of_commands() {
        let scripts: [(&[u8], Vec<Parse>); 3] = [
            // A session: keywords in any case, arguments kept as sent, a bare LF.
            (
                b"capa\r\nUSER alice\r\nPASS  secret with spaces \r\nStLs\r\nnoop\nQUIT\r\n",
                vec![
                    line(6, Command::Capa),
                    line(12, Command::User("alice".into())),
                    line(27, Command::Pass(" secret with spaces ".into())),
                    line(6, Command::Stls),
                    line(5, Command::Noop),
                    line(6, Command::Quit),
                ],
            ),
            // The forms of AUTH.
            (
                b"AUTH\r\nauth plain\r\nAUTH PLAIN AGFsaWNlAHB3\r\nAUTH login =\r\nAUTH \r\n",
                vec![
                    line(6, Command::AuthList),
                    line(12, auth("PLAIN", None)),
                    line(25, auth("PLAIN", Some("AGFsaWNlAHB3"))),
                    line(14, auth("LOGIN", Some("="))),
                    line(7, Command::AuthList),
                ],
            ),
            // Unknown, empty and non-UTF-8 lines.
            (
                b"APOP alice abc\r\n\r\nUSER \xff\xfe\r\nPASS\r\nUSER\r\nxyz\xff\r\n",
                vec![
                    line(16, Command::Other("APOP".into())),
                    line(2, Command::Other(String::new())),
                    line(9, Command::NotUtf8 { keyword: "USER" }),
                    line(6, Command::Pass(String::new())),
                    line(6, Command::User(String::new())),
                    line(6, Command::Other("XYZ\u{fffd}".into())),
                ],
            ),
        ];
        for (script, want) in scripts {
            check(script, 8192, &want);
        }
    }

    #[test]
    fn line_length_limit_counts_the_line_end() {
        // "USER abc\r\n" is 10 bytes: accepted at 10, refused at 9.
        check(
            b"USER abc\r\n",
            10,
            &[line(10, Command::User("abc".into()))],
        );
        check(b"USER abc\r\n", 9, &[Parse::TooLong]);
        // A line with no end at all is refused once the limit is reached.
        check(
            b"CAPA\r\nUSER aaaaaaaaaaaaaaaaaaaaaaa",
            16,
            &[line(6, Command::Capa), Parse::TooLong],
        );
        // Below the limit it is only incomplete.
        assert_eq!(parse_line(b"USER a", 16), Parse::Incomplete);
    }

    #[test]
    fn next_line_strips_only_the_final_cr() {
        assert_eq!(
            next_line(b"a\rb\r\nrest", 100),
            Line::Complete {
                consumed: 5,
                line: b"a\rb"
            }
        );
        assert_eq!(
            next_line(b"\n", 100),
            Line::Complete {
                consumed: 1,
                line: b""
            }
        );
        assert_eq!(next_line(b"", 100), Line::Incomplete);
    }
}
