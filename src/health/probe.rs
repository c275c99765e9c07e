//! Probes as data (HAProxy's CONNECT / SEND / EXPECT rules): a probe connects to one of a
//! backend's ports (plain or implicit TLS), then runs steps that send a line and/or expect a
//! reply, each under its own timeout; a step may do a STARTTLS handshake, and login steps run
//! only when check credentials are configured. The shipped probes are `checks/*.yaml`, also
//! built into the binary; files in `health.checks_dir` replace or add to them by name.
//!
//! A probe's outcome is a [`CheckResult`]: a [`CheckCode`] that tells what broke (a closed
//! port from a timeout from a wrong banner), how long it took and when it ran.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::config::{HumanDuration, Protocol};
use crate::net::stream::BackendStream;
use crate::protocol::decision::Secret;

/// The shipped checks, by name, as built into the binary.
pub const BUILT_IN: [(&str, &str); 4] = [
    ("imap", include_str!("../../checks/imap.yaml")),
    ("pop3", include_str!("../../checks/pop3.yaml")),
    ("lmtp", include_str!("../../checks/lmtp.yaml")),
    ("sieve", include_str!("../../checks/sieve.yaml")),
];

/// The longest reply line a probe reads; a longer one is a wrong response.
const MAX_LINE: usize = 64 * 1024;

/// How many lines one step may pass over (`skip`, `expect_until`) before giving up.
const MAX_SKIPPED_LINES: usize = 1000;

/// What a check found. The names appear in logs, admin output and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckCode {
    /// Every step passed.
    Ok,
    /// Nothing listens on the port (or the host cannot be reached at all).
    ConnectionRefused,
    /// The TCP connection was not set up in time.
    ConnectTimeout,
    /// The TLS handshake (implicit or after STARTTLS) failed or timed out.
    TlsFailure,
    /// The backend answered something other than what a step expects.
    WrongResponse,
    /// The backend did not answer within a step's timeout (a hung backend).
    ResponseTimeout,
    /// A login step was refused (the check credentials do not work there).
    LoginFailed,
    /// The backend closed the connection before the probe was done.
    Closed,
}

impl CheckCode {
    pub fn name(self) -> &'static str {
        match self {
            CheckCode::Ok => "ok",
            CheckCode::ConnectionRefused => "connection_refused",
            CheckCode::ConnectTimeout => "connect_timeout",
            CheckCode::TlsFailure => "tls_failure",
            CheckCode::WrongResponse => "wrong_response",
            CheckCode::ResponseTimeout => "response_timeout",
            CheckCode::LoginFailed => "login_failed",
            CheckCode::Closed => "closed",
        }
    }

    pub fn is_ok(self) -> bool {
        self == CheckCode::Ok
    }
}

impl fmt::Display for CheckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of one check of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub code: CheckCode,
    /// From the start of the connect to the end of the last step (or the failure).
    pub latency: Duration,
    /// When the check ended.
    pub at: SystemTime,
    /// The check's name (`imap`, ...), or `login` for a failure seen by a real login.
    pub check: String,
    /// What went wrong, for people (empty when `ok`).
    pub detail: String,
}

impl CheckResult {
    /// A result made now.
    pub fn new(code: CheckCode, latency: Duration, check: &str, detail: impl Into<String>) -> Self {
        CheckResult {
            code,
            latency,
            at: SystemTime::now(),
            check: check.to_owned(),
            detail: detail.into(),
        }
    }
}

/// A check file (or built-in check) that cannot be used. The text names the file and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

/// The protocol whose port a probe connects to.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PortName {
    Imap,
    Pop3,
    Lmtp,
    Sieve,
}

impl From<PortName> for Protocol {
    fn from(p: PortName) -> Protocol {
        match p {
            PortName::Imap => Protocol::Imap,
            PortName::Pop3 => Protocol::Pop3,
            PortName::Lmtp => Protocol::Lmtp,
            PortName::Sieve => Protocol::Sieve,
        }
    }
}

/// TLS when the probe connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeTls {
    /// Plain TCP (a step may still do STARTTLS).
    #[default]
    None,
    /// TLS from the first byte.
    Implicit,
}

/// A check file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeFile {
    port: PortName,
    #[serde(default)]
    tls: ProbeTls,
    /// Default timeout of every step.
    #[serde(default)]
    timeout: Option<HumanDuration>,
    /// Default: the backend's `connect_timeout`.
    #[serde(default)]
    connect_timeout: Option<HumanDuration>,
    steps: Vec<StepFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    #[serde(default)]
    send: Option<String>,
    #[serde(default)]
    expect: Option<String>,
    #[serde(default)]
    expect_pattern: Option<String>,
    #[serde(default)]
    expect_until: Option<String>,
    #[serde(default)]
    skip: Vec<String>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    starttls: bool,
    #[serde(default)]
    login: bool,
}

/// The step timeout when a check file names none.
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// One part of a line to send.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    User,
    Password,
    UserQuoted,
    PasswordQuoted,
}

/// What a step expects of the backend's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// The line (after skipped ones) starts with this.
    Prefix(String),
    /// The whole line (after skipped ones) matches this glob (`*`, `?`).
    Pattern(String),
    /// Lines are read until one starts with this.
    Until(String),
}

/// One step: send, then expect, then STARTTLS, each optional.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    send: Option<Vec<Piece>>,
    expect: Option<Expect>,
    skip: Vec<String>,
    timeout: Duration,
    starttls: bool,
    login: bool,
}

/// A parsed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub name: String,
    /// The protocol whose port of the backend the probe connects to.
    pub protocol: Protocol,
    pub tls: ProbeTls,
    /// `None`: the backend's `connect_timeout`.
    pub connect_timeout: Option<Duration>,
    steps: Vec<Step>,
}

/// Credentials that login steps use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckCredentials {
    pub user: String,
    pub password: Secret,
}

/// Where and how to run a probe against one backend.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// What a backend's certificate is checked against.
    pub server_name: ServerName<'static>,
    /// Needed for implicit TLS and STARTTLS steps.
    pub connector: Option<TlsConnector>,
    pub connect_timeout: Duration,
    pub credentials: Option<CheckCredentials>,
}

fn perr(source: &str, field: impl fmt::Display, message: impl fmt::Display) -> ProbeError {
    ProbeError(format!("{source}: {field}: {message}"))
}

fn parse_template(text: &str, source: &str, field: &str) -> Result<Vec<Piece>, ProbeError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('{') {
        literal.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("{{") {
            literal.push('{');
            rest = after;
            continue;
        }
        let end = rest.find('}').ok_or_else(|| {
            perr(
                source,
                field,
                "`{` without `}` (write `{{` for a literal brace)",
            )
        })?;
        let piece = match &rest[1..end] {
            "user" => Piece::User,
            "password" => Piece::Password,
            "user_quoted" => Piece::UserQuoted,
            "password_quoted" => Piece::PasswordQuoted,
            other => {
                return Err(perr(
                    source,
                    field,
                    format_args!(
                        "unknown placeholder {{{other}}} (known: {{user}}, {{password}}, {{user_quoted}}, {{password_quoted}}; `{{{{` is a literal brace)"
                    ),
                ))
            }
        };
        if !literal.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut literal)));
        }
        pieces.push(piece);
        rest = &rest[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

impl Probe {
    /// Parses check text. `source` names it in errors (a file path, or `built-in imap`).
    pub fn parse(name: &str, source: &str, text: &str) -> Result<Probe, ProbeError> {
        let file: ProbeFile = crate::config::yaml::from_str(text)
            .map_err(|e| ProbeError(format!("{source}: {}: {}", e.path, e.message)))?;
        let default_timeout = match file.timeout {
            Some(t) if t.0.is_zero() => return Err(perr(source, "timeout", "must be > 0")),
            Some(t) => t.0,
            None => DEFAULT_STEP_TIMEOUT,
        };
        if let Some(t) = file.connect_timeout {
            if t.0.is_zero() {
                return Err(perr(source, "connect_timeout", "must be > 0"));
            }
        }
        if file.steps.is_empty() {
            return Err(perr(source, "steps", "at least one step is needed"));
        }
        let mut steps = Vec::new();
        for (i, s) in file.steps.into_iter().enumerate() {
            let f = |field: &str| format!("steps[{i}].{field}");
            let expects = [&s.expect, &s.expect_pattern, &s.expect_until]
                .iter()
                .filter(|e| e.is_some())
                .count();
            if expects > 1 {
                return Err(perr(
                    source,
                    format_args!("steps[{i}]"),
                    "give only one of expect, expect_pattern, expect_until",
                ));
            }
            if s.send.is_none() && expects == 0 && !s.starttls {
                return Err(perr(
                    source,
                    format_args!("steps[{i}]"),
                    "does nothing (give send, expect, expect_pattern, expect_until or starttls)",
                ));
            }
            if !s.skip.is_empty() && s.expect.is_none() && s.expect_pattern.is_none() {
                return Err(perr(
                    source,
                    f("skip"),
                    "needs expect or expect_pattern after the skipped lines",
                ));
            }
            if s.skip.iter().any(|p| p.is_empty()) {
                return Err(perr(
                    source,
                    f("skip"),
                    "an empty prefix would skip every line",
                ));
            }
            if s.starttls && file.tls == ProbeTls::Implicit {
                return Err(perr(
                    source,
                    f("starttls"),
                    "the probe already connects with implicit TLS",
                ));
            }
            let timeout = match s.timeout {
                Some(t) if t.0.is_zero() => return Err(perr(source, f("timeout"), "must be > 0")),
                Some(t) => t.0,
                None => default_timeout,
            };
            let send = match &s.send {
                Some(text) => {
                    if text.contains(['\r', '\n', '\0']) {
                        return Err(perr(
                            source,
                            f("send"),
                            "one line without CR, LF or NUL (CRLF is added)",
                        ));
                    }
                    let pieces = parse_template(text, source, &f("send"))?;
                    if !s.login && pieces.iter().any(|p| !matches!(p, Piece::Text(_))) {
                        return Err(perr(
                            source,
                            f("send"),
                            "credentials placeholders are only allowed in login steps (login: true)",
                        ));
                    }
                    Some(pieces)
                }
                None => None,
            };
            let expect = match (s.expect, s.expect_pattern, s.expect_until) {
                (Some(p), _, _) => Some(Expect::Prefix(p)),
                (_, Some(p), _) => Some(Expect::Pattern(p)),
                (_, _, Some(p)) if p.is_empty() => {
                    return Err(perr(source, f("expect_until"), "must not be empty"))
                }
                (_, _, Some(p)) => Some(Expect::Until(p)),
                _ => None,
            };
            steps.push(Step {
                send,
                expect,
                skip: s.skip,
                timeout,
                starttls: s.starttls,
                login: s.login,
            });
        }
        Ok(Probe {
            name: name.to_owned(),
            protocol: file.port.into(),
            tls: file.tls,
            connect_timeout: file.connect_timeout.map(|t| t.0),
            steps,
        })
    }

    /// Whether the probe needs a TLS connector (implicit TLS or a STARTTLS step).
    pub fn uses_tls(&self) -> bool {
        self.tls == ProbeTls::Implicit || self.steps.iter().any(|s| s.starttls)
    }

    /// Whether any step logs in (and so needs credentials to be meaningful).
    pub fn logs_in(&self) -> bool {
        self.steps.iter().any(|s| s.login)
    }

    /// Runs the probe once against `target`.
    pub async fn run(&self, target: &Target) -> CheckResult {
        let start = Instant::now();
        let (code, detail) = match self.run_steps(target).await {
            Ok(()) => (CheckCode::Ok, String::new()),
            Err(f) => (f.code, f.detail),
        };
        CheckResult::new(code, start.elapsed(), &self.name, detail)
    }

    async fn run_steps(&self, target: &Target) -> Result<(), Failure> {
        let connect_timeout = self.connect_timeout.unwrap_or(target.connect_timeout);
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(target.addr)).await
        {
            Err(_) => {
                return Err(Failure::new(
                    CheckCode::ConnectTimeout,
                    format!(
                        "no connection to {} within {connect_timeout:?}",
                        target.addr
                    ),
                ))
            }
            Ok(Err(e)) => {
                return Err(Failure::new(
                    CheckCode::ConnectionRefused,
                    format!("{}: {e}", target.addr),
                ))
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let mut conn = LineConn {
            stream: Some(BackendStream::Plain(tcp)),
            buf: Vec::new(),
        };
        if self.tls == ProbeTls::Implicit {
            let first = self
                .steps
                .first()
                .map_or(DEFAULT_STEP_TIMEOUT, |s| s.timeout);
            conn.start_tls(target, first).await?;
        }
        for step in &self.steps {
            if step.login && target.credentials.is_none() {
                continue;
            }
            let deadline = tokio::time::Instant::now() + step.timeout;
            let failed = if step.login {
                CheckCode::LoginFailed
            } else {
                CheckCode::WrongResponse
            };
            if let Some(pieces) = &step.send {
                let line = expand(pieces, target.credentials.as_ref())?;
                conn.send(&line, deadline).await?;
            }
            match &step.expect {
                None => {}
                Some(Expect::Until(p)) => {
                    let mut n = 0;
                    loop {
                        let line = conn.line(deadline).await?;
                        if line.starts_with(p.as_str()) {
                            break;
                        }
                        n += 1;
                        if n > MAX_SKIPPED_LINES {
                            return Err(Failure::new(
                                failed,
                                format!("no line starting with {p:?} in {MAX_SKIPPED_LINES} lines"),
                            ));
                        }
                    }
                }
                Some(e) => {
                    let mut n = 0;
                    let line = loop {
                        let line = conn.line(deadline).await?;
                        if !step.skip.iter().any(|s| line.starts_with(s.as_str())) {
                            break line;
                        }
                        n += 1;
                        if n > MAX_SKIPPED_LINES {
                            return Err(Failure::new(
                                failed,
                                format!("more than {MAX_SKIPPED_LINES} skipped lines"),
                            ));
                        }
                    };
                    let (ok, wanted) = match e {
                        Expect::Prefix(p) => (line.starts_with(p.as_str()), p),
                        Expect::Pattern(p) => (glob_match(p, &line), p),
                        // Handled above; matched here only to keep the match total.
                        Expect::Until(p) => (line.starts_with(p.as_str()), p),
                    };
                    if !ok {
                        return Err(Failure::new(
                            failed,
                            format!("expected {wanted:?}, got {:?}", shorten(&line)),
                        ));
                    }
                }
            }
            if step.starttls {
                if !conn.buf.is_empty() {
                    return Err(Failure::new(
                        CheckCode::WrongResponse,
                        "the backend sent data after its STARTTLS reply",
                    ));
                }
                conn.start_tls(target, step.timeout).await?;
            }
        }
        if let Some(mut s) = conn.stream.take() {
            let _ = tokio::time::timeout(Duration::from_millis(100), s.shutdown()).await;
        }
        Ok(())
    }
}

/// At most 200 characters of a reply, for logs.
fn shorten(line: &str) -> String {
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_owned(),
    }
}

/// An IMAP / ManageSieve quoted string.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn expand(pieces: &[Piece], creds: Option<&CheckCredentials>) -> Result<String, Failure> {
    let mut out = String::new();
    for p in pieces {
        let value = match (p, creds) {
            (Piece::Text(t), _) => {
                out.push_str(t);
                continue;
            }
            (Piece::User | Piece::UserQuoted, Some(c)) => c.user.as_str(),
            (Piece::Password | Piece::PasswordQuoted, Some(c)) => c.password.expose(),
            (_, None) => "",
        };
        if value.contains(['\r', '\n', '\0']) {
            return Err(Failure::new(
                CheckCode::LoginFailed,
                "the check credentials contain CR, LF or NUL and cannot be sent",
            ));
        }
        match p {
            Piece::UserQuoted | Piece::PasswordQuoted => out.push_str(&quoted(value)),
            _ => out.push_str(value),
        }
    }
    Ok(out)
}

/// `*` matches any text (also none), `?` one character; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Why a probe stopped.
#[derive(Debug)]
struct Failure {
    code: CheckCode,
    detail: String,
}

impl Failure {
    fn new(code: CheckCode, detail: impl Into<String>) -> Self {
        Failure {
            code,
            detail: detail.into(),
        }
    }
}

/// A connection read line by line.
struct LineConn {
    /// `None` only while STARTTLS swaps it.
    stream: Option<BackendStream>,
    buf: Vec<u8>,
}

impl LineConn {
    fn stream(&mut self) -> Result<&mut BackendStream, Failure> {
        self.stream
            .as_mut()
            .ok_or_else(|| Failure::new(CheckCode::TlsFailure, "connection lost in STARTTLS"))
    }

    async fn send(&mut self, line: &str, deadline: tokio::time::Instant) -> Result<(), Failure> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        let s = self.stream()?;
        match tokio::time::timeout_at(deadline, s.write_all(&bytes)).await {
            Err(_) => Err(Failure::new(
                CheckCode::ResponseTimeout,
                "the backend did not take the command in time",
            )),
            Ok(Err(e)) => Err(Failure::new(CheckCode::Closed, format!("write: {e}"))),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The next line, without its line end.
    async fn line(&mut self, deadline: tokio::time::Instant) -> Result<String, Failure> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > MAX_LINE {
                return Err(Failure::new(
                    CheckCode::WrongResponse,
                    format!("a reply line longer than {MAX_LINE} bytes"),
                ));
            }
            let mut chunk = [0u8; 4096];
            let s = self.stream()?;
            let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                Err(_) => {
                    return Err(Failure::new(
                        CheckCode::ResponseTimeout,
                        "no reply within the step's timeout",
                    ))
                }
                Ok(Err(e)) => return Err(Failure::new(CheckCode::Closed, format!("read: {e}"))),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err(Failure::new(
                    CheckCode::Closed,
                    "the backend closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn start_tls(&mut self, target: &Target, timeout: Duration) -> Result<(), Failure> {
        let connector = target.connector.as_ref().ok_or_else(|| {
            Failure::new(CheckCode::TlsFailure, "no TLS connector for this backend")
        })?;
        let stream = self
            .stream
            .take()
            .ok_or_else(|| Failure::new(CheckCode::TlsFailure, "no connection"))?;
        match tokio::time::timeout(
            timeout,
            stream.start_tls(connector, target.server_name.clone()),
        )
        .await
        {
            Err(_) => Err(Failure::new(
                CheckCode::TlsFailure,
                format!("TLS handshake not done within {timeout:?}"),
            )),
            Ok(Err(e)) => Err(Failure::new(CheckCode::TlsFailure, e.to_string())),
            Ok(Ok(s)) => {
                self.stream = Some(s);
                Ok(())
            }
        }
    }
}

/// Every check by name: the built-in ones, replaced or joined by the files of a directory.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    pub by_name: BTreeMap<String, Arc<Probe>>,
}

impl Checks {
    /// The built-in checks, then every `*.yaml` in `dir` (named by the file stem).
    pub fn load(dir: Option<&Path>) -> Result<Checks, ProbeError> {
        let mut by_name = BTreeMap::new();
        for (name, text) in BUILT_IN {
            let p = Probe::parse(name, &format!("built-in check {name}"), text)?;
            by_name.insert(name.to_owned(), Arc::new(p));
        }
        if let Some(dir) = dir {
            let entries = std::fs::read_dir(dir)
                .map_err(|e| ProbeError(format!("{}: cannot read: {e}", dir.display())))?;
            let mut paths: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect();
            paths.sort();
            for path in paths {
                let source = path.display().to_string();
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .ok_or_else(|| ProbeError(format!("{source}: the name is not UTF-8")))?
                    .to_owned();
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| ProbeError(format!("{source}: cannot read: {e}")))?;
                let p = Probe::parse(&name, &source, &text)?;
                by_name.insert(name, Arc::new(p));
            }
        }
        Ok(Checks { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Probe>> {
        self.by_name.get(name)
    }

    /// The names, comma-separated, for error messages.
    pub fn names(&self) -> String {
        self.by_name.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The credentials file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// By backend host (as configured) or IP address.
    #[serde(default)]
    backends: BTreeMap<String, CredentialsEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsEntry {
    user: String,
    password: String,
}

/// Check credentials: one pair for every backend, optionally replaced per backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialStore {
    pub default: Option<CheckCredentials>,
    pub by_backend: BTreeMap<String, CheckCredentials>,
}

impl CredentialStore {
    /// Reads the file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<CredentialStore, ProbeError> {
        let source = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| ProbeError(format!("{source}: cannot read: {e}")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ProbeError(format!(
                    "{source}: readable by group or others (mode {mode:o}); chmod 600 it"
                )));
            }
        }
        let _ = meta;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProbeError(format!("{source}: cannot read: {e}")))?;
        Self::parse(&source, &text)
    }

    /// Parses credentials text; `source` names it in errors.
    pub fn parse(source: &str, text: &str) -> Result<CredentialStore, ProbeError> {
        let f: CredentialsFile = crate::config::yaml::from_str(text)
            .map_err(|e| ProbeError(format!("{source}: {}: {}", e.path, e.message)))?;
        let check = |field: String, v: &str| {
            if v.contains(['\r', '\n', '\0']) {
                Err(perr(source, field, "contains CR, LF or NUL"))
            } else {
                Ok(())
            }
        };
        let default = match (f.user, f.password) {
            (Some(user), Some(password)) => {
                check("user".into(), &user)?;
                check("password".into(), &password)?;
                Some(CheckCredentials {
                    user,
                    password: Secret::new(password),
                })
            }
            (None, None) => None,
            (Some(_), None) => return Err(perr(source, "password", "missing (user is set)")),
            (None, Some(_)) => return Err(perr(source, "user", "missing (password is set)")),
        };
        let mut by_backend = BTreeMap::new();
        for (host, e) in f.backends {
            check(format!("backends.{host}.user"), &e.user)?;
            check(format!("backends.{host}.password"), &e.password)?;
            by_backend.insert(
                host.to_ascii_lowercase(),
                CheckCredentials {
                    user: e.user,
                    password: Secret::new(e.password),
                },
            );
        }
        Ok(CredentialStore {
            default,
            by_backend,
        })
    }

    /// The credentials for a backend known by `host` (as configured) and `ip`.
    pub fn for_backend(&self, host: &str, ip: IpAddr) -> Option<CheckCredentials> {
        self.by_backend
            .get(&host.to_ascii_lowercase())
            .or_else(|| self.by_backend.get(&ip.to_string()))
            .or(self.default.as_ref())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_checks_parse() {
        let c = Checks::load(None).unwrap();
        assert_eq!(c.names(), "imap, lmtp, pop3, sieve");
        let imap = c.get("imap").unwrap();
        assert_eq!(imap.protocol, Protocol::Imap);
        assert!(imap.logs_in());
        assert_eq!(
            imap.steps[0].expect,
            Some(Expect::Prefix("* OK".into())),
            "IMAP expects the greeting"
        );
        assert_eq!(imap.steps[1].skip, vec!["* ".to_string()]);
        assert_eq!(
            imap.steps[1].timeout,
            Duration::from_secs(1),
            "a hung backend must fail a check within a second"
        );
        assert_eq!(
            imap.steps[2].timeout,
            Duration::from_secs(1),
            "the login step"
        );
        let lmtp = c.get("lmtp").unwrap();
        assert_eq!(lmtp.protocol, Protocol::Lmtp);
        assert_eq!(lmtp.steps[1].expect, Some(Expect::Prefix("250 ".into())));
        assert!(!lmtp.logs_in());
        assert_eq!(c.get("pop3").unwrap().protocol, Protocol::Pop3);
        assert_eq!(c.get("sieve").unwrap().protocol, Protocol::Sieve);
    }

    fn parse_err(text: &str) -> String {
        Probe::parse("x", "checks/x.yaml", text).unwrap_err().0
    }

    #[test]
    fn bad_check_files_name_the_file_and_field() {
        // A check file, and how its error starts.
        let starts = [
            (
                "port: smtp\nsteps: [{expect: '220'}]\n",
                "checks/x.yaml: port: unknown variant `smtp`",
            ),
            (
                "port: imap\nsteps: [{expect: a, sned: b}]\n",
                "checks/x.yaml: steps[0].sned: unknown field",
            ),
            (
                "port: imap\nsteps: [{expect: a}, {send: 'LOGIN {user} {pass}', login: true}]\n",
                "checks/x.yaml: steps[1].send: unknown placeholder {pass}",
            ),
            (
                "port: imap\nsteps: [{send: x, skip: ['* ']}]\n",
                "checks/x.yaml: steps[0].skip: needs expect",
            ),
            (
                "port: imap\nsteps: [{expect: a, timeout: soon}]\n",
                "checks/x.yaml: steps[0].timeout: \"soon\" is not a duration",
            ),
            (
                "port: imap\nsteps: [{login: true}]\n",
                "checks/x.yaml: steps[0]: does nothing",
            ),
            (
                "port: imap\ntls: implicit\nsteps: [{expect: a, starttls: true}]\n",
                "checks/x.yaml: steps[0].starttls: ",
            ),
        ];
        for (text, start) in starts {
            let e = parse_err(text);
            assert!(e.starts_with(start), "{text:?}: {e}");
        }
        // A check file, and its whole error.
        let whole = [
            (
                "port: imap\nsteps: [{expect: a, expect_until: b}]\n",
                "checks/x.yaml: steps[0]: give only one of expect, expect_pattern, expect_until",
            ),
            (
                "port: imap\nsteps: [{expect: a, timeout: 0s}]\n",
                "checks/x.yaml: steps[0].timeout: must be > 0",
            ),
            (
                "port: imap\nsteps: []\n",
                "checks/x.yaml: steps: at least one step is needed",
            ),
        ];
        for (text, want) in whole {
            assert_eq!(parse_err(text), want, "{text:?}");
        }
        let e = parse_err("port: imap\nsteps: [{send: 'LOGIN {user} x'}]\n");
        assert!(
            e.contains("steps[0].send: credentials placeholders are only allowed in login steps"),
            "{e}"
        );
    }

    #[test]
    fn checks_dir_replaces_and_adds_by_name() {
        let dir = std::env::temp_dir().join(format!("director-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("imap.yaml"),
            "port: imap\nsteps: [{expect: '* OK'}]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("pop3s.yaml"),
            "port: pop3\ntls: implicit\nsteps: [{expect: '+OK'}]\n",
        )
        .unwrap();
        let c = Checks::load(Some(&dir)).unwrap();
        assert_eq!(c.get("imap").unwrap().steps.len(), 1);
        assert_eq!(c.get("pop3s").unwrap().tls, ProbeTls::Implicit);
        std::fs::write(dir.join("bad.yaml"), "port: imap\n").unwrap();
        let e = Checks::load(Some(&dir)).unwrap_err().0;
        assert!(e.contains("bad.yaml: ") && e.contains("steps"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_are_quoted_and_line_breaks_refused() {
        let pieces =
            parse_template("b LOGIN {user_quoted} {password_quoted} {{x}", "s", "f").unwrap();
        let c = CheckCredentials {
            user: "u\"1".into(),
            password: Secret::new("p\\w d"),
        };
        assert_eq!(
            expand(&pieces, Some(&c)).unwrap(),
            r#"b LOGIN "u\"1" "p\\w d" {x}"#
        );
        let bad = CheckCredentials {
            user: "u".into(),
            password: Secret::new("a\r\nb LOGOUT"),
        };
        assert_eq!(
            expand(&pieces, Some(&bad)).unwrap_err().code,
            CheckCode::LoginFailed
        );
        let e = CredentialStore::parse("creds.yaml", "user: a\npassword: \"x\\ny\"\n")
            .unwrap_err()
            .0;
        assert_eq!(e, "creds.yaml: password: contains CR, LF or NUL");
        let s = CredentialStore::parse(
            "creds.yaml",
            "user: a\npassword: b\nbackends:\n  Mail1.example: {user: c, password: d}\n",
        )
        .unwrap();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(s.for_backend("mail1.example", ip).unwrap().user, "c");
        assert_eq!(s.for_backend("mail2.example", ip).unwrap().user, "a");
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match("+OK *ready*", "+OK Dovecot ready."));
        assert!(glob_match("* OK*", "* OK [CAPABILITY IMAP4rev1] hi"));
        assert!(glob_match("2?0 *", "220 lmtp"));
        assert!(!glob_match("2?0 *", "220"));
        assert!(!glob_match("+OK", "+OK more"));
        assert!(glob_match("*", ""));
    }
}
