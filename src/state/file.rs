//! The state file (`state_file` in the configuration): what administrators changed (backends
//! added or removed, weights, tags, up/down, maintenance, a pause of the health checks), so
//! that a restart never undoes a drain. Written atomically (temporary file, fsync, rename) after
//! every admin change; read at start, when it wins over the configuration's backend list.
//! Sticky records and health are not kept: they are rebuilt by logins and checks.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::config::{Config, ConfigError};
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::{ChecksPause, Maintenance, State};

/// The file's format version; a file with another is refused rather than misread.
const VERSION: u32 = 1;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub backends: Vec<SavedBackend>,
    /// A pause of all health checks (`director checks pause`).
    #[serde(default)]
    pub checks_pause: Option<SavedPause>,
}

/// One backend as an admin left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBackend {
    /// The name it was added or configured with (ports and TLS come from the configuration's
    /// entry of that name, or `backend_defaults`).
    pub host: String,
    pub ip: IpAddr,
    pub weight: u32,
    #[serde(default)]
    pub tag: String,
    pub admin: AdminState,
    #[serde(default)]
    pub maintenance: Option<SavedMaintenance>,
}

/// A maintenance under way. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMaintenance {
    pub previous_weight: u32,
    #[serde(default)]
    pub allowed_users: Vec<String>,
    pub since: u64,
    #[serde(default)]
    pub until: Option<u64>,
}

/// A pause of the health checks. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPause {
    pub since: u64,
    #[serde(default)]
    pub until: Option<u64>,
}

impl SavedMaintenance {
    /// A maintenance as the file (and etcd) keeps it.
    pub fn of(m: &Maintenance) -> Self {
        SavedMaintenance {
            previous_weight: m.previous_weight,
            allowed_users: m.allowed_users.clone(),
            since: unix_secs(m.since),
            until: m.until.map(unix_secs_ceil),
        }
    }

    /// The maintenance it keeps.
    pub fn restore(&self) -> Maintenance {
        Maintenance {
            previous_weight: self.previous_weight,
            allowed_users: self.allowed_users.clone(),
            since: from_unix(self.since),
            until: self.until.map(from_unix),
        }
    }
}

impl SavedPause {
    /// A pause as the file (and etcd) keeps it.
    pub fn of(p: ChecksPause) -> Self {
        SavedPause {
            since: unix_secs(p.since),
            until: p.until.map(unix_secs_ceil),
        }
    }

    /// The pause it keeps.
    pub fn restore(&self) -> ChecksPause {
        ChecksPause {
            since: from_unix(self.since),
            until: self.until.map(from_unix),
        }
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A time in the file, rounded up to the next second (so that a saved end is never earlier
/// than the real one).
fn unix_secs_ceil(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .unwrap_or(0)
}

/// What `state` holds now, as the file keeps it.
pub fn snapshot(state: &dyn State) -> SavedState {
    let maintenance = state.maintenance();
    let backends = state
        .backends()
        .backends
        .values()
        .map(|b| SavedBackend {
            host: b.host.to_string(),
            ip: b.ip,
            weight: b.weight,
            tag: b.tag.to_string(),
            admin: b.admin,
            maintenance: maintenance.get(&b.ip).map(SavedMaintenance::of),
        })
        .collect();
    SavedState {
        version: VERSION,
        backends,
        checks_pause: state.checks_pause().map(SavedPause::of),
    }
}

/// Writes `saved` to `path` atomically: a temporary file beside it, fsync, rename, fsync of
/// the directory. The parent directory is created if missing.
pub fn save(path: &Path, saved: &SavedState) -> Result<(), String> {
    let text = crate::config::yaml::to_string(saved).map_err(|e| e.to_string())?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(b"# director admin state: written by the director on every admin change.\n")?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Reads the state file; `None` when it does not exist yet.
pub fn load(path: &Path) -> Result<Option<SavedState>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError(format!(
                "state_file: cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let saved: SavedState = crate::config::yaml::from_str(&text)
        .map_err(|e| ConfigError(format!("state_file: {}: {e}", path.display())))?;
    if saved.version != VERSION {
        return Err(ConfigError(format!(
            "state_file: {}: version {} is not {VERSION}, the version this director writes",
            path.display(),
            saved.version
        )));
    }
    Ok(Some(saved))
}

/// Makes `state` what `saved` says: its backend list replaces the configuration's. A
/// maintenance or pause whose end has passed (`now`) is over: the backend gets its previous
/// weight back and is up.
pub fn apply(
    saved: &SavedState,
    config: &Config,
    state: &crate::state::local::LocalState,
    now: SystemTime,
) {
    let keep: Vec<IpAddr> = saved.backends.iter().map(|b| b.ip).collect();
    for ip in state.backends().backends.keys() {
        if !keep.contains(ip) {
            let _ = state.remove_backend(*ip);
        }
    }
    for b in &saved.backends {
        let mut backend = Backend {
            ip: b.ip,
            host: b.host.as_str().into(),
            weight: b.weight.min(crate::config::MAX_WEIGHT),
            tag: b.tag.as_str().into(),
            admin: b.admin,
            health: Health::Up,
            settings: Arc::new(config.settings_for_host(&b.host)),
        };
        let mut maintenance = None;
        if let Some(m) = &b.maintenance {
            let mut m = m.restore();
            m.previous_weight = m.previous_weight.min(crate::config::MAX_WEIGHT);
            if m.until.is_some_and(|u| u <= now) {
                info!(backend = %b.ip, "maintenance ended while the director was stopped");
                backend.weight = m.previous_weight;
                backend.admin = AdminState::Up;
            } else {
                maintenance = Some(m);
            }
        }
        if backend.admin == AdminState::Maintenance && maintenance.is_none() {
            maintenance = Some(Maintenance {
                previous_weight: backend.weight,
                allowed_users: Vec::new(),
                since: now,
                until: None,
            });
            backend.weight = 0;
        }
        state.upsert_backend(backend);
        state.set_maintenance(b.ip, maintenance);
    }
    let pause = saved.checks_pause.as_ref().map(SavedPause::restore);
    state.set_checks_pause(pause.filter(|p| p.until.is_none_or(|u| u > now)));
    info!(
        backends = saved.backends.len(),
        "admin state restored from the state file"
    );
}

/// At start: reads the configured state file, if any, and applies it to `state`.
pub fn restore(
    config: &Config,
    state: &crate::state::local::LocalState,
) -> Result<(), ConfigError> {
    let Some(path) = &config.state_file else {
        return Ok(());
    };
    if let Some(saved) = load(path)? {
        apply(&saved, config, state, SystemTime::now());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::local::LocalState;

    const CONFIG: &str = "listeners: [{protocol: imap, address: 127.0.0.1:1}]\nbackends: [{host: 10.0.0.1}, {host: 10.0.0.2}]\n";

    fn state(config: &Config) -> LocalState {
        let backends = (0..config.backends.len())
            .map(|i| Backend {
                ip: config.backends[i].host.parse().unwrap(),
                host: config.backends[i].host.as_str().into(),
                weight: 100,
                tag: "".into(),
                admin: AdminState::Up,
                health: Health::Up,
                settings: Arc::new(config.backend_settings(i)),
            })
            .collect();
        LocalState::new(backends, Duration::from_secs(900))
    }

    #[test]
    fn round_trip_through_a_file_and_expiry_at_load() {
        let config = Config::parse(CONFIG).unwrap();
        let s = state(&config);
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        s.set_weight(one, 0).unwrap();
        s.set_admin(one, AdminState::Maintenance).unwrap();
        s.set_maintenance(
            one,
            Some(Maintenance {
                previous_weight: 70,
                allowed_users: vec!["tester".into()],
                since: SystemTime::now(),
                until: Some(SystemTime::now() + Duration::from_secs(3600)),
            }),
        );
        s.remove_backend(two).unwrap();
        let dir = std::env::temp_dir().join(format!("director-state-file-{}", std::process::id()));
        let path = dir.join("sub").join("state.yaml");
        let saved = snapshot(&s);
        save(&path, &saved).unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded, saved);

        let fresh = state(&config);
        apply(&loaded, &config, &fresh, SystemTime::now());
        let set = fresh.backends();
        assert_eq!(set.backends.len(), 1);
        assert_eq!(set.get(one).unwrap().admin, AdminState::Maintenance);
        assert_eq!(set.get(one).unwrap().weight, 0);
        assert!(fresh.maintenance()[&one].allows("TESTER"));

        // Two hours later the maintenance is over.
        let later = state(&config);
        apply(
            &loaded,
            &config,
            &later,
            SystemTime::now() + Duration::from_secs(7200),
        );
        assert_eq!(later.backends().get(one).unwrap().admin, AdminState::Up);
        assert_eq!(later.backends().get(one).unwrap().weight, 70);
        assert!(later.maintenance().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
