//! The line format of Dovecot's auth-client protocol: one command per LF-terminated line,
//! parameters separated by TAB, each parameter tab-escaped (`\x01` then `0`, `1`, `t`, `r` or
//! `n` for NUL, `\x01`, TAB, CR, LF).
//!
//! Everything the service sends is untrusted input here: lines are read with a cap
//! ([`MAX_SERVER_LINE`]), and a line that does not parse is an error naming why, never a panic.

use std::io;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The longest line the auth service accepts from a client, newline included: a longer one
/// makes it drop the connection (Dovecot's `AUTH_CLIENT_MAX_LINE_LENGTH`).
pub const MAX_CLIENT_LINE: usize = 16384;

/// The most bytes of one line from the service that are kept. Dovecot's own client drops the
/// connection over 16384; a little more room costs nothing and spares a reconnect.
pub const MAX_SERVER_LINE: usize = 64 * 1024;

/// Appends `value` tab-escaped to `out`.
pub fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    for &b in value {
        let escaped = match b {
            0 => b'0',
            1 => b'1',
            b'\t' => b't',
            b'\r' => b'r',
            b'\n' => b'n',
            _ => {
                out.push(b);
                continue;
            }
        };
        out.extend_from_slice(&[1, escaped]);
    }
}

/// Undoes [`escape_into`]. An escape of any other byte is that byte; a lone `\x01` at the end
/// is dropped (as Dovecot does).
pub fn unescape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        if b != 1 {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'0') => out.push(0),
            Some(b'1') => out.push(1),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(&other) => out.push(other),
            None => {}
        }
    }
    out
}

/// One `key[=value]` parameter of an `OK` or `FAIL` line, unescaped. A flag has no value.
pub type Field = (String, Option<Vec<u8>>);

/// A line from the auth service, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    Version {
        major: u32,
        minor: u32,
    },
    /// A mechanism and its flags (`plaintext`, `private`...), as sent.
    Mech {
        name: String,
        flags: Vec<String>,
    },
    Spid(u32),
    Cuid(u32),
    Cookie(String),
    Done,
    Ok {
        id: u32,
        fields: Vec<Field>,
    },
    /// A challenge, base64-decoded.
    Cont {
        id: u32,
        data: Vec<u8>,
    },
    Fail {
        id: u32,
        fields: Vec<Field>,
    },
    /// A command this client does not know (the protocol lets either side add some).
    Unknown(String),
}

/// Why a line from the service does not parse. `id` names the request it was for, when that
/// much could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub id: Option<u32>,
    pub reason: &'static str,
}

impl LineError {
    fn new(reason: &'static str) -> Self {
        LineError { id: None, reason }
    }
}

/// Parses one line (without its newline).
pub fn parse_server_line(line: &[u8]) -> Result<ServerLine, LineError> {
    let mut args = line.split(|&b| b == b'\t');
    let command = args.next().unwrap_or_default();
    let number = |arg: Option<&[u8]>, reason| arg.and_then(parse_u32).ok_or(LineError::new(reason));
    match command {
        b"VERSION" => Ok(ServerLine::Version {
            major: number(args.next(), "VERSION without a major version number")?,
            minor: number(args.next(), "VERSION without a minor version number")?,
        }),
        b"MECH" => {
            let name = text(&unescape(args.next().unwrap_or_default()));
            if name.is_empty() {
                return Err(LineError::new("MECH without a name"));
            }
            let flags = args.map(|f| text(&unescape(f))).collect();
            Ok(ServerLine::Mech { name, flags })
        }
        b"SPID" => Ok(ServerLine::Spid(number(args.next(), "SPID is not a pid")?)),
        b"CUID" => Ok(ServerLine::Cuid(number(
            args.next(),
            "CUID is not a number",
        )?)),
        b"COOKIE" => Ok(ServerLine::Cookie(text(&unescape(
            args.next().unwrap_or_default(),
        )))),
        b"DONE" => Ok(ServerLine::Done),
        b"OK" | b"FAIL" | b"CONT" => {
            let id = number(args.next(), "answer without a request id")?;
            let fail = |reason| LineError {
                id: Some(id),
                reason,
            };
            match command {
                b"CONT" => {
                    let data = args.next().ok_or(fail("CONT without data"))?;
                    let data = STANDARD
                        .decode(unescape(data))
                        .map_err(|_| fail("CONT data is not base64"))?;
                    Ok(ServerLine::Cont { id, data })
                }
                b"OK" => Ok(ServerLine::Ok {
                    id,
                    fields: parse_fields(args),
                }),
                _ => Ok(ServerLine::Fail {
                    id,
                    fields: parse_fields(args),
                }),
            }
        }
        other => Ok(ServerLine::Unknown(text(other))),
    }
}

/// The request id of an `OK`, `CONT` or `FAIL` line, from its first bytes (for a line too
/// long to keep whole).
pub fn answer_id(head: &[u8]) -> Option<u32> {
    let mut args = head.split(|&b| b == b'\t');
    match args.next()? {
        b"OK" | b"FAIL" | b"CONT" => parse_u32(args.next()?),
        _ => None,
    }
}

/// The `key[=value]` parameters of an answer, unescaped; empty ones are skipped.
pub fn parse_fields<'a>(args: impl Iterator<Item = &'a [u8]>) -> Vec<Field> {
    args.filter(|a| !a.is_empty())
        .map(|arg| {
            let arg = unescape(arg);
            match arg.iter().position(|&b| b == b'=') {
                Some(eq) => (text(&arg[..eq]), Some(arg[eq + 1..].to_vec())),
                None => (text(&arg), None),
            }
        })
        .collect()
}

/// A decimal number as Dovecot writes one: digits only, no sign, no spaces.
pub fn parse_u32(arg: &[u8]) -> Option<u32> {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A line read with [`LineReader::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadLine {
    /// A whole line, without its LF (and without a CR before it).
    Line(Vec<u8>),
    /// A line longer than the cap: its first `cap` bytes, and how long it was.
    Overlong { head: Vec<u8>, len: usize },
}

/// Reads LF-terminated lines, keeping at most `cap` bytes of each: a peer cannot make it
/// buffer more than that, however long its line.
pub struct LineReader<R> {
    inner: BufReader<R>,
    cap: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, cap: usize) -> Self {
        LineReader {
            inner: BufReader::new(inner),
            cap,
        }
    }

    /// The next line; `None` at the end of the stream (an unterminated last line is dropped).
    /// Not cancel-safe: call it from one task that does not give up half-way.
    pub async fn next(&mut self) -> io::Result<Option<ReadLine>> {
        let mut line = Vec::new();
        let mut len = 0usize;
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                return Ok(None);
            }
            let (chunk, used, complete) = match buf.iter().position(|&b| b == b'\n') {
                Some(at) => (&buf[..at], at + 1, true),
                None => (buf, buf.len(), false),
            };
            let room = self.cap.saturating_sub(line.len()).min(chunk.len());
            line.extend_from_slice(&chunk[..room]);
            len += chunk.len();
            self.inner.consume(used);
            if complete {
                if len > self.cap {
                    return Ok(Some(ReadLine::Overlong { head: line, len }));
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(ReadLine::Line(line)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        escape_into(&mut out, value);
        out
    }

    #[test]
    fn escaping_hides_every_separator_and_round_trips() {
        assert_eq!(
            escaped(b"a\tb\nc\rd\x01e\0f"),
            b"a\x01tb\x01nc\x01rd\x011e\x010f".to_vec()
        );
        let all: Vec<u8> = (0..=255).collect();
        let e = escaped(&all);
        assert!(!e.contains(&b'\t') && !e.contains(&b'\n') && !e.contains(&b'\r'));
        assert_eq!(unescape(&e), all);
    }

    #[test]
    fn unescaping_takes_other_escapes_literally_and_drops_a_trailing_escape() {
        assert_eq!(unescape(b"a\x01xb"), b"axb".to_vec());
        assert_eq!(unescape(b"ab\x01"), b"ab".to_vec());
        assert_eq!(unescape(b"\x01\x01"), vec![1]);
    }

    #[test]
    fn handshake_lines_parse() {
        assert_eq!(
            parse_server_line(b"VERSION\t1\t2"),
            Ok(ServerLine::Version { major: 1, minor: 2 })
        );
        assert_eq!(
            parse_server_line(b"MECH\tDIGEST-MD5\tdictionary\tactive\tmutual-auth"),
            Ok(ServerLine::Mech {
                name: "DIGEST-MD5".into(),
                flags: vec!["dictionary".into(), "active".into(), "mutual-auth".into()]
            })
        );
        assert_eq!(parse_server_line(b"SPID\t6889"), Ok(ServerLine::Spid(6889)));
        assert_eq!(parse_server_line(b"CUID\t1"), Ok(ServerLine::Cuid(1)));
        assert_eq!(
            parse_server_line(b"COOKIE\t97f98ef8"),
            Ok(ServerLine::Cookie("97f98ef8".into()))
        );
        assert_eq!(parse_server_line(b"DONE"), Ok(ServerLine::Done));
    }

    #[test]
    fn answers_parse_into_unescaped_fields() {
        let line = b"OK\t1\tuser=user0001\tproxy\thost=127.0.0.2\treason=a\x01tb=c\t\tpass=p\x01nq";
        let Ok(ServerLine::Ok { id, fields }) = parse_server_line(line) else {
            panic!("not an OK");
        };
        assert_eq!(id, 1);
        assert_eq!(
            fields,
            vec![
                ("user".into(), Some(b"user0001".to_vec())),
                ("proxy".into(), None),
                ("host".into(), Some(b"127.0.0.2".to_vec())),
                ("reason".into(), Some(b"a\tb=c".to_vec())),
                ("pass".into(), Some(b"p\nq".to_vec())),
            ]
        );
        assert_eq!(
            parse_server_line(b"FAIL\t7\treason=Authentication request timed out"),
            Ok(ServerLine::Fail {
                id: 7,
                fields: vec![(
                    "reason".into(),
                    Some(b"Authentication request timed out".to_vec())
                )]
            })
        );
        assert_eq!(
            parse_server_line(b"CONT\t4\tVXNlcm5hbWU6"),
            Ok(ServerLine::Cont {
                id: 4,
                data: b"Username:".to_vec()
            })
        );
        assert_eq!(
            parse_server_line(b"CONT\t4\t"),
            Ok(ServerLine::Cont {
                id: 4,
                data: vec![]
            })
        );
    }

    #[test]
    fn broken_answers_say_why_and_for_which_request_when_known() {
        for bad in [
            &b"OK"[..],
            b"OK\t",
            b"FAIL\tx",
            b"CONT\t-1\tAA==",
            b"OK\t99999999999",
            b"OK\t+5",
        ] {
            let err = parse_server_line(bad).unwrap_err();
            assert_eq!(err.id, None, "{bad:?}");
        }
        assert_eq!(
            parse_server_line(b"CONT\t3").unwrap_err(),
            LineError {
                id: Some(3),
                reason: "CONT without data"
            }
        );
        assert_eq!(parse_server_line(b"CONT\t3\t!!").unwrap_err().id, Some(3));
        assert!(parse_server_line(b"VERSION\tone\t2").is_err());
        assert!(parse_server_line(b"MECH").is_err());
        assert!(parse_server_line(b"SPID\t").is_err());
    }

    #[test]
    fn unknown_commands_are_reported_not_refused() {
        assert_eq!(
            parse_server_line(b"NOTIFY\tsomething"),
            Ok(ServerLine::Unknown("NOTIFY".into()))
        );
        assert_eq!(
            parse_server_line(b""),
            Ok(ServerLine::Unknown(String::new()))
        );
        assert_eq!(
            parse_server_line(b"\xff\xfe"),
            Ok(ServerLine::Unknown("\u{fffd}\u{fffd}".into()))
        );
    }

    #[test]
    fn the_id_of_a_cut_answer_is_found_in_its_head() {
        assert_eq!(answer_id(b"OK\t12\tuser=aaaa"), Some(12));
        assert_eq!(answer_id(b"CONT\t3\tAAAA"), Some(3));
        assert_eq!(answer_id(b"MECH\t3"), None);
        assert_eq!(answer_id(b"OK\tx"), None);
    }

    #[tokio::test]
    async fn lines_are_read_with_a_cap() {
        let mut input = b"short\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nnext\nunterminated");
        let mut reader = LineReader::new(&input[..], 10);
        assert_eq!(
            reader.next().await.unwrap(),
            Some(ReadLine::Line(b"short".to_vec()))
        );
        assert_eq!(
            reader.next().await.unwrap(),
            Some(ReadLine::Overlong {
                head: vec![b'x'; 10],
                len: 100
            })
        );
        assert_eq!(
            reader.next().await.unwrap(),
            Some(ReadLine::Line(b"next".to_vec()))
        );
        assert_eq!(reader.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_line_at_the_cap_is_whole_and_one_more_byte_is_overlong() {
        let mut input = vec![b'a'; 8];
        input.push(b'\n');
        input.extend(vec![b'b'; 9]);
        input.push(b'\n');
        let mut reader = LineReader::new(&input[..], 8);
        assert_eq!(
            reader.next().await.unwrap(),
            Some(ReadLine::Line(vec![b'a'; 8]))
        );
        assert!(matches!(
            reader.next().await.unwrap(),
            Some(ReadLine::Overlong { len: 9, .. })
        ));
    }

    #[tokio::test]
    async fn a_huge_line_arriving_in_pieces_keeps_only_the_cap() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..1024 {
                tx.write_all(&[b'z'; 1024]).await.unwrap();
            }
            tx.write_all(b"\nOK\t1\n").await.unwrap();
        });
        let mut reader = LineReader::new(rx, MAX_SERVER_LINE);
        match reader.next().await.unwrap() {
            Some(ReadLine::Overlong { head, len }) => {
                assert_eq!(head.len(), MAX_SERVER_LINE);
                assert_eq!(len, 1024 * 1024);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            reader.next().await.unwrap(),
            Some(ReadLine::Line(b"OK\t1".to_vec()))
        );
        writer.await.unwrap();
    }
}
