//! Reloading the configuration file (SIGHUP, `director reload`) without dropping a session.
//!
//! Everything the new file needs is prepared first (parsed and checked, backends resolved,
//! certificate and key read, CA files and checks loaded, new listener addresses bound); if any
//! of it fails, the reload is refused with one log line and nothing changes. Then it is swapped
//! in: the settings every new connection takes ([`ListenerShared`]), listeners added and
//! removed (a removed one closes its socket; its sessions go on), backend settings, the
//! health checker's settings, the log level, and the backend list as `add`/`remove` would
//! change it (unless a state file holds the backend list, as at start). What cannot change
//! without a restart is logged as such and kept as it runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::admin::AdminContext;
use crate::config::{Config, ConfigError, ListenerConfig, ListenerTls};
use crate::health::checker::HealthChecker;
use crate::net::admission::ConnectionPool;
use crate::net::shutdown::Shutdown;
use crate::protocol::decision::Protocol;
use crate::server::listener::{ListenSocket, Listener, ListenerShared};
use crate::state::State;

/// Applies a new log level or filter (`log_level`); `Err` names what is wrong with it.
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Builds the settings new connections take from a configuration (the director's, so that
/// start and reload build them the same way).
pub type SharedBuilder = Arc<dyn Fn(&Config, &Prepared) -> ListenerShared + Send + Sync>;

/// What a configuration needs that can fail, made ready before anything is swapped in.
pub struct Prepared {
    /// The director's TLS acceptor (`tls` cert and key).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// TLS connectors for backends.
    pub backend_tls: Arc<crate::net::tls::BackendTlsContext>,
    /// The health checker's new settings, checks and credentials.
    checker: Option<(
        crate::health::checker::CheckerSettings,
        crate::health::probe::Checks,
        crate::health::probe::CredentialStore,
    )>,
    /// Per new listener: the socket it takes over or binds.
    sockets: Vec<Source>,
}

impl Prepared {
    /// What the director is built with at start (listeners are bound by the director).
    pub fn at_start(
        tls: Option<tokio_rustls::TlsAcceptor>,
        backend_tls: Arc<crate::net::tls::BackendTlsContext>,
    ) -> Self {
        Prepared {
            tls,
            backend_tls,
            checker: None,
            sockets: Vec::new(),
        }
    }
}

/// Where a listener of the new configuration gets its socket.
enum Source {
    /// The running listener at this index goes on unchanged.
    Keep(usize),
    /// The running listener at this index has the same address but other settings: its
    /// socket is taken over.
    TakeOver(usize),
    /// Newly bound.
    Bound(Arc<ListenSocket>),
}

/// A listener that runs.
pub struct RunningListener {
    /// Its configuration entry, with its TLS mode made explicit.
    pub entry: ListenerConfig,
    pub protocol: Protocol,
    pub tls: ListenerTls,
    pub socket: Arc<ListenSocket>,
    /// Its connection slots; kept when a reload takes the socket over (the slots hold live
    /// connections), resized to the new `max_connections`.
    pub pool: Arc<ConnectionPool>,
    /// The accept loop; `None` until the director runs.
    task: Option<JoinHandle<()>>,
}

impl RunningListener {
    /// A listener bound at start, not yet accepting.
    pub fn new(config: &Config, index: usize, socket: ListenSocket) -> Self {
        let (entry, tls) = entry_of(config, index);
        RunningListener {
            protocol: entry.protocol.into(),
            pool: ConnectionPool::new(pool_size(config, &entry)),
            entry,
            tls,
            socket: Arc::new(socket),
            task: None,
        }
    }

    fn start(&mut self, shared: Arc<ArcSwap<ListenerShared>>, shutdown: Shutdown) {
        let listener = Listener {
            protocol: self.protocol,
            tls: self.tls,
            proxy_protocol: self.entry.proxy_protocol,
            allow_from: self.entry.allow_from.clone(),
            name: self.socket.describe(),
            local: self.socket.fixed_local_addr(),
            pool: self.pool.clone(),
            auth_socket: self
                .entry
                .auth
                .as_ref()
                .and_then(crate::server::auth_services::login_socket)
                .map(str::to_owned),
            master_socket: self
                .entry
                .auth
                .as_ref()
                .filter(|_| self.protocol == Protocol::Lmtp)
                .and_then(crate::server::auth_services::master_socket)
                .map(str::to_owned),
        };
        info!(protocol = %self.protocol, address = %listener.name, tls = ?self.tls, "listening");
        self.task = Some(tokio::spawn(listener.serve(
            self.socket.clone(),
            shared,
            shutdown,
        )));
    }

    /// Stops accepting: the accept loop ends and drops its hold on the socket.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The size of a listener's pool: its own `max_connections`, else `limits.max_connections`.
fn pool_size(config: &Config, entry: &ListenerConfig) -> usize {
    entry
        .max_connections
        .unwrap_or(config.limits.max_connections)
}

/// A listener's entry with its TLS mode made explicit (what makes two entries the same).
fn entry_of(config: &Config, index: usize) -> (ListenerConfig, ListenerTls) {
    let tls = config.listener_tls(index);
    let mut entry = config.listeners[index].clone();
    entry.tls = Some(tls);
    // Who checks its clients, made explicit too: a change of the top-level `auth` restarts
    // the listeners that follow it.
    entry.auth = Some(config.listener_auth(index).0.clone());
    (entry, tls)
}

/// Where an entry listens, when it can be recognised across configurations (not port 0).
fn fixed_address(entry: &ListenerConfig) -> Option<String> {
    match (&entry.address, &entry.socket) {
        (Some(a), _) if a.port() != 0 => Some(a.to_string()),
        (None, Some(p)) => Some(p.display().to_string()),
        _ => None,
    }
}

/// What runs now.
struct Running {
    config: Arc<Config>,
    listeners: Vec<RunningListener>,
}

/// Reloads the configuration of a running director. Shared by SIGHUP and the admin verb.
pub struct Reloader {
    /// The file `serve` was started with; `None` for a director built in-process.
    path: Mutex<Option<PathBuf>>,
    /// One reload at a time.
    one_at_a_time: tokio::sync::Mutex<()>,
    running: Mutex<Running>,
    shared: Arc<ArcSwap<ListenerShared>>,
    build_shared: SharedBuilder,
    state: Arc<dyn State>,
    health: Option<HealthChecker>,
    admin: Arc<AdminContext>,
    log_level: Mutex<Option<LogLevelHook>>,
    /// Handed to listeners a reload starts; `None` before the director runs and once it
    /// stops (no reload then).
    shutdown: Mutex<Option<Shutdown>>,
}

/// The parts a [`Reloader`] works on.
pub struct ReloaderParts {
    pub config: Arc<Config>,
    pub listeners: Vec<RunningListener>,
    pub shared: Arc<ArcSwap<ListenerShared>>,
    pub build_shared: SharedBuilder,
    pub state: Arc<dyn State>,
    pub health: Option<HealthChecker>,
    pub admin: Arc<AdminContext>,
}

impl Reloader {
    /// A reloader over a built director; the admin verb `reload` is plugged in here.
    pub fn new(parts: ReloaderParts) -> Arc<Reloader> {
        let reloader = Arc::new(Reloader {
            path: Mutex::new(None),
            one_at_a_time: tokio::sync::Mutex::new(()),
            running: Mutex::new(Running {
                config: parts.config,
                listeners: parts.listeners,
            }),
            shared: parts.shared,
            build_shared: parts.build_shared,
            state: parts.state,
            health: parts.health,
            admin: parts.admin.clone(),
            log_level: Mutex::new(None),
            shutdown: Mutex::new(None),
        });
        let weak: Weak<Reloader> = Arc::downgrade(&reloader);
        parts.admin.set_reload(Arc::new(move || {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(r) => r.reload().await,
                    None => Err("the director is stopping".into()),
                }
            })
        }));
        reloader
    }

    /// The configuration file that a reload reads.
    pub fn set_path(&self, path: PathBuf) {
        *self.path.lock().unwrap() = Some(path);
    }

    /// How a reload applies `log_level`.
    pub fn set_log_level(&self, hook: LogLevelHook) {
        *self.log_level.lock().unwrap() = Some(hook);
    }

    /// Every listener's protocol, TLS mode and bound TCP address.
    pub fn listen_addrs(&self) -> Vec<(Protocol, ListenerTls, std::net::SocketAddr)> {
        let running = self.running.lock().unwrap();
        running
            .listeners
            .iter()
            .filter_map(|l| Some((l.protocol, l.tls, l.socket.local_addr()?)))
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.running.lock().unwrap().config.clone()
    }

    /// Starts every listener's accept loop (the director runs).
    pub fn start(&self, shutdown: Shutdown) {
        let mut running = self.running.lock().unwrap();
        for l in running.listeners.iter_mut() {
            l.start(self.shared.clone(), shutdown.clone());
        }
        *self.shutdown.lock().unwrap() = Some(shutdown);
    }

    /// The director stops: no more reloads, and every listening socket is closed (new
    /// clients are refused rather than left waiting in the kernel's queue).
    pub fn stop(&self) {
        self.shutdown.lock().unwrap().take();
        let listeners = std::mem::take(&mut self.running.lock().unwrap().listeners);
        for l in listeners {
            if let Some(task) = l.task {
                task.abort();
            }
        }
    }

    /// Reloads the configuration file; logs one line either way.
    pub async fn reload(&self) -> Result<String, String> {
        let Some(path) = self.path.lock().unwrap().clone() else {
            return Err("this director has no configuration file to reload".into());
        };
        let result = match crate::server::prepare::load_config(&path) {
            Ok(config) => self.reload_config(config).await,
            Err(e) => Err(e.0),
        };
        match &result {
            Ok(done) => info!(file = %path.display(), changes = %done, "configuration reloaded"),
            Err(e) => warn!(file = %path.display(), error = %e,
                            "configuration reload refused: the running configuration stays in force"),
        }
        result
    }

    /// Swaps in `new` (already parsed and checked), or refuses it with nothing changed.
    pub async fn reload_config(&self, new: Config) -> Result<String, String> {
        let _one = self.one_at_a_time.lock().await;
        let Some(shutdown) = self.shutdown.lock().unwrap().clone() else {
            return Err("the director is not serving (starting or stopping)".into());
        };
        let old = self.running.lock().unwrap().config.clone();
        let (new, restart) = keep_what_needs_a_restart(&old, new);
        let prepared = self.prepare(&new).await.map_err(|e| e.0)?;
        let new = Arc::new(new);
        let mut done = Vec::new();

        // From here on nothing can fail: swap everything in.
        if let Some(hook) = self.log_level.lock().unwrap().clone() {
            if let Err(e) = hook(&new.log_level) {
                warn!(error = %e, "log_level not applied");
            }
        }
        let shared = Arc::new((self.build_shared)(&new, &prepared));
        self.shared.store(shared);
        done.push(self.swap_listeners(&new, prepared.sockets, shutdown).await);
        for b in self.state.backends().backends.values() {
            let settings = Arc::new(new.settings_for_host(&b.host));
            let _ = self.state.set_settings(b.ip, settings);
        }
        if let (Some(health), Some((settings, checks, credentials))) =
            (&self.health, prepared.checker)
        {
            health.reload(settings, checks, credentials);
        }
        self.admin.set_config(new.clone());
        let state_file = new.state_file.as_ref().filter(|p| p.exists());
        if new.cluster.is_some() {
            if format!("{:?}", old.backends) != format!("{:?}", new.backends) {
                info!("backends: etcd holds the cluster's backend list; the configuration's list is not applied (use director add/remove)");
            }
            done.push("backends: kept (etcd holds the list)".into());
        } else if let Some(path) = state_file {
            if format!("{:?}", old.backends) != format!("{:?}", new.backends) {
                info!(state_file = %path.display(),
                      "backends: the state file holds the backend list, as at start; the configuration's list is not applied (use director add/remove)");
            }
            done.push("backends: kept (the state file holds the list)".into());
        } else {
            done.push(self.admin.apply_backend_list(&old, &new).await.message);
        }
        self.running.lock().unwrap().config = new;
        if !restart.is_empty() {
            done.push(format!("needs a restart: {}", restart.join(", ")));
        }
        Ok(done.join("; "))
    }

    /// Everything of `new` that can fail, before anything is swapped in.
    async fn prepare(&self, new: &Config) -> Result<Prepared, ConfigError> {
        crate::server::prepare::resolve_backends(new).await?;
        let tls = crate::server::prepare::server_tls(new)?;
        let backend_tls = Arc::new(crate::server::prepare::backend_tls(new)?);
        let checker = match &self.health {
            Some(_) => Some(HealthChecker::parts_of(new)?),
            None => None,
        };
        // Listener sockets: kept, taken over, or bound now.
        let running: Vec<(ListenerConfig, Option<String>)> = {
            let r = self.running.lock().unwrap();
            r.listeners
                .iter()
                .map(|l| (l.entry.clone(), fixed_address(&l.entry)))
                .collect()
        };
        let mut used = vec![false; running.len()];
        let mut sockets = Vec::new();
        for i in 0..new.listeners.len() {
            let (entry, _) = entry_of(new, i);
            if let Some(k) = (0..running.len()).find(|&k| !used[k] && running[k].0 == entry) {
                used[k] = true;
                sockets.push(Source::Keep(k));
                continue;
            }
            let address = fixed_address(&entry);
            if let Some(k) = (0..running.len())
                .find(|&k| !used[k] && address.is_some() && running[k].1 == address)
            {
                used[k] = true;
                sockets.push(Source::TakeOver(k));
                continue;
            }
            sockets.push(Source::Bound(Arc::new(
                crate::server::prepare::bind_listener(new, i).await?,
            )));
        }
        Ok(Prepared {
            tls,
            backend_tls,
            checker,
            sockets,
        })
    }

    /// Stops the listeners the new configuration no longer has, starts its new ones.
    async fn swap_listeners(
        &self,
        new: &Config,
        sources: Vec<Source>,
        shutdown: Shutdown,
    ) -> String {
        let mut old: Vec<Option<RunningListener>> = {
            let mut r = self.running.lock().unwrap();
            std::mem::take(&mut r.listeners)
                .into_iter()
                .map(Some)
                .collect()
        };
        let mut listeners = Vec::new();
        let mut to_start = Vec::new();
        let (mut kept, mut added) = (0, 0);
        for (i, source) in sources.into_iter().enumerate() {
            let (entry, tls) = entry_of(new, i);
            let size = pool_size(new, &entry);
            let (socket, pool) = match source {
                Source::Keep(k) => {
                    let l = old[k].take().expect("used once");
                    l.pool.set_capacity(size);
                    listeners.push(l);
                    kept += 1;
                    continue;
                }
                Source::TakeOver(k) => {
                    let mut l = old[k].take().expect("used once");
                    l.stop().await;
                    l.pool.set_capacity(size);
                    (l.socket, l.pool)
                }
                Source::Bound(socket) => {
                    added += 1;
                    (socket, ConnectionPool::new(size))
                }
            };
            to_start.push(listeners.len());
            listeners.push(RunningListener {
                protocol: entry.protocol.into(),
                entry,
                tls,
                socket,
                pool,
                task: None,
            });
        }
        let mut removed = 0;
        for mut l in old.into_iter().flatten() {
            l.stop().await;
            info!(protocol = %l.protocol, address = %l.socket.describe(),
                  "listener removed: no new connections; its sessions go on");
            removed += 1;
        }
        for i in to_start {
            listeners[i].start(self.shared.clone(), shutdown.clone());
        }
        let changed = listeners.len() - kept - added;
        self.running.lock().unwrap().listeners = listeners;
        format!("listeners: {kept} kept, {added} added, {changed} changed, {removed} removed")
    }
}

/// `new` with what cannot change while running set back to `old`'s values, and the names of
/// the options that were changed in vain (each logged as needing a restart).
fn keep_what_needs_a_restart(old: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut restart = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:expr) => {
            if format!("{:?}", old.$($field).+) != format!("{:?}", new.$($field).+) {
                warn!(option = $name, running = ?old.$($field).+, "changed in the configuration file: needs a restart; the running value stays");
                new.$($field).+ = old.$($field).+.clone();
                restart.push($name);
            }
        };
    }
    keep!(admin, "admin");
    keep!(metrics, "metrics.address");
    keep!(state_file, "state_file");
    keep!(cluster, "cluster");
    keep!(username_hash, "username_hash");
    keep!(user_expire, "user_expire");
    keep!(log_format, "log_format");
    keep!(health.enabled, "health.enabled");
    (new, restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "listeners: [{protocol: imap, address: 127.0.0.1:1143}]\nbackends: [{host: 10.0.0.1}]\n";

    #[test]
    fn options_that_need_a_restart_keep_their_running_value() {
        let old = Config::parse(BASE).unwrap();
        let new = Config::parse(&format!(
            "{BASE}username_hash: \"%Ln\"\nlog_level: debug\nlimits: {{max_connections: 5}}\nadmin: {{socket: /tmp/other.sock}}\n"
        ))
        .unwrap();
        let (kept, restart) = keep_what_needs_a_restart(&old, new);
        assert_eq!(restart, vec!["admin", "username_hash"]);
        assert_eq!(kept.username_hash, old.username_hash);
        assert_eq!(kept.admin.socket, old.admin.socket);
        // What a reload may change is changed.
        assert_eq!(kept.log_level, "debug");
        assert_eq!(kept.limits.max_connections, 5);
    }
}
