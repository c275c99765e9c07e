//! One connection to the auth service: the handshake, then many requests at once, told
//! apart by their id.
//!
//! A reader task routes each answer to the request it names; a writer task sends the lines
//! that callers queue. Callers never wait on a lock: registering a request and queueing its
//! line take a short synchronous lock, and each caller then awaits its own one-shot answer.
//! When the connection ends, every request in flight gets [`AuthError::ConnectionLost`].

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::error::AuthError;
use super::fields::AuthFields;
use super::handshake::{Handshake, HandshakeBuilder, HandshakeError, MAJOR_VERSION, MINOR_VERSION};
use super::wire::{
    answer_id, parse_server_line, LineReader, ReadLine, ServerLine, MAX_CLIENT_LINE,
    MAX_SERVER_LINE,
};
use crate::untrusted::shown_bytes;

/// Where the auth service listens: a unix socket (Dovecot's `unix_listener`), or `HOST:PORT`
/// (an `inet_listener`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// `HOST:PORT` (`127.0.0.1:9999`, `[::1]:9999`, `auth.example.org:9999`) is TCP; anything
    /// with a `/`, or without a `:`, is a socket path.
    pub fn parse(text: &str) -> Endpoint {
        let tcp = !text.contains('/')
            && text
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if tcp {
            Endpoint::Tcp(text.to_owned())
        } else {
            Endpoint::Unix(PathBuf::from(text))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => f.write_str(addr),
        }
    }
}

/// An answer of the service to one request.
#[derive(Debug)]
pub enum Reply {
    /// It asks for more: the challenge, decoded.
    Cont(Vec<u8>),
    Ok(AuthFields),
    Fail(AuthFields),
}

type Answer = Result<Reply, AuthError>;

/// Where a request in flight stands.
enum Slot {
    /// Its line is sent; the caller awaits the answer.
    Waiting(oneshot::Sender<Answer>),
    /// The service asked for more; the client's response has not come yet.
    Challenged,
    /// The service ended it before the client responded; kept for the caller.
    Ended(Answer),
}

struct Requests {
    slots: HashMap<u32, Slot>,
    next_id: u32,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// What the tasks and the callers share.
struct Shared {
    endpoint: String,
    requests: Mutex<Requests>,
    closed: AtomicBool,
    out: mpsc::UnboundedSender<Vec<u8>>,
}

/// One connection, handshake done. Dropping it ends its tasks and closes the socket.
pub struct Connection {
    handshake: Arc<Handshake>,
    shared: Arc<Shared>,
    reader: AbortHandle,
}

pub(super) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

impl Connection {
    /// Connects, sends `VERSION` and `CPID`, and reads the service's handshake, all within
    /// `timeout`.
    pub async fn open(
        endpoint: &Endpoint,
        client_pid: u32,
        timeout: Duration,
    ) -> Result<Connection, AuthError> {
        let name = endpoint.to_string();
        let connect_error = |reason: String| AuthError::Connect {
            endpoint: name.clone(),
            reason,
        };
        let (handshake, reader, writer) =
            tokio::time::timeout(timeout, handshake(endpoint, &name, client_pid))
                .await
                .map_err(|_| connect_error(format!("no handshake within {timeout:?}")))??;
        let (out, lines) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            endpoint: name,
            requests: Mutex::new(Requests {
                slots: HashMap::new(),
                next_id: 1,
                closed: None,
            }),
            closed: AtomicBool::new(false),
            out,
        });
        tokio::spawn(write_lines(writer, lines, Arc::clone(&shared)));
        let reader = tokio::spawn(read_lines(reader, Arc::clone(&shared))).abort_handle();
        Ok(Connection {
            handshake: Arc::new(handshake),
            shared,
            reader,
        })
    }

    pub fn handshake(&self) -> &Arc<Handshake> {
        &self.handshake
    }

    /// The service's address, for errors and logs.
    pub fn endpoint(&self) -> String {
        self.shared.endpoint.clone()
    }

    /// Whether the connection has ended (requests on it can only fail).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// How many requests are in flight (sent and not finished, or awaiting the client).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().slots.len()
    }

    /// Sends `AUTH<TAB><id><TAB>tail` under a fresh id (never one in flight) and returns the
    /// id and where its first answer will come.
    pub fn begin(&self, tail: &[u8]) -> Result<(u32, oneshot::Receiver<Answer>), AuthError> {
        let mut requests = self.shared.lock();
        self.shared.check_open(&requests)?;
        let mut id = requests.next_id;
        while id == 0 || requests.slots.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        let mut line = format!("AUTH\t{id}\t").into_bytes();
        line.extend_from_slice(tail);
        check_length(line.len())?;
        requests.next_id = id.wrapping_add(1);
        let (tx, rx) = oneshot::channel();
        requests.slots.insert(id, Slot::Waiting(tx));
        self.shared.send(line);
        Ok((id, rx))
    }

    /// Sends the client's response to the challenge of request `id` (`CONT`).
    pub fn respond(
        &self,
        id: u32,
        response: &[u8],
    ) -> Result<oneshot::Receiver<Answer>, AuthError> {
        let line = format!("CONT\t{id}\t{}\n", STANDARD.encode(response)).into_bytes();
        check_length(line.len())?;
        let mut requests = self.shared.lock();
        self.shared.check_open(&requests)?;
        match requests.slots.remove(&id) {
            Some(Slot::Challenged) => {
                let (tx, rx) = oneshot::channel();
                requests.slots.insert(id, Slot::Waiting(tx));
                self.shared.send(line);
                Ok(rx)
            }
            Some(Slot::Ended(answer)) => Ok(ready(answer)),
            other => {
                // Not awaiting a response (a caller's bug): leave the request as it stood.
                if let Some(slot) = other {
                    requests.slots.insert(id, slot);
                }
                Err(self
                    .shared
                    .protocol(format!("request {id} is not waiting for a response")))
            }
        }
    }

    /// Gives up request `id`: frees its id and tells the service (`CANCEL`) if it may still
    /// hold it.
    pub fn abandon(&self, id: u32) {
        let mut requests = self.shared.lock();
        let pending = matches!(
            requests.slots.remove(&id),
            Some(Slot::Waiting(_) | Slot::Challenged)
        );
        if pending && requests.closed.is_none() {
            self.shared.send(format!("CANCEL\t{id}\n").into_bytes());
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close("connection dropped".into());
    }
}

/// A receiver that already holds `answer`.
fn ready(answer: Answer) -> oneshot::Receiver<Answer> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(answer);
    rx
}

fn check_length(len: usize) -> Result<(), AuthError> {
    if len > MAX_CLIENT_LINE {
        return Err(AuthError::TooLong {
            len,
            max: MAX_CLIENT_LINE,
        });
    }
    Ok(())
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Requests> {
        // A panic elsewhere while holding the lock leaves the map consistent: every change
        // is one insert or remove.
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self, requests: &Requests) -> Result<(), AuthError> {
        match &requests.closed {
            Some(reason) => Err(self.lost(reason.clone())),
            None => Ok(()),
        }
    }

    fn send(&self, line: Vec<u8>) {
        // Fails only once the writer has stopped, which closes the connection anyway.
        let _ = self.out.send(line);
    }

    fn lost(&self, reason: String) -> AuthError {
        AuthError::ConnectionLost {
            endpoint: self.endpoint.clone(),
            reason,
        }
    }

    fn protocol(&self, detail: String) -> AuthError {
        AuthError::Protocol {
            endpoint: self.endpoint.clone(),
            detail,
        }
    }

    /// Ends the connection: every request in flight fails with `ConnectionLost`.
    fn close(&self, reason: String) {
        let slots = {
            let mut requests = self.lock();
            if requests.closed.is_some() {
                return;
            }
            requests.closed = Some(reason.clone());
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut requests.slots)
        };
        let waiting = slots.len();
        if waiting > 0 {
            warn!(auth = %self.endpoint, requests = waiting, reason = %reason,
                  "auth service connection closed with requests in flight");
        } else {
            debug!(auth = %self.endpoint, reason = %reason, "auth service connection closed");
        }
        for slot in slots.into_values() {
            if let Slot::Waiting(tx) = slot {
                let _ = tx.send(Err(self.lost(reason.clone())));
            }
        }
    }

    /// Hands `answer` to request `id`. An answer for an id not in flight (given up after a
    /// timeout, or never sent) is ignored, as Dovecot's own client does.
    fn answer(&self, id: u32, answer: Answer) {
        let mut requests = self.lock();
        let continues = matches!(answer, Ok(Reply::Cont(_)));
        match requests.slots.remove(&id) {
            Some(Slot::Waiting(tx)) => {
                let failed = answer.is_err();
                let delivered = tx.send(answer).is_ok();
                if continues && delivered {
                    requests.slots.insert(id, Slot::Challenged);
                }
                // The service may still hold a request whose answer we could not use, or
                // whose caller went away without abandoning it (its task was dropped).
                if failed || (continues && !delivered) {
                    self.send(format!("CANCEL\t{id}\n").into_bytes());
                }
            }
            Some(slot @ (Slot::Challenged | Slot::Ended(_))) => {
                if continues {
                    // Nothing was asked: leave the request as it stood.
                    requests.slots.insert(id, slot);
                    debug!(auth = %self.endpoint, id, "unasked challenge from the auth service: ignored");
                } else {
                    requests.slots.insert(id, Slot::Ended(answer));
                }
            }
            None => {
                debug!(auth = %self.endpoint, id, "answer for a request not in flight: ignored");
            }
        }
    }

    /// Routes one line from the service.
    fn dispatch(&self, line: &[u8]) {
        match parse_server_line(line) {
            Ok(ServerLine::Ok { id, fields }) => {
                self.answer(id, Ok(Reply::Ok(AuthFields::new(fields))))
            }
            Ok(ServerLine::Fail { id, fields }) => {
                self.answer(id, Ok(Reply::Fail(AuthFields::new(fields))))
            }
            Ok(ServerLine::Cont { id, data }) => self.answer(id, Ok(Reply::Cont(data))),
            Ok(_) => {
                debug!(auth = %self.endpoint, line = %shown_bytes(line),
                       "line from the auth service not expected here: ignored");
            }
            Err(e) => {
                let detail = format!("{}: {}", e.reason, shown_bytes(line));
                match e.id {
                    Some(id) => self.answer(id, Err(self.protocol(detail))),
                    None => {
                        warn!(auth = %self.endpoint, error = %detail, "unusable line from the auth service: ignored")
                    }
                }
            }
        }
    }

    /// A line over [`MAX_SERVER_LINE`]: the request it answers, if its head names one,
    /// fails; the connection goes on.
    fn overlong(&self, head: &[u8], len: usize) {
        let detail = format!(
            "answer of {len} bytes, over the {MAX_SERVER_LINE} kept: {}",
            shown_bytes(head)
        );
        match answer_id(head) {
            Some(id) => self.answer(id, Err(self.protocol(detail))),
            None => {
                warn!(auth = %self.endpoint, error = %detail, "overlong line from the auth service: ignored")
            }
        }
    }
}

/// Connects and reads the service's handshake.
async fn handshake(
    endpoint: &Endpoint,
    name: &str,
    client_pid: u32,
) -> Result<(Handshake, LineReader<BoxRead>, BoxWrite), AuthError> {
    let connect_error = |reason: String| AuthError::Connect {
        endpoint: name.to_owned(),
        reason,
    };
    let protocol = |detail: String| AuthError::Protocol {
        endpoint: name.to_owned(),
        detail,
    };
    let (reader, mut writer) = connect(endpoint)
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    writer
        .write_all(
            format!("VERSION\t{MAJOR_VERSION}\t{MINOR_VERSION}\nCPID\t{client_pid}\n").as_bytes(),
        )
        .await
        .map_err(|e| connect_error(format!("sending the handshake: {e}")))?;
    let mut reader = LineReader::new(reader, MAX_SERVER_LINE);
    let mut builder = HandshakeBuilder::default();
    loop {
        let line =
            match reader.next().await {
                Ok(Some(ReadLine::Line(line))) => line,
                Ok(Some(ReadLine::Overlong { head, len })) => {
                    return Err(protocol(format!(
                        "handshake line of {len} bytes: {}",
                        shown_bytes(&head)
                    )))
                }
                Ok(None) => return Err(connect_error(
                    "closed during the handshake (not an auth-client socket, or refused our CPID?)"
                        .into(),
                )),
                Err(e) => return Err(connect_error(format!("reading the handshake: {e}"))),
            };
        let parsed = parse_server_line(&line)
            .map_err(|e| protocol(format!("handshake: {}: {}", e.reason, shown_bytes(&line))))?;
        match builder.feed(parsed) {
            Ok(Some(handshake)) => return Ok((handshake, reader, writer)),
            Ok(None) => {}
            Err(HandshakeError::Version { major, minor }) => {
                return Err(AuthError::Version {
                    endpoint: name.to_owned(),
                    major,
                    minor,
                })
            }
            Err(HandshakeError::Broken(why)) => return Err(protocol(format!("handshake: {why}"))),
        }
    }
}

/// Opens a stream to `endpoint`, split in halves (also the auth-master client's way in).
pub(super) async fn connect(endpoint: &Endpoint) -> io::Result<(BoxRead, BoxWrite)> {
    Ok(match endpoint {
        Endpoint::Unix(path) => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            (Box::new(r), Box::new(w))
        }
        Endpoint::Tcp(addr) => {
            let stream = TcpStream::connect(addr.as_str()).await?;
            // Requests are single small lines: send each at once.
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
    })
}

async fn read_lines(mut reader: LineReader<BoxRead>, shared: Arc<Shared>) {
    let reason = loop {
        match reader.next().await {
            Ok(Some(ReadLine::Line(line))) => shared.dispatch(&line),
            Ok(Some(ReadLine::Overlong { head, len })) => shared.overlong(&head, len),
            Ok(None) => break "closed by the auth service".to_owned(),
            Err(e) => break format!("read failed: {e}"),
        }
    };
    shared.close(reason);
}

async fn write_lines(
    mut writer: BoxWrite,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::new();
    while let Some(line) = lines.recv().await {
        batch.clear();
        batch.extend_from_slice(&line);
        // Whatever else is queued goes out in the same write.
        while batch.len() < MAX_SERVER_LINE {
            match lines.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = writer.write_all(&batch).await {
            shared.close(format!("write failed: {e}"));
            return;
        }
    }
    let _ = writer.shutdown().await;
}
