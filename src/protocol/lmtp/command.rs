//! The grammar of LMTP (RFC 2033, which is SMTP of RFC 5321 with LHLO) as the director reads
//! it. No I/O: a [`CommandParser`] is shown the front of the session's read buffer and says
//! whether a whole command line is there; a [`DataScanner`] finds the end of a message
//! (`CRLF . CRLF`) in chunks as they arrive, without holding the message; [`ReplyParser`]
//! reads a backend's (possibly multi-line) replies; [`username_of`] turns a recipient address
//! into the username that routing hashes.

use std::fmt;

/// The commands of an LMTP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `LHLO domain`: the only greeting LMTP knows.
    Lhlo(String),
    /// `HELO` / `EHLO`: SMTP's greetings, refused in LMTP (RFC 2033 section 4.1).
    Helo,
    Ehlo,
    /// `MAIL FROM:<reverse-path> [parameters]`.
    Mail(MailFrom),
    /// `RCPT TO:<forward-path> [parameters]`.
    Rcpt(RcptTo),
    Data,
    Rset,
    Noop,
    Quit,
    /// `VRFY ...`: answered without looking anything up (no user enumeration).
    Vrfy,
    /// Any other verb, upper-cased (EXPN, HELP, STARTTLS, BDAT, garbage ...).
    Other(String),
}

/// An ESMTP parameter of MAIL or RCPT (`SIZE=1000`, `SMTPUTF8`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The keyword, upper-cased, for comparisons.
    pub keyword: String,
    pub value: Option<String>,
    /// The parameter exactly as the client wrote it, to pass on unchanged.
    pub raw: String,
}

/// `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path as written between `<` and `>` (empty for the null sender `<>`).
    pub path: String,
    pub params: Vec<Param>,
}

impl MailFrom {
    /// The value of parameter `keyword` (upper case), if given.
    pub fn param(&self, keyword: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.keyword == keyword)
    }
}

/// `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    /// The forward path as written between `<` and `>`.
    pub path: String,
    pub params: Vec<Param>,
}

/// Why a line is not a usable command; the session answers with [`SyntaxError::reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyntaxError {
    /// Longer than the line limit (the rest of the line is skipped).
    TooLong,
    /// Bytes that are not UTF-8, or NUL.
    BadBytes,
    /// The arguments of a known command are wrong; the text says how.
    Arguments(&'static str),
}

impl SyntaxError {
    /// The reply line (without CRLF).
    pub fn reply(&self) -> String {
        match self {
            SyntaxError::TooLong => "500 5.5.2 Line too long".into(),
            SyntaxError::BadBytes => "500 5.5.2 Invalid characters in command".into(),
            SyntaxError::Arguments(why) => format!("501 5.5.4 {why}"),
        }
    }
}

/// What [`CommandParser::parse`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// No complete line yet: read more, append, call again.
    Incomplete,
    /// Bytes of an over-long line that was already answered: drop them, no reply.
    Skip { consumed: usize },
    /// A command; drop `consumed` bytes.
    Command { consumed: usize, command: Command },
    /// Not a command; drop `consumed` bytes and answer.
    Error { consumed: usize, error: SyntaxError },
}

/// The streaming command-line parser of one session.
///
/// Contract: the caller passes its whole read buffer, only appends to it between calls that
/// return [`Parse::Incomplete`], and drops exactly `consumed` bytes otherwise.
#[derive(Debug, Clone)]
pub struct CommandParser {
    /// Longest command line accepted, CRLF included.
    max_line: usize,
    /// Bytes at the front already searched for LF (none there).
    search_from: usize,
    /// Inside an over-long line that was answered: drop bytes up to its LF.
    discarding: bool,
}

impl CommandParser {
    pub fn new(max_line: usize) -> Self {
        CommandParser {
            max_line,
            search_from: 0,
            discarding: false,
        }
    }

    /// Forgets a partly seen line (the buffer was emptied by other means, e.g. after DATA).
    pub fn reset(&mut self) {
        self.search_from = 0;
        self.discarding = false;
    }

    /// Looks at the front of `buf`.
    pub fn parse(&mut self, buf: &[u8]) -> Parse {
        let lf = buf[self.search_from.min(buf.len())..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + self.search_from);
        if self.discarding {
            return match lf {
                Some(lf) => {
                    self.reset();
                    Parse::Skip { consumed: lf + 1 }
                }
                None if buf.is_empty() => Parse::Incomplete,
                None => Parse::Skip {
                    consumed: buf.len(),
                },
            };
        }
        let Some(lf) = lf else {
            if buf.len() > self.max_line {
                self.search_from = 0;
                self.discarding = true;
                return Parse::Error {
                    consumed: buf.len(),
                    error: SyntaxError::TooLong,
                };
            }
            self.search_from = buf.len();
            return Parse::Incomplete;
        };
        self.reset();
        let consumed = lf + 1;
        if consumed > self.max_line {
            return Parse::Error {
                consumed,
                error: SyntaxError::TooLong,
            };
        }
        let mut line = &buf[..lf];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        match parse_line(line) {
            Ok(command) => Parse::Command { consumed, command },
            Err(error) => Parse::Error { consumed, error },
        }
    }
}

/// Parses one command line (without its line end).
pub fn parse_line(line: &[u8]) -> Result<Command, SyntaxError> {
    if line.contains(&0) {
        return Err(SyntaxError::BadBytes);
    }
    let line = std::str::from_utf8(line).map_err(|_| SyntaxError::BadBytes)?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |c: Command| {
        if rest.trim().is_empty() {
            Ok(c)
        } else {
            Err(SyntaxError::Arguments("This command takes no arguments"))
        }
    };
    match verb.as_str() {
        "LHLO" => {
            let domain = rest.trim();
            if domain.is_empty() || domain.contains(' ') {
                Err(SyntaxError::Arguments("LHLO needs one domain argument"))
            } else {
                Ok(Command::Lhlo(domain.to_owned()))
            }
        }
        "HELO" => Ok(Command::Helo),
        "EHLO" => Ok(Command::Ehlo),
        "MAIL" => {
            let (path, params) =
                path_after(rest, "FROM:", "Syntax: MAIL FROM:<address> [parameters]")?;
            Ok(Command::Mail(MailFrom { path, params }))
        }
        "RCPT" => {
            let (path, params) = path_after(rest, "TO:", "Syntax: RCPT TO:<address> [parameters]")?;
            if path.is_empty() {
                return Err(SyntaxError::Arguments("An empty recipient address"));
            }
            Ok(Command::Rcpt(RcptTo { path, params }))
        }
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        // NOOP and VRFY may carry a string that is ignored.
        "NOOP" => Ok(Command::Noop),
        "VRFY" => Ok(Command::Vrfy),
        _ => Ok(Command::Other(verb)),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `keyword` (`FROM:` or `TO:`, any case) then [`path_and_params`]; `syntax` is the error if
/// either is missing or malformed.
fn path_after(
    rest: &str,
    keyword: &str,
    syntax: &'static str,
) -> Result<(String, Vec<Param>), SyntaxError> {
    strip_prefix_ci(rest, keyword)
        .and_then(path_and_params)
        .ok_or(SyntaxError::Arguments(syntax))
}

/// `<path> [SP param]*` (a space after the colon is tolerated, as most servers do). The path
/// may hold quoted strings, in which `>` and spaces are data.
fn path_and_params(s: &str) -> Option<(String, Vec<Param>)> {
    let s = s.trim_start_matches(' ');
    let inner = s.strip_prefix('<')?;
    let (end, _) = unquoted(inner).find(|&(_, c)| c == '>')?;
    let path = &inner[..end];
    let rest = &inner[end + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return None;
    }
    let mut params = Vec::new();
    for raw in rest.split(' ').filter(|p| !p.is_empty()) {
        let (keyword, value) = match raw.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (raw, None),
        };
        if keyword.is_empty()
            || !keyword
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return None;
        }
        params.push(Param {
            keyword: keyword.to_ascii_uppercase(),
            value,
            raw: raw.to_owned(),
        });
    }
    Some((path.to_owned(), params))
}

/// Which part of a recipient address is the username that routing hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecipientUsername {
    /// `user@domain` (what Dovecot's director looked up).
    #[default]
    WholeAddress,
    /// `user` only, for pools whose logins are bare names.
    LocalPart,
}

/// The username of a forward path: source route dropped, local part unquoted, everything from
/// the first `delimiter` in the local part removed (`user+detail@x` → `user@x`). `None` if no
/// username remains.
pub fn username_of(path: &str, mode: RecipientUsername, delimiter: Option<char>) -> Option<String> {
    // A source route `@a,@b:user@domain` (RFC 5321 says to accept and ignore it).
    let path = if path.starts_with('@') {
        path.split_once(':')?.1
    } else {
        path
    };
    let (local, domain) = split_mailbox(path);
    let mut local = unquote(local);
    if let Some(d) = delimiter {
        if let Some(i) = local.find(d) {
            local.truncate(i);
        }
    }
    if local.is_empty() {
        return None;
    }
    match (mode, domain) {
        (RecipientUsername::WholeAddress, Some(domain)) if !domain.is_empty() => {
            Some(format!("{local}@{domain}"))
        }
        _ => Some(local),
    }
}

/// The characters of `s` outside its quoted strings (in which `\\` escapes the next
/// character), with their offsets; the quotes themselves are left out.
fn unquoted(s: &str) -> impl Iterator<Item = (usize, char)> + '_ {
    let mut quoted = false;
    let mut escaped = false;
    s.char_indices().filter(move |&(_, c)| {
        if escaped {
            escaped = false;
            false
        } else if quoted && c == '\\' {
            escaped = true;
            false
        } else if c == '"' {
            quoted = !quoted;
            false
        } else {
            !quoted
        }
    })
}

/// Splits a mailbox at the `@` that is not inside the quoted local part.
fn split_mailbox(path: &str) -> (&str, Option<&str>) {
    match unquoted(path).filter(|&(_, c)| c == '@').last() {
        Some((i, _)) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

/// The value of a local part: quotes and backslash escapes of a quoted string removed.
fn unquote(local: &str) -> String {
    let Some(inner) = local.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return local.to_owned();
    };
    let mut out = String::new();
    let mut escaped = false;
    for c in inner.chars() {
        if escaped || c != '\\' {
            out.push(c);
            escaped = false;
        } else {
            escaped = true;
        }
    }
    out
}

/// Finds the end of a message in the bytes that follow DATA's 354, one chunk at a time. The
/// message ends with `CRLF . CRLF`, where the first CRLF may be the one that ended the DATA
/// line (an empty message is just `. CRLF`). Dot-stuffing is not undone: the bytes go on to
/// the backends as they came.
#[derive(Debug, Clone)]
pub struct DataScanner {
    /// How much of `CRLF . CRLF` the bytes seen so far end with.
    matched: usize,
}

const END: &[u8; 5] = b"\r\n.\r\n";

impl Default for DataScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl DataScanner {
    /// A scanner at the start of a message (just after a line end).
    pub fn new() -> Self {
        DataScanner { matched: 2 }
    }

    /// Scans `chunk`; `Some(n)`: the message ends after `chunk[..n]` (the final `.CRLF`
    /// included), and the bytes after it are commands.
    pub fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        for (i, &b) in chunk.iter().enumerate() {
            self.matched = if b == END[self.matched] {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END.len() {
                self.matched = 2;
                return Some(i + 1);
            }
        }
        None
    }
}

/// One reply of a server: a code and the text of each line (after `NNN-` / `NNN `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The reply on the wire, CRLFs included.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        let n = self.lines.len().max(1);
        for i in 0..n {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            if text.is_empty() && i + 1 == n {
                out.push_str(&format!("{}\r\n", self.code));
            } else {
                out.push_str(&format!("{}{sep}{text}\r\n", self.code));
            }
        }
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// Why a server's bytes are not a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("not an SMTP reply line: {0:?}")]
    Garbage(String),
    #[error("reply longer than {0} bytes")]
    TooLong(usize),
}

/// Reads replies from a server's bytes, restartable like [`CommandParser`].
#[derive(Debug, Clone)]
pub struct ReplyParser {
    /// Largest whole reply accepted (all its lines).
    max_reply: usize,
}

impl ReplyParser {
    pub fn new(max_reply: usize) -> Self {
        ReplyParser { max_reply }
    }

    /// `Ok(Some((consumed, reply)))` when `buf` starts with a whole reply; `Ok(None)`: read
    /// more.
    pub fn parse(&self, buf: &[u8]) -> Result<Option<(usize, Reply)>, ReplyError> {
        let mut pos = 0;
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let Some(lf) = buf[pos..].iter().position(|&b| b == b'\n') else {
                if buf.len() > self.max_reply {
                    return Err(ReplyError::TooLong(self.max_reply));
                }
                return Ok(None);
            };
            let end = pos + lf + 1;
            if end > self.max_reply {
                return Err(ReplyError::TooLong(self.max_reply));
            }
            let raw = &buf[pos..pos + lf];
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let text = String::from_utf8_lossy(raw);
            let garbage = || ReplyError::Garbage(text.chars().take(100).collect());
            let digits = raw.get(..3).ok_or_else(garbage)?;
            if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
                return Err(garbage());
            }
            let this: u16 = std::str::from_utf8(digits).unwrap().parse().unwrap();
            if code.is_some_and(|c| c != this) {
                return Err(garbage());
            }
            code = Some(this);
            let (last, rest) = match raw.get(3) {
                None => (true, ""),
                Some(b' ') => (true, &text[4..]),
                Some(b'-') => (false, &text[4..]),
                Some(_) => return Err(garbage()),
            };
            lines.push(rest.to_owned());
            pos = end;
            if last {
                return Ok(Some((pos, Reply { code: this, lines })));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Command(Command),
        Error(SyntaxError),
    }

    /// Feeds `script` `chunk` bytes at a time, as a session reads it.
    fn replay(script: &[u8], chunk: usize, max_line: usize) -> Vec<Event> {
        let mut parser = CommandParser::new(max_line);
        let mut buf = Vec::new();
        let mut events = Vec::new();
        for piece in script.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match parser.parse(&buf) {
                    Parse::Incomplete => break,
                    Parse::Skip { consumed } => {
                        assert!(consumed > 0 && consumed <= buf.len());
                        buf.drain(..consumed);
                    }
                    Parse::Command { consumed, command } => {
                        buf.drain(..consumed);
                        events.push(Event::Command(command));
                    }
                    Parse::Error { consumed, error } => {
                        assert!(consumed > 0 && consumed <= buf.len());
                        buf.drain(..consumed);
                        events.push(Event::Error(error));
                    }
                }
            }
            // Never more than a line's worth waits in the buffer.
            assert!(
                buf.len() <= max_line + chunk,
                "buffer grew to {}",
                buf.len()
            );
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        events
    }

    /// Replays `script` in chunks of 1, 2, 4, … 512 bytes; every run must see the same.
    fn replay_all(script: &[u8], max_line: usize) -> Vec<Event> {
        let whole = replay(script, script.len().max(1), max_line);
        let mut chunk = 1;
        while chunk <= 512 {
            assert_eq!(
                replay(script, chunk, max_line),
                whole,
                "chunks of {chunk} bytes"
            );
            chunk *= 2;
        }
        whole
    }

    fn param(raw: &str) -> Param {
        let (k, v) = match raw.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (raw, None),
        };
        Param {
            keyword: k.to_ascii_uppercase(),
            value: v,
            raw: raw.into(),
        }
    }

    #[test]
    fn a_pipelined_transaction() {
        let events = replay_all(
            b"LHLO mta.example\r\nMAIL FROM:<a@b.example> SIZE=120 body=8BITMIME\r\n\
              RCPT TO:<u1@x>\r\nrcpt to: <\"odd >name\"@x>\r\nDATA\r\nRSET\r\nNOOP hello\r\n\
              VRFY root\r\nQUIT\r\n",
            512,
        );
        assert_eq!(
            events,
            vec![
                Event::Command(Command::Lhlo("mta.example".into())),
                Event::Command(Command::Mail(MailFrom {
                    path: "a@b.example".into(),
                    params: vec![param("SIZE=120"), param("body=8BITMIME")],
                })),
                Event::Command(Command::Rcpt(RcptTo {
                    path: "u1@x".into(),
                    params: vec![]
                })),
                Event::Command(Command::Rcpt(RcptTo {
                    path: "\"odd >name\"@x".into(),
                    params: vec![]
                })),
                Event::Command(Command::Data),
                Event::Command(Command::Rset),
                Event::Command(Command::Noop),
                Event::Command(Command::Vrfy),
                Event::Command(Command::Quit),
            ]
        );
    }

    #[test]
    fn null_sender_and_smtp_greetings() {
        let events = replay_all(b"MAIL FROM:<>\r\nHELO x\r\nEHLO x\r\nSTARTTLS\r\n", 512);
        assert_eq!(
            events,
            vec![
                Event::Command(Command::Mail(MailFrom {
                    path: String::new(),
                    params: vec![]
                })),
                Event::Command(Command::Helo),
                Event::Command(Command::Ehlo),
                Event::Command(Command::Other("STARTTLS".into())),
            ]
        );
    }

    #[test]
    fn syntax_errors() {
        let events = replay_all(
            b"MAIL <a@b>\r\nMAIL FROM:a@b\r\nRCPT TO:<>\r\nRCPT TO:<a@b>x\r\nLHLO\r\n\
              DATA now\r\nRCPT TO:<a@b> =x\r\nMAIL FROM:<\xff>\r\nNOOP\r\n",
            512,
        );
        let args = |e: &Event| matches!(e, Event::Error(SyntaxError::Arguments(_)));
        assert_eq!(events.len(), 9, "{events:?}");
        assert!(events[..7].iter().all(args), "{events:?}");
        assert_eq!(events[7], Event::Error(SyntaxError::BadBytes));
        assert_eq!(events[8], Event::Command(Command::Noop));
    }

    #[test]
    fn too_long_lines_are_answered_once_and_skipped() {
        let mut script = b"RCPT TO:<".to_vec();
        script.extend(std::iter::repeat_n(b'x', 300));
        script.extend_from_slice(b">\r\nNOOP\r\n");
        assert_eq!(
            replay_all(&script, 64),
            vec![
                Event::Error(SyntaxError::TooLong),
                Event::Command(Command::Noop)
            ]
        );
        // Exactly at the limit is fine.
        assert_eq!(
            replay_all(b"NOOP\r\n", 6),
            vec![Event::Command(Command::Noop)]
        );
    }

    /// Feeds a message in chunks; returns where the end was found (offset in the whole).
    fn end_of(data: &[u8], chunk: usize) -> Option<usize> {
        let mut s = DataScanner::new();
        let mut offset = 0;
        for piece in data.chunks(chunk) {
            if let Some(n) = s.scan(piece) {
                return Some(offset + n);
            }
            offset += piece.len();
        }
        None
    }

    #[test]
    fn the_end_of_data_is_found_across_chunks() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b".\r\nQUIT\r\n", Some(3)),
            (b"a\r\n.\r\nQUIT\r\n", Some(6)),
            (b"..\r\n.x\r\n\r\n.\r\n", Some(13)),
            (b"a\r\r\n.\r\n", Some(7)),
            (b"a\n.\n", None),
            (b"a\r\n.\r", None),
            (b"a\r\n..\r\n", None),
            (b"\r\n.\r\n", Some(5)),
        ];
        for (data, want) in cases {
            for chunk in [1, 2, 3, 4, 8, 64] {
                assert_eq!(end_of(data, chunk), *want, "{data:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn replies_single_and_multi_line() {
        let p = ReplyParser::new(1024);
        let script = b"250-backend1\r\n250-PIPELINING\r\n250 XCLIENT ADDR PORT\r\n354\r\n";
        for chunk in 1..script.len() {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for piece in script.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some((n, reply)) = p.parse(&buf).unwrap() {
                    buf.drain(..n);
                    got.push(reply);
                }
            }
            assert_eq!(
                got,
                vec![
                    Reply {
                        code: 250,
                        lines: vec![
                            "backend1".into(),
                            "PIPELINING".into(),
                            "XCLIENT ADDR PORT".into()
                        ]
                    },
                    Reply {
                        code: 354,
                        lines: vec!["".into()]
                    }
                ]
            );
        }
        assert!(p.parse(b"HTTP/1.1 400 Bad\r\n").is_err());
        assert!(p.parse(b"250-a\r\n251 b\r\n").is_err());
        assert!(p.parse(&[b'2'; 2000]).is_err());
        assert_eq!(
            Reply::new(250, "2.0.0 Ok").to_wire(),
            "250 2.0.0 Ok\r\n".to_string()
        );
    }

    #[test]
    fn usernames_of_recipients() {
        use RecipientUsername::*;
        let u = |p, m, d| username_of(p, m, d);
        assert_eq!(
            u("User1+box@x.org", WholeAddress, Some('+')).unwrap(),
            "User1@x.org"
        );
        assert_eq!(u("user1+box@x.org", LocalPart, Some('+')).unwrap(), "user1");
        assert_eq!(u("user1+box@x.org", LocalPart, None).unwrap(), "user1+box");
        assert_eq!(u("user1-a-b@x", LocalPart, Some('-')).unwrap(), "user1");
        assert_eq!(u("@r1,@r2:user1@x", LocalPart, Some('+')).unwrap(), "user1");
        assert_eq!(u("\"a\\\"b@c\"@x", WholeAddress, None).unwrap(), "a\"b@c@x");
        assert_eq!(
            u("Postmaster", WholeAddress, Some('+')).unwrap(),
            "Postmaster"
        );
        assert_eq!(u("+box@x", LocalPart, Some('+')), None);
    }
}
