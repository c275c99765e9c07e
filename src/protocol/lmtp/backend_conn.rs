//! One LMTP connection from the director to a backend, for one transaction: connect, read the
//! greeting (refusing a loop back to this director), LHLO, XCLIENT when offered, then the
//! transaction's commands, each reply read under a timeout.
//!
//! Plain TCP only for now (a PROXY v2 header first if the backend is configured for it): TLS
//! to LMTP backends is left for later.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::command::{Param, Reply, ReplyError, ReplyParser};
use crate::config::BackendTls;
use crate::net::stream::BackendStream;
use crate::protocol::backend_login::Forward;
use crate::protocol::decision::{ClientIdentity, Protocol};
use crate::state::backend::Backend;

/// The largest reply accepted from a backend (LHLO lists are the longest).
const MAX_REPLY: usize = 16 * 1024;

/// Why a backend cannot be used (any of these gives the recipients a 4xx).
#[derive(Debug, thiserror::Error)]
pub enum BackendFailure {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("closed the connection")]
    Closed,
    #[error("{0}")]
    Garbage(#[from] ReplyError),
    #[error("greeted with {0}")]
    Greeting(Reply),
    #[error("answered LHLO with {0}")]
    Lhlo(Reply),
    #[error("answered XCLIENT with {0}")]
    Xclient(Reply),
    #[error("is this director itself (greeting {0}): refusing a mail loop")]
    Loop(Reply),
    #[error("TLS: {0}")]
    Tls(String),
}

/// What the backend offered in its LHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Extension keywords, upper-cased (`PIPELINING`, `8BITMIME`, `SIZE` ...).
    pub keywords: Vec<String>,
    /// The attributes listed after `XCLIENT`, upper-cased; `None` if XCLIENT is not offered.
    pub xclient: Option<Vec<String>>,
}

impl Capabilities {
    fn from_lhlo(reply: &Reply) -> Self {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            if keyword == "XCLIENT" {
                caps.xclient = Some(words.map(|w| w.to_ascii_uppercase()).collect());
            }
            caps.keywords.push(keyword);
        }
        caps
    }

    pub fn has(&self, keyword: &str) -> bool {
        self.keywords.iter().any(|k| k == keyword)
    }

    /// Whether a MAIL parameter may be passed to this backend: only those of extensions it
    /// offered (Dovecot 2.3 answers `555 5.5.4 Unsupported parameters` to `SIZE=` because it
    /// does not offer SIZE).
    pub fn accepts_mail_param(&self, param: &Param) -> bool {
        match param.keyword.as_str() {
            "BODY" => self.has("8BITMIME"),
            other => self.has(other),
        }
    }
}

/// How the director introduces itself and detects loops.
pub struct Hello<'a> {
    /// Our host name, sent in LHLO.
    pub hostname: &'a str,
    /// Our own greeting text after `220 `: a backend greeting with it is this director.
    pub own_greeting: &'a str,
    /// The domain the client gave in LHLO, forwarded as XCLIENT HELO.
    pub client_helo: Option<&'a str>,
    /// TLS connectors, for backends configured with TLS.
    pub tls: &'a crate::net::tls::BackendTlsContext,
}

/// An open connection to a backend's LMTP service.
pub struct BackendConn {
    stream: BackendStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    parser: ReplyParser,
    /// Time allowed for each command's reply (the backend's `login_timeout`).
    pub reply_timeout: Duration,
    pub capabilities: Capabilities,
}

impl BackendConn {
    /// Connects and runs the dialogue up to (not including) MAIL.
    pub async fn open(
        backend: &Backend,
        identity: &ClientIdentity,
        hello: &Hello<'_>,
    ) -> Result<BackendConn, BackendFailure> {
        let settings = &backend.settings;
        let addr = backend.address(Protocol::Lmtp);
        let mut tcp = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| BackendFailure::Timeout(settings.connect_timeout))?
            .map_err(BackendFailure::Connect)?;
        let _ = tcp.set_nodelay(true);
        if settings.forward == Forward::ProxyV2 {
            let header =
                crate::protocol::proxy_protocol::encode_v2(identity.client, identity.local);
            tcp.write_all(&header).await?;
        }
        let tls = match settings.tls {
            BackendTls::None => None,
            _ => {
                let connector = hello.tls.connector(backend).ok_or_else(|| {
                    BackendFailure::Tls("no TLS connector configured for this backend".into())
                })?;
                let name = crate::net::tls::server_name(&settings.tls_server_name)
                    .map_err(|e| BackendFailure::Tls(e.to_string()))?;
                Some((connector, name))
            }
        };
        let mut stream = BackendStream::Plain(tcp);
        if let (BackendTls::Implicit, Some((connector, name))) = (settings.tls, &tls) {
            stream = tokio::time::timeout(
                settings.login_timeout,
                stream.start_tls(connector, name.clone()),
            )
            .await
            .map_err(|_| BackendFailure::Timeout(settings.login_timeout))?
            .map_err(|e| BackendFailure::Tls(e.to_string()))?;
        }
        let mut conn = BackendConn {
            stream,
            buf: Vec::new(),
            parser: ReplyParser::new(MAX_REPLY),
            reply_timeout: settings.login_timeout,
            capabilities: Capabilities::default(),
        };
        conn.greet(hello).await?;
        conn.lhlo(hello).await?;
        if let (BackendTls::Starttls, Some((connector, name))) = (settings.tls, tls) {
            if !conn.capabilities.has("STARTTLS") {
                return Err(BackendFailure::Tls(
                    "the backend does not offer STARTTLS, which the configuration requires".into(),
                ));
            }
            let reply = conn.command("STARTTLS").await?;
            if reply.code != 220 {
                return Err(BackendFailure::Tls(format!("STARTTLS refused: {reply}")));
            }
            if !conn.buf.is_empty() {
                return Err(BackendFailure::Tls(
                    "the backend sent data after its STARTTLS reply".into(),
                ));
            }
            let BackendConn {
                stream,
                reply_timeout,
                ..
            } = conn;
            let stream =
                tokio::time::timeout(settings.login_timeout, stream.start_tls(&connector, name))
                    .await
                    .map_err(|_| BackendFailure::Timeout(settings.login_timeout))?
                    .map_err(|e| BackendFailure::Tls(e.to_string()))?;
            conn = BackendConn {
                stream,
                buf: Vec::new(),
                parser: ReplyParser::new(MAX_REPLY),
                reply_timeout,
                capabilities: Capabilities::default(),
            };
            conn.lhlo(hello).await?;
        }
        if settings.forward == Forward::Auto {
            if let Some(line) = xclient_line(&conn.capabilities, identity, hello.client_helo) {
                let reply = conn.command(&line).await?;
                // Dovecot (like Postfix) answers a successful XCLIENT with a new greeting, and
                // the session starts over from LHLO.
                if reply.code != 220 {
                    return Err(BackendFailure::Xclient(reply));
                }
                conn.lhlo(hello).await?;
            }
        }
        Ok(conn)
    }

    async fn greet(&mut self, hello: &Hello<'_>) -> Result<(), BackendFailure> {
        let greeting = self.reply().await?;
        if greeting.code != 220 {
            return Err(BackendFailure::Greeting(greeting));
        }
        if greeting.lines.first().map(String::as_str) == Some(hello.own_greeting) {
            return Err(BackendFailure::Loop(greeting));
        }
        Ok(())
    }

    async fn lhlo(&mut self, hello: &Hello<'_>) -> Result<(), BackendFailure> {
        let reply = self.command(&format!("LHLO {}", hello.hostname)).await?;
        if reply.code != 250 {
            return Err(BackendFailure::Lhlo(reply));
        }
        self.capabilities = Capabilities::from_lhlo(&reply);
        Ok(())
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, BackendFailure> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// Writes bytes (message data) within the reply timeout.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendFailure> {
        let t = self.reply_timeout;
        tokio::time::timeout(t, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| BackendFailure::Timeout(t))??;
        Ok(())
    }

    /// Reads one reply within the reply timeout.
    pub async fn reply(&mut self) -> Result<Reply, BackendFailure> {
        let t = self.reply_timeout;
        self.reply_within(t).await
    }

    /// Reads one reply within `timeout`.
    pub async fn reply_within(&mut self, timeout: Duration) -> Result<Reply, BackendFailure> {
        tokio::time::timeout(timeout, async {
            loop {
                if let Some((n, reply)) = self.parser.parse(&self.buf)? {
                    self.buf.drain(..n);
                    return Ok(reply);
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(BackendFailure::Closed);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .map_err(|_| BackendFailure::Timeout(timeout))?
    }

    /// Says QUIT without waiting for the answer, and closes.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let _ = self.stream.write_all(b"QUIT\r\n").await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// The XCLIENT command for this backend, or `None` if it offers none of what we would send.
/// Postfix's syntax, which Dovecot reads: `ADDR=` (IPv6 as `IPV6:...`), `PORT=`, `HELO=`,
/// `SESSION=`, values in xtext.
fn xclient_line(
    caps: &Capabilities,
    identity: &ClientIdentity,
    client_helo: Option<&str>,
) -> Option<String> {
    let offered = caps.xclient.as_ref()?;
    let has = |a: &str| offered.iter().any(|o| o == a);
    let mut attrs = Vec::new();
    let ip = identity.client.ip();
    // A unix-socket client has no address worth forwarding.
    if !ip.is_unspecified() {
        if has("ADDR") {
            attrs.push(match ip {
                std::net::IpAddr::V4(v4) => format!("ADDR={v4}"),
                std::net::IpAddr::V6(v6) => format!("ADDR=IPV6:{v6}"),
            });
        }
        if has("PORT") {
            attrs.push(format!("PORT={}", identity.client.port()));
        }
    }
    if let (true, Some(helo)) = (has("HELO"), client_helo) {
        attrs.push(format!("HELO={}", xtext(helo)));
    }
    if has("SESSION") && !identity.session_id.is_empty() {
        attrs.push(format!("SESSION={}", xtext(&identity.session_id)));
    }
    (!attrs.is_empty()).then(|| format!("XCLIENT {}", attrs.join(" ")))
}

/// RFC 3461 xtext: `+XX` for `+`, `=`, controls, space and non-ASCII.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xclient_offers_only_what_the_backend_takes() {
        let lhlo = Reply {
            code: 250,
            lines: vec![
                "backend1".into(),
                "8BITMIME".into(),
                "XCLIENT ADDR PORT PROTO HELO LOGIN SESSION TTL TIMEOUT".into(),
            ],
        };
        let caps = Capabilities::from_lhlo(&lhlo);
        assert!(caps.has("8BITMIME") && !caps.has("SIZE"));
        let identity = ClientIdentity {
            client: "192.0.2.7:4567".parse().unwrap(),
            local: "127.0.0.1:24".parse().unwrap(),
            session_id: "abc".into(),
            session_ext_id: None,
        };
        assert_eq!(
            xclient_line(&caps, &identity, Some("mta one")).unwrap(),
            "XCLIENT ADDR=192.0.2.7 PORT=4567 HELO=mta+20one SESSION=abc"
        );
        let v6 = ClientIdentity {
            client: "[2001:db8::1]:25".parse().unwrap(),
            ..identity.clone()
        };
        assert!(xclient_line(&caps, &v6, None)
            .unwrap()
            .starts_with("XCLIENT ADDR=IPV6:2001:db8::1 PORT=25"));
        let none = Capabilities::from_lhlo(&Reply::new(250, "backend1"));
        assert_eq!(xclient_line(&none, &identity, None), None);
        let size = |raw: &str| Param {
            keyword: raw.split('=').next().unwrap().to_ascii_uppercase(),
            value: None,
            raw: raw.into(),
        };
        assert!(!caps.accepts_mail_param(&size("SIZE=10")));
        assert!(caps.accepts_mail_param(&size("BODY=8BITMIME")));
    }
}
