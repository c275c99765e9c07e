//! A backend (Dovecot: mail host): an address, a weight, a tag, and two separate states, the
//! one people set (admin) and the one the health checker sets. The checker never overrides an
//! admin's decision.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{BackendSettings, Protocol};
use crate::metrics::BackendLabel;

/// What an administrator decided about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    Up,
    /// Takes no users at all (Dovecot's `director down`).
    Down,
    /// Drained for maintenance: weight 0, users moved off, health checks skipped; only the
    /// allowed test users (`state::Maintenance`) are still routed to it.
    Maintenance,
}

impl AdminState {
    /// The name in logs, admin output and the state file.
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Up => "up",
            AdminState::Down => "down",
            AdminState::Maintenance => "maintenance",
        }
    }
}

/// What the health checker found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Down,
}

impl Health {
    /// The name in logs and admin output.
    pub fn name(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// One backend: one IP address (a host name that resolves to several is several backends).
#[derive(Debug, Clone)]
pub struct Backend {
    pub ip: IpAddr,
    /// The name as configured (a DNS name or the IP), for people and TLS server names.
    /// Shared, like the tag: a route hands out a copy of its backend at every login.
    pub host: Arc<str>,
    /// Points on the ring (Dovecot's vhost count). 0: no new users, existing ones stay.
    pub weight: u32,
    /// The pool this backend belongs to; users of a tag only go to backends of that tag.
    pub tag: Arc<str>,
    pub admin: AdminState,
    pub health: Health,
    /// Ports, TLS and forwarding.
    pub settings: Arc<BackendSettings>,
}

impl Backend {
    /// Whether users who already have a record on this backend may keep using it. A
    /// backend in maintenance serves only its allowed test users (see `state::router`).
    pub fn serves_existing(&self) -> bool {
        self.admin == AdminState::Up && self.health == Health::Up
    }

    /// Whether the ring may send new users here.
    pub fn takes_new_users(&self) -> bool {
        self.admin == AdminState::Up && self.health == Health::Up && self.weight > 0
    }

    /// Where this backend listens for `protocol`.
    pub fn address(&self, protocol: Protocol) -> SocketAddr {
        SocketAddr::new(self.ip, self.settings.port(protocol))
    }
}

/// A backend in metrics labels: its IP and tag.
impl<'a> From<&'a Backend> for BackendLabel<'a> {
    fn from(b: &'a Backend) -> Self {
        BackendLabel {
            ip: b.ip,
            tag: &b.tag,
        }
    }
}
