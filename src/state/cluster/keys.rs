//! What the directors keep in etcd, under the configured prefix (DESIGN.md, "Cluster
//! mode"), and how each value is written (JSON, small, with short field names where there
//! are many of them):
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `backends/<ip>` | [`BackendValue`] | admin verbs, the first director to start | none |
//! | `health/<ip>` | [`HealthValue`] | the elected checker only | none |
//! | `checks_pause` | [`PauseValue`] | `checks pause` | none |
//! | `users/<hash>` | [`UserValue`]: the sticky record | logins, refreshes, moves | none |
//! | `directors/<id>` | [`MemberValue`] | each director, for itself | its own |
//! | `checker` | the elected checker's id | the election | the checker's |
//! | `acks/<move id>/<id>` | empty | a director that ended its sessions of a moved user | its own |
//! | `suspects/<ip>/<id>` | [`SuspectValue`] | a director whose login found `ip` unresponsive | its own |
//!
//! Keys under a lease vanish when their director stops renewing it, so membership, the
//! checker's seat, acknowledgements and suspicions all follow the directors' lives.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::backend::{AdminState, Health};

/// Milliseconds since the Unix epoch: wall-clock times in values (compared across
/// directors, so only where a skew of a second does no harm: refreshes, lag, ages).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The current time as [`unix_ms`].
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// A key of ours, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Backend(IpAddr),
    Health(IpAddr),
    ChecksPause,
    User(u32),
    Member(String),
    Checker,
    Ack { move_id: String, director: String },
    Suspect { ip: IpAddr, director: String },
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix every key starts with (watched whole).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn backend(&self, ip: IpAddr) -> String {
        format!("{}backends/{ip}", self.prefix)
    }
    pub fn health(&self, ip: IpAddr) -> String {
        format!("{}health/{ip}", self.prefix)
    }
    pub fn checks_pause(&self) -> String {
        format!("{}checks_pause", self.prefix)
    }
    pub fn user(&self, hash: u32) -> String {
        format!("{}users/{hash:08x}", self.prefix)
    }
    pub fn users(&self) -> String {
        format!("{}users/", self.prefix)
    }
    pub fn member(&self, id: &str) -> String {
        format!("{}directors/{id}", self.prefix)
    }
    pub fn checker(&self) -> String {
        format!("{}checker", self.prefix)
    }
    pub fn ack(&self, move_id: &str, director: &str) -> String {
        format!("{}acks/{move_id}/{director}", self.prefix)
    }
    pub fn acks(&self, move_id: &str) -> String {
        format!("{}acks/{move_id}/", self.prefix)
    }
    pub fn suspect(&self, ip: IpAddr, director: &str) -> String {
        format!("{}suspects/{ip}/{director}", self.prefix)
    }

    /// What a key of ours is; `None` for anything else under the prefix.
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(self.prefix.as_str())?;
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        Some(match kind {
            "backends" => Key::Backend(name.parse().ok()?),
            "health" => Key::Health(name.parse().ok()?),
            "checks_pause" => Key::ChecksPause,
            "users" => Key::User(u32::from_str_radix(name, 16).ok()?),
            "directors" if !name.is_empty() => Key::Member(name.to_owned()),
            "checker" => Key::Checker,
            "acks" => {
                let (move_id, director) = name.split_once('/')?;
                Key::Ack {
                    move_id: move_id.to_owned(),
                    director: director.to_owned(),
                }
            }
            "suspects" => {
                let (ip, director) = name.split_once('/')?;
                Key::Suspect {
                    ip: ip.parse().ok()?,
                    director: director.to_owned(),
                }
            }
            _ => return None,
        })
    }
}

/// A backend as administrators left it (`backends/<ip>`). Ports and TLS are each director's
/// configuration (the entry of that host name, else `backend_defaults`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendValue {
    pub host: String,
    pub weight: u32,
    #[serde(default)]
    pub tag: String,
    pub admin: AdminState,
    #[serde(default)]
    pub maintenance: Option<MaintenanceValue>,
}

/// A maintenance under way: as the state file keeps it (times in seconds since the epoch).
pub type MaintenanceValue = crate::state::file::SavedMaintenance;

/// The checker's verdict on a backend (`health/<ip>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthValue {
    pub health: Health,
    /// The checker that decided.
    pub by: String,
    pub at: u64,
}

/// A pause of the health checks (`checks_pause`): as the state file keeps it.
pub type PauseValue = crate::state::file::SavedPause;

/// A sticky record (`users/<hash>`): one per user with sessions or a recent one, so kept
/// short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserValue {
    /// The backend; `None` only while a user without a record is moved (`m` set).
    #[serde(rename = "b", default)]
    pub backend: Option<IpAddr>,
    /// Last refresh ([`unix_ms`]): a director with sessions of the user rewrites it every
    /// `record_refresh`; the checker drops records older than `user_expire`.
    #[serde(rename = "r")]
    pub refreshed: u64,
    /// A move under way: logins wait, every director ends its sessions of the user and
    /// acknowledges.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<Box<MoveMark>>,
}

/// A move of one user under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveMark {
    /// Unique per move: acknowledgements are `acks/<id>/<director>`.
    pub id: String,
    /// The director running the move (it waits for the others' acknowledgements).
    pub by: String,
}

/// A live director (`directors/<id>`, under its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberValue {
    /// Where it serves, as it says (`cluster.advertise`).
    pub address: String,
    pub version: String,
    /// When it took its current lease ([`unix_ms`]).
    pub since: u64,
    /// Sessions it relays, as of `at`.
    pub sessions: u64,
    pub at: u64,
}

/// A real login found a backend unresponsive (`suspects/<ip>/<director>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectValue {
    pub detail: String,
    pub at: u64,
}

/// Encodes a value.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("cluster values serialise")
}

/// Decodes a value; `None` (and the caller logs) for one this version cannot read.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back() {
        let k = Keys::new("/director/");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let six: IpAddr = "2001:db8::1".parse().unwrap();
        for (key, parsed) in [
            (k.backend(ip), Key::Backend(ip)),
            (k.backend(six), Key::Backend(six)),
            (k.health(ip), Key::Health(ip)),
            (k.checks_pause(), Key::ChecksPause),
            (k.user(0xdead_beef), Key::User(0xdead_beef)),
            (k.user(7), Key::User(7)),
            (k.member("d1"), Key::Member("d1".into())),
            (k.checker(), Key::Checker),
            (
                k.ack("m1", "d2"),
                Key::Ack {
                    move_id: "m1".into(),
                    director: "d2".into(),
                },
            ),
            (
                k.suspect(ip, "d3"),
                Key::Suspect {
                    ip,
                    director: "d3".into(),
                },
            ),
        ] {
            assert_eq!(k.parse(key.as_bytes()), Some(parsed), "{key}");
        }
        assert_eq!(k.parse(b"/other/backends/10.0.0.1"), None);
        assert_eq!(k.parse(b"/director/users/xyz"), None);
        assert_eq!(k.parse(b"/director/unknown"), None);
    }

    #[test]
    fn a_record_is_short_and_reads_back() {
        let v = UserValue {
            backend: Some("10.0.0.1".parse().unwrap()),
            refreshed: 1_700_000_000_000,
            moving: None,
        };
        let bytes = encode(&v);
        assert_eq!(bytes, br#"{"b":"10.0.0.1","r":1700000000000}"#);
        assert_eq!(decode::<UserValue>(&bytes), Some(v));
    }
}
