//! The metrics listener, on its own address (`metrics.address`), apart from the mail ports and
//! the admin API:
//!
//! - `GET /metrics`: the catalogue ([`crate::metrics`]) in Prometheus' text format.
//! - `GET /healthz`: `200 ok` while the process serves requests (liveness).
//! - `GET /readyz`: `200 ready` when the director can route: its first round of health checks
//!   is done (or health checks are off; in a cluster: it holds its lease, and routes by the
//!   cluster's verdicts) and at least one backend takes new users; else `503` with the reason. A TCP load balancer or keepalived in front of several directors uses it
//!   to stop sending clients to one that has nowhere to send them.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::checker::HealthChecker;
use crate::login::LoginGates;
use crate::metrics::Metrics;
use crate::state::sessions::Sessions;
use crate::state::{State, StateMode};

/// What the endpoints read.
#[derive(Clone)]
pub struct MetricsContext {
    pub metrics: Metrics,
    pub state: Arc<dyn State>,
    pub sessions: Sessions,
    /// `None` when health checks are disabled.
    pub health: Option<HealthChecker>,
    /// The listeners' login turns per backend (logins waiting for one).
    pub gates: LoginGates,
}

impl MetricsContext {
    /// `Ok` when the director can route new users, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if let Err(e) = self.state.serving() {
            return Err(e.to_string());
        }
        if let Some(h) = &self.health {
            // A single director knows nothing of its backends before its own first checks.
            // A cluster member routes by the cluster's verdicts (the elected checker's, in
            // etcd) and runs no checks of its own unless elected: nothing to wait for.
            if matches!(self.state.mode(), StateMode::Single) && !h.first_round_done() {
                return Err("the first round of health checks is not done yet".into());
            }
        }
        let set = self.state.backends();
        if set.backends.values().any(|b| b.takes_new_users()) {
            Ok(())
        } else {
            Err(format!(
                "no backend takes new users ({} configured: all down, in maintenance or at weight 0)",
                set.backends.len()
            ))
        }
    }
}

/// The bound metrics listener.
pub struct MetricsServer {
    listener: TcpListener,
    context: MetricsContext,
}

impl MetricsServer {
    /// Binds `address`.
    pub async fn bind(address: SocketAddr, context: MetricsContext) -> std::io::Result<Self> {
        Ok(MetricsServer {
            listener: TcpListener::bind(address).await?,
            context,
        })
    }

    /// The bound address (port 0 gets an ephemeral port).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the future is dropped.
    pub async fn serve(self) {
        let app = axum::Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self.context);
        if let Err(e) = axum::serve(self.listener, app).await {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    }
}

async fn metrics(Extract(c): Extract<MetricsContext>) -> Response {
    let text = c
        .metrics
        .render(&*c.state, &c.sessions, c.health.as_ref(), Some(&c.gates));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(Extract(c): Extract<MetricsContext>) -> Response {
    match c.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}
