//! One IMAP session as a chaos test's client holds it: log in through a director (plaintext
//! LOGIN, the director trusts loopback), keep the session with NOOPs, log out. Nothing here
//! panics: a login is either a session, a temporary refusal (what a client must expect
//! while a director is dead or fenced, or a backend is down) or a wrong answer, which the
//! test fails on.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::client::quote;
use super::dovecot::PASSWORD;

/// How long a login may wait for an answer. A login of a user being moved waits for the
/// move (the tests' `move_timeout` is 8 s), then gets a temporary failure; no answer after
/// this is a hang.
const LOGIN_WAIT: Duration = Duration::from_secs(20);
/// How long a NOOP of a held session may wait for its answer.
const NOOP_WAIT: Duration = Duration::from_secs(10);
/// Time between two NOOPs of a held session.
const NOOP_EVERY: Duration = Duration::from_millis(250);

/// Why a login did not give a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Connection refused or ended before the answer, or `NO [UNAVAILABLE]`: expected while
    /// a director is dead or fenced, or a user's backend is down or being moved.
    Temporary(String),
    /// Any other answer (a wrong password answer, a BAD, a hang): a bug.
    Wrong(String),
}

impl Refusal {
    /// The kind of refusal, to count them by kind: an answer's whole text, or what failed
    /// (`connect`, `connection ended`).
    pub fn kind(&self) -> String {
        match self {
            Refusal::Temporary(why) | Refusal::Wrong(why) if why.starts_with("NO ") => why.clone(),
            Refusal::Temporary(why) | Refusal::Wrong(why) => {
                why.split(':').next().unwrap_or(why).to_owned()
            }
        }
    }
}

/// How a held session went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Still open after the hold.
    Open,
    /// The director (or the backend) ended it meanwhile.
    Ended,
    /// A NOOP got no answer within [`NOOP_WAIT`].
    Stalled,
}

/// A logged-in IMAP session through a director.
pub struct ImapSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The backend that serves it, as its `ID` answer names it (`backend2`), or `?`.
    pub backend: String,
    /// The `* BYE` line that ended it (CRLF removed), if one came: tells a kick by the
    /// director (`* BYE Disconnected by the director.`) from a backend shutting down.
    pub bye: Option<String>,
    /// The next command tag's number.
    tag: u32,
}

impl ImapSession {
    /// Logs `user` in through the director at `addr`, then asks `ID` for the backend's name.
    pub fn login(addr: SocketAddr, user: &str) -> Result<ImapSession, Refusal> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| Refusal::Temporary(format!("connect: {e}")))?;
        s.set_read_timeout(Some(LOGIN_WAIT)).unwrap();
        let _ = s.set_nodelay(true);
        let mut session = ImapSession {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            backend: "?".into(),
            bye: None,
            tag: 0,
        };
        let greeting = session.line().map_err(Self::during_login)?;
        if greeting.starts_with("* BYE") {
            return Err(Refusal::Temporary(format!(
                "greeting: {}",
                greeting.trim_end()
            )));
        }
        if !greeting.starts_with("* OK") {
            return Err(Refusal::Wrong(format!("greeting: {}", greeting.trim_end())));
        }
        session
            .send(&format!("a LOGIN {} {}\r\n", quote(user), quote(PASSWORD)))
            .map_err(Self::during_login)?;
        loop {
            let line = session.line().map_err(Self::during_login)?;
            if let Some(answer) = line.strip_prefix("a ") {
                let answer = answer.trim_end();
                if answer.starts_with("OK") {
                    break;
                }
                if answer.starts_with("NO [UNAVAILABLE]") {
                    return Err(Refusal::Temporary(answer.to_owned()));
                }
                return Err(Refusal::Wrong(format!("login answer: {answer}")));
            }
        }
        // Logged in: from here on, the director may end the session any time.
        if session.send("b ID NIL\r\n").is_ok() {
            while let Ok(line) = session.line() {
                if line.starts_with("* BYE") {
                    session.bye = Some(line.trim_end().to_owned());
                }
                if let Some(i) = line.find("\"x-backend\" \"") {
                    session.backend = line[i + 13..].split('"').next().unwrap_or("?").into();
                }
                if line.starts_with("b ") {
                    break;
                }
            }
        }
        session.writer.set_read_timeout(Some(NOOP_WAIT)).unwrap();
        Ok(session)
    }

    /// Keeps the session for `d`, a NOOP every quarter second; stops early when it ends.
    pub fn hold(&mut self, d: Duration) -> Held {
        let until = Instant::now() + d;
        loop {
            match self.noop() {
                Held::Open => {}
                other => return other,
            }
            let now = Instant::now();
            if now >= until {
                return Held::Open;
            }
            std::thread::sleep(NOOP_EVERY.min(until - now));
        }
    }

    /// One NOOP: whether the session still answers.
    pub fn noop(&mut self) -> Held {
        self.tag += 1;
        let tag = format!("n{}", self.tag);
        if self.send(&format!("{tag} NOOP\r\n")).is_err() {
            return Held::Ended;
        }
        loop {
            match self.line() {
                Ok(line) if line.starts_with("* BYE") => {
                    self.bye = Some(line.trim_end().to_owned());
                    return Held::Ended;
                }
                Ok(line) if line.starts_with(&format!("{tag} ")) => return Held::Open,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Held::Stalled
                }
                Err(_) => return Held::Ended,
            }
        }
    }

    /// Whether the session has been ended by the other side within `within` (NOOPs until
    /// one fails).
    pub fn ended_within(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            if self.noop() == Held::Ended {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Logs out (best effort) and closes.
    pub fn logout(mut self) {
        let _ = self.send("z LOGOUT\r\n");
        let _ = self.writer.set_read_timeout(Some(Duration::from_secs(2)));
        while let Ok(line) = self.line() {
            if line.starts_with("z ") {
                break;
            }
        }
    }

    fn send(&mut self, text: &str) -> std::io::Result<()> {
        self.writer.write_all(text.as_bytes())
    }

    /// One line; an end of stream is an error.
    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line)
    }

    /// A read or write that failed before the login's answer: the connection ended
    /// (temporary) or nothing came back in time (wrong).
    fn during_login(e: std::io::Error) -> Refusal {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                Refusal::Wrong(format!("no answer within {LOGIN_WAIT:?}"))
            }
            _ => Refusal::Temporary(format!("connection ended: {e}")),
        }
    }
}
