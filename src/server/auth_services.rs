//! The auth services the listeners use (`auth.mode: dovecot`), one client per socket, shared
//! by every listener that names it and kept across reloads: a Dovecot login socket takes one
//! connection per client pid, and a kept connection needs no new handshake. A reload that
//! changes a socket's timeouts applies them at the next restart (said in the log).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::dovecot::{AuthClient, AuthClientOptions, Endpoint};
use crate::auth::service::AuthService;
use crate::config::{AuthConfig, AuthMode, Config};
use crate::metrics::Metrics;

/// Every auth service made so far, by socket.
#[derive(Clone, Default)]
pub struct AuthServices {
    known: Arc<Mutex<HashMap<String, (AuthConfig, AuthService)>>>,
}

impl AuthServices {
    /// The services `config`'s login listeners need, by socket: the known ones, and new ones
    /// for sockets not seen before. Nothing connects until the first client.
    pub fn for_config(&self, config: &Config, metrics: &Metrics) -> HashMap<String, AuthService> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = HashMap::new();
        for i in 0..config.listeners.len() {
            let (auth, _) = config.listener_auth(i);
            let Some(socket) = login_socket(auth) else {
                continue;
            };
            let (first, service) = known.entry(socket.to_owned()).or_insert_with(|| {
                let options = AuthClientOptions {
                    connect_timeout: auth.connect_timeout.into(),
                    request_timeout: auth.request_timeout.into(),
                    ..AuthClientOptions::new(Endpoint::parse(socket))
                };
                let service = AuthService::new(AuthClient::new(options), metrics.clone());
                (auth.clone(), service)
            });
            if first.connect_timeout != auth.connect_timeout
                || first.request_timeout != auth.request_timeout
            {
                tracing::warn!(auth = %socket, "new timeouts for this auth socket take effect at the next restart");
            }
            used.insert(socket.to_owned(), service.clone());
        }
        used
    }
}

/// The auth-client socket a login listener with `auth` uses, if it uses one.
pub fn login_socket(auth: &AuthConfig) -> Option<&str> {
    match auth.mode {
        AuthMode::Dovecot => auth.socket.as_deref(),
        AuthMode::Passthrough => None,
    }
}
