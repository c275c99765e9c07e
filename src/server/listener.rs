//! A listening socket and the life of each connection on it: PROXY header, implicit TLS, the
//! protocol's front end, the relay, and the one log line at the end.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::network::{any_contains, Network};
use crate::config::ListenerTls;
use crate::login::{ListenerAuth, Login};
use crate::net::admission::{refusal_line, Admitted, ConnectionPool, PerIpGuard, PerIpLimit, Slot};
use crate::net::refusals::{RefusalLog, RefusalReason};
use crate::net::relay::{relay, Kick, RelayEnd};
use crate::net::shutdown::Shutdown;
use crate::net::stream::ClientStream;
use crate::protocol::decision::{ClientIdentity, Protocol};
use crate::protocol::imap::frontend::Imap;
use crate::protocol::lmtp::serve_connection_until;
use crate::protocol::pop3::frontend::Pop3;
use crate::protocol::preauth::{self, BackendLink, Established, FrontendContext, PreauthLimits};
use crate::protocol::sieve::frontend::ManageSieve;
use crate::server::lmtp_recipients::DovecotRecipients;

/// Settings every listener shares. A reload swaps in a new one (`ArcSwap`); each connection
/// keeps the one it was accepted with.
pub struct ListenerShared {
    pub login: Login,
    /// The auth services of the listeners with `auth.mode: dovecot`, by socket.
    pub auth: std::collections::HashMap<String, crate::auth::service::AuthService>,
    /// The recipient lookups of the LMTP listeners with `auth.mode: dovecot`, by auth-master
    /// socket.
    pub lookups: std::collections::HashMap<String, crate::auth::lookups::UserLookups>,
    /// For implicit TLS and STARTTLS; `None` when no certificate is configured.
    pub tls: Option<TlsAcceptor>,
    pub trusted_networks: Vec<Network>,
    pub disable_plaintext_auth: bool,
    pub limits: PreauthLimits,
    pub greeting: String,
    /// After one side of a relayed session closes, how long the other may still send.
    pub close_linger: Duration,
    /// Peers that may send a PROXY header (`proxy_trusted_networks`).
    pub proxy_trusted_networks: Vec<Network>,
    /// Caps connections not logged in yet per client address, all listeners together.
    pub per_ip: Arc<PerIpLimit>,
    /// Reports turned-away connections in the log, at most once per interval per reason.
    pub refusals: RefusalLog,
    /// The LMTP service's settings.
    pub lmtp: Arc<crate::protocol::lmtp::LmtpSettings>,
    /// Counts connections, logins and relayed bytes.
    pub metrics: crate::metrics::Metrics,
}

/// A bound listening socket. Kept apart from [`Listener`] (which every connection holds) so
/// that a listener removed by a reload closes its socket while its sessions go on.
pub enum ListenSocket {
    Tcp(TcpListener),
    /// A unix socket (LMTP from a local MTA), at this path.
    Unix(UnixListener, std::path::PathBuf),
}

impl ListenerShared {
    /// Counts and reports (rate limited) a connection turned away for `reason`.
    fn refused(
        &self,
        protocol: Protocol,
        reason: RefusalReason,
        addr: Option<IpAddr>,
        detail: Option<String>,
    ) {
        self.metrics.refused(protocol, reason);
        self.refusals.record(reason, addr, detail);
    }
}

/// Writes the line that turns a connection away (at most 1 s for a peer that does not read),
/// then closes.
async fn send_refusal(client: &mut ClientStream, line: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        client.write_all(line.as_bytes()).await?;
        client.shutdown().await
    })
    .await;
}

impl ListenSocket {
    /// The bound TCP address; `None` for a unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            ListenSocket::Tcp(l) => l.local_addr().ok(),
            ListenSocket::Unix(..) => None,
        }
    }

    /// The local address of every connection it accepts: its bound address unless that is
    /// a wildcard (`0.0.0.0`, `::`), where each connection has its own.
    pub fn fixed_local_addr(&self) -> Option<SocketAddr> {
        self.local_addr().filter(|a| !a.ip().is_unspecified())
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            ListenSocket::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            ListenSocket::Unix(_, path) => path.display().to_string(),
        }
    }

    async fn accept(&self) -> std::io::Result<(Accepted, SocketAddr)> {
        match self {
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
}

/// One listener's settings, which each of its connections holds.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: ListenerTls,
    pub proxy_protocol: bool,
    /// LMTP over TCP: who may connect (empty: anyone).
    pub allow_from: Vec<Network>,
    /// Where it listens ([`ListenSocket::describe`]), for logs.
    pub name: String,
    /// The local address of every connection it accepts, when it listens on one address
    /// ([`ListenSocket::fixed_local_addr`]); `None`: asked of each connection.
    pub local: Option<SocketAddr>,
    /// This listener's own connection slots (`max_connections`).
    pub pool: Arc<ConnectionPool>,
    /// The auth service's socket (`auth.mode: dovecot`); `None`: passthrough.
    pub auth_socket: Option<String>,
    /// LMTP in `auth.mode: dovecot`: the auth-master socket its recipients are looked up on;
    /// `None`: recipients go by the ring.
    pub master_socket: Option<String>,
}

impl Listener {
    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        self.name.clone()
    }

    /// Serves one LMTP connection to its end, its recipients routed by the ring or looked up
    /// in the user database, and notes an end by shutdown.
    async fn serve_lmtp(
        &self,
        client: ClientStream,
        identity: ClientIdentity,
        shared: &ListenerShared,
        shutdown: &Shutdown,
    ) {
        let router = shared.login.router.clone();
        let (settings, metrics) = (shared.lmtp.clone(), shared.metrics.clone());
        let session = identity.clone();
        // Boxed: the LMTP session's state must not enlarge every relayed session's task.
        let _ = match &self.master_socket {
            None => {
                let ring = router.clone();
                Box::pin(serve_connection_until(
                    client,
                    session,
                    router,
                    ring,
                    settings,
                    metrics,
                    shutdown.clone(),
                ))
                .await
            }
            Some(socket) => {
                let Some(lookups) = shared.lookups.get(socket) else {
                    // Never the ring by mistake: a listener that must look recipients up and
                    // cannot takes nobody (the MTA retries).
                    warn!(auth = %socket, "no auth-master client for this listener: connection closed");
                    return;
                };
                let lookup = DovecotRecipients {
                    login: &shared.login,
                    lookups,
                };
                Box::pin(serve_connection_until(
                    client,
                    session,
                    router,
                    lookup,
                    settings,
                    metrics,
                    shutdown.clone(),
                ))
                .await
            }
        };
        ended_by_shutdown(shutdown, Protocol::Lmtp, &identity);
    }

    /// Accepts connections on `socket` until the director stops (or the task is aborted: a
    /// reload removed the listener). Each connection gets the shared settings current when
    /// it is accepted, and a [`Shutdown`] that tells it when to say goodbye.
    pub async fn serve(
        self,
        socket: Arc<ListenSocket>,
        shared: Arc<ArcSwap<ListenerShared>>,
        shutdown: Shutdown,
    ) {
        let this = Arc::new(self);
        loop {
            let (conn, peer) = tokio::select! {
                r = socket.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(listener = %this.describe(), error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.draining() => return,
            };
            let shared = shared.load_full();
            if this.proxy_protocol && !any_contains(&shared.proxy_trusted_networks, peer.ip()) {
                // Before anything else: not one byte read, no task, no greeting.
                shared.refused(
                    this.protocol,
                    RefusalReason::UntrustedProxyPeer,
                    Some(peer.ip()),
                    None,
                );
                continue;
            }
            let this = this.clone();
            let shutdown = shutdown.clone();
            // Boxed: the connection's future (a kilobyte and more) is then moved into the
            // task as a pointer, not copied at each of the spawn's steps.
            tokio::spawn(Box::pin(async move {
                let _open = shared.metrics.connection(this.protocol);
                match conn {
                    Accepted::Tcp(tcp) => this.handle(tcp, peer, &shared, &shutdown).await,
                    // Boxed: a rare path whose state must not enlarge every session's task.
                    Accepted::Unix(unix) => {
                        Box::pin(this.serve_unix(unix, &shared, &shutdown)).await
                    }
                }
            }));
        }
    }

    /// Serves a connection of a local MTA on a unix-socket LMTP listener: no address to
    /// count, only the listener's own pool.
    async fn serve_unix(
        &self,
        unix: tokio::net::UnixStream,
        shared: &ListenerShared,
        shutdown: &Shutdown,
    ) {
        let mut client = ClientStream::Unix(unix);
        let Some((_slot, _)) = self.admit(&mut client, None, shared).await else {
            return;
        };
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let identity = ClientIdentity {
            client: unspecified,
            local: unspecified,
            session_id: new_session_id(),
            session_ext_id: None,
        };
        self.serve_lmtp(client, identity, shared, shutdown).await;
    }

    /// Takes this connection's places: one among its address's connections before login
    /// (none for a unix socket: `ip` is `None`), and a slot in this listener's pool, made by
    /// dropping the oldest connection before login when the pool is full. `None`: the
    /// connection was turned away (told so unless it is implicit TLS, and counted).
    async fn admit(
        &self,
        client: &mut ClientStream,
        ip: Option<IpAddr>,
        shared: &ListenerShared,
    ) -> Option<(Slot, Option<PerIpGuard>)> {
        let lmtp_host = &shared.lmtp.hostname;
        // Implicit TLS: no handshake (CPU) for a connection that is turned away; just close.
        let can_answer = self.tls != ListenerTls::Implicit;
        let per_ip = match ip {
            Some(ip) => match shared.per_ip.try_acquire(ip) {
                Some(guard) => Some(guard),
                None => {
                    shared.refused(self.protocol, RefusalReason::PerIpLimit, Some(ip), None);
                    if can_answer {
                        send_refusal(client, &refusal_line(self.protocol, true, lmtp_host)).await;
                    }
                    return None;
                }
            },
            None => None,
        };
        // An LMTP connection carries deliveries: never dropped for a newcomer.
        match self.pool.admit(self.protocol != Protocol::Lmtp) {
            Admitted::Slot { slot, .. } => Some((slot, per_ip)),
            Admitted::Full => {
                shared.refused(self.protocol, RefusalReason::ListenerFull, ip, None);
                if can_answer {
                    send_refusal(client, &refusal_line(self.protocol, false, lmtp_host)).await;
                }
                None
            }
        }
    }

    /// Serves a TCP connection: its pre-login part in a future of its own, boxed, so that the
    /// memory of everything before login (the TLS handshake's state, the PROXY header, the
    /// front end and the backend login with their buffers) is freed when the relay starts,
    /// and an idle relayed session holds only what [`Listener::relay_session`] needs.
    async fn handle(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        shared: &ListenerShared,
        shutdown: &Shutdown,
    ) {
        let started = Instant::now();
        let Some((established, slot)) =
            Box::pin(self.until_login(tcp, peer, shared, shutdown)).await
        else {
            return;
        };
        self.relay_session(established, slot, started, shared, shutdown)
            .await;
    }

    /// Everything before a TCP connection is relayed: the logged-in session and the slot it
    /// holds in this listener's pool, or `None` when it ended before (LMTP connections are
    /// served here to their end).
    async fn until_login(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        shared: &ListenerShared,
        shutdown: &Shutdown,
    ) -> Option<(Established, Slot)> {
        // TCP_NODELAY comes from the listening socket (`prepare::listen_tcp`).
        let local = match self.local {
            Some(local) => local,
            None => tcp.local_addr().unwrap_or(peer),
        };
        let mut identity = ClientIdentity {
            client: peer,
            local,
            session_id: new_session_id(),
            session_ext_id: None,
        };
        if self.proxy_protocol {
            match crate::protocol::proxy_protocol::read_header(&mut tcp, shared.limits.timeout)
                .await
            {
                Ok(h) => {
                    identity.client = h.source.unwrap_or(peer);
                    identity.local = h.destination.unwrap_or(local);
                }
                Err(e) => {
                    shared.refused(
                        self.protocol,
                        RefusalReason::BadProxyHeader,
                        Some(peer.ip()),
                        Some(e.to_string()),
                    );
                    return None;
                }
            }
        }
        let mut client = ClientStream::Plain(tcp);
        if self.protocol == Protocol::Lmtp {
            if !self.allow_from.is_empty() && !any_contains(&self.allow_from, identity.client.ip())
            {
                shared.refused(
                    self.protocol,
                    RefusalReason::NotAllowed,
                    Some(identity.client.ip()),
                    None,
                );
                let _ = crate::protocol::lmtp::refuse_connection(client, &shared.lmtp).await;
                return None;
            }
            let (_slot, _per_ip) = self
                .admit(&mut client, Some(identity.client.ip()), shared)
                .await?;
            self.serve_lmtp(client, identity, shared, shutdown).await;
            return None;
        }
        let (mut slot, per_ip) = self
            .admit(&mut client, Some(identity.client.ip()), shared)
            .await?;
        let eviction = slot.eviction();
        if self.tls == ListenerTls::Implicit {
            let acceptor = shared.tls.as_ref().expect("checked by config");
            let handshake = tokio::time::timeout(shared.limits.timeout, client.start_tls(acceptor));
            tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => client = s,
                    Ok(Err(e)) => {
                        debug!(client = %identity.client, error = %e, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => return None,
                },
                // Mid-handshake: no BYE can be said; just close.
                _ = eviction.evicted() => {
                    shared.refused(self.protocol, RefusalReason::Evicted, Some(identity.client.ip()), None);
                    return None;
                }
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
            shutdown: shutdown.clone(),
            eviction: eviction.clone(),
        };
        let service = match &self.auth_socket {
            None => None,
            Some(socket) => match shared.auth.get(socket) {
                Some(service) => Some(service),
                None => {
                    // Never passthrough by mistake: a listener that must authenticate and
                    // cannot takes nobody.
                    warn!(auth = %socket, "no auth service for this listener: connection closed");
                    return None;
                }
            },
        };
        let auth = ListenerAuth {
            login: &shared.login,
            service,
        };
        // The pre-login futures (front end and backend login, with their read buffers) are
        // boxed so that their memory is freed when the relay starts: an idle relayed session
        // then holds only the relay's small state.
        let result = match self.protocol {
            Protocol::Imap => Box::pin(preauth::run::<Imap, _>(client, ctx, &auth)).await,
            Protocol::Pop3 => Box::pin(preauth::run::<Pop3, _>(client, ctx, &auth)).await,
            Protocol::Sieve => Box::pin(preauth::run::<ManageSieve, _>(client, ctx, &auth)).await,
            other => {
                warn!("{other} listeners are not supported yet");
                return None;
            }
        };
        if eviction.is_evicted() && !matches!(result, Ok(Some(_))) {
            shared.refused(
                self.protocol,
                RefusalReason::Evicted,
                Some(identity.client.ip()),
                None,
            );
        }
        let established = match result {
            Ok(Some(e)) => e,
            Ok(None) if ended_by_shutdown(shutdown, self.protocol, &identity) => return None,
            Ok(None) => {
                debug!(session = %identity.session_id, client = %identity.client, "disconnected before login");
                return None;
            }
            Err(e) => {
                debug!(session = %identity.session_id, client = %identity.client, error = %e, "pre-login I/O error");
                return None;
            }
        };
        // Logged in: no longer counted against its address, never dropped to make room.
        drop(per_ip);
        slot.logged_in();
        Some((established, slot))
    }

    /// Relays a logged-in session until it ends, then logs how it went.
    ///
    /// Not an `async fn`: the login's result is taken apart before the future is made, so
    /// the future holds each part once (an `async fn` keeps its whole argument beside the
    /// parts taken out of it) and drops what the relay does not need (the backend's success
    /// text, the client's forwarding details). This future is most of what an idle session
    /// costs.
    fn relay_session<'a>(
        &'a self,
        established: Established,
        slot: Slot,
        started: Instant,
        shared: &'a ListenerShared,
        shutdown: &'a Shutdown,
    ) -> impl std::future::Future<Output = ()> + 'a {
        let Established {
            mut client,
            client_leftover,
            backend,
            username,
            identity,
        } = established;
        let BackendLink {
            stream: mut backend_stream,
            leftover: backend_leftover,
            session,
            ..
        } = backend;
        let ClientIdentity {
            client: client_addr,
            session_id,
            ..
        } = identity;
        let (kick_message, shutdown_message): (&[u8], &[u8]) = match self.protocol {
            Protocol::Imap => (
                b"* BYE Disconnected by the director.\r\n",
                b"* BYE Server shutting down.\r\n",
            ),
            Protocol::Sieve => (
                b"BYE \"Disconnected by the director.\"\r\n",
                b"BYE \"Server shutting down.\"\r\n",
            ),
            _ => (
                b"-ERR Disconnected by the director.\r\n",
                b"-ERR Server shutting down.\r\n",
            ),
        };
        async move {
            // Held until the session ends (borrowed, not moved: a moved capture would be
            // kept twice in the task's state).
            let _slot = &slot;
            // A session is kicked by an admin or a move, or by the stop once the grace is
            // over (the server kicks every session then): the phase tells which.
            let stats = {
                let kicked = std::pin::pin!(async {
                    if !shutdown.is_closing() {
                        session.kicked().await;
                    }
                    if shutdown.is_closing() {
                        Kick {
                            end: RelayEnd::Shutdown,
                            message: shutdown_message,
                        }
                    } else {
                        Kick {
                            end: RelayEnd::Kicked,
                            message: kick_message,
                        }
                    }
                });
                relay(
                    &mut client,
                    client_leftover,
                    &mut backend_stream,
                    backend_leftover,
                    kicked,
                    shared.close_linger,
                )
                .await
            };
            let backend_addr = session.info().backend;
            // The user as routed and registered (a master login `user*master` is `user`'s
            // session); the login as given is shown too when it differs.
            let user = session.info().username.clone();
            drop(session);
            shared.metrics.relayed(
                self.protocol,
                stats.client_to_backend,
                stats.backend_to_client,
            );
            SessionEnded {
                session: &session_id,
                protocol: self.protocol,
                user: &user,
                login: (username != user).then_some(username.as_str()),
                client: client_addr,
                backend: backend_addr,
                duration: started.elapsed(),
                stats: &stats,
            }
            .log();
        }
    }
}

/// The line a relayed session ends with.
struct SessionEnded<'a> {
    session: &'a str,
    protocol: Protocol,
    /// The user as routed.
    user: &'a str,
    /// The login as the client gave it, when it differs from `user` (a master login).
    login: Option<&'a str>,
    client: SocketAddr,
    backend: SocketAddr,
    duration: Duration,
    stats: &'a crate::net::relay::RelayStats,
}

impl SessionEnded<'_> {
    /// Logs it at `info`: written directly in the text format ([`crate::log_line::Direct`]:
    /// every session logs this line), else through tracing, with the same text.
    fn log(&self) {
        if crate::log_line::direct() && tracing::enabled!(tracing::Level::INFO) {
            self.direct().write();
            return;
        }
        let shown = crate::untrusted::shown;
        let login = self.login.map(|l| tracing::field::display(shown(l)));
        info!(
            session = %self.session,
            protocol = %self.protocol,
            user = %shown(self.user),
            login,
            client = %crate::addr_text::socket(self.client),
            backend = %crate::addr_text::socket(self.backend),
            duration = %crate::log_line::elapsed(self.duration),
            bytes_in = self.stats.client_to_backend,
            bytes_out = self.stats.backend_to_client,
            end = ?self.stats.end,
            "session ended"
        );
    }

    fn direct(&self) -> crate::log_line::Direct {
        let mut line =
            crate::log_line::Direct::new(tracing::Level::INFO, module_path!(), "session ended");
        line.text("session", self.session)
            .text("protocol", self.protocol.name())
            .shown("user", self.user);
        if let Some(login) = self.login {
            line.shown("login", login);
        }
        line.text("client", crate::addr_text::socket(self.client).as_str())
            .text("backend", crate::addr_text::socket(self.backend).as_str())
            .display("duration", crate::log_line::elapsed(self.duration))
            .u64("bytes_in", self.stats.client_to_backend)
            .u64("bytes_out", self.stats.backend_to_client)
            .debug("end", &self.stats.end);
        line
    }
}

/// Logs the end of a connection that ended while the director was stopping (pre-login or
/// LMTP: relayed sessions log their own line); `false` if it is not stopping.
fn ended_by_shutdown(shutdown: &Shutdown, protocol: Protocol, identity: &ClientIdentity) -> bool {
    if !shutdown.is_stopping() {
        return false;
    }
    info!(
        session = %identity.session_id,
        protocol = %protocol,
        client = %identity.client,
        end = ?RelayEnd::Shutdown,
        "session ended"
    );
    true
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
    // 16 hex digits, written by hand (one per connection: format! cost a thousand
    // instructions).
    let id = (start & 0xffff_ffff_0000_0000) | u64::from((start as u32).wrapping_add(n as u32));
    let mut text = String::with_capacity(16);
    for shift in (0..16).rev() {
        text.push(char::from(
            b"0123456789abcdef"[(id >> (shift * 4)) as usize & 0xf],
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_sixteen_hex_digits_and_differ() {
        let ids: Vec<String> = (0..1000).map(|_| new_session_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // The first half is the process's, the second counts.
        assert_eq!(ids[0][..8], ids[999][..8]);
    }

    /// The line written directly is the line tracing writes, for every kind of field: a
    /// master login, a hostile username, an error with a newline, IPv6.
    #[test]
    fn session_ended_reads_the_same_written_directly() {
        use crate::log_line::{logged, without_time};
        use crate::net::relay::RelayStats;
        let ends = [
            RelayEnd::ClientClosed,
            RelayEnd::Error("backend: reset\nby \"peer\"".into()),
        ];
        for (i, end) in ends.into_iter().enumerate() {
            let stats = RelayStats {
                client_to_backend: 17,
                backend_to_client: 123_456_789_012,
                end,
            };
            let long = "x".repeat(200);
            let users = [
                ("bob@example.org", None),
                ("alice", Some("alice*master")),
                ("bad\u{1b}[2J\"user\\", Some(long.as_str())),
            ];
            for (user, login) in users {
                let ended = SessionEnded {
                    session: "0123456789abcdef",
                    protocol: Protocol::Sieve,
                    user,
                    login,
                    client: if i == 0 {
                        "192.0.2.1:50000".parse().unwrap()
                    } else {
                        "[2001:db8::1]:4190".parse().unwrap()
                    },
                    backend: "10.0.0.255:4190".parse().unwrap(),
                    duration: Duration::from_micros(1_500_123),
                    stats: &stats,
                };
                let traced = logged(|| ended.log());
                let direct = ended.direct().finish();
                assert_eq!(without_time(&direct), without_time(&traced));
                assert_eq!(direct.lines().count(), 1, "{direct}");
            }
        }
    }
}
