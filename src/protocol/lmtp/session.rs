//! One LMTP client connection: the command loop, and transactions that fan out to backends.
//!
//! Replies are queued and flushed whenever the session is about to wait for the client, so a
//! pipelined group (MAIL, RCPT…, DATA in one write) is answered in order in one write.
//!
//! The safety rule: a recipient is told 250 after DATA only when its backend said 250 for it.
//! Anything that fails on the way (connect, timeout, dropped connection, garbage) gives that
//! backend's recipients `451 4.4.0`, never a 5xx of our own. A message over the size limit is
//! not delivered anywhere: the backend connections are dropped before the final dot. The one
//! 5xx of our own at RCPT is for a user the user database does not know (`auth.mode:
//! dovecot`), worded as the backend would word it; a user database that cannot tell gives
//! `451 4.3.0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::backend_conn::{BackendConn, BackendFailure, Hello};
use super::command::{
    username_of, Command, CommandParser, DataScanner, MailFrom, Parse, RcptTo, Reply, SyntaxError,
};
use super::lookup::{RecipientLookup, RecipientRoute};
use super::LmtpSettings;
use crate::config::BackendTls;
use crate::metrics::{Metrics, RecipientResult};
use crate::net::shutdown::{Phase, Shutdown};
use crate::net::stream::ClientStream;
use crate::protocol::decision::ClientIdentity;
use crate::state::backend::Backend;
use crate::state::router::Router;

/// Read size from the client (also the most of a message held at once).
const CHUNK: usize = 64 * 1024;

/// The reply for every failure that is ours or a backend's: the MTA keeps the mail.
fn unavailable() -> Reply {
    Reply::new(451, "4.4.0 Backend unavailable, try again later")
}

/// Which recipients share a backend connection: those of one address, with one TLS setting
/// (an auth service may give a user its own port or TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UpstreamKey {
    addr: SocketAddr,
    tls: (BackendTls, bool),
}

impl UpstreamKey {
    fn of(backend: &Backend) -> Self {
        let s = &backend.settings;
        UpstreamKey {
            addr: backend.address(crate::protocol::decision::Protocol::Lmtp),
            tls: (s.tls, s.tls_verify),
        }
    }
}

/// A backend taking part in the transaction.
struct Upstream {
    key: UpstreamKey,
    /// `None` once it failed (or after the transaction ended).
    conn: Option<BackendConn>,
    /// What its recipients get if it failed.
    failure: Option<Reply>,
    /// Recipients it accepted, in its RCPT order.
    accepted: usize,
    /// Its replies after the final dot, one per accepted recipient, as they came.
    data_replies: Vec<Reply>,
}

impl Upstream {
    /// Drops the connection; its recipients will get `reply`.
    fn fail(&mut self, reply: Reply) {
        self.conn = None;
        if self.failure.is_none() {
            self.failure = Some(reply);
        }
    }
}

/// A recipient the backend accepted.
struct Recipient {
    path: String,
    /// The user's hash, whose record the delivery keeps alive; `None` for a backend outside
    /// the pool (an auth service's `host`), which has no records.
    user_hash: Option<u32>,
    /// Index into the transaction's upstreams.
    upstream: usize,
    /// Position among that upstream's accepted recipients.
    index: usize,
}

/// From MAIL to the end of DATA (or RSET).
struct Transaction {
    mail: MailFrom,
    /// Our own RCPT count (accepted or not), for `max_recipients`.
    rcpt_commands: usize,
    upstreams: Vec<Upstream>,
    recipients: Vec<Recipient>,
    started: Instant,
}

/// How the session loop goes on after a command.
enum Next {
    Continue,
    Close,
}

/// One client connection; `L` says where each recipient goes.
pub struct Session<L> {
    client: ClientStream,
    identity: ClientIdentity,
    router: Router,
    lookup: L,
    settings: Arc<LmtpSettings>,
    /// Bytes read from the client and not yet used.
    buf: Vec<u8>,
    parser: CommandParser,
    /// Replies not yet written.
    out: Vec<u8>,
    /// The domain of the client's LHLO; `None` before LHLO.
    lhlo: Option<String>,
    tx: Option<Transaction>,
    bad_commands: u32,
    /// Our greeting text, which a backend must not show (loop check).
    own_greeting: String,
    /// Counts recipients by outcome.
    metrics: Metrics,
    /// The director's stop: between transactions the client gets `421` at once; a
    /// transaction under way has the grace to finish.
    shutdown: Shutdown,
}

/// What waiting for the client gave.
enum Wait {
    Read(std::io::Result<usize>),
    TimedOut,
    /// The director is stopping.
    Stopping,
}

impl<L: RecipientLookup> Session<L> {
    pub fn new(
        client: ClientStream,
        identity: ClientIdentity,
        router: Router,
        lookup: L,
        settings: Arc<LmtpSettings>,
        metrics: Metrics,
        shutdown: Shutdown,
    ) -> Self {
        let own_greeting = format!("{} Director LMTP ready", settings.hostname);
        Session {
            client,
            identity,
            router,
            lookup,
            parser: CommandParser::new(settings.max_line_length),
            settings,
            buf: Vec::new(),
            out: Vec::new(),
            lhlo: None,
            tx: None,
            bad_commands: 0,
            own_greeting,
            metrics,
            shutdown,
        }
    }

    /// Runs the session to its end.
    pub async fn run(mut self) -> std::io::Result<()> {
        let greeting = Reply::new(220, self.own_greeting.clone());
        self.reply(&greeting);
        let result = self.command_loop().await;
        self.end_transaction().await;
        if result.is_ok() {
            let _ = self.flush().await;
            let _ = self.client.shutdown().await;
        }
        debug!(session = %self.identity.session_id, client = %self.identity.client, "LMTP session ended");
        result
    }

    async fn command_loop(&mut self) -> std::io::Result<()> {
        loop {
            match self.parser.parse(&self.buf) {
                Parse::Incomplete => {
                    if !self.read_more().await? {
                        return Ok(());
                    }
                }
                Parse::Skip { consumed } => {
                    self.buf.drain(..consumed);
                }
                Parse::Error { consumed, error } => {
                    self.buf.drain(..consumed);
                    if let Next::Close = self.bad_command(&error.reply()) {
                        return Ok(());
                    }
                    // An over-long line's rest is skipped: keep the buffer small meanwhile.
                    if error == SyntaxError::TooLong {
                        self.flush().await?;
                    }
                }
                Parse::Command { consumed, command } => {
                    self.buf.drain(..consumed);
                    if let Next::Close = self.command(command).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Flushes replies, then reads from the client. `false`: the client is gone or silent
    /// too long (told so).
    async fn read_more(&mut self) -> std::io::Result<bool> {
        self.flush().await?;
        let mut chunk = vec![0u8; CHUNK];
        // Between transactions a stop closes the connection at once; inside one, at the end
        // of the grace.
        let stop_at = if self.tx.is_some() {
            Phase::Closing
        } else {
            Phase::Draining
        };
        match self.wait_for_client(&mut chunk, stop_at).await {
            Wait::Read(Ok(0)) => Ok(false),
            Wait::Read(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Wait::Read(Err(e)) => Err(e),
            Wait::Stopping => {
                self.shutting_down();
                Ok(false)
            }
            Wait::TimedOut => {
                info!(session = %self.identity.session_id, client = %self.identity.client, "LMTP client timed out");
                let line = format!("4.4.2 {} Timeout, closing", self.settings.hostname);
                self.say(421, &line);
                Ok(false)
            }
        }
    }

    fn reply(&mut self, reply: &Reply) {
        self.out.extend_from_slice(reply.to_wire().as_bytes());
    }

    fn say(&mut self, code: u16, text: &str) {
        self.reply(&Reply::new(code, text));
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.client.write_all(&self.out).await?;
            self.client.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Answers a bad command; closes after too many.
    fn bad_command(&mut self, line: &str) -> Next {
        self.bad_commands += 1;
        if self.bad_commands > self.settings.max_bad_commands {
            self.say(421, "4.7.0 Too many errors, closing connection");
            return Next::Close;
        }
        let (code, text) = line.split_at(3);
        self.say(code.parse().unwrap_or(500), text.trim_start());
        Next::Continue
    }

    async fn command(&mut self, command: Command) -> std::io::Result<Next> {
        match command {
            Command::Lhlo(domain) => {
                self.end_transaction().await;
                let size = match self.settings.max_message_size {
                    Some(n) => format!("SIZE {n}"),
                    None => "SIZE".into(),
                };
                let reply = Reply {
                    code: 250,
                    lines: vec![
                        self.settings.hostname.clone(),
                        "PIPELINING".into(),
                        "ENHANCEDSTATUSCODES".into(),
                        "8BITMIME".into(),
                        "SMTPUTF8".into(),
                        size,
                    ],
                };
                self.reply(&reply);
                self.lhlo = Some(domain);
            }
            Command::Helo | Command::Ehlo => {
                return Ok(self.bad_command("500 5.5.1 This is LMTP: use LHLO"));
            }
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => self.rcpt(rcpt).await,
            Command::Data => return self.data().await,
            Command::Rset => {
                self.end_transaction().await;
                self.say(250, "2.0.0 OK");
            }
            Command::Noop => self.say(250, "2.0.0 OK"),
            Command::Quit => {
                self.say(221, "2.0.0 Bye");
                return Ok(Next::Close);
            }
            Command::Vrfy => self.say(
                252,
                "2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Command::Other(verb) => {
                let line = match verb.as_str() {
                    "EXPN" | "HELP" | "STARTTLS" | "BDAT" | "TURN" | "ETRN" => {
                        format!("502 5.5.1 {verb} is not implemented")
                    }
                    _ => "500 5.5.2 Unknown command".into(),
                };
                return Ok(self.bad_command(&line));
            }
        }
        Ok(Next::Continue)
    }

    fn mail(&mut self, mail: MailFrom) {
        if self.lhlo.is_none() {
            return self.say(503, "5.5.1 Send LHLO first");
        }
        if self.tx.is_some() {
            return self.say(503, "5.5.1 Nested MAIL command");
        }
        for p in &mail.params {
            match (p.keyword.as_str(), p.value.as_deref()) {
                ("SIZE", Some(v)) => {
                    let Ok(size) = v.parse::<u64>() else {
                        return self.say(501, "5.5.4 Invalid SIZE parameter");
                    };
                    if self.settings.max_message_size.is_some_and(|max| size > max) {
                        return self
                            .say(552, "5.3.4 Message size exceeds fixed maximum message size");
                    }
                }
                ("BODY", Some(v))
                    if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
                ("SMTPUTF8", None) => {}
                _ => return self.say(555, "5.5.4 Unsupported parameter"),
            }
        }
        self.tx = Some(Transaction {
            mail,
            rcpt_commands: 0,
            upstreams: Vec::new(),
            recipients: Vec::new(),
            started: Instant::now(),
        });
        self.say(250, "2.1.0 OK");
    }

    async fn rcpt(&mut self, rcpt: RcptTo) {
        let Some(tx) = self.tx.as_mut() else {
            return self.say(503, "5.5.1 MAIL needed first");
        };
        if !rcpt.params.is_empty() {
            return self.say(555, "5.5.4 Unsupported parameter");
        }
        if tx.rcpt_commands >= self.settings.max_recipients {
            return self.say(452, "4.5.3 Too many recipients");
        }
        tx.rcpt_commands += 1;
        let s = &self.settings;
        let Some(username) = username_of(&rcpt.path, s.recipient_username, s.recipient_delimiter)
        else {
            return self.say(501, "5.1.3 Bad recipient address syntax");
        };
        let reply = self.route_recipient(&rcpt, &username).await;
        if !reply.is_positive() {
            self.metrics
                .lmtp_recipient(RecipientResult::from_code(reply.code));
        }
        debug!(session = %self.identity.session_id, rcpt = %crate::untrusted::shown(&rcpt.path), user = %crate::untrusted::shown(&username), reply = %reply, "RCPT");
        self.reply(&reply);
    }

    /// Routes a recipient, opens its backend's connection if needed, and passes RCPT on.
    async fn route_recipient(&mut self, rcpt: &RcptTo, username: &str) -> Reply {
        let session = self.identity.session_id.clone();
        let mut answer = self.lookup.lookup(username, &self.identity).await;
        if let RecipientRoute::Deliver { route, .. } = &answer {
            let state = self.router.state();
            if state.is_moving(route.user_hash) {
                // A move of this user is under way: wait for it, then follow the new record.
                let hash = route.user_hash;
                let deadline = Instant::now() + self.settings.move_wait;
                while state.is_moving(hash) && Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                if state.is_moving(hash) {
                    warn!(session = %session, user = %crate::untrusted::shown(username), "recipient's user is being moved: try again later");
                    return unavailable();
                }
                answer = self.lookup.lookup(username, &self.identity).await;
            }
        }
        let route = match answer {
            RecipientRoute::Deliver { user, route } => {
                if user != username {
                    debug!(session = %session, rcpt = %crate::untrusted::shown(&rcpt.path),
                           user = %crate::untrusted::shown(&user), "recipient's user as the user database names it");
                }
                route
            }
            // Dovecot's words (its LMTP service, and its LMTP proxy's lookup failure).
            RecipientRoute::Unknown => {
                return Reply::new(
                    550,
                    format!("5.1.1 <{}> User doesn't exist: {username}", rcpt.path),
                )
            }
            RecipientRoute::LookupFailed => {
                return Reply::new(
                    451,
                    format!("4.3.0 <{}> Temporary user lookup failure", rcpt.path),
                )
            }
            RecipientRoute::NoBackend(why) => {
                warn!(session = %session, user = %crate::untrusted::shown(username), error = %why, "no backend for recipient");
                return unavailable();
            }
        };
        let backend = route.backend;
        let tx = self.tx.as_mut().expect("checked by rcpt");
        let key = UpstreamKey::of(&backend);
        let up = match tx.upstreams.iter().position(|u| u.key == key) {
            Some(i) => i,
            None => {
                let hello = Hello {
                    hostname: &self.settings.hostname,
                    own_greeting: &self.own_greeting,
                    client_helo: self.lhlo.as_deref(),
                    tls: &self.settings.backend_tls,
                };
                let addr = backend.address(crate::protocol::decision::Protocol::Lmtp);
                let mut upstream = Upstream {
                    key,
                    conn: None,
                    failure: None,
                    accepted: 0,
                    data_replies: Vec::new(),
                };
                // Connecting has `connect_timeout`; the greeting, LHLO, STARTTLS and XCLIENT
                // together have `greeting_timeout` more: a hung backend costs seconds, and the
                // recipient gets a 4xx the MTA retries.
                let s = &backend.settings;
                let opened = tokio::time::timeout(
                    s.connect_timeout + s.greeting_timeout,
                    BackendConn::open(&backend, &self.identity, &hello),
                )
                .await
                .unwrap_or(Err(BackendFailure::Timeout(
                    s.connect_timeout + s.greeting_timeout,
                )));
                match opened {
                    Ok(mut conn) => {
                        let line = mail_line(&tx.mail, &conn);
                        match conn.command(&line).await {
                            Ok(r) if r.is_positive() => upstream.conn = Some(conn),
                            Ok(r) => {
                                warn!(session = %session, backend = %addr, reply = %r, "backend refused MAIL FROM");
                                upstream.fail(r);
                            }
                            Err(e) => {
                                warn!(session = %session, backend = %addr, error = %e, "backend failed at MAIL FROM");
                                upstream.fail(unavailable());
                            }
                        }
                    }
                    Err(e) => {
                        if let BackendFailure::Loop(_) = e {
                            warn!(session = %session, backend = %addr, "backend {e}");
                        } else {
                            warn!(session = %session, backend = %addr, error = %e, "backend unusable for LMTP");
                        }
                        upstream.fail(unavailable());
                    }
                }
                tx.upstreams.push(upstream);
                tx.upstreams.len() - 1
            }
        };
        let upstream = &mut tx.upstreams[up];
        let Some(conn) = upstream.conn.as_mut() else {
            return upstream.failure.clone().unwrap_or_else(unavailable);
        };
        match conn.command(&format!("RCPT TO:<{}>", rcpt.path)).await {
            Ok(reply) => {
                if reply.is_positive() {
                    // Keeps the user's record alive while the delivery is under way.
                    let state = self.router.state();
                    let in_pool = state.backends().get(backend.ip).is_some();
                    if in_pool {
                        state.session_started(route.user_hash, backend.ip, Instant::now());
                    }
                    tx.recipients.push(Recipient {
                        path: rcpt.path.clone(),
                        user_hash: in_pool.then_some(route.user_hash),
                        upstream: up,
                        index: upstream.accepted,
                    });
                    upstream.accepted += 1;
                }
                reply
            }
            Err(e) => {
                warn!(session = %session, backend = %backend.ip, error = %e, "backend failed at RCPT");
                upstream.fail(unavailable());
                unavailable()
            }
        }
    }

    async fn data(&mut self) -> std::io::Result<Next> {
        let Some(tx) = self.tx.as_mut() else {
            self.say(503, "5.5.1 MAIL needed first");
            return Ok(Next::Continue);
        };
        if tx.recipients.is_empty() {
            self.say(503, "5.5.1 No valid recipients");
            return Ok(Next::Continue);
        }
        let session = self.identity.session_id.clone();
        // Every backend with recipients must be ready for the message.
        for u in tx.upstreams.iter_mut().filter(|u| u.accepted > 0) {
            let Some(conn) = u.conn.as_mut() else {
                continue;
            };
            match conn.command("DATA").await {
                Ok(r) if r.code == 354 => {}
                Ok(r) => {
                    warn!(session = %session, backend = %u.key.addr, reply = %r, "backend refused DATA");
                    u.fail(if r.code >= 400 { r } else { unavailable() });
                }
                Err(e) => {
                    warn!(session = %session, backend = %u.key.addr, error = %e, "backend failed at DATA");
                    u.fail(unavailable());
                }
            }
        }
        if tx.upstreams.iter().all(|u| u.conn.is_none()) {
            // Nobody will take the message: the client need not send it.
            let failures: Vec<&Reply> = tx
                .upstreams
                .iter()
                .filter(|u| u.accepted > 0)
                .filter_map(|u| u.failure.as_ref())
                .collect();
            let reply = match failures.first() {
                Some(first) if failures.iter().all(|r| r.code >= 500) => (*first).clone(),
                _ => unavailable(),
            };
            for _ in &tx.recipients {
                self.metrics
                    .lmtp_recipient(RecipientResult::from_code(reply.code));
            }
            self.reply(&reply);
            self.end_transaction().await;
            return Ok(Next::Continue);
        }
        self.say(354, "Start mail input; end with <CRLF>.<CRLF>");
        self.flush().await?;
        let Some(oversize) = self.stream_message().await? else {
            // The client went away mid-message: drop the backend connections without a final
            // dot (not even QUIT, which would be message text), so nothing is delivered.
            if let Some(tx) = self.tx.as_mut() {
                for u in &mut tx.upstreams {
                    u.conn = None;
                }
            }
            return Ok(Next::Close);
        };
        let tx = self.tx.as_mut().expect("still in the transaction");
        if oversize {
            for u in &mut tx.upstreams {
                u.conn = None;
            }
            let n = tx.recipients.len();
            info!(session = %session, recipients = n, "message over the size limit: refused");
            for _ in 0..n {
                self.metrics.lmtp_recipient(RecipientResult::Rejected);
                self.say(552, "5.3.4 Message size exceeds fixed maximum message size");
            }
            self.end_transaction().await;
            return Ok(Next::Continue);
        }
        let timeout = self.settings.backend_data_timeout;
        for u in tx.upstreams.iter_mut().filter(|u| u.accepted > 0) {
            while u.data_replies.len() < u.accepted {
                let Some(conn) = u.conn.as_mut() else { break };
                match conn.reply_within(timeout).await {
                    Ok(r) => u.data_replies.push(r),
                    Err(e) => {
                        warn!(session = %session, backend = %u.key.addr, error = %e, got = u.data_replies.len(),
                              of = u.accepted, "backend failed after the message was sent");
                        u.fail(unavailable());
                    }
                }
            }
        }
        let mut replies = Vec::new();
        for r in &tx.recipients {
            let u = &tx.upstreams[r.upstream];
            let reply = u
                .data_replies
                .get(r.index)
                .cloned()
                .or_else(|| u.failure.clone())
                .unwrap_or_else(unavailable);
            info!(session = %session, from = %crate::untrusted::shown(&tx.mail.path), to = %crate::untrusted::shown(&r.path), backend = %u.key.addr,
                  reply = %reply, ms = tx.started.elapsed().as_millis() as u64, "delivery");
            self.metrics
                .lmtp_recipient(RecipientResult::from_code(reply.code));
            replies.push(reply);
        }
        for reply in &replies {
            self.reply(reply);
        }
        self.end_transaction().await;
        Ok(Next::Continue)
    }

    /// Copies the message from the client to every live backend until the final dot.
    /// `Some(oversize)` when the message ended; `None` when the client left or timed out.
    async fn stream_message(&mut self) -> std::io::Result<Option<bool>> {
        let mut scanner = DataScanner::new();
        let mut size: u64 = 0;
        let mut oversize = false;
        let max = self.settings.max_message_size;
        let session = self.identity.session_id.clone();
        loop {
            if self.buf.is_empty() && !self.read_data().await? {
                return Ok(None);
            }
            let end = scanner.scan(&self.buf);
            let n = end.unwrap_or(self.buf.len());
            size += n as u64;
            if !oversize && max.is_some_and(|m| size > m) {
                oversize = true;
                // Drop the connections without the final dot: nothing gets delivered.
                let tx = self.tx.as_mut().expect("in a transaction");
                for u in &mut tx.upstreams {
                    u.conn = None;
                }
            }
            if !oversize {
                let tx = self.tx.as_mut().expect("in a transaction");
                for u in tx.upstreams.iter_mut() {
                    let Some(conn) = u.conn.as_mut() else {
                        continue;
                    };
                    if let Err(e) = conn.send(&self.buf[..n]).await {
                        warn!(session = %session, backend = %u.key.addr, error = %e, "backend failed while receiving the message");
                        u.fail(unavailable());
                    }
                }
            }
            self.buf.drain(..n);
            if end.is_some() {
                self.parser.reset();
                return Ok(Some(oversize));
            }
        }
    }

    /// Reads from the client within `client_timeout`, unless the stop reaches `stop_at`.
    async fn wait_for_client(&mut self, chunk: &mut [u8], stop_at: Phase) -> Wait {
        let read = tokio::time::timeout(self.settings.client_timeout, self.client.read(chunk));
        tokio::select! {
            r = read => match r {
                Ok(r) => Wait::Read(r),
                Err(_) => Wait::TimedOut,
            },
            _ = self.shutdown.reached(stop_at) => Wait::Stopping,
        }
    }

    /// Tells the client the director is stopping (`421`, as RFC 5321 section 3.8 says).
    fn shutting_down(&mut self) {
        info!(session = %self.identity.session_id, client = %self.identity.client, in_transaction = self.tx.is_some(), "LMTP connection closed: director shutting down");
        let line = format!("4.3.2 {} Server shutting down", self.settings.hostname);
        self.say(421, &line);
    }

    /// Reads message bytes; `false` if the client went away or timed out.
    async fn read_data(&mut self) -> std::io::Result<bool> {
        let mut chunk = vec![0u8; CHUNK];
        match self.wait_for_client(&mut chunk, Phase::Closing).await {
            Wait::Stopping => {
                info!(session = %self.identity.session_id, "LMTP message not finished within the shutdown grace: nothing delivered");
                self.shutting_down();
                Ok(false)
            }
            Wait::Read(Ok(0)) => {
                info!(session = %self.identity.session_id, "LMTP client closed the connection inside DATA: nothing delivered");
                Ok(false)
            }
            Wait::Read(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Wait::Read(Err(e)) => Err(e),
            Wait::TimedOut => {
                info!(session = %self.identity.session_id, "LMTP client timed out inside DATA: nothing delivered");
                let line = format!("4.4.2 {} Timeout, closing", self.settings.hostname);
                self.say(421, &line);
                Ok(false)
            }
        }
    }

    /// Ends the transaction: backend connections closed, records released.
    async fn end_transaction(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        let now = Instant::now();
        for hash in tx.recipients.iter().filter_map(|r| r.user_hash) {
            self.router.state().session_ended(hash, now);
        }
        for u in tx.upstreams {
            if let Some(conn) = u.conn {
                conn.quit().await;
            }
        }
    }
}

/// `MAIL FROM` for a backend: the client's path, and those of its parameters the backend
/// offers (a backend that does not offer `SIZE` refuses `SIZE=`).
fn mail_line(mail: &MailFrom, conn: &BackendConn) -> String {
    let mut line = format!("MAIL FROM:<{}>", mail.path);
    for p in &mail.params {
        if conn.capabilities.accepts_mail_param(p) {
            line.push(' ');
            line.push_str(&p.raw);
        }
    }
    line
}
