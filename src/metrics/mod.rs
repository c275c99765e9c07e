//! The one catalogue of the director's Prometheus metrics: every metric's name, help and
//! labels in [`CATALOGUE`], registered on the director's own [`Registry`] by [`Metrics`].
//! Dashboards and alert rules are checked against this list.
//!
//! Conventions: `director_` prefix, base units (`_seconds`, `_bytes`), `_total` on counters,
//! `_info` for build information. Labels never carry usernames or client addresses: a
//! backend is its IP (`backend`) and `tag`.
//!
//! Events (logins, connections, checks, moves) are counted where they happen. Gauges that
//! mirror state (backend health, admin state, weight, records, live sessions, pause) are
//! computed at scrape time from the state and the session registry (`crate::server::scrape`),
//! so they are always right and need no updates scattered through the code. The cluster
//! gauges (`director_cluster_*`: mode, lease, fencing, members, checker, moves awaiting acks,
//! watch lag) are set by the etcd state when they change: only it knows them, and a scrape
//! must not wait on etcd. A director without a `cluster` section leaves them at 0.
//!
//! This file knows no runtime type: label values come from the callers (a reason's or a
//! result's name, a backend as a [`BackendLabel`]), so every part can count here without
//! the catalogue depending on it. The one type it names is [`Protocol`], a plain value of the
//! configuration that imports nothing. The label values it starts at 0 are listed here
//! ([`MOVE_REASONS`], [`REFUSAL_REASONS`], [`ETCD_OPS`]); the enums that name them have tests
//! that keep the lists in step.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::Protocol;

/// What kind of metric a catalogue entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The name Prometheus' text format uses (`# TYPE`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

/// Declares each metric as a constant (its help text as its documentation) and lists them all,
/// in the order given, in [`CATALOGUE`].
macro_rules! catalogue {
    ($($constant:ident: $kind:ident $name:literal $labels:tt $help:literal;)+) => {
        $(
            #[doc = $help]
            pub const $constant: MetricDef = MetricDef {
                name: $name,
                help: $help,
                kind: $kind,
                labels: &$labels,
            };
        )+
        /// Every metric the director exports.
        pub const CATALOGUE: &[MetricDef] = &[$($constant),+];
    };
}

use Kind::{Counter, Gauge, Histogram};

// Each entry: constant, kind, name, labels, help.
catalogue! {
    BUILD_INFO: Gauge "director_build_info"
        ["version"]
        "Always 1; the version label tells which director build runs.";
    CONNECTIONS_TOTAL: Counter "director_connections_total"
        ["protocol"]
        "Client connections accepted, by protocol.";
    CONNECTIONS: Gauge "director_connections"
        ["protocol"]
        "Client connections open now (pre-login and relayed), by protocol.";
    LOGINS_TOTAL: Counter "director_logins_total"
        ["protocol", "result"]
        "Client logins by result: ok, auth_failed (the backend refused the credentials), \
        unavailable (no backend could take the session), refused (the director refused it: the \
        user's sessions were still on another backend).";
    LOGIN_DURATION: Histogram "director_login_duration_seconds"
        ["protocol"]
        "Client-visible login latency: from the client's login command (or the end of its SASL \
        exchange) to the director's answer, routing and backend login included.";
    RELAY_BYTES_TOTAL: Counter "director_relay_bytes_total"
        ["protocol", "direction"]
        "Bytes relayed after login, counted when a session ends; direction \"in\" is client to \
        backend, \"out\" backend to client.";
    BACKEND_UP: Gauge "director_backend_up"
        ["backend", "tag"]
        "Health of a backend as the health checker sees it: 1 up, 0 down.";
    BACKEND_ADMIN_STATE: Gauge "director_backend_admin_state"
        ["backend", "tag", "state"]
        "What an administrator set for a backend: 1 for its current state (up, down, \
        maintenance), 0 for the others.";
    BACKEND_WEIGHT: Gauge "director_backend_weight"
        ["backend", "tag"]
        "Weight of a backend (points on the ring; 0 takes no new users).";
    BACKEND_LAST_CHECK: Gauge "director_backend_last_check_result"
        ["backend", "tag", "result"]
        "Result code of the backend's last health check (or failed login): 1 for that code.";
    BACKEND_CHECK_DURATION: Histogram "director_backend_check_duration_seconds"
        ["backend", "tag", "result"]
        "Duration of health checks of a backend; result is ok or failed.";
    BACKEND_CHECK_RESULTS_TOTAL: Counter "director_backend_check_results_total"
        ["backend", "tag", "result"]
        "Health checks of a backend by result code (ok, connection_refused, connect_timeout, \
        tls_failure, wrong_response, response_timeout, login_failed, closed).";
    BACKEND_HEALTH_TRANSITIONS_TOTAL: Counter "director_backend_health_transitions_total"
        ["backend", "tag", "to"]
        "Changes of a backend's health found by the health checker, by new health (up, down).";
    BACKEND_USERS: Gauge "director_backend_users"
        ["backend", "tag"]
        "Users with a live sticky record on a backend.";
    BACKEND_SESSIONS: Gauge "director_backend_sessions"
        ["backend", "tag", "protocol"]
        "Sessions relayed to a backend now, by protocol.";
    BACKEND_LOGINS_TOTAL: Counter "director_backend_logins_total"
        ["backend", "tag", "protocol", "result"]
        "Backend login attempts by result: ok, auth_failed, unavailable (a temporary failure \
        answered by the backend), error (the backend could not be used).";
    BACKEND_CONNECT_FAILURES_TOTAL: Counter "director_backend_connect_failures_total"
        ["backend", "tag"]
        "Connections to a backend for a login that failed or timed out.";
    BACKEND_LOGINS_WAITING: Gauge "director_backend_logins_waiting"
        ["backend", "tag"]
        "Logins waiting for a turn to log in to a backend now (its max_logins_in_flight are \
        all under way).";
    BACKEND_LOGIN_TURNS_MISSED_TOTAL: Counter "director_backend_login_turns_missed_total"
        ["backend", "tag"]
        "Logins that found no turn to log in to a backend within its login_timeout \
        (max_logins_in_flight) and were answered with a temporary failure.";
    STICKY_RECORDS: Gauge "director_sticky_records"
        []
        "Live sticky records (users bound to a backend).";
    MOVES_TOTAL: Counter "director_moves_total"
        ["reason"]
        "Users whose record was moved to another backend or dropped, by reason (admin, flush, \
        health_down, maintenance, kick).";
    KICKS_TOTAL: Counter "director_kicks_total"
        ["reason"]
        "Sessions ended by the director (kick, move, evacuation), by reason.";
    CHECKS_PAUSED: Gauge "director_checks_paused"
        []
        "1 while an administrator has paused the health checks, else 0.";
    LMTP_RECIPIENTS_TOTAL: Counter "director_lmtp_recipients_total"
        ["result"]
        "LMTP recipients by outcome: delivered (2xx after DATA), deferred (4xx) or rejected (5xx), \
        at RCPT or after DATA.";
    CONNECTIONS_REFUSED_TOTAL: Counter "director_connections_refused_total"
        ["protocol", "reason"]
        "Client connections turned away before login, by reason: untrusted_proxy_peer (a peer \
        outside proxy_trusted_networks on a proxy_protocol listener), bad_proxy_header, \
        not_allowed (LMTP allow_from), per_ip_limit (limits.max_preauth_per_ip), listener_full \
        (the listener's pool holds only logged-in sessions), evicted (the oldest connection not \
        logged in yet, dropped to make room in a full pool).";
    AUTH_REQUESTS_TOTAL: Counter "director_auth_requests_total"
        ["result"]
        "Authentications at the auth service (auth.mode: dovecot) by result: ok, failed (wrong \
        credentials), refused (right credentials but nologin), tempfail (the service could not \
        tell, or its answer lacked what a proxy needs), error (the service could not be reached \
        or did not answer in time).";
    AUTH_LOOKUPS_TOTAL: Counter "director_auth_lookups_total"
        ["result"]
        "User lookups without a password at the auth service's auth-master socket (LMTP recipients, \
        auth.mode: dovecot) by result: found, not_found, tempfail (the answer lacked what routing \
        needs), error (the service could not be reached, failed the lookup or did not answer in \
        time).";
    AUTH_SERVICE_UP: Gauge "director_auth_service_up"
        ["endpoint"]
        "1 while the auth service answers (or has not failed yet), 0 from its first failure until \
        it answers again.";
    CLUSTER_MODE: Gauge "director_cluster_mode"
        []
        "1 when the director shares its state with other directors in etcd (a cluster section), \
        0 when it runs alone.";
    CLUSTER_LEASE_UP: Gauge "director_cluster_lease_up"
        []
        "1 while the director holds its etcd membership lease, else 0.";
    CLUSTER_FENCED: Gauge "director_cluster_fenced"
        []
        "1 while the director, unable to renew its lease, refuses new logins (temporary failure) \
        and has ended the sessions it relayed (unless set to keep them); 0 otherwise.";
    CLUSTER_MEMBERS: Gauge "director_cluster_members"
        []
        "Live directors in the cluster as this director sees them, itself included.";
    CLUSTER_CHECKER: Gauge "director_cluster_checker"
        []
        "1 while this director is the elected health checker of the cluster, else 0.";
    CLUSTER_MOVES_AWAITING_ACKS: Gauge "director_cluster_moves_awaiting_acks"
        []
        "Moves started by this director that wait for the other directors to acknowledge that \
        they ended the user's sessions.";
    CLUSTER_WATCH_LAG: Gauge "director_cluster_watch_lag_seconds"
        []
        "How far behind etcd the director's replica was at the last change it applied: the time \
        from the change's write to its application.";
    ETCD_REQUEST_DURATION: Histogram "director_etcd_request_duration_seconds"
        ["op"]
        "Round-trip time of requests to etcd, by operation (get, txn, put, delete, lease_grant, \
        lease_keepalive, watch), failed ones included.";
    ETCD_ERRORS_TOTAL: Counter "director_etcd_errors_total"
        ["op"]
        "Requests to etcd that failed or timed out, by operation.";
    CLUSTER_LEASE_LOST_TOTAL: Counter "director_cluster_lease_lost_total"
        []
        "Times the director could not renew its etcd membership lease.";
}

/// The protocols clients log in with (LMTP has no login).
pub(crate) const LOGIN_PROTOCOLS: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Sieve];
const ALL_PROTOCOLS: [Protocol; 4] = [
    Protocol::Imap,
    Protocol::Pop3,
    Protocol::Lmtp,
    Protocol::Sieve,
];
/// The `reason` values of [`MOVES_TOTAL`] and [`KICKS_TOTAL`]: the names of
/// `state::moves::MoveReason`.
pub const MOVE_REASONS: [&str; 5] = ["admin", "flush", "health_down", "maintenance", "kick"];
/// The `reason` values of [`CONNECTIONS_REFUSED_TOTAL`]: the names of
/// `net::refusals::RefusalReason`.
pub const REFUSAL_REASONS: [&str; 6] = [
    "untrusted_proxy_peer",
    "bad_proxy_header",
    "not_allowed",
    "per_ip_limit",
    "listener_full",
    "evicted",
];
/// The `op` values of [`ETCD_REQUEST_DURATION`] and [`ETCD_ERRORS_TOTAL`]: the kinds of
/// request the cluster state sends to etcd.
pub const ETCD_OPS: [&str; 7] = [
    "get",
    "txn",
    "put",
    "delete",
    "lease_grant",
    "lease_keepalive",
    "watch",
];

/// Login latency buckets, in seconds.
const LOGIN_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Health check latency buckets, in seconds.
const CHECK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// etcd round-trip buckets, in seconds: a loopback or LAN request takes a millisecond or less,
/// a slow disk on an etcd member (fsync) or a leader election seconds.
const ETCD_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// How a client login ended, for `director_logins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginResult {
    Ok,
    AuthFailed,
    Unavailable,
    Refused,
}

impl LoginResult {
    pub fn name(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::AuthFailed => "auth_failed",
            LoginResult::Unavailable => "unavailable",
            LoginResult::Refused => "refused",
        }
    }
    const ALL: [LoginResult; 4] = [
        LoginResult::Ok,
        LoginResult::AuthFailed,
        LoginResult::Unavailable,
        LoginResult::Refused,
    ];
}

/// How an authentication at the auth service ended, for `director_auth_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    Ok,
    Failed,
    Refused,
    TempFail,
    Error,
}

impl AuthResult {
    pub fn name(self) -> &'static str {
        match self {
            AuthResult::Ok => "ok",
            AuthResult::Failed => "failed",
            AuthResult::Refused => "refused",
            AuthResult::TempFail => "tempfail",
            AuthResult::Error => "error",
        }
    }
    const ALL: [AuthResult; 5] = [
        AuthResult::Ok,
        AuthResult::Failed,
        AuthResult::Refused,
        AuthResult::TempFail,
        AuthResult::Error,
    ];
}

/// How a user lookup at the auth-master socket ended, for `director_auth_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    Found,
    NotFound,
    TempFail,
    Error,
}

impl LookupResult {
    pub fn name(self) -> &'static str {
        match self {
            LookupResult::Found => "found",
            LookupResult::NotFound => "not_found",
            LookupResult::TempFail => "tempfail",
            LookupResult::Error => "error",
        }
    }
    const ALL: [LookupResult; 4] = [
        LookupResult::Found,
        LookupResult::NotFound,
        LookupResult::TempFail,
        LookupResult::Error,
    ];
}

/// How one backend login attempt ended, for `director_backend_logins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendLoginOutcome {
    Ok,
    AuthFailed,
    Unavailable,
    Error,
}

impl BackendLoginOutcome {
    pub fn name(self) -> &'static str {
        match self {
            BackendLoginOutcome::Ok => "ok",
            BackendLoginOutcome::AuthFailed => "auth_failed",
            BackendLoginOutcome::Unavailable => "unavailable",
            BackendLoginOutcome::Error => "error",
        }
    }
}

/// What happened to one LMTP recipient, for `director_lmtp_recipients_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientResult {
    Delivered,
    Deferred,
    Rejected,
}

impl RecipientResult {
    pub fn name(self) -> &'static str {
        match self {
            RecipientResult::Delivered => "delivered",
            RecipientResult::Deferred => "deferred",
            RecipientResult::Rejected => "rejected",
        }
    }

    /// The outcome an LMTP reply code stands for.
    pub fn from_code(code: u16) -> Self {
        match code {
            200..=399 => RecipientResult::Delivered,
            400..=499 => RecipientResult::Deferred,
            _ => RecipientResult::Rejected,
        }
    }
}

/// How a backend shows in labels: `backend` is its IP, `tag` its tag.
#[derive(Debug, Clone, Copy)]
pub struct BackendLabel<'a> {
    pub ip: IpAddr,
    pub tag: &'a str,
}

/// The registered metrics. Cheap to clone: every clone updates the same series.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) inner: Arc<Inner>,
}

/// The series. Visible to the crate for the scrape (`crate::server::scrape`), which sets the
/// gauges that mirror state from the state itself, above this catalogue.
pub(crate) struct Inner {
    pub(crate) registry: Registry,
    pub(crate) connections_total: IntCounterVec,
    pub(crate) connections: IntGaugeVec,
    pub(crate) logins_total: IntCounterVec,
    pub(crate) login_duration: HistogramVec,
    pub(crate) relay_bytes_total: IntCounterVec,
    pub(crate) backend_up: IntGaugeVec,
    pub(crate) backend_admin_state: IntGaugeVec,
    pub(crate) backend_weight: IntGaugeVec,
    pub(crate) backend_last_check: IntGaugeVec,
    pub(crate) backend_check_duration: HistogramVec,
    pub(crate) backend_check_results_total: IntCounterVec,
    pub(crate) backend_health_transitions_total: IntCounterVec,
    pub(crate) backend_users: IntGaugeVec,
    pub(crate) backend_sessions: IntGaugeVec,
    pub(crate) backend_logins_total: IntCounterVec,
    pub(crate) backend_connect_failures_total: IntCounterVec,
    pub(crate) backend_logins_waiting: IntGaugeVec,
    pub(crate) backend_login_turns_missed_total: IntCounterVec,
    pub(crate) sticky_records: IntGauge,
    pub(crate) moves_total: IntCounterVec,
    pub(crate) kicks_total: IntCounterVec,
    pub(crate) checks_paused: IntGauge,
    pub(crate) lmtp_recipients_total: IntCounterVec,
    pub(crate) connections_refused_total: IntCounterVec,
    pub(crate) auth_requests_total: IntCounterVec,
    pub(crate) auth_lookups_total: IntCounterVec,
    pub(crate) auth_service_up: IntGaugeVec,
    pub(crate) cluster_mode: IntGauge,
    pub(crate) cluster_lease_up: IntGauge,
    pub(crate) cluster_fenced: IntGauge,
    pub(crate) cluster_members: IntGauge,
    pub(crate) cluster_checker: IntGauge,
    pub(crate) cluster_moves_awaiting_acks: IntGauge,
    /// In seconds, with a fraction: the one gauge that is not a whole number.
    pub(crate) cluster_watch_lag: prometheus::Gauge,
    pub(crate) etcd_request_duration: HistogramVec,
    pub(crate) etcd_errors_total: IntCounterVec,
    pub(crate) cluster_lease_lost_total: IntCounter,
    /// Scrapes reset and refill the state gauges: one at a time.
    pub(crate) refresh: Mutex<()>,
    /// Each protocol's series, by `Protocol as usize`, found once: a session updates seven,
    /// and a lookup by label values hashes the values every time.
    by_protocol: Vec<ProtocolSeries>,
}

/// One protocol's series of [`Inner`].
struct ProtocolSeries {
    connections_total: IntCounter,
    connections: IntGauge,
    /// For protocols that log in (not LMTP).
    login: Option<LoginSeries>,
}

/// A login protocol's series: results by `LoginResult as usize`.
struct LoginSeries {
    results: Vec<IntCounter>,
    duration: prometheus::Histogram,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("catalogue names are unique");
    c
}

fn counter_vec(r: &Registry, d: &MetricDef) -> IntCounterVec {
    debug_assert_eq!(d.kind, Counter);
    register(
        r,
        IntCounterVec::new(Opts::new(d.name, d.help), d.labels).unwrap(),
    )
}

fn gauge_vec(r: &Registry, d: &MetricDef) -> IntGaugeVec {
    debug_assert_eq!(d.kind, Gauge);
    register(
        r,
        IntGaugeVec::new(Opts::new(d.name, d.help), d.labels).unwrap(),
    )
}

fn gauge(r: &Registry, d: &MetricDef) -> IntGauge {
    debug_assert!(d.kind == Gauge && d.labels.is_empty());
    register(r, IntGauge::with_opts(Opts::new(d.name, d.help)).unwrap())
}

fn float_gauge(r: &Registry, d: &MetricDef) -> prometheus::Gauge {
    debug_assert!(d.kind == Gauge && d.labels.is_empty());
    register(
        r,
        prometheus::Gauge::with_opts(Opts::new(d.name, d.help)).unwrap(),
    )
}

fn counter(r: &Registry, d: &MetricDef) -> IntCounter {
    debug_assert!(d.kind == Counter && d.labels.is_empty());
    register(r, IntCounter::with_opts(Opts::new(d.name, d.help)).unwrap())
}

fn histogram_vec(r: &Registry, d: &MetricDef, buckets: &[f64]) -> HistogramVec {
    debug_assert_eq!(d.kind, Histogram);
    let opts = HistogramOpts::new(d.name, d.help).buckets(buckets.to_vec());
    register(r, HistogramVec::new(opts, d.labels).unwrap())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the whole catalogue on a registry of its own. Series whose label values are
    /// known in advance start at 0, so that rates and alerts see them before the first event.
    pub fn new() -> Self {
        let r = Registry::new();
        let build_info = gauge_vec(&r, &BUILD_INFO);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let mut inner = Inner {
            connections_total: counter_vec(&r, &CONNECTIONS_TOTAL),
            connections: gauge_vec(&r, &CONNECTIONS),
            logins_total: counter_vec(&r, &LOGINS_TOTAL),
            login_duration: histogram_vec(&r, &LOGIN_DURATION, LOGIN_BUCKETS),
            relay_bytes_total: counter_vec(&r, &RELAY_BYTES_TOTAL),
            backend_up: gauge_vec(&r, &BACKEND_UP),
            backend_admin_state: gauge_vec(&r, &BACKEND_ADMIN_STATE),
            backend_weight: gauge_vec(&r, &BACKEND_WEIGHT),
            backend_last_check: gauge_vec(&r, &BACKEND_LAST_CHECK),
            backend_check_duration: histogram_vec(&r, &BACKEND_CHECK_DURATION, CHECK_BUCKETS),
            backend_check_results_total: counter_vec(&r, &BACKEND_CHECK_RESULTS_TOTAL),
            backend_health_transitions_total: counter_vec(&r, &BACKEND_HEALTH_TRANSITIONS_TOTAL),
            backend_users: gauge_vec(&r, &BACKEND_USERS),
            backend_sessions: gauge_vec(&r, &BACKEND_SESSIONS),
            backend_logins_total: counter_vec(&r, &BACKEND_LOGINS_TOTAL),
            backend_connect_failures_total: counter_vec(&r, &BACKEND_CONNECT_FAILURES_TOTAL),
            backend_logins_waiting: gauge_vec(&r, &BACKEND_LOGINS_WAITING),
            backend_login_turns_missed_total: counter_vec(&r, &BACKEND_LOGIN_TURNS_MISSED_TOTAL),
            sticky_records: gauge(&r, &STICKY_RECORDS),
            moves_total: counter_vec(&r, &MOVES_TOTAL),
            kicks_total: counter_vec(&r, &KICKS_TOTAL),
            checks_paused: gauge(&r, &CHECKS_PAUSED),
            lmtp_recipients_total: counter_vec(&r, &LMTP_RECIPIENTS_TOTAL),
            connections_refused_total: counter_vec(&r, &CONNECTIONS_REFUSED_TOTAL),
            auth_requests_total: counter_vec(&r, &AUTH_REQUESTS_TOTAL),
            auth_lookups_total: counter_vec(&r, &AUTH_LOOKUPS_TOTAL),
            auth_service_up: gauge_vec(&r, &AUTH_SERVICE_UP),
            cluster_mode: gauge(&r, &CLUSTER_MODE),
            cluster_lease_up: gauge(&r, &CLUSTER_LEASE_UP),
            cluster_fenced: gauge(&r, &CLUSTER_FENCED),
            cluster_members: gauge(&r, &CLUSTER_MEMBERS),
            cluster_checker: gauge(&r, &CLUSTER_CHECKER),
            cluster_moves_awaiting_acks: gauge(&r, &CLUSTER_MOVES_AWAITING_ACKS),
            cluster_watch_lag: float_gauge(&r, &CLUSTER_WATCH_LAG),
            etcd_request_duration: histogram_vec(&r, &ETCD_REQUEST_DURATION, ETCD_BUCKETS),
            etcd_errors_total: counter_vec(&r, &ETCD_ERRORS_TOTAL),
            cluster_lease_lost_total: counter(&r, &CLUSTER_LEASE_LOST_TOTAL),
            registry: r,
            refresh: Mutex::new(()),
            by_protocol: Vec::new(),
        };
        for (i, p) in ALL_PROTOCOLS.into_iter().enumerate() {
            debug_assert_eq!(p as usize, i, "ALL_PROTOCOLS in declaration order");
            let login = LOGIN_PROTOCOLS.contains(&p).then(|| LoginSeries {
                results: LoginResult::ALL
                    .iter()
                    .enumerate()
                    .map(|(j, r)| {
                        debug_assert_eq!(*r as usize, j, "LoginResult::ALL in declaration order");
                        inner.logins_total.with_label_values(&[p.name(), r.name()])
                    })
                    .collect(),
                duration: inner.login_duration.with_label_values(&[p.name()]),
                bytes_in: inner.relay_bytes_total.with_label_values(&[p.name(), "in"]),
                bytes_out: inner
                    .relay_bytes_total
                    .with_label_values(&[p.name(), "out"]),
            });
            inner.by_protocol.push(ProtocolSeries {
                connections_total: inner.connections_total.with_label_values(&[p.name()]),
                connections: inner.connections.with_label_values(&[p.name()]),
                login,
            });
        }
        // Connections, logins and relayed bytes exist from the start through `by_protocol`.
        for p in ALL_PROTOCOLS {
            for reason in REFUSAL_REASONS {
                inner
                    .connections_refused_total
                    .with_label_values(&[p.name(), reason]);
            }
        }
        for result in AuthResult::ALL {
            inner
                .auth_requests_total
                .with_label_values(&[result.name()]);
        }
        for result in LookupResult::ALL {
            inner.auth_lookups_total.with_label_values(&[result.name()]);
        }
        for reason in MOVE_REASONS {
            inner.moves_total.with_label_values(&[reason]);
            inner.kicks_total.with_label_values(&[reason]);
        }
        for r in [
            RecipientResult::Delivered,
            RecipientResult::Deferred,
            RecipientResult::Rejected,
        ] {
            inner.lmtp_recipients_total.with_label_values(&[r.name()]);
        }
        for op in ETCD_OPS {
            inner.etcd_request_duration.with_label_values(&[op]);
            inner.etcd_errors_total.with_label_values(&[op]);
        }
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// The registry every metric is on.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A client connection was accepted; it counts as open until the guard is dropped.
    pub fn connection(&self, protocol: Protocol) -> ConnectionGuard {
        let series = &self.inner.by_protocol[protocol as usize];
        series.connections_total.inc();
        let gauge = series.connections.clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// A client login ended with `result`, `elapsed` after the client asked.
    /// One authentication at the auth service.
    pub fn auth(&self, result: AuthResult) {
        self.inner
            .auth_requests_total
            .with_label_values(&[result.name()])
            .inc();
    }

    /// One user lookup at an auth-master socket.
    pub fn auth_lookup(&self, result: LookupResult) {
        self.inner
            .auth_lookups_total
            .with_label_values(&[result.name()])
            .inc();
    }

    /// Whether the auth service at `endpoint` answers.
    pub fn auth_service_up(&self, endpoint: String, up: bool) {
        self.inner
            .auth_service_up
            .with_label_values(&[endpoint.as_str()])
            .set(i64::from(up));
    }

    pub fn login(&self, protocol: Protocol, result: LoginResult, elapsed: Duration) {
        if let Some(series) = &self.inner.by_protocol[protocol as usize].login {
            series.results[result as usize].inc();
            series.duration.observe(elapsed.as_secs_f64());
            return;
        }
        self.inner
            .logins_total
            .with_label_values(&[protocol.name(), result.name()])
            .inc();
        self.inner
            .login_duration
            .with_label_values(&[protocol.name()])
            .observe(elapsed.as_secs_f64());
    }

    /// One attempt to log in on `backend` ended with `outcome`.
    pub fn backend_login<'a>(
        &self,
        backend: impl Into<BackendLabel<'a>>,
        protocol: Protocol,
        o: BackendLoginOutcome,
    ) {
        let b = backend.into();
        self.inner
            .backend_logins_total
            .with_label_values(&[
                crate::addr_text::ip(b.ip).as_str(),
                b.tag,
                protocol.name(),
                o.name(),
            ])
            .inc();
    }

    /// A connection to `backend` for a login failed or timed out.
    pub fn backend_connect_failure<'a>(&self, backend: impl Into<BackendLabel<'a>>) {
        let b = backend.into();
        self.inner
            .backend_connect_failures_total
            .with_label_values(&[crate::addr_text::ip(b.ip).as_str(), b.tag])
            .inc();
    }

    /// A login found no turn to log in to `backend` within its login timeout.
    pub fn login_turn_missed<'a>(&self, backend: impl Into<BackendLabel<'a>>) {
        let b = backend.into();
        self.inner
            .backend_login_turns_missed_total
            .with_label_values(&[crate::addr_text::ip(b.ip).as_str(), b.tag])
            .inc();
    }

    /// A relayed session ended after these many bytes each way.
    pub fn relayed(&self, protocol: Protocol, client_to_backend: u64, backend_to_client: u64) {
        if let Some(series) = &self.inner.by_protocol[protocol as usize].login {
            series.bytes_in.inc_by(client_to_backend);
            series.bytes_out.inc_by(backend_to_client);
            return;
        }
        let c = &self.inner.relay_bytes_total;
        c.with_label_values(&[protocol.name(), "in"])
            .inc_by(client_to_backend);
        c.with_label_values(&[protocol.name(), "out"])
            .inc_by(backend_to_client);
    }

    /// A health check of `backend` ended with result code `code` (`ok` when `passed`).
    pub fn check<'a>(
        &self,
        backend: impl Into<BackendLabel<'a>>,
        code: &str,
        passed: bool,
        latency: Duration,
    ) {
        let b = backend.into();
        let ip = b.ip.to_string();
        self.inner
            .backend_check_results_total
            .with_label_values(&[&ip, b.tag, code])
            .inc();
        let result = if passed { "ok" } else { "failed" };
        self.inner
            .backend_check_duration
            .with_label_values(&[&ip, b.tag, result])
            .observe(latency.as_secs_f64());
    }

    /// The health checker changed the health of `backend` to `to` (`up`, `down`).
    pub fn health_transition<'a>(&self, backend: impl Into<BackendLabel<'a>>, to: &str) {
        let b = backend.into();
        self.inner
            .backend_health_transitions_total
            .with_label_values(&[crate::addr_text::ip(b.ip).as_str(), b.tag, to])
            .inc();
    }

    /// `users` records moved (or dropped) and `sessions` sessions ended, for `reason` (one of
    /// [`MOVE_REASONS`]).
    pub fn moved(&self, reason: impl AsRef<str>, users: usize, sessions: usize) {
        let reason = reason.as_ref();
        self.inner
            .moves_total
            .with_label_values(&[reason])
            .inc_by(users as u64);
        self.inner
            .kicks_total
            .with_label_values(&[reason])
            .inc_by(sessions as u64);
    }

    /// A client connection was turned away (or dropped to make room) before login, for
    /// `reason` (one of [`REFUSAL_REASONS`]).
    pub fn refused(&self, protocol: Protocol, reason: impl AsRef<str>) {
        self.inner
            .connections_refused_total
            .with_label_values(&[protocol.name(), reason.as_ref()])
            .inc();
    }

    /// One LMTP recipient's outcome.
    pub fn lmtp_recipient(&self, result: RecipientResult) {
        self.inner
            .lmtp_recipients_total
            .with_label_values(&[result.name()])
            .inc();
    }

    /// Whether the director runs in cluster mode (a `cluster` section) or alone.
    pub fn cluster_mode(&self, on: bool) {
        self.inner.cluster_mode.set(i64::from(on));
    }

    /// Whether the director holds its etcd membership lease.
    pub fn cluster_lease_up(&self, up: bool) {
        self.inner.cluster_lease_up.set(i64::from(up));
    }

    /// Whether the director is fenced: it could not renew its lease, refuses new logins and
    /// has ended its sessions (unless set to keep them).
    pub fn cluster_fenced(&self, fenced: bool) {
        self.inner.cluster_fenced.set(i64::from(fenced));
    }

    /// The live directors this director sees, itself included.
    pub fn cluster_members(&self, n: usize) {
        self.inner.cluster_members.set(n as i64);
    }

    /// Whether this director is the elected health checker.
    pub fn cluster_checker(&self, elected: bool) {
        self.inner.cluster_checker.set(i64::from(elected));
    }

    /// Moves started by this director that wait for other directors' acknowledgements now.
    pub fn cluster_moves_awaiting_acks(&self, n: usize) {
        self.inner.cluster_moves_awaiting_acks.set(n as i64);
    }

    /// How far behind etcd the replica was at the change just applied (now minus the change's
    /// write time). The gauge keeps its value until the next call: a caught-up watch with no
    /// changes to apply should say so with a zero, or an old lag would show for ever.
    pub fn cluster_watch_lag(&self, lag: Duration) {
        self.inner.cluster_watch_lag.set(lag.as_secs_f64());
    }

    /// One request to etcd of kind `op` (one of [`ETCD_OPS`]) took `elapsed`, answered or not.
    pub fn etcd_request(&self, op: &str, elapsed: Duration) {
        debug_assert!(ETCD_OPS.contains(&op), "{op} is not in ETCD_OPS");
        self.inner
            .etcd_request_duration
            .with_label_values(&[op])
            .observe(elapsed.as_secs_f64());
    }

    /// One request to etcd of kind `op` (one of [`ETCD_OPS`]) failed or timed out.
    pub fn etcd_error(&self, op: &str) {
        debug_assert!(ETCD_OPS.contains(&op), "{op} is not in ETCD_OPS");
        self.inner.etcd_errors_total.with_label_values(&[op]).inc();
    }

    /// The director could not renew its etcd membership lease.
    pub fn cluster_lease_lost(&self) {
        self.inner.cluster_lease_lost_total.inc();
    }

    /// The text exposition of every metric as the registry holds it now.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Keeps a connection counted in `director_connections` while it lives.
pub struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
impl Metrics {
    /// For unit tests: the value of `name`'s series with a label valued `label`, if it exists.
    pub(crate) fn sample(&self, name: &str, label: &str) -> Option<f64> {
        self.registry()
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .find(|s| s.get_label().iter().any(|l| l.value() == label))
            .map(|s| s.get_counter().get_value() + s.get_gauge().get_value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::refusals::RefusalReason;
    use crate::state::moves::MoveReason;
    use crate::state::sessions::Sessions;
    use std::collections::HashSet;

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = HashSet::new();
        for d in CATALOGUE {
            assert!(seen.insert(d.name), "{} listed twice", d.name);
            assert!(
                d.name.starts_with("director_"),
                "{}: no director_ prefix",
                d.name
            );
            assert!(
                d.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}: not snake_case",
                d.name
            );
            assert_eq!(
                d.kind == Kind::Counter,
                d.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                d.name
            );
            if d.kind == Kind::Histogram {
                assert!(
                    d.name.ends_with("_seconds") || d.name.ends_with("_bytes"),
                    "{}: a histogram is in a base unit",
                    d.name
                );
            }
            for unit in ["_milliseconds", "_ms", "_kilobytes", "_minutes"] {
                assert!(!d.name.contains(unit), "{}: not a base unit", d.name);
            }
            assert!(!d.help.is_empty(), "{}: no help", d.name);
            for l in d.labels {
                assert!(
                    !["user", "username", "client", "client_address"].contains(l),
                    "{}: label {l} would carry a user or client",
                    d.name
                );
            }
            if d.labels.contains(&"backend") {
                assert!(d.labels.contains(&"tag"), "{}: backend without tag", d.name);
            }
        }
        assert!(seen.contains("director_build_info"));
    }

    #[test]
    fn every_catalogue_entry_is_registered_with_its_help() {
        let m = Metrics::new();
        let families = m.registry().gather();
        // Every metric without per-backend (or per-auth-service) labels exists from the start.
        let per_instance =
            |d: &&MetricDef| d.labels.contains(&"backend") || d.labels.contains(&"endpoint");
        for d in CATALOGUE.iter().filter(|d| !per_instance(d)) {
            let f = families
                .iter()
                .find(|f| f.name() == d.name)
                .unwrap_or_else(|| panic!("{} is not exported", d.name));
            assert_eq!(f.help(), d.help);
        }
        for f in &families {
            assert!(
                CATALOGUE.iter().any(|d| d.name == f.name()),
                "{} is exported but not in the catalogue",
                f.name()
            );
        }
    }

    #[test]
    fn events_show_in_the_exposition() {
        let m = Metrics::new();
        {
            let _c = m.connection(Protocol::Imap);
            m.login(Protocol::Imap, LoginResult::Ok, Duration::from_millis(30));
            m.relayed(Protocol::Imap, 10, 200);
        }
        m.lmtp_recipient(RecipientResult::from_code(250));
        m.refused(Protocol::Lmtp, RefusalReason::PerIpLimit);
        m.moved(MoveReason::HealthDown, 2, 3);
        m.cluster_mode(true);
        m.cluster_lease_up(true);
        m.cluster_members(3);
        m.cluster_checker(true);
        m.cluster_moves_awaiting_acks(2);
        m.cluster_watch_lag(Duration::from_millis(1500));
        m.etcd_request("txn", Duration::from_millis(2));
        m.etcd_request("txn", Duration::from_secs(7));
        m.etcd_error("lease_keepalive");
        m.cluster_lease_lost();
        m.cluster_fenced(true);
        let state = crate::state::local::LocalState::new(Vec::new(), Duration::from_secs(60));
        let text = m.render(&state, &Sessions::new(), None, None);
        for line in [
            "director_connections_total{protocol=\"imap\"} 1",
            "director_connections{protocol=\"imap\"} 0",
            "director_logins_total{protocol=\"imap\",result=\"ok\"} 1",
            "director_login_duration_seconds_count{protocol=\"imap\"} 1",
            "director_relay_bytes_total{direction=\"out\",protocol=\"imap\"} 200",
            "director_lmtp_recipients_total{result=\"delivered\"} 1",
            "director_connections_refused_total{protocol=\"lmtp\",reason=\"per_ip_limit\"} 1",
            "director_connections_refused_total{protocol=\"imap\",reason=\"evicted\"} 0",
            "director_moves_total{reason=\"health_down\"} 2",
            "director_kicks_total{reason=\"health_down\"} 3",
            "director_sticky_records 0",
            "director_checks_paused 0",
            "director_cluster_mode 1",
            "director_cluster_lease_up 1",
            "director_cluster_fenced 1",
            "director_cluster_members 3",
            "director_cluster_checker 1",
            "director_cluster_moves_awaiting_acks 2",
            "director_cluster_watch_lag_seconds 1.5",
            "director_etcd_request_duration_seconds_count{op=\"txn\"} 2",
            "director_etcd_request_duration_seconds_bucket{op=\"txn\",le=\"0.0025\"} 1",
            "director_etcd_request_duration_seconds_bucket{op=\"txn\",le=\"5\"} 1",
            "director_etcd_request_duration_seconds_count{op=\"get\"} 0",
            "director_etcd_errors_total{op=\"lease_keepalive\"} 1",
            "director_etcd_errors_total{op=\"watch\"} 0",
            "director_cluster_lease_lost_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.contains("director_build_info{version=\""));
    }

    #[test]
    fn a_single_director_exports_the_cluster_series_at_zero() {
        let text = Metrics::new().text();
        for name in [
            "director_cluster_mode",
            "director_cluster_lease_up",
            "director_cluster_fenced",
            "director_cluster_members",
            "director_cluster_checker",
            "director_cluster_moves_awaiting_acks",
            "director_cluster_watch_lag_seconds",
            "director_cluster_lease_lost_total",
        ] {
            let line = format!("{name} 0");
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        for op in ETCD_OPS {
            for line in [
                format!("director_etcd_errors_total{{op=\"{op}\"}} 0"),
                format!("director_etcd_request_duration_seconds_count{{op=\"{op}\"}} 0"),
            ] {
                assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
            }
        }
    }

    #[test]
    fn label_values_started_at_zero_are_distinct_snake_case() {
        let lists: [&[&str]; 3] = [&MOVE_REASONS, &REFUSAL_REASONS, &ETCD_OPS];
        for list in lists {
            let mut seen = HashSet::new();
            for v in list {
                assert!(seen.insert(v), "{v} listed twice");
                assert!(
                    !v.is_empty() && v.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{v}: not snake_case"
                );
            }
        }
    }
}
