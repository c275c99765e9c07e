//! A listening socket and the life of each connection on it: PROXY header, implicit TLS, the
//! protocol's front end, the relay, and the one log line at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::ListenerTls;
use crate::decision::{ClientIdentity, Protocol};
use crate::frontend::{Established, FrontendContext, PreauthLimits};
use crate::login::Login;
use crate::network::{any_contains, Network};
use crate::relay::relay;
use crate::stream::ClientStream;

/// Settings every listener shares.
pub struct ListenerShared {
    pub login: Login,
    /// For implicit TLS and STARTTLS; `None` when no certificate is configured.
    pub tls: Option<TlsAcceptor>,
    pub trusted_networks: Vec<Network>,
    pub disable_plaintext_auth: bool,
    pub limits: PreauthLimits,
    pub greeting: String,
    /// After one side of a relayed session closes, how long the other may still send.
    pub close_linger: Duration,
    /// Caps connections served at once, all listeners together.
    pub connections: Arc<Semaphore>,
    /// The LMTP service's settings.
    pub lmtp: Arc<crate::lmtp::LmtpSettings>,
    /// Counts connections, logins and relayed bytes.
    pub metrics: crate::metrics::Metrics,
}

/// A bound listening socket.
pub enum ListenSocket {
    Tcp(TcpListener),
    /// A unix socket (LMTP from a local MTA), at this path.
    Unix(UnixListener, std::path::PathBuf),
}

/// One listener.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: ListenerTls,
    pub proxy_protocol: bool,
    /// LMTP over TCP: who may connect (empty: anyone).
    pub allow_from: Vec<Network>,
    pub socket: ListenSocket,
}

impl Listener {
    /// The bound TCP address; `None` for a unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            ListenSocket::Tcp(l) => l.local_addr().ok(),
            ListenSocket::Unix(..) => None,
        }
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match &self.socket {
            ListenSocket::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            ListenSocket::Unix(_, path) => path.display().to_string(),
        }
    }

    async fn accept(&self) -> std::io::Result<(Accepted, SocketAddr)> {
        match &self.socket {
            ListenSocket::Tcp(l) => {
                let (tcp, peer) = l.accept().await?;
                Ok((Accepted::Tcp(tcp), peer))
            }
            ListenSocket::Unix(l, _) => {
                let (unix, _) = l.accept().await?;
                Ok((Accepted::Unix(unix), SocketAddr::from(([0, 0, 0, 0], 0))))
            }
        }
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(self, shared: Arc<ListenerShared>, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        loop {
            let permit = tokio::select! {
                p = shared.connections.clone().acquire_owned() => p.expect("semaphore never closes"),
                _ = shutdown.changed() => return,
            };
            let (conn, peer) = tokio::select! {
                r = this.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(listener = %this.describe(), error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let shared = shared.clone();
            let this = this.clone();
            tokio::spawn(async move {
                let _open = shared.metrics.connection(this.protocol);
                match conn {
                    Accepted::Tcp(tcp) => this.handle(tcp, peer, &shared).await,
                    Accepted::Unix(unix) => {
                        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                        let identity = ClientIdentity {
                            client: unspecified,
                            local: unspecified,
                            session_id: new_session_id(),
                            session_ext_id: None,
                        };
                        // Boxed: the LMTP session's state must not enlarge every relayed session's task.
                        let _ = Box::pin(crate::lmtp::serve_connection(
                            ClientStream::Unix(unix),
                            identity,
                            shared.login.router.clone(),
                            shared.lmtp.clone(),
                            shared.metrics.clone(),
                        ))
                        .await;
                    }
                }
                drop(permit);
            });
        }
    }

    async fn handle(&self, mut tcp: TcpStream, peer: SocketAddr, shared: &ListenerShared) {
        let _ = tcp.set_nodelay(true);
        let started = Instant::now();
        let local = tcp.local_addr().unwrap_or(peer);
        let mut identity = ClientIdentity {
            client: peer,
            local,
            session_id: new_session_id(),
            session_ext_id: None,
        };
        if self.proxy_protocol {
            match crate::proxy_protocol::read_header(&mut tcp, shared.limits.timeout).await {
                Ok(h) => {
                    identity.client = h.source.unwrap_or(peer);
                    identity.local = h.destination.unwrap_or(local);
                }
                Err(e) => {
                    warn!(peer = %peer, error = %e, "bad PROXY protocol header; connection closed");
                    return;
                }
            }
        }
        let mut client = ClientStream::Plain(tcp);
        if self.protocol == Protocol::Lmtp {
            if !self.allow_from.is_empty() && !any_contains(&self.allow_from, identity.client.ip())
            {
                warn!(client = %identity.client, listener = %self.describe(), "LMTP client not in allow_from: refused");
                let _ = crate::lmtp::refuse_connection(client, &shared.lmtp).await;
                return;
            }
            // Boxed: the LMTP session's state must not enlarge every relayed session's task.
            let _ = Box::pin(crate::lmtp::serve_connection(
                client,
                identity,
                shared.login.router.clone(),
                shared.lmtp.clone(),
                shared.metrics.clone(),
            ))
            .await;
            return;
        }
        if self.tls == ListenerTls::Implicit {
            let acceptor = shared.tls.as_ref().expect("checked by config");
            match tokio::time::timeout(shared.limits.timeout, client.start_tls(acceptor)).await {
                Ok(Ok(s)) => client = s,
                Ok(Err(e)) => {
                    debug!(client = %identity.client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        let ctx = FrontendContext {
            starttls: match self.tls {
                ListenerTls::Starttls => shared.tls.clone(),
                _ => None,
            },
            disable_plaintext_auth: shared.disable_plaintext_auth,
            trusted: any_contains(&shared.trusted_networks, identity.client.ip()),
            limits: shared.limits.clone(),
            identity: identity.clone(),
            greeting: shared.greeting.clone(),
        };
        // The pre-login futures (front end and backend login, with their read buffers) are
        // boxed so that their memory is freed when the relay starts: an idle relayed session
        // then holds only the relay's small state.
        let result = match self.protocol {
            Protocol::Imap => {
                Box::pin(crate::imap::frontend::run(client, ctx, &shared.login)).await
            }
            Protocol::Pop3 => {
                Box::pin(crate::pop3::frontend::run(client, ctx, &shared.login)).await
            }
            Protocol::Sieve => {
                Box::pin(crate::sieve::frontend::run(client, ctx, &shared.login)).await
            }
            other => {
                warn!("{other} listeners are not supported yet");
                return;
            }
        };
        let established = match result {
            Ok(Some(e)) => e,
            Ok(None) => {
                debug!(session = %identity.session_id, client = %identity.client, "disconnected before login");
                return;
            }
            Err(e) => {
                debug!(session = %identity.session_id, client = %identity.client, error = %e, "pre-login I/O error");
                return;
            }
        };
        let Established {
            mut client,
            client_leftover,
            backend,
            username,
            identity,
        } = established;
        let mut backend_stream = backend.stream;
        let kick_message: &[u8] = match self.protocol {
            Protocol::Imap => b"* BYE Disconnected by the director.\r\n",
            Protocol::Sieve => b"BYE \"Disconnected by the director.\"\r\n",
            _ => b"-ERR Disconnected by the director.\r\n",
        };
        let session = backend.session;
        let stats = relay(
            &mut client,
            client_leftover,
            &mut backend_stream,
            backend.leftover,
            session.kicked(),
            kick_message,
            shared.close_linger,
        )
        .await;
        let backend_addr = session.info().backend;
        // The user as routed and registered (a master login `user*master` is `user`'s
        // session); the login as given is shown too when it differs.
        let user = session.info().username.clone();
        drop(session);
        let login =
            (username != user).then(|| tracing::field::display(crate::untrusted::shown(&username)));
        shared.metrics.relayed(
            self.protocol,
            stats.client_to_backend,
            stats.backend_to_client,
        );
        info!(
            session = %identity.session_id,
            protocol = %self.protocol,
            user = %crate::untrusted::shown(&user),
            login,
            client = %identity.client,
            backend = %backend_addr,
            duration = ?started.elapsed(),
            bytes_in = stats.client_to_backend,
            bytes_out = stats.backend_to_client,
            end = ?stats.end,
            "session ended"
        );
    }
}

/// An accepted connection.
enum Accepted {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A session id unique within this process and unlikely to repeat across restarts.
pub fn new_session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:08x}{:08x}",
        (start >> 32) as u32,
        (start as u32).wrapping_add(n as u32)
    )
}
