//! Minimal blocking IMAP and POP3 clients for tests, plus a curl runner. They send exactly the
//! bytes a test gives them, so tests can split commands across TCP writes or send garbage.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use super::command::run;

/// A raw line-oriented connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects and sets a 20 s read timeout.
    pub fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Connects from `source` (a 127.x address picks which client the director sees), with
    /// the same settings as [`Conn::connect`]. `None` when the connection cannot be made.
    pub fn try_connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Option<Conn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let s = rt
            .block_on(async {
                let sock = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(source, 0))?;
                sock.connect(addr).await?.into_std()
            })
            .ok()?;
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Some(Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        })
    }

    /// Wraps a socket a test connected itself (20 s read timeout).
    pub fn from_stream(s: TcpStream) -> Conn {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// [`Conn::try_connect_from`], panicking when the connection cannot be made.
    pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Conn {
        Self::try_connect_from(source, addr)
            .unwrap_or_else(|| panic!("connect {addr} from {source} failed"))
    }

    /// The socket, to change its settings (e.g. the read timeout).
    pub fn socket(&self) -> &TcpStream {
        &self.writer
    }

    /// Sends bytes as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
        self.writer.flush().unwrap();
    }

    /// Sends bytes in pieces of `chunk` bytes with a short pause between, so that the
    /// receiver sees them in separate TCP reads.
    pub fn send_split(&mut self, bytes: &[u8], chunk: usize) {
        for piece in bytes.chunks(chunk) {
            self.send(piece);
            std::thread::sleep(Duration::from_millis(3));
        }
    }

    /// One line, without CRLF. Empty string at end of stream.
    pub fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.reader.read_until(b'\n', &mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    /// One line as sent, CRLF included. Empty at end of stream.
    pub fn raw_line(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.reader.read_until(b'\n', &mut buf).unwrap_or(0);
        buf
    }

    /// Reads a line and panics unless it is an IMAP continuation request (`+ ...`); returns it.
    pub fn continuation(&mut self) -> String {
        let l = self.line();
        assert!(
            l == "+" || l.starts_with("+ "),
            "expected a continuation request, got {l:?}"
        );
        l
    }

    /// Like [`Conn::until_tagged`], but reads literals (`{n}` at the end of a line) as bytes:
    /// returns the lines (each literal shown as its `{n}` announcement only) and the
    /// literals in order.
    pub fn until_tagged_with_literals(&mut self, tag: &str) -> (Vec<String>, Vec<Vec<u8>>) {
        let mut lines = Vec::new();
        let mut literals = Vec::new();
        loop {
            let raw = self.raw_line();
            if raw.is_empty() {
                panic!("connection closed while waiting for {tag}; got {lines:?}");
            }
            let l = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if let Some(n) = literal_size(&l) {
                literals.push(self.bytes(n));
            }
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return (lines, literals);
            }
        }
    }

    /// Everything the peer sends until it closes the connection (a reset counts as closing),
    /// or `None` if it is still open after `timeout`.
    pub fn until_closed(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        self.writer.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = Vec::new();
        let result = self.reader.read_to_end(&mut buf);
        self.writer
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        match result {
            Ok(_) => Some(buf),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(buf),
            Err(_) => None,
        }
    }

    /// Sends a POP3 command line (CRLF added) and returns the status line.
    pub fn pop3(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.line()
    }

    /// The body of a POP3 multi-line reply (after its status line), up to the terminating
    /// `.`, with dot-stuffing undone: for `RETR`, the message as stored.
    pub fn pop3_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.raw_line();
            assert!(
                !line.is_empty(),
                "connection closed in a multi-line reply; got {:?}",
                String::from_utf8_lossy(&body)
            );
            if line == b".\r\n" {
                return body;
            }
            body.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
        }
    }

    /// Exactly `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf).unwrap();
        buf
    }

    /// Lines up to and including the first that starts with `tag ` (IMAP tagged reply).
    pub fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                panic!("connection closed while waiting for {tag}; got {lines:?}");
            }
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// Sends `tag command\r\n` and returns the reply lines up to the tagged one.
    pub fn imap(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.until_tagged(tag)
    }

    /// Whether the peer has closed (reads end of stream within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut buf = Vec::new();
        self.reader.read_to_end(&mut buf).is_ok()
    }

    /// Whether the peer has ended the connection within the read timeout: end of stream, or
    /// a reset (a server that closes with unread input makes the kernel send RST). Unlike
    /// [`Conn::closed`], a reset counts as ended; a timeout does not.
    pub fn ended(&mut self) -> bool {
        let mut buf = Vec::new();
        match self.reader.read_to_end(&mut buf) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// After an IMAP login: which backend this session is on (`x-backend` of `ID NIL`).
    pub fn imap_backend(&mut self) -> String {
        let lines = self.imap("zid", "ID NIL");
        let id = lines
            .iter()
            .find(|l| l.starts_with("* ID"))
            .unwrap_or_else(|| panic!("no ID reply: {lines:?}"));
        let start = id.find("\"x-backend\" \"").expect("x-backend in ID") + 13;
        id[start..].split('"').next().unwrap().to_owned()
    }

    /// Connects to an IMAP server and reads its greeting, which must be `* OK ...`.
    pub fn imap_greeted(addr: SocketAddr) -> Conn {
        let mut c = Conn::connect(addr);
        let greeting = c.line();
        assert!(greeting.starts_with("* OK"), "{greeting}");
        c
    }

    /// Connects to a POP3 server and reads its greeting, which must be `+OK ...`.
    pub fn pop3_greeted(addr: SocketAddr) -> Conn {
        let mut c = Conn::connect(addr);
        let greeting = c.line();
        assert!(greeting.starts_with("+OK"), "{greeting}");
        c
    }

    /// Connects to a ManageSieve server and reads its greeting (capability lines up to `OK`);
    /// returns the connection and those lines.
    pub fn sieve_greeted(addr: SocketAddr) -> (Conn, Vec<String>) {
        let mut c = Conn::connect(addr);
        let mut lines = Vec::new();
        loop {
            let line = c.line();
            assert!(!line.is_empty(), "closed during the greeting: {lines:?}");
            let done = line.starts_with("OK");
            lines.push(line);
            if done {
                return (c, lines);
            }
        }
    }

    /// [`Conn::imap`], panicking unless the tagged reply is `tag OK`.
    pub fn imap_ok(&mut self, tag: &str, command: &str) -> Vec<String> {
        let reply = self.imap(tag, command);
        assert_ok(&reply, tag, command);
        reply
    }

    /// IMAP `LOGIN` with both arguments quoted, which must succeed; returns the reply.
    pub fn imap_login_as(&mut self, tag: &str, user: &str, password: &str) -> Vec<String> {
        let reply = self.imap(tag, &format!("LOGIN {} {}", quote(user), quote(password)));
        assert_ok(&reply, tag, &format!("login {user}"));
        reply
    }

    /// [`Conn::pop3`], panicking unless the status line is `+OK`; returns it.
    pub fn pop3_ok(&mut self, command: &str) -> String {
        let status = self.pop3(command);
        assert!(status.starts_with("+OK"), "{command}: {status}");
        status
    }

    /// POP3 `USER`, which must be accepted, then `PASS`; returns the status line of `PASS`.
    pub fn pop3_user_pass(&mut self, user: &str, password: &str) -> String {
        self.pop3_ok(&format!("USER {user}"));
        self.pop3(&format!("PASS {password}"))
    }

    /// POP3 `USER` and `PASS`, which must both be accepted.
    pub fn pop3_login_as(&mut self, user: &str, password: &str) {
        let r = self.pop3_user_pass(user, password);
        assert!(r.starts_with("+OK"), "PASS for {user}: {r}");
    }
}

/// Panics unless the last line of `reply` is `<tag> OK ...`; returns that line.
pub fn assert_ok<'a>(reply: &'a [String], tag: &str, what: &str) -> &'a str {
    assert_tagged(reply, tag, "OK", what)
}

/// Panics unless the last line of `reply` is `<tag> <status>...` (`status` being `OK`, `BAD`,
/// `NO [AUTHENTICATIONFAILED]`...); returns that line.
pub fn assert_tagged<'a>(reply: &'a [String], tag: &str, status: &str, what: &str) -> &'a str {
    let last = reply.last().map(String::as_str).unwrap_or("");
    assert!(
        last.starts_with(&format!("{tag} {status}")),
        "{what}: expected {tag} {status}, got {reply:?}"
    );
    last
}

/// Connects to an IMAP director, logs in with LOGIN (quoted), and returns the connection
/// and the name of the backend it landed on.
pub fn imap_login(addr: SocketAddr, user: &str, password: &str) -> (Conn, String) {
    let mut c = Conn::imap_greeted(addr);
    c.imap_login_as("a1", user, password);
    let backend = c.imap_backend();
    (c, backend)
}

/// Connects to a POP3 server, logs in with USER/PASS and returns the connection.
pub fn pop3_login(addr: SocketAddr, user: &str, password: &str) -> Conn {
    let mut c = Conn::pop3_greeted(addr);
    c.pop3_login_as(user, password);
    c
}

/// Logs in to the IMAP server at `addr` (a backend or the director) and APPENDs `message`
/// (CRLF line ends) to the user's INBOX.
pub fn imap_append(addr: SocketAddr, user: &str, password: &str, message: &[u8]) {
    let mut c = Conn::imap_greeted(addr);
    c.imap_login_as("a1", user, password);
    c.send(format!("a2 APPEND INBOX {{{}}}\r\n", message.len()).as_bytes());
    let go = c.line();
    assert!(go.starts_with('+'), "APPEND continuation: {go}");
    c.send(message);
    c.send(b"\r\n");
    let r = c.until_tagged("a2");
    assert_ok(&r, "a2", "APPEND");
    c.imap_ok("a3", "LOGOUT");
}

/// Base64 (standard alphabet, padded), as SASL wants it.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An IMAP quoted string.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Runs curl with `args` (plus -s -S and a timeout); returns (success, stdout, stderr).
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = run(
        Command::new("curl")
            .args(["-s", "-S", "-m", "30"])
            .args(args),
        None,
    )
    .expect("run curl (is it installed? run ./scripts/test)");
    (out.ok, out.stdout, out.stderr)
}

/// curl logging in to the IMAP server at `addr` with SASL CRAM-MD5 (curl computes the
/// response) and sending `ID NIL`, verbose: (success, stdout, stderr with the dialogue).
pub fn curl_imap_cram_md5(
    addr: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> (bool, String, String) {
    let url = format!("imap://{addr}/");
    let login = format!("{user}:{password}");
    curl(&[
        "-v",
        &url,
        "-u",
        &login,
        "--login-options",
        "AUTH=CRAM-MD5",
        "-X",
        "ID NIL",
    ])
}

/// The size announced by an IMAP literal at the end of `line` (`{n}` or `{n+}`), if any.
pub fn literal_size(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    inner[open + 1..].trim_end_matches('+').parse().ok()
}
