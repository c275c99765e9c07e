//! Several directors over one pool, sharing their state through a real etcd: the
//! configuration each gets, and the oracle that never asks a director (which backends a user
//! is logged in on, from `doveadm who` on the backends themselves).

#![allow(dead_code)]

use std::time::Duration;

use super::director::{config_yaml, DirectorOptions, TestDirector};
use super::dovecot::Pool;
use super::wait::wait_until;

/// Health checks fast enough for tests: a dead backend is down within about a second.
pub const FAST_HEALTH: &str =
    "health:\n  enabled: true\n  interval: 500ms\n  fast_interval: 200ms\n";

/// The `cluster:` section of director `id` over `endpoints`, with a short lease (fencing
/// and fail-over within seconds, yet no fence when a loaded machine stalls etcd for a
/// second) and `extra` lines (indented by two) added.
pub fn cluster_section(endpoints: &[String], id: &str, extra: &str) -> String {
    format!(
        "cluster:\n  director_id: {id}\n  lease_ttl: 5s\n  move_timeout: 12s\n{extra}  etcd:\n    endpoints: [{}]\n    connect_timeout: 1s\n    request_timeout: 2s\n",
        endpoints.join(", ")
    )
}

/// The options of cluster member `id`: the pool, fast health checks, `top` (more top-level
/// YAML) and the cluster section.
pub fn member_options(endpoints: &[String], id: &str, top: &str) -> DirectorOptions {
    DirectorOptions::with_extra(&format!(
        "{FAST_HEALTH}{top}{}",
        cluster_section(endpoints, id, "")
    ))
}

/// Starts `n` directors `d1`, `d2`... over `pool`, all in one cluster on `endpoints`.
pub fn start_members(pool: &Pool, endpoints: &[String], n: usize) -> Vec<TestDirector> {
    (1..=n)
        .map(|i| start_member(pool, endpoints, &format!("d{i}")))
        .collect()
}

/// Starts director `id` over `pool` in the cluster on `endpoints`.
pub fn start_member(pool: &Pool, endpoints: &[String], id: &str) -> TestDirector {
    TestDirector::start_yaml(&config_yaml(pool, &member_options(endpoints, id, "")))
}

/// Each pool backend's name with the number of `user`'s sessions on it (`doveadm who`),
/// only those with sessions.
pub fn sessions_by_backend(pool: &Pool, user: &str) -> Vec<(String, usize)> {
    pool.backends
        .iter()
        .filter(|b| b.is_running())
        .map(|b| (b.name.clone(), b.who(user)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits until `user` has sessions on exactly one backend, `backend`, per `doveadm who`
/// (a session the director ended may take a moment to leave the backend's list).
pub fn wait_only_on(pool: &Pool, user: &str, backend: &str) {
    wait_until(
        &format!("{user} logged in on {backend} only"),
        Duration::from_secs(10),
        || {
            let on = sessions_by_backend(pool, user);
            (on.len() == 1 && on[0].0 == backend).then_some(())
        },
    );
}
