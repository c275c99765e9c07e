//! Whether one socket of the auth service answers, as the log and `director_auth_service_up`
//! tell it: one line when it stops answering and one when it answers again, however many
//! requests fail in between (a storm of logins or recipients writes no storm of lines).

use std::sync::atomic::{AtomicBool, Ordering};

use super::dovecot::AuthError;
use crate::metrics::Metrics;

/// The state of one endpoint (an auth-client or an auth-master socket).
pub struct Reachability {
    endpoint: String,
    /// What its users get while it is down, for the log line (`logins get a temporary
    /// failure`).
    meanwhile: &'static str,
    metrics: Metrics,
    /// Whether the last contact worked; up until the first failure.
    up: AtomicBool,
}

impl Reachability {
    /// An endpoint taken to answer until it fails.
    pub fn new(endpoint: String, meanwhile: &'static str, metrics: Metrics) -> Self {
        metrics.auth_service_up(endpoint.clone(), true);
        Reachability {
            endpoint,
            meanwhile,
            metrics,
            up: AtomicBool::new(true),
        }
    }

    /// It answered: its return is logged once.
    pub fn reached(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!(auth = %self.endpoint, "auth service reachable again");
            self.metrics.auth_service_up(self.endpoint.clone(), true);
        }
    }

    /// It could not be used: the first failure of a run of them is logged.
    pub fn failed(&self, error: &AuthError) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(auth = %self.endpoint, %error,
                           "auth service unusable: {} until it answers again", self.meanwhile);
            self.metrics.auth_service_up(self.endpoint.clone(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up_gauge(m: &Metrics, endpoint: &str) -> Option<f64> {
        m.sample("director_auth_service_up", endpoint)
    }

    #[test]
    fn the_gauge_follows_the_state_changes() {
        let m = Metrics::new();
        let r = Reachability::new("/run/auth-master".into(), "recipients wait", m.clone());
        assert_eq!(up_gauge(&m, "/run/auth-master"), Some(1.0));
        let error = AuthError::Connect {
            endpoint: "/run/auth-master".into(),
            reason: "refused".into(),
        };
        r.failed(&error);
        r.failed(&error);
        assert_eq!(up_gauge(&m, "/run/auth-master"), Some(0.0));
        r.reached();
        assert_eq!(up_gauge(&m, "/run/auth-master"), Some(1.0));
    }
}
