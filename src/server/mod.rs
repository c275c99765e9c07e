//! The running director: built from a [`Config`], it binds the listeners, resolves the
//! backends, and serves until told to stop.

pub mod reload;
pub mod shutdown;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::config::{BackendTls, Config, ConfigError, ListenerTls};
use crate::health::checker::HealthChecker;
use crate::login::{BackendTlsContext, Login};
use crate::metrics::server::{MetricsContext, MetricsServer};
use crate::metrics::Metrics;
use crate::net::listener::{ListenSocket, ListenerShared};
use crate::protocol::decision::Protocol;
use crate::protocol::preauth::PreauthLimits;
use crate::routing::Router;
use crate::server::reload::{Prepared, Reloader, ReloaderParts, RunningListener};
use crate::server::shutdown::{Phase, Shutdown, ShutdownTrigger};
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::local::LocalState;
use crate::state::moves::Mover;
use crate::state::sessions::Sessions;
use crate::state::State;

/// After the grace, how long closed sessions get to write their goodbye and end before the
/// director exits anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A director ready to serve.
pub struct Director {
    pub state: Arc<LocalState>,
    /// The health checker (`None` when `health.enabled` is false); its last results are
    /// what `status` shows.
    pub health: Option<HealthChecker>,
    pub sessions: Sessions,
    pub router: Router,
    /// Reloads the configuration (SIGHUP, `director reload`); owns the listeners.
    pub reloader: Arc<Reloader>,
    /// Moves a stop through its phases; sees when every connection has finished.
    trigger: ShutdownTrigger,
    /// The connections' side of the stop, handed to the listeners when the director runs.
    shutdown: Shutdown,
    user_expire: Duration,
    /// The admin API (bound at build, so that a bad socket or token file fails the start).
    pub admin: crate::admin::AdminServer,
    /// The catalogue of metrics every part counts on.
    pub metrics: Metrics,
    /// The metrics listener (`None` without `metrics.address`), bound at build.
    metrics_server: Option<MetricsServer>,
}

/// Resolves the configured backends: a host name with several addresses is several backends.
pub async fn resolve_backends(config: &Config) -> Result<Vec<Backend>, ConfigError> {
    let mut out: Vec<Backend> = Vec::new();
    for (i, b) in config.backends.iter().enumerate() {
        let ips = crate::net::resolve::resolve_host(&b.host)
            .await
            .map_err(|e| ConfigError(format!("backends[{i}].host: {e}")))?;
        let settings = Arc::new(config.backend_settings(i));
        for ip in ips {
            if out.iter().any(|o| o.ip == ip) {
                return Err(ConfigError(format!(
                    "backends[{i}].host: {} resolves to {ip}, which another backend already has",
                    b.host
                )));
            }
            out.push(Backend {
                ip,
                host: b.host.clone(),
                weight: b.weight,
                tag: b.tag.clone(),
                admin: AdminState::Up,
                health: Health::Up,
                settings: settings.clone(),
            });
        }
    }
    Ok(out)
}

/// What `check-config` checks beyond parsing: backends resolve, the certificate and key and
/// the backends' CA files load, the health checks and credentials load. Returns the number of
/// backends. (Listener addresses are not bound: the running director may hold them.)
pub async fn check(config: &Config) -> Result<usize, ConfigError> {
    let backends = resolve_backends(config).await?;
    server_tls(config)?;
    backend_tls(config)?;
    if config.health.enabled {
        HealthChecker::parts_of(config)?;
    }
    // The admin token file, with the checks `serve` makes (not readable by group or others).
    if let Some(t) = &config.admin.tcp {
        crate::admin::read_token(&t.token_file)?;
    }
    Ok(backends.len())
}

/// The director's own TLS acceptor (`tls` cert and key), read from the files now.
pub(crate) fn server_tls(
    config: &Config,
) -> Result<Option<tokio_rustls::TlsAcceptor>, ConfigError> {
    match &config.tls {
        Some(files) => Ok(Some(crate::net::tls::acceptor(
            crate::net::tls::server_config(&files.cert, &files.key)
                .map_err(|e| ConfigError(format!("tls: {e}")))?,
        ))),
        None => Ok(None),
    }
}

/// Binds `listeners[index]`.
pub(crate) async fn bind_listener(
    config: &Config,
    index: usize,
) -> Result<ListenSocket, ConfigError> {
    let i = index;
    let lc = &config.listeners[index];
    Ok(match (&lc.address, &lc.socket) {
        (Some(address), _) => ListenSocket::Tcp(TcpListener::bind(address).await.map_err(|e| {
            ConfigError(format!(
                "listeners[{i}].address: cannot listen on {address}: {e}"
            ))
        })?),
        (None, Some(path)) => ListenSocket::Unix(
            bind_unix(path).map_err(|e| {
                ConfigError(format!(
                    "listeners[{i}].socket: cannot listen on {}: {e}",
                    path.display()
                ))
            })?,
            path.clone(),
        ),
        (None, None) => unreachable!("checked by Config::validate"),
    })
}

/// The settings new connections take, from a configuration and what was prepared for it.
/// The settings new connections take from `config`. The per-address counts and the refusal
/// log live on across reloads (a reload changes the cap, not the counts).
fn listener_shared(
    config: &Config,
    prepared: &Prepared,
    login: &Login,
    per_ip: &Arc<crate::net::admission::PerIpLimit>,
    refusals: &crate::net::refusals::RefusalLog,
) -> ListenerShared {
    let l = &config.limits;
    per_ip.set_max(l.max_preauth_per_ip);
    ListenerShared {
        login: Login {
            router: login.router.clone(),
            sessions: login.sessions.clone(),
            tls: prepared.backend_tls.clone(),
            health: login.health.clone(),
            metrics: login.metrics.clone(),
            master_user_separator: config.auth_master_user_separator.chars().next(),
        },
        tls: prepared.tls.clone(),
        trusted_networks: config.trusted_networks.clone(),
        disable_plaintext_auth: config.disable_plaintext_auth,
        limits: PreauthLimits {
            timeout: l.preauth_timeout.into(),
            max_line: l.max_line_length,
            max_literal: l.max_literal_size,
            max_auth_failures: l.max_auth_failures,
            auth_failure_delay: l.auth_failure_delay.into(),
            max_bad_commands: l.max_bad_commands,
        },
        greeting: config.greeting.clone(),
        close_linger: l.close_linger.into(),
        proxy_trusted_networks: config.proxy_trusted_networks.clone(),
        per_ip: per_ip.clone(),
        refusals: refusals.clone(),
        lmtp: Arc::new(crate::protocol::lmtp::LmtpSettings {
            backend_tls: prepared.backend_tls.clone(),
            ..config.lmtp_settings()
        }),
        metrics: login.metrics.clone(),
    }
}

/// Binds a unix socket for a local MTA: a stale socket file is replaced, the parent
/// directory created, and the socket made writable by everyone (as Dovecot's `lmtp` socket,
/// mode 0666): restrict access with the directory's permissions.
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Builds the TLS connectors the backends need.
pub(crate) fn backend_tls(config: &Config) -> Result<BackendTlsContext, ConfigError> {
    let mut ctx = BackendTlsContext::default();
    for i in 0..config.backends.len() {
        let s = config.backend_settings(i);
        if s.tls == BackendTls::None
            || ctx
                .connectors
                .iter()
                .any(|(ca, v, _)| *ca == s.tls_ca_file && *v == s.tls_verify)
        {
            continue;
        }
        let connector = crate::net::tls::connector(s.tls_ca_file.as_deref(), s.tls_verify)
            .map_err(|e| ConfigError(format!("backends[{i}].tls_ca_file: {e}")))?;
        ctx.connectors
            .push((s.tls_ca_file.clone(), s.tls_verify, connector));
    }
    Ok(ctx)
}

impl Director {
    /// Loads TLS material, resolves backends and binds every listener.
    pub async fn build(config: &Config) -> Result<Director, ConfigError> {
        let backends = resolve_backends(config).await?;
        let user_expire: Duration = config.user_expire.into();
        let state = Arc::new(LocalState::new(backends, user_expire));
        crate::state::file::restore(config, &*state)?;
        let router = Router::new(state.clone() as Arc<dyn State>, config.user_hash());
        let sessions = Sessions::new();
        let metrics = Metrics::new();
        let mover = Mover::new(state.clone() as Arc<dyn State>, sessions.clone())
            .with_metrics(metrics.clone());
        let health = HealthChecker::from_config(config, state.clone() as Arc<dyn State>, mover)?;
        let prepared = Prepared::at_start(server_tls(config)?, Arc::new(backend_tls(config)?));
        let login = Login {
            router: router.clone(),
            sessions: sessions.clone(),
            tls: prepared.backend_tls.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            master_user_separator: config.auth_master_user_separator.chars().next(),
        };
        let per_ip = crate::net::admission::PerIpLimit::new(config.limits.max_preauth_per_ip);
        let refusals = crate::net::refusals::RefusalLog::default();
        let shared = Arc::new(ArcSwap::from_pointee(listener_shared(
            config, &prepared, &login, &per_ip, &refusals,
        )));
        let admin = crate::admin::AdminContext::new(
            state.clone(),
            sessions.clone(),
            router.clone(),
            Arc::new(config.clone()),
        )
        .with_metrics(metrics.clone());
        if let Some(checker) = &health {
            let checker = checker.clone();
            admin.set_check_results(Arc::new(move || {
                checker
                    .last_results()
                    .into_iter()
                    .map(|(ip, r)| (ip, r.code.name().to_owned(), r.latency))
                    .collect()
            }));
        }
        let admin_context = Arc::new(admin);
        let admin = crate::admin::AdminServer::bind(admin_context.clone()).await?;
        let metrics_server = match config.metrics.address {
            Some(address) => Some(
                MetricsServer::bind(
                    address,
                    MetricsContext {
                        metrics: metrics.clone(),
                        state: state.clone(),
                        sessions: sessions.clone(),
                        health: health.clone(),
                    },
                )
                .await
                .map_err(|e| {
                    ConfigError(format!("metrics.address: cannot listen on {address}: {e}"))
                })?,
            ),
            None => None,
        };
        let mut listeners = Vec::new();
        for i in 0..config.listeners.len() {
            let socket = bind_listener(config, i).await?;
            listeners.push(RunningListener::new(config, i, socket));
        }
        let reloader = Reloader::new(ReloaderParts {
            config: Arc::new(config.clone()),
            listeners,
            shared,
            build_shared: Arc::new(move |config, prepared| {
                listener_shared(config, prepared, &login, &per_ip, &refusals)
            }),
            state: state.clone() as Arc<dyn State>,
            health: health.clone(),
            admin: admin_context,
        });
        let (trigger, shutdown) = crate::server::shutdown::channel();
        Ok(Director {
            state,
            health,
            sessions,
            router,
            reloader,
            trigger,
            shutdown,
            user_expire,
            admin,
            metrics,
            metrics_server,
        })
    }

    /// The bound address of every listener, with its protocol and TLS mode (listeners on
    /// port 0 get an ephemeral port).
    pub fn listen_addrs(&self) -> Vec<(Protocol, ListenerTls, SocketAddr)> {
        self.reloader.listen_addrs()
    }

    /// The bound address of the metrics listener, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref()?.local_addr()
    }

    /// Serves until `shutdown` completes, then stops gracefully: no new connections,
    /// clients not logged in sent away, relayed sessions and LMTP transactions given
    /// `shutdown_grace`, then closed with the protocol's goodbye. Returns when every
    /// connection has ended (or a short while after the grace).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.reloader.start(self.shutdown);
        let admin = tokio::spawn(self.admin.serve());
        let metrics_server = self.metrics_server.map(|m| {
            let address = m.local_addr().map_or_else(|| "?".into(), |a| a.to_string());
            info!(address = %address, "metrics listening (/metrics, /healthz, /readyz)");
            tokio::spawn(m.serve())
        });
        let state = self.state.clone();
        let every = (self.user_expire / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let n = state.purge_expired(Instant::now());
                if n > 0 {
                    debug!(expired = n, "sticky records expired");
                }
            }
        });
        let checker = self.health.map(|h| tokio::spawn(h.run()));
        shutdown.await;
        self.reloader.stop();
        let grace: Duration = self.reloader.config().shutdown_grace.into();
        info!(grace = ?grace, sessions = self.sessions.list().len(),
              "shutting down: no new connections, clients not logged in sent away, sessions end within the grace");
        self.trigger.set(Phase::Draining);
        if tokio::time::timeout(grace, self.trigger.all_done())
            .await
            .is_err()
        {
            info!(
                connections = self.trigger.live(),
                "shutdown grace over: closing the remaining sessions"
            );
            self.trigger.set(Phase::Closing);
            if tokio::time::timeout(CLOSE_WAIT, self.trigger.all_done())
                .await
                .is_err()
            {
                warn!(
                    connections = self.trigger.live(),
                    "connections still open at exit"
                );
            }
        }
        sweeper.abort();
        if let Some(c) = checker {
            c.abort();
        }
        admin.abort();
        if let Some(m) = metrics_server {
            m.abort();
        }
        info!("shut down");
    }
}
