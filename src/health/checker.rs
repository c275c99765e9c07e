//! The health checker (it replaces poolmon): one task per backend runs the backend's probes
//! (`probe`) every `interval`, and every `fast_interval` while the results disagree with the
//! backend's health. A HAProxy-style counter gives hysteresis: `fall` failures in a row take
//! an up backend down, `rise` passes in a row bring a down one up.
//!
//! - Backends start up, so a freshly started director serves at once; the first checks run
//!   immediately and take a dead backend down after `fall` of them.
//! - Up → down: the health is set down (the ring drops the backend, so it takes no new users),
//!   then its users are moved safely ([`Mover::evacuate`]: sessions ended, records pointed to
//!   where the ring now sends them).
//! - Down → up: the health is set up, nothing else. Users who moved away stay where they are
//!   until their records expire, so nothing flaps.
//! - The checker never touches admin state: a backend that an administrator set down or into
//!   maintenance is not checked (its health stays as it was), and nothing is checked while
//!   checks are paused ([`State::checks_pause`]). The counter starts afresh afterwards.
//! - Passive health: a real login that cannot use its backend before sending the user's
//!   credentials (refused, timed out, no greeting), or that waits long for it, makes the backend
//!   suspect ([`HealthChecker::suspect`]): it is checked at once (at most once per
//!   `fast_interval`), and only that active check counts. Nothing a client sends can count
//!   against a backend: what a backend does with a user's credentials (refuses them, closes, a
//!   reply too large) is never reported at all, and a suspicion without a failing check changes
//!   nothing.
//! - After a failed check the next one starts `fast_interval` after the failed one *started*:
//!   a check that failed by timing out is followed at once, so a hung backend is down after
//!   `fall` timeouts, not `fall` timeouts plus intervals.
//! - Backends added at run time get a task within a second; removed ones lose theirs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::health::probe::{CheckCode, CheckResult, Checks, CredentialStore, Probe, Target};
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::moves::{MoveReason, Mover};
use crate::state::State;

/// Consecutive results against a backend's current health (HAProxy's check counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    rise: u32,
    fall: u32,
    /// Results in a row that disagree with the current health.
    streak: u32,
}

impl Counter {
    pub fn new(rise: u32, fall: u32) -> Self {
        Counter {
            rise: rise.max(1),
            fall: fall.max(1),
            streak: 0,
        }
    }

    /// Feeds one result; returns the new health when this result changes it.
    pub fn observe(&mut self, current: Health, passed: bool) -> Option<Health> {
        if passed == (current == Health::Up) {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match current {
            Health::Up => self.fall,
            Health::Down => self.rise,
        };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        Some(if passed { Health::Up } else { Health::Down })
    }

    /// Whether recent results disagree with the health (the fast interval applies).
    pub fn unsettled(&self) -> bool {
        self.streak > 0
    }

    /// Forgets the streak (checks were skipped: admin state, pause).
    pub fn reset(&mut self) {
        self.streak = 0;
    }
}

/// The checker's settings, taken from `health` and the backends' `checks`.
#[derive(Debug, Clone)]
pub struct CheckerSettings {
    pub interval: Duration,
    pub fast_interval: Duration,
    pub rise: u32,
    pub fall: u32,
    /// `health.checks`.
    pub default_checks: Vec<String>,
    /// A backend's own `checks`, by its configured host (lower case).
    pub backend_checks: HashMap<String, Vec<String>>,
}

/// What the checker knows of one backend.
struct Tracker {
    counter: Counter,
    last: Option<CheckResult>,
    /// Wakes the backend's task early (a passive failure brings on the fast interval).
    wake: Arc<Notify>,
}

/// A backend's CA file and whether it verifies: what a TLS connector depends on.
type ConnectorKey = (Option<PathBuf>, bool);

struct Inner {
    state: Arc<dyn State>,
    mover: Mover,
    /// Swapped by a reload ([`HealthChecker::reload`]), as are the checks and credentials.
    settings: ArcSwap<CheckerSettings>,
    checks: ArcSwap<Checks>,
    credentials: ArcSwap<CredentialStore>,
    /// TLS connectors by (CA file, verify), built when a probe first needs one.
    connectors: Mutex<Vec<(ConnectorKey, Option<TlsConnector>)>>,
    trackers: Mutex<HashMap<IpAddr, Tracker>>,
    /// Latched once every checked backend has a result (`/readyz`).
    first_round: std::sync::atomic::AtomicBool,
}

/// The health checker. Cheap to clone; [`HealthChecker::run`] drives it.
#[derive(Clone)]
pub struct HealthChecker {
    inner: Arc<Inner>,
}

/// How often the set of backends is compared with the running tasks, at most.
const RECONCILE_MAX: Duration = Duration::from_secs(1);

/// Aborts every backend task when the checker stops.
struct Tasks(HashMap<IpAddr, JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for h in self.0.values() {
            h.abort();
        }
    }
}

impl HealthChecker {
    /// A checker with explicit parts (tests, and [`HealthChecker::from_config`]).
    pub fn new(
        state: Arc<dyn State>,
        mover: Mover,
        settings: CheckerSettings,
        checks: Checks,
        credentials: CredentialStore,
    ) -> Self {
        HealthChecker {
            inner: Arc::new(Inner {
                state,
                mover,
                settings: ArcSwap::from_pointee(settings),
                checks: ArcSwap::from_pointee(checks),
                credentials: ArcSwap::from_pointee(credentials),
                connectors: Mutex::new(Vec::new()),
                trackers: Mutex::new(HashMap::new()),
                first_round: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The checker the `health` section describes (`None` when it is disabled).
    pub fn from_config(
        config: &Config,
        state: Arc<dyn State>,
        mover: Mover,
    ) -> Result<Option<Self>, ConfigError> {
        if !config.health.enabled {
            return Ok(None);
        }
        let (settings, checks, credentials) = Self::parts_of(config)?;
        Ok(Some(Self::new(state, mover, settings, checks, credentials)))
    }

    /// The settings, checks and credentials the configuration gives (files read here), for
    /// [`HealthChecker::from_config`] and [`HealthChecker::reload`]. Every check a backend or
    /// `health.checks` names must exist; errors name the field, as the configuration's own do.
    pub fn parts_of(
        config: &Config,
    ) -> Result<(CheckerSettings, Checks, CredentialStore), ConfigError> {
        let h = &config.health;
        let checks = Checks::load(h.checks_dir.as_deref())
            .map_err(|e| ConfigError(format!("health.checks_dir: {e}")))?;
        let lists = std::iter::once(("health.checks".to_string(), &h.checks)).chain(
            config.backends.iter().enumerate().filter_map(|(i, b)| {
                b.checks
                    .as_ref()
                    .map(|c| (format!("backends[{i}].checks"), c))
            }),
        );
        for (field, names) in lists {
            for (j, name) in names.iter().enumerate() {
                if checks.get(name).is_none() {
                    return Err(ConfigError(format!(
                        "{field}[{j}]: no check named {name:?} (known: {}; more in checks_dir)",
                        checks.names()
                    )));
                }
            }
        }
        let credentials = match &h.credentials_file {
            Some(path) => CredentialStore::load(path)
                .map_err(|e| ConfigError(format!("health.credentials_file: {e}")))?,
            None => CredentialStore::default(),
        };
        let backend_checks = config
            .backends
            .iter()
            .filter_map(|b| b.checks.clone().map(|c| (b.host.to_ascii_lowercase(), c)))
            .collect();
        let settings = CheckerSettings {
            interval: h.interval.into(),
            fast_interval: h.fast_interval.into(),
            rise: h.rise,
            fall: h.fall,
            default_checks: h.checks.clone(),
            backend_checks,
        };
        Ok((settings, checks, credentials))
    }

    /// Swaps in new settings, checks and credentials (a reload). Each backend's counter keeps
    /// its streak under the new rise and fall; the next checks use the new probes.
    pub fn reload(&self, settings: CheckerSettings, checks: Checks, credentials: CredentialStore) {
        {
            let mut trackers = self.inner.trackers.lock().unwrap();
            for t in trackers.values_mut() {
                let streak = t.counter.streak;
                t.counter = Counter::new(settings.rise, settings.fall);
                t.counter.streak = streak;
                t.wake.notify_one();
            }
        }
        info!(interval = ?settings.interval, fast_interval = ?settings.fast_interval,
              rise = settings.rise, fall = settings.fall, checks = ?settings.default_checks,
              "health checker settings reloaded");
        self.inner.settings.store(Arc::new(settings));
        self.inner.checks.store(Arc::new(checks));
        self.inner.credentials.store(Arc::new(credentials));
    }

    /// The last result of every backend that has one, by IP.
    pub fn last_results(&self) -> Vec<(IpAddr, CheckResult)> {
        let trackers = self.inner.trackers.lock().unwrap();
        let mut out: Vec<(IpAddr, CheckResult)> = trackers
            .iter()
            .filter_map(|(ip, t)| t.last.clone().map(|r| (*ip, r)))
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        out
    }

    /// Checks of a backend follow each other this closely, at most (a login that waits longer
    /// than this for its backend makes the backend suspect).
    pub fn fast_interval(&self) -> Duration {
        self.inner.settings.load().fast_interval
    }

    /// The last result of one backend.
    pub fn last_result(&self, ip: IpAddr) -> Option<CheckResult> {
        let trackers = self.inner.trackers.lock().unwrap();
        trackers.get(&ip).and_then(|t| t.last.clone())
    }

    /// Whether the first round of checks is done: every backend that is checked (admin up,
    /// checks not paused) has a result. Once true, stays true.
    pub fn first_round_done(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.inner.first_round.load(Ordering::Relaxed) {
            return true;
        }
        let set = self.inner.state.backends();
        let done = {
            let trackers = self.inner.trackers.lock().unwrap();
            set.backends
                .values()
                .all(|b| self.skipped(b) || trackers.get(&b.ip).is_some_and(|t| t.last.is_some()))
        };
        if done {
            self.inner.first_round.store(true, Ordering::Relaxed);
        }
        done
    }

    /// Passive health: a real login found backend `ip` unresponsive before it had seen the
    /// user's credentials (or waits long for it). The backend is checked at once, or
    /// `fast_interval` after its last check started if that is later; the check decides.
    pub fn suspect(&self, ip: IpAddr, code: CheckCode, detail: impl std::fmt::Display) {
        if !self.inner.state.is_checker() {
            debug!(backend = %ip, code = %code, detail = %detail,
                   "backend suspect: telling the cluster's checker");
            self.inner
                .state
                .report_suspect(ip, &format!("{code}: {detail}"));
            return;
        }
        debug!(backend = %ip, code = %code, detail = %detail, "backend suspect: checking it now");
        if let Some(t) = self.inner.trackers.lock().unwrap().get(&ip) {
            t.wake.notify_one();
        }
    }

    /// Runs the checker until the future is dropped (aborting it stops every check).
    pub async fn run(self) {
        let s = self.inner.settings.load_full();
        info!(interval = ?s.interval, fast_interval = ?s.fast_interval, rise = s.rise,
              fall = s.fall, checks = ?s.default_checks, "health checker started");
        let mut tasks = Tasks(HashMap::new());
        loop {
            let reconcile = self.inner.settings.load().fast_interval.min(RECONCILE_MAX);
            let set = self.inner.state.backends();
            tasks.0.retain(|ip, h| {
                if set.get(*ip).is_none() {
                    h.abort();
                    self.inner.trackers.lock().unwrap().remove(ip);
                    false
                } else {
                    !h.is_finished()
                }
            });
            for ip in set.backends.keys() {
                if !tasks.0.contains_key(ip) {
                    let me = self.clone();
                    let ip = *ip;
                    tasks
                        .0
                        .insert(ip, tokio::spawn(async move { me.backend_loop(ip).await }));
                }
            }
            tokio::time::sleep(reconcile).await;
        }
    }

    fn wake_of(&self, ip: IpAddr) -> Arc<Notify> {
        let mut trackers = self.inner.trackers.lock().unwrap();
        self.tracker(&mut trackers, ip).wake.clone()
    }

    fn tracker<'a>(
        &self,
        trackers: &'a mut HashMap<IpAddr, Tracker>,
        ip: IpAddr,
    ) -> &'a mut Tracker {
        let s = self.inner.settings.load();
        trackers.entry(ip).or_insert_with(|| Tracker {
            counter: Counter::new(s.rise, s.fall),
            last: None,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Checks one backend until it is removed.
    async fn backend_loop(self, ip: IpAddr) {
        let wake = self.wake_of(ip);
        loop {
            let s = self.inner.settings.load_full();
            let Some(backend) = self.inner.state.backends().get(ip).cloned() else {
                self.inner.trackers.lock().unwrap().remove(&ip);
                return;
            };
            let started = tokio::time::Instant::now();
            // In a cluster only the elected director checks; the others wait their turn.
            let wait = if !self.inner.state.is_checker() {
                // Looks again soon: a director elected checker starts checking at once.
                let mut trackers = self.inner.trackers.lock().unwrap();
                self.tracker(&mut trackers, ip).counter.reset();
                s.fast_interval
            } else if self.skipped(&backend) {
                let mut trackers = self.inner.trackers.lock().unwrap();
                self.tracker(&mut trackers, ip).counter.reset();
                s.interval
            } else {
                let result = self.check(&backend).await;
                self.inner.mover.metrics.check(
                    &backend,
                    result.code.name(),
                    result.code.is_ok(),
                    result.latency,
                );
                debug!(backend = %ip, code = %result.code, check = %result.check,
                       latency = ?result.latency, detail = %result.detail, "health check");
                if self.observe(ip, result).await {
                    s.fast_interval
                } else {
                    s.interval
                }
            };
            // Counted from the start of this check: a check that timed out is followed at once
            // when the results are unsettled.
            let mut until = started + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = wake.notified() => {
                        let soonest = (started + s.fast_interval).max(tokio::time::Instant::now());
                        until = until.min(soonest);
                    }
                }
            }
        }
    }

    /// Whether checks of `backend` are off now: checks paused, or an admin's decision.
    fn skipped(&self, backend: &Backend) -> bool {
        backend.admin != AdminState::Up || self.inner.state.checks_pause().is_some()
    }

    /// Counts a result and acts on a change of health. Returns whether the backend's results
    /// are unsettled (the fast interval applies).
    async fn observe(&self, ip: IpAddr, result: CheckResult) -> bool {
        let set = self.inner.state.backends();
        let Some(backend) = set.get(ip) else {
            return false;
        };
        let change = {
            let mut trackers = self.inner.trackers.lock().unwrap();
            let t = self.tracker(&mut trackers, ip);
            t.last = Some(result.clone());
            if self.skipped(backend) {
                t.counter.reset();
                return false;
            }
            // Read the health again under the lock: it is only changed here.
            let current = self
                .inner
                .state
                .backends()
                .get(ip)
                .map_or(backend.health, |b| b.health);
            match t.counter.observe(current, result.code.is_ok()) {
                Some(h) => h,
                None => return t.counter.unsettled(),
            }
        };
        // Only this backend's loop changes its health, so nothing changed it meanwhile.
        if let Err(e) = self.inner.state.set_health(ip, change).await {
            warn!(backend = %ip, health = change.name(), error = %e,
                  "backend health not recorded: the next check decides again");
            let mut trackers = self.inner.trackers.lock().unwrap();
            self.tracker(&mut trackers, ip).counter.reset();
            return true;
        }
        self.inner
            .mover
            .metrics
            .health_transition(backend, change.name());
        match change {
            Health::Down => {
                warn!(backend = %ip, code = %result.code, check = %result.check,
                      detail = %result.detail, "backend health down: moving its users");
                let mover = self.inner.mover.clone();
                tokio::spawn(async move {
                    mover.evacuate(ip, MoveReason::HealthDown, false).await;
                });
            }
            Health::Up => {
                info!(backend = %ip, code = %result.code, check = %result.check,
                      latency = ?result.latency, "backend health up");
            }
        }
        false
    }

    /// Runs the backend's checks; the first failure is the result, else `ok` with the total
    /// latency.
    async fn check(&self, backend: &Backend) -> CheckResult {
        let s = self.inner.settings.load_full();
        let checks = self.inner.checks.load_full();
        let names = s
            .backend_checks
            .get(&backend.host.to_ascii_lowercase())
            .unwrap_or(&s.default_checks);
        let mut total = Duration::ZERO;
        for name in names {
            let Some(probe) = checks.get(name) else {
                // Names are checked when the configuration is loaded.
                continue;
            };
            let target = self.target(backend, probe);
            let r = probe.run(&target).await;
            total += r.latency;
            if !r.code.is_ok() {
                return r;
            }
        }
        CheckResult::new(CheckCode::Ok, total, &names.join("+"), "")
    }

    fn target(&self, backend: &Backend, probe: &Probe) -> Target {
        let settings = &backend.settings;
        let connector = if probe.uses_tls() {
            self.connector(settings.tls_ca_file.clone(), settings.tls_verify)
        } else {
            None
        };
        let server_name = crate::net::tls::server_name(&settings.tls_server_name)
            .unwrap_or_else(|_| backend.ip.into());
        Target {
            addr: SocketAddr::new(backend.ip, settings.port(probe.protocol)),
            server_name,
            connector,
            connect_timeout: settings.connect_timeout,
            credentials: self
                .inner
                .credentials
                .load()
                .for_backend(&backend.host, backend.ip),
        }
    }

    fn connector(&self, ca: Option<PathBuf>, verify: bool) -> Option<TlsConnector> {
        let mut cache = self.inner.connectors.lock().unwrap();
        let key = (ca, verify);
        if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let c = match crate::net::tls::connector(key.0.as_deref(), key.1) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "no TLS connector for health checks");
                None
            }
        };
        cache.push((key, c.clone()));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners:\n  - protocol: imap\n    address: 127.0.0.1:1143\nbackends:\n  - host: 10.0.0.1\n";

    fn parts_of(text: &str) -> Result<(CheckerSettings, Checks, CredentialStore), ConfigError> {
        HealthChecker::parts_of(&Config::parse(text)?)
    }

    fn error_of(text: &str) -> String {
        parts_of(text).unwrap_err().0
    }

    /// The checks, check files and credentials the configuration names are checked where they
    /// are read; the errors name the field like the configuration's own.
    #[test]
    fn check_errors_name_the_field() {
        let e = error_of(&format!("{MINIMAL}health: {{checks: [imap, smtp]}}\n"));
        assert!(
            e.starts_with(
                "health.checks[1]: no check named \"smtp\" (known: imap, lmtp, pop3, sieve"
            ),
            "{e}"
        );
        let e = error_of(&MINIMAL.replace("host: 10.0.0.1", "host: 10.0.0.1\n    checks: [pop]"));
        assert!(
            e.starts_with("backends[0].checks[0]: no check named \"pop\""),
            "{e}"
        );
        let e = error_of(&format!(
            "{MINIMAL}health: {{checks_dir: /nonexistent/checks}}\n"
        ));
        assert!(
            e.starts_with("health.checks_dir: /nonexistent/checks: cannot read"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("director-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = dir.join("creds.yaml");
        std::fs::write(&creds, "user: u\npassword: p\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = error_of(&format!(
            "{MINIMAL}health: {{credentials_file: {}}}\n",
            creds.display()
        ));
        assert!(
            e.starts_with("health.credentials_file: ") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
        parts_of(&format!(
            "{MINIMAL}health: {{credentials_file: {}}}\n",
            creds.display()
        ))
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fall_failures_in_a_row_take_an_up_backend_down() {
        let mut c = Counter::new(2, 3);
        assert_eq!(c.observe(Health::Up, false), None);
        assert!(c.unsettled());
        assert_eq!(c.observe(Health::Up, false), None);
        // A pass in between starts the count again.
        assert_eq!(c.observe(Health::Up, true), None);
        assert!(!c.unsettled());
        assert_eq!(c.observe(Health::Up, false), None);
        assert_eq!(c.observe(Health::Up, false), None);
        assert_eq!(c.observe(Health::Up, false), Some(Health::Down));
        assert!(!c.unsettled(), "settled after the change");
    }

    #[test]
    fn rise_passes_in_a_row_bring_a_down_backend_up() {
        let mut c = Counter::new(2, 3);
        assert_eq!(c.observe(Health::Down, false), None);
        assert!(!c.unsettled());
        assert_eq!(c.observe(Health::Down, true), None);
        assert!(c.unsettled());
        assert_eq!(c.observe(Health::Down, false), None);
        assert_eq!(c.observe(Health::Down, true), None);
        assert_eq!(c.observe(Health::Down, true), Some(Health::Up));
        // Passes on an up backend change nothing.
        assert_eq!(c.observe(Health::Up, true), None);
    }

    #[test]
    fn rise_and_fall_of_one_act_at_once_and_reset_forgets() {
        let mut c = Counter::new(1, 1);
        assert_eq!(c.observe(Health::Up, false), Some(Health::Down));
        assert_eq!(c.observe(Health::Down, true), Some(Health::Up));
        let mut c = Counter::new(0, 0);
        assert_eq!(
            c.observe(Health::Up, false),
            Some(Health::Down),
            "0 counts as 1"
        );
        let mut c = Counter::new(2, 2);
        c.observe(Health::Up, false);
        c.reset();
        assert_eq!(c.observe(Health::Up, false), None);
        assert_eq!(c.observe(Health::Up, false), Some(Health::Down));
    }
}
