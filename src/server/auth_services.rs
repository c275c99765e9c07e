//! The auth services the listeners use (`auth.mode: dovecot`), one client per socket, shared
//! by every listener that names it and kept across reloads: a Dovecot login socket takes one
//! connection per client pid, and a kept connection needs no new handshake. The auth-master
//! sockets of LMTP listeners (recipient lookups) are kept the same way, so their state (up or
//! down, logged once per change) carries over a reload. A reload that changes a socket's
//! timeouts applies them at the next restart (said in the log).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::dovecot::{
    AuthClient, AuthClientOptions, AuthMaster, AuthMasterOptions, Endpoint,
};
use crate::auth::lookups::UserLookups;
use crate::auth::service::AuthService;
use crate::config::{AuthConfig, AuthMode, Config, Protocol};
use crate::metrics::Metrics;

/// Clients by socket, each with the configuration it was made with.
type Known<T> = Arc<Mutex<HashMap<String, (AuthConfig, T)>>>;

/// Every auth service made so far, by socket.
#[derive(Clone, Default)]
pub struct AuthServices {
    known: Known<AuthService>,
    /// The auth-master sockets' lookups.
    masters: Known<UserLookups>,
}

impl AuthServices {
    /// The services `config`'s login listeners need, by socket: the known ones, and new ones
    /// for sockets not seen before. Nothing connects until the first client.
    pub fn for_config(&self, config: &Config, metrics: &Metrics) -> HashMap<String, AuthService> {
        let login = |auth: &AuthConfig, _| login_socket(auth).map(str::to_owned);
        used(&self.known, config, login, |socket, auth| {
            let options = AuthClientOptions {
                connect_timeout: auth.connect_timeout.into(),
                request_timeout: auth.request_timeout.into(),
                ..AuthClientOptions::new(Endpoint::parse(socket))
            };
            AuthService::new(AuthClient::new(options), metrics.clone())
        })
    }

    /// The recipient lookups `config`'s LMTP listeners need, by auth-master socket, kept and
    /// made like [`AuthServices::for_config`]'s services.
    pub fn lookups_for_config(
        &self,
        config: &Config,
        metrics: &Metrics,
    ) -> HashMap<String, UserLookups> {
        let lmtp_master = |auth: &AuthConfig, protocol| match protocol {
            Protocol::Lmtp => master_socket(auth).map(str::to_owned),
            _ => None,
        };
        used(&self.masters, config, lmtp_master, |socket, auth| {
            let options = AuthMasterOptions {
                connect_timeout: auth.connect_timeout.into(),
                request_timeout: auth.request_timeout.into(),
                ..AuthMasterOptions::new(Endpoint::parse(socket))
            };
            UserLookups::new(AuthMaster::new(options), metrics.clone())
        })
    }
}

/// The clients of the sockets that `config`'s listeners name (`socket_of` a listener's auth
/// section and protocol), by socket: those in `known`, and new ones (`make`) added to it.
fn used<T: Clone>(
    known: &Known<T>,
    config: &Config,
    socket_of: impl Fn(&AuthConfig, Protocol) -> Option<String>,
    make: impl Fn(&str, &AuthConfig) -> T,
) -> HashMap<String, T> {
    let mut known = known.lock().unwrap_or_else(|e| e.into_inner());
    let mut used = HashMap::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let (auth, _) = config.listener_auth(i);
        let Some(socket) = socket_of(auth, listener.protocol.into()) else {
            continue;
        };
        let (first, client) = known
            .entry(socket.clone())
            .or_insert_with(|| (auth.clone(), make(&socket, auth)));
        if first.connect_timeout != auth.connect_timeout
            || first.request_timeout != auth.request_timeout
        {
            tracing::warn!(auth = %socket, "new timeouts for this auth socket take effect at the next restart");
        }
        used.insert(socket, client.clone());
    }
    used
}

/// The auth-client socket a login listener with `auth` uses, if it uses one.
pub fn login_socket(auth: &AuthConfig) -> Option<&str> {
    match auth.mode {
        AuthMode::Dovecot => auth.socket.as_deref(),
        AuthMode::Passthrough => None,
    }
}

/// The auth-master socket an LMTP listener with `auth` looks its recipients up on, if any.
pub fn master_socket(auth: &AuthConfig) -> Option<&str> {
    match auth.mode {
        AuthMode::Dovecot => auth.master_socket.as_deref(),
        AuthMode::Passthrough => None,
    }
}
