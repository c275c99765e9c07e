//! Literals and quoted strings, as IMAP and ManageSieve share them. No I/O.
//!
//! A [`Framer`] finds where a unit ends in a read buffer: a line, and after each line that
//! ends in a literal header (`{n}` or `{n+}`) the `n` bytes of the literal and the line after
//! it. It keeps its position between calls, so a unit that arrives one byte at a time is
//! scanned once, and it enforces the limits before anything is buffered beyond them. A
//! [`Cursor`] then reads the quoted strings and literals of a framed unit; each protocol's
//! grammar (`imap::command`, `sieve::command`) reads the rest.

/// Where framing stands in the unit at the front of the buffer.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    /// Start of the line being framed (0, or just after a literal's bytes).
    line_start: usize,
    /// Where to look for the line's LF next: bytes before it were seen and hold none.
    search_from: usize,
    /// Literal bytes announced so far in this unit (not counted as line length).
    literal_bytes: usize,
    /// `Some(end)` while waiting for a literal's bytes, which end at `end`.
    literal_end: Option<usize>,
}

/// What [`Framer::frame`] found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// No whole unit yet: read more bytes, append them and call again.
    Incomplete,
    /// A whole unit is `buf[..end]`.
    Complete(usize),
    /// The client announced a synchronising literal (`{n}`) and waits for the server's
    /// continuation request before sending it: send that, then call again. Returned once per
    /// synchronising literal, and only by a framer made with continuations.
    Continuation,
    /// The unit, literals excluded, is longer than the line limit: the start of the next unit
    /// cannot be found.
    TooLong,
    /// A literal would take the unit's literals over their limit. Its header line ends at
    /// `line_end`; `sync`: the client waits for a continuation before sending the literal
    /// (so it has not sent it), as opposed to a literal whose bytes are on their way.
    LiteralTooLarge { line_end: usize, sync: bool },
}

/// Finds where a unit ends, keeping its position between calls.
///
/// Contract: the caller passes its whole read buffer each time, only appends to it between
/// calls that return [`Frame::Incomplete`] or [`Frame::Continuation`], and drops the unit's
/// bytes after any other result (or calls [`Framer::reset`] when it throws the buffer away,
/// e.g. at STARTTLS).
#[derive(Debug, Clone)]
pub struct Framer {
    /// Longest unit accepted, in bytes, literal contents excluded, line ends included.
    max_line: usize,
    /// Largest total of literal bytes in one unit.
    max_literal: usize,
    /// Whether `{n}` waits for a continuation request (IMAP). Without (ManageSieve, where
    /// no continuation exists), `{n}` is read at once like `{n+}`.
    continuations: bool,
    position: Position,
}

impl Framer {
    /// A framer for units of at most `max_line` bytes outside literals and `max_literal`
    /// bytes of literals. A buffer then never needs more than `max_line + max_literal` bytes.
    pub fn new(max_line: usize, max_literal: usize, continuations: bool) -> Self {
        Framer {
            max_line,
            max_literal,
            continuations,
            position: Position::default(),
        }
    }

    /// Forgets the partly framed unit: the buffer was emptied.
    pub fn reset(&mut self) {
        self.position = Position::default();
    }

    /// Looks at the front of `buf`; see [`Frame`].
    pub fn frame(&mut self, buf: &[u8]) -> Frame {
        let frame = self.advance(buf);
        if !matches!(frame, Frame::Incomplete | Frame::Continuation) {
            self.reset();
        }
        frame
    }

    fn advance(&mut self, buf: &[u8]) -> Frame {
        loop {
            let p = &mut self.position;
            if let Some(end) = p.literal_end {
                if buf.len() < end {
                    return Frame::Incomplete;
                }
                p.literal_end = None;
                p.line_start = end;
                p.search_from = end;
            }
            let Some(lf) = buf[p.search_from..]
                .iter()
                .position(|b| *b == b'\n')
                .map(|i| p.search_from + i)
            else {
                p.search_from = buf.len();
                if buf.len() - p.literal_bytes > self.max_line {
                    return Frame::TooLong;
                }
                return Frame::Incomplete;
            };
            let line_end = lf + 1;
            if line_end - p.literal_bytes > self.max_line {
                return Frame::TooLong;
            }
            let Some((size, sync)) = literal_header(strip_eol(&buf[p.line_start..line_end])) else {
                return Frame::Complete(line_end);
            };
            let sync = sync && self.continuations;
            let total = size
                .checked_add(p.literal_bytes)
                .filter(|total| *total <= self.max_literal);
            let Some(total) = total else {
                return Frame::LiteralTooLarge { line_end, sync };
            };
            p.literal_bytes = total;
            p.literal_end = Some(line_end + size);
            if sync {
                // Even if the bytes are already here (a client that did not wait), so that
                // the dialogue does not depend on how the bytes were cut into reads.
                return Frame::Continuation;
            }
        }
    }
}

/// A line without its LF or CRLF.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// If `line` (without its line end) ends in a literal header `{n}` or `{n+}`: its size and
/// whether it is synchronising (`{n}`). A size too large for `usize` is reported as
/// `usize::MAX`.
fn literal_header(line: &[u8]) -> Option<(usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let inner = &inner[open + 1..];
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = digits.iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    });
    Some((size.unwrap_or(usize::MAX), sync))
}

/// Reads one framed unit (whose literals are known to be complete): the protocol's grammar
/// moves `pos` over what is its own and asks the cursor for strings and literals.
pub struct Cursor<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    pub fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    /// Whether the cursor stands on the final LF or CRLF.
    pub fn at_eol(&self) -> bool {
        matches!(&self.bytes[self.pos..], b"\n" | b"\r\n")
    }

    /// Steps over an LF or CRLF; `false` if the cursor stands on neither.
    pub fn eat_eol(&mut self) -> bool {
        let rest = &self.bytes[self.pos..];
        let len = if rest.starts_with(b"\r\n") {
            2
        } else if rest.starts_with(b"\n") {
            1
        } else {
            return false;
        };
        self.pos += len;
        true
    }

    /// The bytes from the cursor on that `accept` takes (maybe none), stepping over them.
    pub fn take_while(&mut self, accept: fn(u8) -> bool) -> &'a [u8] {
        let start = self.pos;
        while self.peek().is_some_and(accept) {
            self.pos += 1;
        }
        &self.bytes[start..self.pos]
    }

    /// A quoted string, the cursor on its opening `"`: its value, escapes removed. Any byte but
    /// CR, LF and NUL.
    pub fn quoted(&mut self) -> Result<Vec<u8>, &'static str> {
        self.pos += 1;
        let mut value = Vec::new();
        loop {
            let Some(byte) = self.peek() else {
                return Err("Missing '\"'.");
            };
            self.pos += 1;
            match byte {
                b'"' => return Ok(value),
                b'\\' => match self.peek() {
                    Some(escaped @ (b'"' | b'\\')) => {
                        self.pos += 1;
                        value.push(escaped);
                    }
                    _ => return Err("Invalid escape in quoted string."),
                },
                b'\r' | b'\n' => return Err("Missing '\"'."),
                0 => return Err("NUL in quoted string."),
                other => value.push(other),
            }
        }
    }

    /// A literal, the cursor on its `{`: its bytes.
    pub fn literal(&mut self) -> Result<Vec<u8>, &'static str> {
        self.pos += 1;
        let digits = self.take_while(|b| b.is_ascii_digit());
        let size: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or("Invalid literal size.")?;
        if self.peek() == Some(b'+') {
            self.pos += 1;
        }
        if self.peek() != Some(b'}') {
            return Err("Invalid literal.");
        }
        self.pos += 1;
        if !self.eat_eol() {
            return Err("Literal header not at the end of the line.");
        }
        // Framing checked that the literal's bytes are all here; stay safe anyway.
        let end = self
            .pos
            .checked_add(size)
            .filter(|end| *end <= self.bytes.len())
            .ok_or("Truncated literal.")?;
        let value = self.bytes[self.pos..end].to_vec();
        self.pos = end;
        Ok(value)
    }
}

/// Replaying a client's script through a parser cut into reads of every size, for the
/// grammars' tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::fmt::Debug;

    /// What a parser made of the buffer, as [`replay`] needs to know it.
    pub(crate) enum Step<E> {
        /// More bytes are needed.
        Incomplete,
        /// An event that consumes nothing (a continuation request).
        Waiting(E),
        /// An event and the bytes it consumed; `fatal`: the session would close.
        Consumed {
            consumed: usize,
            event: E,
            fatal: bool,
        },
    }

    impl<E> Step<E> {
        /// An event that consumed `consumed` bytes and leaves the session open.
        pub(crate) fn consumed(consumed: usize, event: E) -> Self {
            Step::Consumed {
                consumed,
                event,
                fatal: false,
            }
        }
    }

    /// Feeds `script` to `parse` `chunk` bytes at a time, as a session reads it, never
    /// buffering more than `cap` bytes, and records every event. Stops at a fatal one.
    pub(crate) fn replay<E>(
        script: &[u8],
        chunk: usize,
        cap: usize,
        mut parse: impl FnMut(&[u8]) -> Step<E>,
    ) -> Vec<E> {
        let mut buf = Vec::new();
        let mut events = Vec::new();
        let mut sent = 0;
        while sent < script.len() {
            // Like a session: never read more than the buffer's room.
            let room = cap - buf.len();
            assert!(room > 0, "the parser let the buffer fill up");
            let take = chunk.min(room).min(script.len() - sent);
            buf.extend_from_slice(&script[sent..sent + take]);
            sent += take;
            loop {
                match parse(&buf) {
                    Step::Incomplete => break,
                    Step::Waiting(event) => events.push(event),
                    Step::Consumed {
                        consumed,
                        event,
                        fatal,
                    } => {
                        assert!(consumed > 0 && consumed <= buf.len());
                        buf.drain(..consumed);
                        events.push(event);
                        if fatal {
                            return events;
                        }
                    }
                }
            }
        }
        assert!(buf.is_empty(), "bytes left over: {buf:?}");
        events
    }

    /// Runs `replay_in` (a replay in chunks of the given size) in chunks of 1, 2, 4, … 512
    /// bytes; every run must see the same events as one read of the whole script. Returns them.
    pub(crate) fn replay_all<E: PartialEq + Debug>(
        script: &[u8],
        replay_in: impl Fn(usize) -> Vec<E>,
    ) -> Vec<E> {
        let whole = replay_in(script.len().max(1));
        let mut chunk = 1;
        while chunk <= 512 {
            assert_eq!(replay_in(chunk), whole, "chunks of {chunk} bytes");
            chunk *= 2;
        }
        whole
    }
}
