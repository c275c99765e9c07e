//! The running director: built from a [`Config`], it binds the listeners, resolves the
//! backends, and serves until told to stop.

pub mod auth_services;
pub mod listener;
pub mod lmtp_recipients;
pub mod metrics_server;
pub mod prepare;
pub mod reload;
pub mod scrape;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError, ListenerTls};
use crate::health::checker::HealthChecker;
use crate::login::Login;
use crate::metrics::Metrics;
use crate::net::shutdown::{Phase, Shutdown, ShutdownTrigger};
use crate::protocol::decision::Protocol;
use crate::protocol::lmtp::LmtpSettings;
use crate::protocol::preauth::PreauthLimits;
use crate::server::listener::ListenerShared;
use crate::server::metrics_server::{MetricsContext, MetricsServer};
use crate::server::prepare::{backend_tls, bind_listener, resolve_backends, server_tls};
use crate::server::reload::{Prepared, Reloader, ReloaderParts, RunningListener};
use crate::state::cluster::ClusterState;
use crate::state::local::LocalState;
use crate::state::moves::Mover;
use crate::state::router::Router;
use crate::state::sessions::Sessions;
use crate::state::State;

/// After the grace, how long closed sessions get to write their goodbye and end before the
/// director exits anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A director ready to serve.
pub struct Director {
    /// The state as single-director tests change it directly: the director's own, or in a
    /// cluster the replica's backends (read-only there: changes must go through `shared`).
    pub state: Arc<LocalState>,
    /// The state every part of the director uses: local, or the cluster's in etcd.
    pub shared: Arc<dyn State>,
    /// The cluster membership, with `cluster` configured.
    pub cluster: Option<ClusterState>,
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
    /// Moves users (the cluster's janitor uses it).
    mover: Mover,
    /// The admin API (bound at build, so that a bad socket or token file fails the start).
    pub admin: crate::admin::AdminServer,
    /// The catalogue of metrics every part counts on.
    pub metrics: Metrics,
    /// The metrics listener (`None` without `metrics.address`), bound at build.
    metrics_server: Option<MetricsServer>,
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
    auth_services: &auth_services::AuthServices,
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
            default_settings: Arc::new(config.settings_for_host("")),
            gates: login.gates.clone(),
        },
        auth: auth_services.for_config(config, &login.metrics),
        lookups: auth_services.lookups_for_config(config, &login.metrics),
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
        lmtp: Arc::new(LmtpSettings::from_config(
            &config.lmtp,
            prepared.backend_tls.clone(),
        )),
        metrics: login.metrics.clone(),
    }
}

impl Director {
    /// Loads TLS material, resolves backends and binds every listener.
    pub async fn build(config: &Config) -> Result<Director, ConfigError> {
        let backends = resolve_backends(config).await?;
        let user_expire: Duration = config.user_expire.into();
        let sessions = Sessions::new();
        let metrics = Metrics::new();
        let (state, shared_state, cluster): (Arc<LocalState>, Arc<dyn State>, _) = match &config
            .cluster
        {
            Some(c) => {
                let mut c = c.clone();
                c.advertise = config.cluster_advertise();
                let cluster =
                    ClusterState::start(config, &c, backends, sessions.clone(), metrics.clone())
                        .await?;
                (cluster.local(), Arc::new(cluster.clone()), Some(cluster))
            }
            None => {
                let state = Arc::new(LocalState::new(backends, user_expire));
                crate::state::file::restore(config, &state)?;
                (state.clone(), state, None)
            }
        };
        let router = Router::new(
            shared_state.clone(),
            crate::routing::user_hash::UserHash::from_config(config)?,
        );
        let mover = Mover::new(shared_state.clone(), sessions.clone())
            .with_metrics(metrics.clone())
            .with_parallelism(
                config
                    .cluster
                    .as_ref()
                    .map_or(crate::state::moves::DEFAULT_PARALLELISM, |c| {
                        c.move_parallelism
                    }),
            );
        let health = HealthChecker::from_config(config, shared_state.clone(), mover.clone())?;
        if let (Some(cluster), Some(checker)) = (&cluster, &health) {
            let checker = checker.clone();
            cluster.on_suspect(move |ip| {
                checker.suspect(
                    ip,
                    crate::health::probe::CheckCode::ResponseTimeout,
                    "a login through another director",
                )
            });
        }
        let prepared = Prepared::at_start(server_tls(config)?, Arc::new(backend_tls(config)?));
        let login = Login {
            router: router.clone(),
            sessions: sessions.clone(),
            tls: prepared.backend_tls.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            master_user_separator: config.auth_master_user_separator.chars().next(),
            default_settings: Arc::new(config.settings_for_host("")),
            gates: crate::login::LoginGates::default(),
        };
        let auth_services = auth_services::AuthServices::default();
        let per_ip = crate::net::admission::PerIpLimit::new(config.limits.max_preauth_per_ip);
        let refusals = crate::net::refusals::RefusalLog::default();
        let shared = Arc::new(ArcSwap::from_pointee(listener_shared(
            config,
            &prepared,
            &login,
            &per_ip,
            &refusals,
            &auth_services,
        )));
        let admin = crate::admin::AdminContext::new(
            shared_state.clone(),
            sessions.clone(),
            router.clone(),
            Arc::new(config.clone()),
        )
        .with_metrics(metrics.clone())
        .with_parallelism(mover.parallelism);
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
                        state: shared_state.clone(),
                        sessions: sessions.clone(),
                        health: health.clone(),
                        gates: login.gates.clone(),
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
                listener_shared(config, prepared, &login, &per_ip, &refusals, &auth_services)
            }),
            state: shared_state.clone(),
            health: health.clone(),
            admin: admin_context,
        });
        let (trigger, shutdown) = crate::net::shutdown::channel();
        Ok(Director {
            state,
            shared: shared_state,
            cluster,
            mover,
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
        let state = self.shared.clone();
        let every = (self.user_expire / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // The local table purges when asked (one shard at a time, some 250 ms of work
                // at ten million records): off the worker's other tasks where the runtime
                // allows it, so that no connection on this worker waits for the pass.
                let purge = || state.purge_expired(Instant::now());
                let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread;
                let purged = if multi_thread {
                    tokio::task::block_in_place(purge)
                } else {
                    purge()
                };
                match purged.await {
                    Ok(0) => {}
                    Ok(n) => debug!(expired = n, "sticky records expired"),
                    Err(e) => debug!(error = %e, "sticky records not purged"),
                }
            }
        });
        let janitor = self
            .cluster
            .clone()
            .map(|c| tokio::spawn(janitor(c, self.mover.clone())));
        let checker = self.health.map(|h| tokio::spawn(h.run()));
        shutdown.await;
        self.reloader.stop();
        let grace: Duration = self.reloader.config().shutdown_grace.into();
        info!(grace = ?grace, sessions = self.sessions.list().len(),
              "shutting down: no new connections, clients not logged in sent away, sessions end within the grace");
        self.trigger.set(Phase::Draining);
        if !self.trigger.all_done_within(grace).await {
            info!(
                connections = self.trigger.live(),
                "shutdown grace over: closing the remaining sessions"
            );
            self.trigger.set(Phase::Closing);
            // Relayed sessions wait only for their own kick (one small future each rather
            // than a second one on the stop): at Closing every session is kicked, and a
            // kicked relay tells a stop from a kick by the phase.
            self.sessions.kick_all();
            if !self.trigger.all_done_within(CLOSE_WAIT).await {
                warn!(
                    connections = self.trigger.live(),
                    "connections still open at exit"
                );
            }
        }
        sweeper.abort();
        if let Some(j) = janitor {
            j.abort();
        }
        if let Some(c) = &self.cluster {
            c.leave().await;
        }
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

/// The cluster's janitor, run by the elected checker: users whose record points to a backend
/// that no longer serves them (down, removed) and that nobody is moving (the director that
/// took the backend down died, or the checker changed mid-evacuation) are moved off, once
/// they have been left there for `move_timeout` (an admin's evacuation on another director
/// may still be under way); and etcd's old history is compacted.
async fn janitor(state: ClusterState, mover: Mover) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut stranded_since: std::collections::HashMap<std::net::IpAddr, Instant> =
        std::collections::HashMap::new();
    loop {
        tick.tick().await;
        if !state.is_checker() {
            stranded_since.clear();
            continue;
        }
        state.compact_history().await;
        let set = state.backends();
        let now = Instant::now();
        // Backends with records that do not serve them, then whether any of those records
        // is not being moved: counted first, so that no list of every record is made.
        let stranded: std::collections::BTreeSet<std::net::IpAddr> = state
            .record_counts(now)
            .by_backend
            .into_keys()
            .filter(|ip| {
                set.get(*ip).is_none_or(|b| {
                    !b.serves_existing()
                        && b.admin != crate::state::backend::AdminState::Maintenance
                })
            })
            .filter(|ip| {
                state
                    .records_on(*ip, now)
                    .into_iter()
                    .any(|hash| !state.being_moved(hash))
            })
            .collect();
        stranded_since.retain(|ip, _| stranded.contains(ip));
        for ip in stranded {
            let since = *stranded_since.entry(ip).or_insert_with(Instant::now);
            if since.elapsed() < state.move_timeout() {
                continue;
            }
            let reason = match set.get(ip) {
                Some(b) if b.health == crate::state::backend::Health::Down => {
                    crate::state::moves::MoveReason::HealthDown
                }
                _ => crate::state::moves::MoveReason::Maintenance,
            };
            info!(backend = %ip, "cluster: users left on a backend that does not serve them: moving them");
            mover.evacuate(ip, reason, false).await;
            stranded_since.remove(&ip);
        }
    }
}
