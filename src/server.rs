//! The running director: built from a [`Config`], it binds the listeners, resolves the
//! backends, and serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info};

use crate::backend::{AdminState, Backend, Health};
use crate::checker::HealthChecker;
use crate::config::{BackendTls, Config, ConfigError, ListenerTls};
use crate::decision::Protocol;
use crate::frontend::PreauthLimits;
use crate::listener::{ListenSocket, Listener, ListenerShared};
use crate::local_state::LocalState;
use crate::login::{BackendTlsContext, Login};
use crate::metrics::Metrics;
use crate::metrics_server::{MetricsContext, MetricsServer};
use crate::moves::Mover;
use crate::routing::Router;
use crate::sessions::Sessions;
use crate::state::State;

/// A director ready to serve.
pub struct Director {
    pub state: Arc<LocalState>,
    /// The health checker (`None` when `health.enabled` is false); its last results are
    /// what `status` shows.
    pub health: Option<HealthChecker>,
    pub sessions: Sessions,
    pub router: Router,
    listeners: Vec<Listener>,
    shared: Arc<ListenerShared>,
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
        let ips = crate::resolve::resolve_host(&b.host)
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
fn backend_tls(config: &Config) -> Result<BackendTlsContext, ConfigError> {
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
        let connector = crate::tls::connector(s.tls_ca_file.as_deref(), s.tls_verify)
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
        crate::state_file::restore(config, &*state)?;
        let router = Router::new(state.clone() as Arc<dyn State>, config.user_hash());
        let sessions = Sessions::new();
        let metrics = Metrics::new();
        let mover = Mover::new(state.clone() as Arc<dyn State>, sessions.clone())
            .with_metrics(metrics.clone());
        let health = HealthChecker::from_config(config, state.clone() as Arc<dyn State>, mover)?;
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::acceptor(
                crate::tls::server_config(&files.cert, &files.key)
                    .map_err(|e| ConfigError(format!("tls: {e}")))?,
            )),
            None => None,
        };
        let backend_tls = Arc::new(backend_tls(config)?);
        let login = Login {
            router: router.clone(),
            sessions: sessions.clone(),
            tls: backend_tls.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            master_user_separator: config.auth_master_user_separator.chars().next(),
        };
        let l = &config.limits;
        let shared = Arc::new(ListenerShared {
            login,
            tls,
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
            connections: Arc::new(Semaphore::new(l.max_connections)),
            lmtp: Arc::new(crate::lmtp::LmtpSettings {
                backend_tls: backend_tls.clone(),
                ..config.lmtp_settings()
            }),
            metrics: metrics.clone(),
        });
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
        let admin = crate::admin::AdminServer::bind(Arc::new(admin)).await?;
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
        for (i, lc) in config.listeners.iter().enumerate() {
            let socket = match (&lc.address, &lc.socket) {
                (Some(address), _) => {
                    ListenSocket::Tcp(TcpListener::bind(address).await.map_err(|e| {
                        ConfigError(format!(
                            "listeners[{i}].address: cannot listen on {address}: {e}"
                        ))
                    })?)
                }
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
            };
            listeners.push(Listener {
                protocol: lc.protocol.into(),
                tls: config.listener_tls(i),
                proxy_protocol: lc.proxy_protocol,
                allow_from: lc.allow_from.clone(),
                socket,
            });
        }
        Ok(Director {
            state,
            health,
            sessions,
            router,
            listeners,
            shared,
            user_expire,
            admin,
            metrics,
            metrics_server,
        })
    }

    /// The bound address of every listener, with its protocol and TLS mode (listeners on
    /// port 0 get an ephemeral port).
    pub fn listen_addrs(&self) -> Vec<(Protocol, ListenerTls, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.protocol, l.tls, l.local_addr()?)))
            .collect()
    }

    /// The bound address of the metrics listener, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref()?.local_addr()
    }

    /// Serves until `shutdown` completes. Sessions already relayed are left to end by
    /// themselves (the process exit ends them).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (tx, rx) = watch::channel(false);
        for l in self.listeners {
            info!(protocol = %l.protocol, address = %l.describe(), tls = ?l.tls, "listening");
            tokio::spawn(l.serve(self.shared.clone(), rx.clone()));
        }
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
        let _ = tx.send(true);
        sweeper.abort();
        if let Some(c) = checker {
            c.abort();
        }
        admin.abort();
        if let Some(m) = metrics_server {
            m.abort();
        }
        info!("listeners closed");
    }
}
