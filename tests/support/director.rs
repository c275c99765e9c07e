//! A director under test: built from YAML over a [`Pool`], run in-process on its own thread
//! and runtime (so tests stay plain blocking code), listening on ephemeral ports.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use director::config::{Config, ListenerTls};
use director::health::checker::HealthChecker;
use director::protocol::decision::Protocol;
use director::server::Director;
use director::state::backend::Backend as DirBackend;
use director::state::local::LocalState;
use director::state::router::Router;
use director::state::sessions::{SessionInfo, Sessions};

use super::dovecot::{Backend, Pool, IMAP_PORT, LMTP_PORT, POP3_PORT, SIEVE_PORT};
use super::runtime_thread::RuntimeThread;

/// What a test may change in the director's configuration.
#[derive(Debug, Clone)]
pub struct DirectorOptions {
    /// One weight per pool backend (default 100 each). Shorter lists leave the rest at 100.
    pub weights: Vec<u32>,
    /// YAML lines added to every backend entry (indented by the caller's `    `), e.g.
    /// `    forward: proxy_v2\n    ports: {imap: 11143, pop3: 11110}\n`.
    pub backend_extra: String,
    /// YAML added at the top level (e.g. `user_expire: 2s\n`).
    pub extra: String,
    /// Whether listeners expect a PROXY header.
    pub proxy_protocol: bool,
    /// `proxy_trusted_networks`, written when `proxy_protocol` is set (default 127.0.0.0/8:
    /// the tests' own clients act as the load balancer).
    pub proxy_trusted_networks: Vec<String>,
    /// `trusted_networks` (default 127.0.0.0/8, so plaintext logins work without TLS).
    pub trusted_networks: Vec<String>,
    /// How many of the pool's backends (the first ones) the configuration lists; `None`: all.
    /// The others are left for a test to add at run time (`state.upsert_backend`).
    pub configured_backends: Option<usize>,
    /// `backend_defaults.connect_timeout` (default `2s`).
    pub connect_timeout: String,
    /// `backend_defaults.login_timeout` (default `10s`).
    pub login_timeout: String,
}

impl DirectorOptions {
    /// The defaults with `yaml` added at the top level.
    pub fn with_extra(yaml: &str) -> DirectorOptions {
        DirectorOptions {
            extra: yaml.into(),
            ..DirectorOptions::default()
        }
    }

    /// The defaults with `yaml` added to every backend entry.
    pub fn with_backend_extra(yaml: &str) -> DirectorOptions {
        DirectorOptions {
            backend_extra: yaml.into(),
            ..DirectorOptions::default()
        }
    }

    /// The defaults with only the first `n` backends of the pool configured.
    pub fn with_configured_backends(n: usize) -> DirectorOptions {
        DirectorOptions {
            configured_backends: Some(n),
            ..DirectorOptions::default()
        }
    }
}

impl Default for DirectorOptions {
    fn default() -> Self {
        DirectorOptions {
            weights: Vec::new(),
            backend_extra: String::new(),
            extra: String::new(),
            proxy_protocol: false,
            proxy_trusted_networks: vec!["127.0.0.0/8".into()],
            trusted_networks: vec!["127.0.0.0/8".into()],
            configured_backends: None,
            connect_timeout: "2s".into(),
            login_timeout: "10s".into(),
        }
    }
}

/// The YAML configuration for a director over `pool`.
pub fn config_yaml(pool: &Pool, o: &DirectorOptions) -> String {
    let mut y = String::new();
    y += &format!("trusted_networks: [{}]\n", o.trusted_networks.join(", "));
    if o.proxy_protocol {
        y += &format!(
            "proxy_trusted_networks: [{}]\n",
            o.proxy_trusted_networks.join(", ")
        );
    }
    y += &format!(
        "tls:\n  cert: {}\n  key: {}\n",
        pool.tls.cert.display(),
        pool.tls.key.display()
    );
    y += &format!(
        "limits:\n  auth_failure_delay: 100ms\n  preauth_timeout: 20s\nbackend_defaults:\n  ports: {{imap: {IMAP_PORT}, pop3: {POP3_PORT}, lmtp: {LMTP_PORT}, sieve: {SIEVE_PORT}}}\n  tls_ca_file: {}\n  connect_timeout: {}\n  login_timeout: {}\n",
        pool.tls.ca.display(),
        o.connect_timeout,
        o.login_timeout
    );
    y += "listeners:\n";
    for (proto, tls) in [
        ("imap", "starttls"),
        ("imap", "implicit"),
        ("pop3", "starttls"),
        ("pop3", "implicit"),
        ("sieve", "starttls"),
    ] {
        y += &format!(
            "  - {{protocol: {proto}, address: 127.0.0.1:0, tls: {tls}, proxy_protocol: {}}}\n",
            o.proxy_protocol
        );
    }
    y += "backends:\n";
    let listed = o.configured_backends.unwrap_or(pool.backends.len());
    for (i, b) in pool.backends.iter().enumerate().take(listed) {
        let w = o.weights.get(i).copied().unwrap_or(100);
        y += &format!("  - host: {}\n    weight: {w}\n{}", b.ip, o.backend_extra);
    }
    y += &o.extra;
    // The tests written before the health checker expect no checker to act on the backends
    // they kill or pause; a test that wants one configures `health:` in `extra`.
    if !o.extra.contains("shutdown_grace:") {
        // Dropping a test director must not wait the default grace for sessions left open.
        y += "shutdown_grace: 1s\n";
    }
    if !o.extra.contains("health:") {
        y += "health:\n  enabled: false\n";
    }
    if !o.extra.contains("admin:") {
        // Every director under test gets its own admin socket (the default path is shared).
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        y += &format!(
            "admin:\n  socket: {}/admin-{n}.sock\n",
            pool.dir().display()
        );
    }
    y
}

/// A running director. Dropping it stops it (sessions still relayed end with the thread).
pub struct TestDirector {
    /// Plain IMAP listener (STARTTLS offered).
    pub imap: SocketAddr,
    /// IMAP with implicit TLS.
    pub imaps: SocketAddr,
    /// Plain POP3 listener (STLS offered).
    pub pop3: SocketAddr,
    /// POP3 with implicit TLS.
    pub pop3s: SocketAddr,
    /// ManageSieve (STARTTLS offered).
    pub sieve: SocketAddr,
    /// LMTP TCP listeners, in configuration order (none unless the YAML adds them).
    pub lmtp: Vec<SocketAddr>,
    pub state: Arc<LocalState>,
    pub sessions: Sessions,
    pub router: Router,
    /// The health checker, when the configuration enables it.
    pub health: Option<HealthChecker>,
    /// The metrics listener (`/metrics`, `/healthz`, `/readyz`), when `metrics.address` is set.
    pub metrics: Option<SocketAddr>,
    /// The configuration it runs with.
    pub yaml: String,
    /// Runs the director; dropping it stops it.
    _service: RuntimeThread,
}

impl TestDirector {
    /// Starts a director over `pool` with the default health settings and backend timeouts
    /// (what an operator gets without configuring them), `health_extra` added under `health:`
    /// (e.g. `  credentials_file: ...\n`), and waits until every backend has passed a check.
    pub fn start_with_default_health(pool: &Pool, health_extra: &str) -> TestDirector {
        let d = Self::start(
            pool,
            &DirectorOptions {
                connect_timeout: "5s".into(),
                login_timeout: "30s".into(),
                extra: format!("health:\n  enabled: true\n{health_extra}"),
                ..DirectorOptions::default()
            },
        );
        let checker = d.health.clone().expect("health checker");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !pool.backends.iter().all(|b| {
            checker
                .last_result(b.ip)
                .is_some_and(|r| r.code == director::health::probe::CheckCode::Ok)
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "first checks did not pass"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d
    }

    /// Starts a pool of `backends` and a director with the default options over it.
    pub fn with_pool(backends: usize) -> (Pool, TestDirector) {
        Self::start_with_pool(backends, &DirectorOptions::default())
    }

    /// Starts a pool of `backends` and a director with `options` over it.
    pub fn start_with_pool(backends: usize, options: &DirectorOptions) -> (Pool, TestDirector) {
        let pool = Pool::start(backends);
        let d = Self::start(&pool, options);
        (pool, d)
    }

    /// Starts a director over `pool` with `options`.
    pub fn start(pool: &Pool, options: &DirectorOptions) -> TestDirector {
        Self::start_yaml(&config_yaml(pool, options))
    }

    /// Starts a director from configuration text (listeners on port 0).
    pub fn start_yaml(yaml: &str) -> TestDirector {
        let config = Config::parse(yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"));
        let (service, (addrs, state, sessions, router, health, metrics)) =
            RuntimeThread::start("director", |tx, stop| async move {
                let d = Director::build(&config).await.expect("director builds");
                tx.send((
                    d.listen_addrs(),
                    d.state.clone(),
                    d.sessions.clone(),
                    d.router.clone(),
                    d.health.clone(),
                    d.metrics_addr(),
                ))
                .unwrap();
                d.run(async {
                    let _ = stop.await;
                })
                .await;
            });
        let find = |p: Protocol, t: ListenerTls| {
            addrs
                .iter()
                .find(|(pp, tt, _)| *pp == p && *tt == t)
                .map(|(_, _, a)| *a)
                .expect("listener")
        };
        TestDirector {
            imap: find(Protocol::Imap, ListenerTls::Starttls),
            imaps: find(Protocol::Imap, ListenerTls::Implicit),
            pop3: find(Protocol::Pop3, ListenerTls::Starttls),
            pop3s: find(Protocol::Pop3, ListenerTls::Implicit),
            sieve: find(Protocol::Sieve, ListenerTls::Starttls),
            lmtp: addrs
                .iter()
                .filter(|(p, _, _)| *p == Protocol::Lmtp)
                .map(|(_, _, a)| *a)
                .collect(),
            state,
            sessions,
            router,
            health,
            metrics,
            yaml: yaml.to_owned(),
            _service: service,
        }
    }

    /// A copy of the director's backend `template` at `ip` (and its host name), with its IMAP
    /// port changed to `imap_port` when given: a fake backend to add beside the real ones.
    pub fn backend_like(&self, template: IpAddr, ip: IpAddr, imap_port: Option<u16>) -> DirBackend {
        let template = self.state.backends().get(template).unwrap().clone();
        let mut settings = (*template.settings).clone();
        if imap_port.is_some() {
            settings.ports.imap = imap_port;
        }
        DirBackend {
            ip,
            host: ip.to_string().into(),
            settings: Arc::new(settings),
            ..template
        }
    }

    /// The live sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<SessionInfo> {
        self.sessions
            .list()
            .into_iter()
            .filter(|s| s.username == user)
            .collect()
    }

    /// The pool backend the router sends `user` to (its record, else the ring).
    pub fn home<'p>(&self, pool: &'p Pool, user: &str) -> &'p Backend {
        home(pool, &self.router, user)
    }
}

/// The pool backend `router` sends `user` to (its record, else the ring).
pub fn home<'p>(pool: &'p Pool, router: &Router, user: &str) -> &'p Backend {
    let ip = ready(router.route(user, "")).expect("a route").backend.ip;
    pool.by_ip(ip).expect("a pool backend")
}

/// The output of a future that does not wait (routing over the local state never does), from
/// a test thread or inside a runtime alike.
pub fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the local state waited"),
    }
}

/// `yaml` with `listener` (a flow mapping) added first under `listeners:`.
pub fn with_listener(yaml: &str, listener: &str) -> String {
    yaml.replacen("listeners:\n", &format!("listeners:\n  - {listener}\n"), 1)
}

/// `yaml` with `lines` added under `limits:`.
pub fn with_limits(yaml: &str, lines: &str) -> String {
    yaml.replacen("limits:\n", &format!("limits:\n{lines}"), 1)
}
