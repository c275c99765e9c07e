//! The configuration file: its structure, defaults and checks. Every error names the field
//! (`backends[2].weight: 1200 is above the maximum 1000`). `config.yaml.example` documents
//! every option with its default; keep the two in step.
//!
//! A leaf: plain settings that the runtime reads, never the reverse. What a setting turns into
//! is built where it is used (`LmtpSettings::from_config` in `protocol::lmtp`, the checker's
//! settings, check definitions and credentials in `health::checker`, TLS and sockets in
//! `server::prepare`), and the checks that need those files are made there, with errors
//! that name the field all the same, and the `username_hash` template is parsed by
//! `routing::user_hash` when a configuration is loaded (`server::prepare::load_config`).
//! Values the file names and nothing else defines live here: `Forward`, [`Protocol`]
//! (`protocol`), address networks (`network`). The `cluster` section (several directors
//! sharing their state in etcd) is in `cluster`. `config` imports nothing else of the crate.

pub mod auth;
pub mod cluster;
pub mod network;
pub mod protocol;
pub mod yaml;

pub use auth::{AuthConfig, AuthMode};
pub use cluster::{ClusterConfig, EtcdConfig};
pub use protocol::Protocol;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::network::Network;

/// The largest weight a backend may have (Dovecot's vhost count; 100 is the default).
pub const MAX_WEIGHT: u32 = 1000;

/// A configuration that cannot be used. The text names the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// The same error, said of the file at `path`.
    pub fn in_file(self, path: &Path) -> ConfigError {
        ConfigError(format!("{}: {}", path.display(), self.0))
    }
}

fn err(field: impl fmt::Display, message: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{field}: {message}"))
}

/// A duration written as `15m`, `2s`, `1h 30m` (humantime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!("{s:?} is not a duration like 30s or 15m: {e}"))
            })
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

/// Reads a field of type `Duration` written like a [`HumanDuration`]
/// (`#[serde(deserialize_with = "duration")]`).
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    HumanDuration::deserialize(d).map(Duration::from)
}

/// [`duration`] for an `Option<Duration>` field (with `#[serde(default)]`).
fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<HumanDuration>::deserialize(d).map(|o| o.map(Duration::from))
}

fn secs(n: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(n))
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What is hashed to place a user on the ring (Dovecot's `director_username_hash`).
    #[serde(default = "default_username_hash")]
    pub username_hash: String,
    /// How long a user's sticky record outlives the user's last session.
    #[serde(default = "default_user_expire")]
    pub user_expire: HumanDuration,
    /// Refuse plaintext logins on connections that are neither TLS nor trusted.
    #[serde(default = "yes")]
    pub disable_plaintext_auth: bool,
    /// Clients in these networks may log in in plaintext (Dovecot's `login_trusted_networks`).
    #[serde(default)]
    pub trusted_networks: Vec<Network>,
    /// Peers allowed to send a PROXY header on `proxy_protocol` listeners (Dovecot's
    /// `haproxy_trusted_networks`): the load balancers. Others are closed before a byte is
    /// read, so nobody else can claim a client address. Required when a listener has
    /// `proxy_protocol: true`.
    #[serde(default)]
    pub proxy_trusted_networks: Vec<Network>,
    /// Text of the greeting after `* OK` / `+OK`.
    #[serde(default = "default_greeting")]
    pub greeting: String,
    /// Certificate and key for TLS listeners and STARTTLS.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// Settings every backend has unless it overrides them.
    #[serde(default)]
    pub backend_defaults: BackendDefaults,
    pub backends: Vec<BackendConfig>,
    /// Where admin state (backends added or removed, weights, up/down, maintenance, pauses)
    /// is kept across restarts, written atomically. `None`: not kept. Not with `cluster`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Several directors acting as one, their state shared in etcd. `None`: this director is
    /// single, its state its own.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// The LMTP service.
    #[serde(default)]
    pub lmtp: LmtpConfig,
    /// The admin API the `director` CLI talks to.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The built-in health checker.
    #[serde(default)]
    pub health: HealthConfig,
    /// The Prometheus metrics listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How log lines are written: `text` (key=value) or `json` (one object a line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Dovecot's `auth_master_user_separator`: with `*`, a login `user*master` (a master user
    /// acting for `user`) is routed and kept with `user`'s own sessions. "": none.
    #[serde(default)]
    pub auth_master_user_separator: String,
    /// Who checks credentials: `passthrough` (the backend) or a Dovecot auth service; a
    /// listener may have its own.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Which log lines are written (`info`, `debug`, or a filter like
    /// `info,director::health::probe=debug`); `RUST_LOG`, when set, wins. Changed by a reload.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// At SIGTERM: how long relayed sessions and LMTP transactions may go on before they are
    /// closed (IMAP `* BYE`...), so that short commands and deliveries finish.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
}

fn default_log_level() -> String {
    "info".into()
}
fn default_shutdown_grace() -> HumanDuration {
    secs(5)
}

/// The format of log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    #[default]
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// The metrics listener: Prometheus text exposition at `/metrics`, liveness at `/healthz`,
/// readiness at `/readyz`. Served without a token: bind it to a management address.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where it listens (e.g. `127.0.0.1:9155`); none: no metrics listener.
    pub address: Option<SocketAddr>,
}

/// Which part of a recipient address routing hashes as the username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecipientUsernameName {
    WholeAddress,
    LocalPart,
}

/// The LMTP service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpConfig {
    /// Our name in the greeting and LHLO; default: the system's host name.
    pub hostname: Option<String>,
    /// `whole_address` or `local_part` (use `local_part` when IMAP logins are bare names and
    /// `username_hash` keeps the domain, so deliveries land where the user logs in).
    pub recipient_username: RecipientUsernameName,
    /// Separator of the `+detail` part removed before routing; "" keeps the local part whole.
    pub recipient_delimiter: String,
    /// Largest message accepted, in bytes; none: no limit.
    pub max_message_size: Option<u64>,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// How long the client may stay silent, between commands and inside DATA.
    pub client_timeout: HumanDuration,
    /// How long a backend may take to answer after the message's final dot.
    pub backend_data_timeout: HumanDuration,
}

impl Default for LmtpConfig {
    fn default() -> Self {
        LmtpConfig {
            hostname: None,
            recipient_username: RecipientUsernameName::WholeAddress,
            recipient_delimiter: "+".into(),
            max_message_size: None,
            max_recipients: 500,
            client_timeout: secs(300),
            backend_data_timeout: secs(600),
        }
    }
}

/// The admin API: a unix socket by default, optionally TCP with a bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Unix socket path (owner-only). The CLI finds the running director through it.
    pub socket: PathBuf,
    /// Optional TCP listener; requires `token_file` and `allow_from`.
    pub tcp: Option<AdminTcpConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: PathBuf::from("/run/director/admin.sock"),
            tcp: None,
        }
    }
}

/// The admin API over TCP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTcpConfig {
    pub address: SocketAddr,
    /// File holding the bearer token (must not be readable by group or others).
    pub token_file: PathBuf,
    /// Networks allowed to connect; others are refused and logged.
    pub allow_from: Vec<Network>,
}

/// The health checker (replaces poolmon).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Run checks at all.
    pub enabled: bool,
    /// Time between checks of a healthy backend.
    pub interval: HumanDuration,
    /// Time between checks after a failure, until the backend is up or down for sure.
    pub fast_interval: HumanDuration,
    /// Consecutive passes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that bring an up backend down.
    pub fall: u32,
    /// Which checks run on every backend unless it says otherwise (names of built-in checks
    /// `imap`, `pop3`, `lmtp`, `sieve`, or of files in `checks_dir`).
    pub checks: Vec<String>,
    /// Extra check definitions (`*.yaml`); a file named like a built-in replaces it.
    pub checks_dir: Option<PathBuf>,
    /// Credentials for checks that log in (`user: ...`, `password: ...`, optionally per
    /// backend); must not be readable by group or others.
    pub credentials_file: Option<PathBuf>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            interval: secs(2),
            fast_interval: HumanDuration(Duration::from_millis(500)),
            rise: 2,
            fall: 2,
            checks: vec!["imap".into()],
            checks_dir: None,
            credentials_file: None,
        }
    }
}

impl HealthConfig {
    /// Checks the section's own values. The check names, `checks_dir` and `credentials_file`
    /// are checked where they are read (`health::checker::HealthChecker::parts_of`).
    fn validate(&self) -> Result<(), ConfigError> {
        if self.rise == 0 {
            return Err(err("health.rise", "must be at least 1"));
        }
        if self.fall == 0 {
            return Err(err("health.fall", "must be at least 1"));
        }
        if self.interval.0.is_zero() {
            return Err(err("health.interval", "must be longer than 0s"));
        }
        if self.fast_interval.0.is_zero() {
            return Err(err("health.fast_interval", "must be longer than 0s"));
        }
        if self.enabled && self.checks.is_empty() {
            return Err(err(
                "health.checks",
                "at least one check is needed (or enabled: false)",
            ));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}
fn default_username_hash() -> String {
    "%Lu".into()
}
fn default_user_expire() -> HumanDuration {
    secs(15 * 60)
}
fn default_greeting() -> String {
    "Director ready.".into()
}

/// PEM files for the director's own TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTls {
    /// Plaintext only.
    None,
    /// Plaintext with STARTTLS/STLS offered (needs `tls`).
    Starttls,
    /// TLS from the first byte (ports 993/995; needs `tls`).
    Implicit,
}

/// One listening socket: TCP (`address`) or, for LMTP, a unix socket (`socket`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: ProtocolName,
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// A unix socket path (LMTP only): a local MTA delivers here, and mail still goes to the
    /// backends' LMTP TCP port.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// LMTP over TCP: the networks allowed to connect (others get `554` and a log line).
    /// Empty: anyone who can reach the port.
    #[serde(default)]
    pub allow_from: Vec<Network>,
    /// Default: `starttls` when `tls` is configured, else `none`.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Expect a PROXY protocol (v1 or v2) header on every connection, from peers in
    /// `proxy_trusted_networks` only.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Connections this listener serves at once; default `limits.max_connections`. Each
    /// listener has its own pool, so a flood on one cannot starve another.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Who checks the credentials of this listener's clients; default: the top-level `auth`.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

/// A protocol name in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolName {
    Imap,
    Pop3,
    Lmtp,
    Sieve,
}

impl From<ProtocolName> for Protocol {
    fn from(p: ProtocolName) -> Protocol {
        match p {
            ProtocolName::Imap => Protocol::Imap,
            ProtocolName::Pop3 => Protocol::Pop3,
            ProtocolName::Lmtp => Protocol::Lmtp,
            ProtocolName::Sieve => Protocol::Sieve,
        }
    }
}

/// Limits that protect the director.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub preauth_timeout: HumanDuration,
    pub max_line_length: usize,
    pub max_literal_size: usize,
    pub max_auth_failures: u32,
    pub auth_failure_delay: HumanDuration,
    pub max_bad_commands: u32,
    /// Connections served at once by each listener (its own pool), unless the listener sets
    /// its own `max_connections`. When a pool is full, its oldest connection that has not
    /// logged in yet is dropped to make room.
    pub max_connections: usize,
    /// Connections not yet logged in (and LMTP connections) from one client address (IPv6:
    /// one /64) at once, all listeners together: one host cannot fill the pools.
    pub max_preauth_per_ip: usize,
    /// After one side of a relayed session closes, how long the other may still send.
    pub close_linger: HumanDuration,
    /// The listen backlog of every TCP listener (connections the kernel completes before the
    /// director accepts them); `None`: the system's `net.core.somaxconn`, which also caps it.
    pub listen_backlog: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            preauth_timeout: secs(60),
            max_line_length: 8192,
            max_literal_size: 8192,
            max_auth_failures: 3,
            auth_failure_delay: secs(2),
            max_bad_commands: 10,
            max_connections: 10_000,
            max_preauth_per_ip: 100,
            close_linger: secs(10),
            listen_backlog: None,
        }
    }
}

/// Ports of a backend, per protocol.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub imap: Option<u16>,
    pub pop3: Option<u16>,
    pub lmtp: Option<u16>,
    pub sieve: Option<u16>,
}

impl Ports {
    fn get(&self, p: Protocol) -> Option<u16> {
        match p {
            Protocol::Imap => self.imap,
            Protocol::Pop3 => self.pop3,
            Protocol::Lmtp => self.lmtp,
            Protocol::Sieve => self.sieve,
        }
    }
}

/// TLS from the director to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendTls {
    None,
    Starttls,
    Implicit,
}

/// How a backend learns the real client address (`forward`). Defined here, with the other
/// values the file names, and used as it is by the backend logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forward {
    /// IMAP `ID` (x-originating-ip ...) or POP3/LMTP `XCLIENT`, when the backend advertises it.
    Auto,
    /// A PROXY protocol v2 header, written by `login` before the protocol starts (the
    /// backend's listener needs `haproxy = yes`).
    ProxyV2,
    /// Nothing: the backend sees the director's address.
    None,
}

/// Backend settings that `backend_defaults` sets for all and a backend may override.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendDefaults {
    pub ports: Ports,
    pub tls: BackendTls,
    /// CA certificates that backend certificates are verified against.
    pub tls_ca_file: Option<PathBuf>,
    /// `false` accepts any backend certificate (private network, self-signed).
    pub tls_verify: bool,
    pub forward: Forward,
    pub connect_timeout: HumanDuration,
    /// Time a backend has, once connected, to greet (and to finish TLS, `CAPABILITY` and
    /// `STARTTLS`) before the user's credentials are sent. A backend that misses it has seen
    /// nothing of the user, so the login goes on to the next backend; keep it short.
    pub greeting_timeout: HumanDuration,
    /// Time a backend has to answer the user's credentials.
    pub login_timeout: HumanDuration,
    /// Logins under way to one backend at once (connect to its answer to the credentials);
    /// more wait for their turn, up to `login_timeout`. A reconnect storm then reaches a
    /// backend at the pace it logs users in instead of overrunning its login processes.
    pub max_logins_in_flight: u32,
}

impl Default for BackendDefaults {
    fn default() -> Self {
        BackendDefaults {
            ports: Ports::default(),
            tls: BackendTls::None,
            tls_ca_file: None,
            tls_verify: true,
            forward: Forward::Auto,
            connect_timeout: secs(5),
            greeting_timeout: secs(2),
            login_timeout: secs(30),
            max_logins_in_flight: 40,
        }
    }
}

/// One backend entry. `host` may be a DNS name: each address it resolves to is a backend.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub ports: Ports,
    pub tls: Option<BackendTls>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_verify: Option<bool>,
    /// Name the backend certificate must carry; default: `host`.
    pub tls_server_name: Option<String>,
    pub forward: Option<Forward>,
    /// Checks for this backend instead of `health.checks`.
    #[serde(default)]
    pub checks: Option<Vec<String>>,
}

fn default_weight() -> u32 {
    100
}

/// A backend's settings after `backend_defaults` were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSettings {
    pub ports: Ports,
    pub tls: BackendTls,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_verify: bool,
    pub tls_server_name: String,
    pub forward: Forward,
    pub connect_timeout: Duration,
    pub greeting_timeout: Duration,
    pub login_timeout: Duration,
    pub max_logins_in_flight: u32,
}

impl BackendSettings {
    /// The backend's port for `protocol`.
    pub fn port(&self, protocol: Protocol) -> u16 {
        self.ports
            .get(protocol)
            .unwrap_or(protocol.default_backend_port())
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            crate::config::yaml::from_str(text).map_err(|e| err(e.path, e.message))?;
        config.validate()?;
        Ok(config)
    }

    /// The settings of `backends[index]` with defaults applied.
    pub fn backend_settings(&self, index: usize) -> BackendSettings {
        self.settings_of(&self.backends[index])
    }

    /// The settings of a backend named `host` that an admin added at run time (or a state
    /// file restored): those of the configured backend with that host name if there is one,
    /// else `backend_defaults`.
    pub fn settings_for_host(&self, host: &str) -> BackendSettings {
        match self
            .backends
            .iter()
            .position(|b| b.host.eq_ignore_ascii_case(host))
        {
            Some(i) => self.backend_settings(i),
            None => self.settings_of(&BackendConfig {
                host: host.to_owned(),
                weight: default_weight(),
                ..BackendConfig::default()
            }),
        }
    }

    fn settings_of(&self, b: &BackendConfig) -> BackendSettings {
        let d = &self.backend_defaults;
        let ports = Ports {
            imap: b.ports.imap.or(d.ports.imap),
            pop3: b.ports.pop3.or(d.ports.pop3),
            lmtp: b.ports.lmtp.or(d.ports.lmtp),
            sieve: b.ports.sieve.or(d.ports.sieve),
        };
        BackendSettings {
            ports,
            tls: b.tls.unwrap_or(d.tls),
            tls_ca_file: b.tls_ca_file.clone().or_else(|| d.tls_ca_file.clone()),
            tls_verify: b.tls_verify.unwrap_or(d.tls_verify),
            tls_server_name: b.tls_server_name.clone().unwrap_or_else(|| b.host.clone()),
            forward: b.forward.unwrap_or(d.forward),
            connect_timeout: d.connect_timeout.into(),
            greeting_timeout: d.greeting_timeout.into(),
            login_timeout: d.login_timeout.into(),
            max_logins_in_flight: d.max_logins_in_flight,
        }
    }

    /// The TLS mode of `listeners[index]` with its default applied.
    pub fn listener_tls(&self, index: usize) -> ListenerTls {
        let l = &self.listeners[index];
        if l.protocol == ProtocolName::Lmtp {
            return ListenerTls::None;
        }
        l.tls.unwrap_or(if self.tls.is_some() {
            ListenerTls::Starttls
        } else {
            ListenerTls::None
        })
    }

    /// Who checks the credentials of `listeners[index]`'s clients, and the field that says so.
    pub fn listener_auth(&self, index: usize) -> (&AuthConfig, String) {
        match &self.listeners[index].auth {
            Some(own) => (own, format!("listeners[{index}].auth")),
            None => (&self.auth, "auth".into()),
        }
    }

    /// How often sticky records are refreshed in etcd
    /// ([`ClusterConfig::record_refresh_for`]); `None` for a single director.
    pub fn record_refresh(&self) -> Option<Duration> {
        self.cluster
            .as_ref()
            .map(|c| c.record_refresh_for(self.user_expire.into()))
    }

    /// What other directors show as this one's address: `cluster.advertise`, else the first
    /// TCP listener's address; `None` for a single director (or one with unix sockets only).
    pub fn cluster_advertise(&self) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        cluster.advertise.clone().or_else(|| {
            self.listeners
                .iter()
                .find_map(|l| l.address)
                .map(|a| a.to_string())
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.user_expire.0.is_zero() {
            return Err(err("user_expire", "must be longer than 0s"));
        }
        if let Some(cluster) = &self.cluster {
            if self.state_file.is_some() {
                return Err(err(
                    "state_file",
                    "not used with cluster: etcd holds the state; remove it",
                ));
            }
            cluster.validate(self.user_expire.into())?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            err(
                "log_level",
                format_args!(
                    "{:?} is not a level or filter like info or debug: {e}",
                    self.log_level
                ),
            )
        })?;
        self.auth.validate("auth")?;
        if self.listeners.is_empty() {
            return Err(err("listeners", "at least one listener is needed"));
        }
        let mut addresses = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            match (&l.address, &l.socket) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(err(
                        format_args!("listeners[{i}]"),
                        "give either `address` (TCP) or `socket` (unix), not both or neither",
                    ));
                }
                (None, Some(_)) if l.protocol != ProtocolName::Lmtp => {
                    return Err(err(
                        format_args!("listeners[{i}].socket"),
                        "unix sockets are for LMTP listeners only",
                    ));
                }
                _ => {}
            }
            if !l.allow_from.is_empty() && (l.protocol != ProtocolName::Lmtp || l.socket.is_some())
            {
                return Err(err(
                    format_args!("listeners[{i}].allow_from"),
                    "is for LMTP TCP listeners only",
                ));
            }
            if let Some(address) = l.address {
                if address.port() != 0 && !addresses.insert(address) {
                    return Err(err(
                        format_args!("listeners[{i}].address"),
                        format_args!("{address} is used by another listener"),
                    ));
                }
            }
            if l.protocol == ProtocolName::Lmtp && l.tls.is_some_and(|t| t != ListenerTls::None) {
                return Err(err(
                    format_args!("listeners[{i}].tls"),
                    "LMTP listeners do not offer TLS yet",
                ));
            }
            if l.max_connections == Some(0) {
                return Err(err(
                    format_args!("listeners[{i}].max_connections"),
                    "must be at least 1",
                ));
            }
            if l.proxy_protocol && l.socket.is_some() {
                return Err(err(
                    format_args!("listeners[{i}].proxy_protocol"),
                    "is for TCP listeners only",
                ));
            }
            if l.proxy_protocol && self.proxy_trusted_networks.is_empty() {
                return Err(err(
                    "proxy_trusted_networks",
                    format_args!("listeners[{i}] has proxy_protocol: true, so the load balancers allowed to send PROXY headers must be listed here (anyone else could claim any client address)"),
                ));
            }
            if let Some(own) = &l.auth {
                own.validate(&format!("listeners[{i}].auth"))?;
            }
            let (auth, field) = self.listener_auth(i);
            auth.validate_for(&field, l.protocol == ProtocolName::Lmtp)?;
            if self.listener_tls(i) != ListenerTls::None && self.tls.is_none() {
                return Err(err(
                    format_args!("listeners[{i}].tls"),
                    "needs the top-level `tls` (cert and key files)",
                ));
            }
        }
        let l = &self.limits;
        let positive = [
            ("limits.preauth_timeout", l.preauth_timeout.0.is_zero()),
            ("limits.max_line_length", l.max_line_length < 512),
            ("limits.max_literal_size", l.max_literal_size < 512),
            ("limits.max_auth_failures", l.max_auth_failures == 0),
            ("limits.max_bad_commands", l.max_bad_commands == 0),
            ("limits.max_connections", l.max_connections == 0),
            ("limits.max_preauth_per_ip", l.max_preauth_per_ip == 0),
            ("limits.listen_backlog", l.listen_backlog == Some(0)),
        ];
        for (field, bad) in positive {
            if bad {
                return Err(err(
                    field,
                    "is too small (durations must be > 0, lengths >= 512, counts >= 1)",
                ));
            }
        }
        if self.backend_defaults.connect_timeout.0.is_zero() {
            return Err(err(
                "backend_defaults.connect_timeout",
                "must be longer than 0s",
            ));
        }
        if self.backend_defaults.max_logins_in_flight == 0 {
            return Err(err(
                "backend_defaults.max_logins_in_flight",
                "must be at least 1",
            ));
        }
        if self.backend_defaults.greeting_timeout.0.is_zero() {
            return Err(err(
                "backend_defaults.greeting_timeout",
                "must be longer than 0s",
            ));
        }
        if self.backend_defaults.login_timeout.0.is_zero() {
            return Err(err(
                "backend_defaults.login_timeout",
                "must be longer than 0s",
            ));
        }
        if self.lmtp.recipient_delimiter.chars().count() > 1 {
            return Err(err(
                "lmtp.recipient_delimiter",
                "must be one character, or \"\" for none",
            ));
        }
        if self.auth_master_user_separator.chars().count() > 1 {
            return Err(err(
                "auth_master_user_separator",
                "must be one character (e.g. \"*\"), or \"\" for none",
            ));
        }
        if self.lmtp.max_recipients == 0 {
            return Err(err("lmtp.max_recipients", "must be at least 1"));
        }
        if self.backends.is_empty() {
            return Err(err("backends", "at least one backend is needed"));
        }
        self.health.validate()?;
        if let Some(m) = self.metrics.address.filter(|a| a.port() != 0) {
            let clash =
                addresses.contains(&m) || self.admin.tcp.as_ref().is_some_and(|t| t.address == m);
            if clash {
                return Err(err(
                    "metrics.address",
                    format_args!("{m} is used by a listener or the admin API: give the metrics their own port"),
                ));
            }
        }
        let mut hosts = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            if b.host.trim().is_empty() {
                return Err(err(format_args!("backends[{i}].host"), "is empty"));
            }
            if !hosts.insert(b.host.to_ascii_lowercase()) {
                return Err(err(
                    format_args!("backends[{i}].host"),
                    format_args!("{} is listed twice", b.host),
                ));
            }
            if b.weight > MAX_WEIGHT {
                return Err(err(
                    format_args!("backends[{i}].weight"),
                    format_args!("{} is above the maximum {MAX_WEIGHT}", b.weight),
                ));
            }
            let s = self.backend_settings(i);
            for p in [s.ports.imap, s.ports.pop3, s.ports.lmtp, s.ports.sieve] {
                if p == Some(0) {
                    return Err(err(
                        format_args!("backends[{i}].ports"),
                        "port 0 is not a port",
                    ));
                }
            }
            if s.tls != BackendTls::None && s.tls_verify && s.tls_ca_file.is_none() {
                return Err(err(
                    format_args!("backends[{i}].tls_ca_file"),
                    "TLS to the backend is verified but no CA file is set (set tls_ca_file, or tls_verify: false)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners:\n  - protocol: imap\n    address: 127.0.0.1:1143\nbackends:\n  - host: 10.0.0.1\n";

    #[test]
    fn master_user_separator_is_one_character() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.auth_master_user_separator, "", "off by default");
        let c = Config::parse(&format!("{MINIMAL}auth_master_user_separator: \"*\"\n")).unwrap();
        assert_eq!(c.auth_master_user_separator, "*");
        let e = error_of(&format!("{MINIMAL}auth_master_user_separator: \"**\"\n"));
        assert!(
            e.starts_with("auth_master_user_separator: must be one character"),
            "{e}"
        );
    }

    #[test]
    fn auth_is_checked_where_it_is_set_and_where_it_is_used() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.auth.mode, AuthMode::Passthrough);
        assert_eq!(c.listener_auth(0).0.mode, AuthMode::Passthrough);
        let dovecot =
            format!("{MINIMAL}auth: {{mode: dovecot, socket: /run/dovecot/director-login}}\n");
        let c = Config::parse(&dovecot).unwrap();
        assert_eq!(
            c.listener_auth(0).0.socket.as_deref(),
            Some("/run/dovecot/director-login")
        );
        let e = error_of(&format!("{MINIMAL}auth: {{mode: dovecot}}\n"));
        assert!(
            e.starts_with("auth.socket: is needed in dovecot mode"),
            "{e}"
        );
        let e = error_of(&format!("{MINIMAL}auth: {{socket: /x}}\n"));
        assert!(e.starts_with("auth.mode: is passthrough"), "{e}");
        let e = error_of(&format!("{MINIMAL}auth: {{mode: ldap}}\n"));
        assert!(e.starts_with("auth.mode: unknown variant `ldap`"), "{e}");
        let e = error_of(&format!(
            "{MINIMAL}auth: {{mode: dovecot, socket: x, request_timeout: 0s}}\n"
        ));
        assert_eq!(e, "auth.request_timeout: must be longer than 0s");
        // A listener of its own: passthrough beside a global dovecot, and the reverse.
        let own = MINIMAL.replace(
            "address: 127.0.0.1:1143",
            "address: 127.0.0.1:1143\n    auth: {mode: passthrough}",
        );
        let c = Config::parse(&format!("{own}auth: {{mode: dovecot, socket: s}}\n")).unwrap();
        assert_eq!(
            c.listener_auth(0),
            (&AuthConfig::default(), "listeners[0].auth".into())
        );
        let e = error_of(&MINIMAL.replace(
            "address: 127.0.0.1:1143",
            "address: 127.0.0.1:1143\n    auth: {mode: dovecot}",
        ));
        assert!(e.starts_with("listeners[0].auth.socket: is needed"), "{e}");
        // LMTP in dovecot mode looks recipients up over the auth-master socket.
        let lmtp = format!("{MINIMAL}auth: {{mode: dovecot, socket: s}}\n").replace(
            "listeners:\n",
            "listeners:\n  - protocol: lmtp\n    address: 127.0.0.1:24\n",
        );
        let e = error_of(&lmtp);
        assert!(
            e.starts_with("auth.master_socket: is needed by an LMTP listener"),
            "{e}"
        );
        let c = Config::parse(&lmtp.replace("socket: s}", "socket: s, master_socket: m}")).unwrap();
        assert_eq!(c.listener_auth(0).0.master_socket.as_deref(), Some("m"));
    }

    #[test]
    fn metrics_listener_and_log_format() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.metrics.address, None, "no metrics listener by default");
        assert_eq!(c.log_format, LogFormat::Text);
        let c = Config::parse(&format!(
            "{MINIMAL}metrics:\n  address: 127.0.0.1:9155\nlog_format: json\n"
        ))
        .unwrap();
        assert_eq!(c.metrics.address, Some("127.0.0.1:9155".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        let e = error_of(&format!("{MINIMAL}metrics:\n  address: 127.0.0.1:1143\n"));
        assert!(
            e.starts_with("metrics.address: 127.0.0.1:1143 is used by"),
            "{e}"
        );
        let e = error_of(&format!("{MINIMAL}log_format: xml\n"));
        assert!(e.starts_with("log_format: unknown variant `xml`"), "{e}");
        assert_eq!(c.log_level, "info");
        assert_eq!(c.shutdown_grace.0, Duration::from_secs(5));
        let c =
            Config::parse(&format!("{MINIMAL}log_level: debug\nshutdown_grace: 30s\n")).unwrap();
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.shutdown_grace.0, Duration::from_secs(30));
        let e = error_of(&format!("{MINIMAL}log_level: \"director=loud\"\n"));
        assert!(e.starts_with("log_level: "), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.username_hash, "%Lu");
        assert_eq!(c.user_expire.0, Duration::from_secs(900));
        assert_eq!(c.backends[0].weight, 100);
        assert_eq!(c.backend_settings(0).port(Protocol::Imap), 143);
        assert_eq!(c.backend_settings(0).port(Protocol::Pop3), 110);
        assert_eq!(c.listener_tls(0), ListenerTls::None);
        assert!(c.disable_plaintext_auth);
        assert_eq!(c.auth_master_user_separator, "");
    }

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().0
    }

    #[test]
    fn errors_name_the_field() {
        let e = error_of(&MINIMAL.replace("host: 10.0.0.1", "host: 10.0.0.1\n    weight: 1200"));
        assert_eq!(e, "backends[0].weight: 1200 is above the maximum 1000");
        let e = error_of(&format!("{MINIMAL}bogus: 1\n"));
        assert!(e.starts_with("bogus: unknown field `bogus`"), "{e}");
        let e = error_of(&MINIMAL.replace("host: 10.0.0.1", "host: 10.0.0.1\n    wieght: 5"));
        assert!(
            e.starts_with("backends[0].wieght: unknown field `wieght`"),
            "{e}"
        );
        let e = error_of(&format!("{MINIMAL}user_expire: soon\n"));
        assert!(
            e.starts_with("user_expire: \"soon\" is not a duration"),
            "{e}"
        );
        let e = error_of(&MINIMAL.replace("protocol: imap", "protocol: imap\n    tls: implicit"));
        assert!(e.starts_with("listeners[0].tls: needs"), "{e}");
        let e = error_of(&MINIMAL.replace("protocol: imap", "protocol: smtp"));
        assert!(
            e.starts_with("listeners[0].protocol: unknown variant `smtp`"),
            "{e}"
        );
        let e = error_of(&format!("{MINIMAL}trusted_networks: [10.0.0.0/40]\n"));
        assert!(e.starts_with("trusted_networks[0]: "), "{e}");
    }

    #[test]
    fn proxy_protocol_needs_trusted_peers_and_limits_are_checked() {
        let proxy = MINIMAL.replace(
            "address: 127.0.0.1:1143",
            "address: 127.0.0.1:1143\n    proxy_protocol: true",
        );
        let e = error_of(&proxy);
        assert!(
            e.starts_with("proxy_trusted_networks: listeners[0] has proxy_protocol: true"),
            "{e}"
        );
        let c = Config::parse(&format!("{proxy}proxy_trusted_networks: [10.0.0.5]\n")).unwrap();
        assert_eq!(c.proxy_trusted_networks.len(), 1);
        let e = error_of(&format!("{MINIMAL}limits: {{max_preauth_per_ip: 0}}\n"));
        assert!(
            e.starts_with("limits.max_preauth_per_ip: is too small"),
            "{e}"
        );
        let e = error_of(&MINIMAL.replace(
            "address: 127.0.0.1:1143",
            "address: 127.0.0.1:1143\n    max_connections: 0",
        ));
        assert_eq!(e, "listeners[0].max_connections: must be at least 1");
        let c = Config::parse(&MINIMAL.replace(
            "address: 127.0.0.1:1143",
            "address: 127.0.0.1:1143\n    max_connections: 50",
        ))
        .unwrap();
        assert_eq!(c.listeners[0].max_connections, Some(50));
        assert_eq!(c.limits.max_preauth_per_ip, 100);
        assert_eq!(c.limits.listen_backlog, None);
        let e = error_of(&format!("{MINIMAL}limits: {{listen_backlog: 0}}\n"));
        assert!(e.starts_with("limits.listen_backlog: is too small"), "{e}");
    }

    #[test]
    fn health_errors_name_the_field() {
        let e = error_of(&format!("{MINIMAL}health: {{rise: 0}}\n"));
        assert_eq!(e, "health.rise: must be at least 1");
        let e = error_of(&format!("{MINIMAL}health: {{fall: 0}}\n"));
        assert_eq!(e, "health.fall: must be at least 1");
        let e = error_of(&format!("{MINIMAL}health: {{interval: 0s}}\n"));
        assert_eq!(e, "health.interval: must be longer than 0s");
        let e = error_of(&format!("{MINIMAL}health: {{fast_interval: 0s}}\n"));
        assert_eq!(e, "health.fast_interval: must be longer than 0s");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example parses, and its defaults are the code's defaults.
    #[test]
    fn example_matches_defaults() {
        let text = include_str!("../../config.yaml.example");
        let c = Config::parse(text).unwrap();
        let l = Limits::default();
        assert_eq!(c.limits.preauth_timeout, l.preauth_timeout);
        assert_eq!(c.limits.max_line_length, l.max_line_length);
        assert_eq!(c.limits.max_literal_size, l.max_literal_size);
        assert_eq!(c.limits.max_auth_failures, l.max_auth_failures);
        assert_eq!(c.limits.auth_failure_delay, l.auth_failure_delay);
        assert_eq!(c.limits.max_bad_commands, l.max_bad_commands);
        assert_eq!(c.limits.max_connections, l.max_connections);
        assert_eq!(c.limits.max_preauth_per_ip, l.max_preauth_per_ip);
        assert!(c.proxy_trusted_networks.is_empty());
        assert!(c.listeners.iter().all(|l| l.max_connections.is_none()));
        assert_eq!(c.limits.close_linger, l.close_linger);
        let d = BackendDefaults::default();
        assert_eq!(c.backend_defaults.tls, d.tls);
        assert_eq!(c.backend_defaults.tls_verify, d.tls_verify);
        assert_eq!(c.backend_defaults.forward, d.forward);
        assert_eq!(c.backend_defaults.connect_timeout, d.connect_timeout);
        assert_eq!(c.backend_defaults.greeting_timeout, d.greeting_timeout);
        assert_eq!(c.backend_defaults.login_timeout, d.login_timeout);
        assert_eq!(c.username_hash, default_username_hash());
        assert_eq!(c.user_expire, default_user_expire());
        assert_eq!(c.greeting, default_greeting());
        assert!(c.disable_plaintext_auth);
        assert_eq!(c.log_level, default_log_level());
        assert_eq!(c.shutdown_grace, default_shutdown_grace());
        assert_eq!(c.auth, AuthConfig::default());
        let (e, d) = (&c.lmtp, LmtpConfig::default());
        assert_eq!(e.recipient_username, d.recipient_username);
        assert_eq!(e.recipient_delimiter, d.recipient_delimiter);
        assert_eq!(e.max_recipients, d.max_recipients);
        assert_eq!(e.client_timeout, d.client_timeout);
        assert_eq!(e.backend_data_timeout, d.backend_data_timeout);
        for p in [
            Protocol::Imap,
            Protocol::Pop3,
            Protocol::Lmtp,
            Protocol::Sieve,
        ] {
            assert_eq!(c.backend_settings(0).port(p), p.default_backend_port());
        }
    }
}
