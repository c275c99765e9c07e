//! The gauges that mirror state, set at scrape time: backends (health, admin state, weight,
//! users, live sessions, last check), sticky records, checks paused. Reading the state, the
//! session registry and the health checker is done here, above the catalogue, so that the
//! catalogue ([`crate::metrics`]) depends on none of them and every part can count there.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::config::Protocol;
use crate::health::checker::HealthChecker;
use crate::health::probe::CheckCode;
use crate::login::LoginGates;
use crate::metrics::{Metrics, LOGIN_PROTOCOLS};
use crate::state::backend::{AdminState, Health};
use crate::state::sessions::Sessions;
use crate::state::State;

impl Metrics {
    /// Sets the gauges that mirror state: backends (health, admin state, weight, records,
    /// sessions, last check), sticky records, checks paused. Series of removed backends go.
    pub fn refresh(
        &self,
        state: &dyn State,
        sessions: &Sessions,
        health: Option<&HealthChecker>,
        gates: Option<&LoginGates>,
    ) {
        let _one = self.inner.refresh.lock().unwrap();
        let i = &self.inner;
        let set = state.backends();
        let now = Instant::now();
        // Counted shard by shard: a scrape never lists the records.
        let records = state.record_counts(now);
        let mut live: BTreeMap<(IpAddr, Protocol), i64> = BTreeMap::new();
        for s in sessions.list() {
            *live.entry((s.backend.ip(), s.protocol)).or_default() += 1;
        }
        let last: BTreeMap<IpAddr, CheckCode> = health
            .map(|h| {
                h.last_results()
                    .into_iter()
                    .map(|(ip, r)| (ip, r.code))
                    .collect()
            })
            .unwrap_or_default();
        let waiting = gates
            .map(|g| g.waiting(|ip| set.backends.contains_key(&ip)))
            .unwrap_or_default();
        for g in [
            &i.backend_logins_waiting,
            &i.backend_up,
            &i.backend_admin_state,
            &i.backend_weight,
            &i.backend_users,
            &i.backend_sessions,
            &i.backend_last_check,
        ] {
            g.reset();
        }
        for b in set.backends.values() {
            let ip = b.ip.to_string();
            let l = [ip.as_str(), &b.tag[..]];
            i.backend_up
                .with_label_values(&l)
                .set((b.health == Health::Up) as i64);
            for s in [AdminState::Up, AdminState::Down, AdminState::Maintenance] {
                i.backend_admin_state
                    .with_label_values(&[ip.as_str(), &b.tag[..], s.name()])
                    .set((b.admin == s) as i64);
            }
            i.backend_weight.with_label_values(&l).set(b.weight as i64);
            i.backend_logins_waiting
                .with_label_values(&l)
                .set(waiting.get(&b.ip).copied().unwrap_or(0));
            i.backend_users
                .with_label_values(&l)
                .set(records.by_backend.get(&b.ip).map_or(0, |n| *n as i64));
            for p in LOGIN_PROTOCOLS {
                i.backend_sessions
                    .with_label_values(&[ip.as_str(), &b.tag[..], p.name()])
                    .set(live.get(&(b.ip, p)).copied().unwrap_or(0));
            }
            if let Some(code) = last.get(&b.ip) {
                i.backend_last_check
                    .with_label_values(&[ip.as_str(), &b.tag[..], code.name()])
                    .set(1);
            }
            // Per-backend counters start at 0 so that they exist before the first event.
            i.backend_connect_failures_total.with_label_values(&l);
            i.backend_login_turns_missed_total.with_label_values(&l);
            for p in LOGIN_PROTOCOLS {
                i.backend_logins_total.with_label_values(&[
                    ip.as_str(),
                    &b.tag[..],
                    p.name(),
                    "ok",
                ]);
            }
            if health.is_some() {
                i.backend_check_results_total
                    .with_label_values(&[ip.as_str(), &b.tag[..], "ok"]);
                i.backend_check_duration
                    .with_label_values(&[ip.as_str(), &b.tag[..], "ok"]);
                for to in [Health::Up, Health::Down] {
                    i.backend_health_transitions_total.with_label_values(&[
                        ip.as_str(),
                        &b.tag[..],
                        to.name(),
                    ]);
                }
            }
        }
        i.sticky_records.set(records.total as i64);
        i.checks_paused.set(state.checks_pause().is_some() as i64);
    }

    /// The text exposition of every metric, state gauges refreshed first.
    pub fn render(
        &self,
        state: &dyn State,
        sessions: &Sessions,
        health: Option<&HealthChecker>,
        gates: Option<&LoginGates>,
    ) -> String {
        self.refresh(state, sessions, health, gates);
        self.text()
    }
}
