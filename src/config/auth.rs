//! `auth`: who checks a client's credentials. `passthrough` (the default): nobody at the
//! director, the backend decides. `dovecot`: a Dovecot auth service that the operator runs
//! beside the director with the site's passdb, reached over its auth-client protocol; its
//! answer decides, and the passdb's fields steer routing. Set globally, and per listener.

use std::time::Duration;

use serde::Deserialize;

use super::{err, secs, ConfigError, HumanDuration};

/// Who checks the credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// The director checks nothing: the backend accepts or refuses the login.
    #[default]
    Passthrough,
    /// A Dovecot auth service checks the credentials first.
    Dovecot,
}

/// The `auth` section (top level, or a listener's own).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// `dovecot`: the auth service's client socket: a unix socket path, or `HOST:PORT` of an
    /// `inet_listener`. Name the listener `...-login` (e.g. `director-login`): only a login
    /// socket returns the password (`pass`) a proxy needs for mechanisms like CRAM-MD5.
    pub socket: Option<String>,
    /// `dovecot`, LMTP listeners: the service's `auth-master` socket (path or `HOST:PORT`),
    /// for recipient lookups without a password, as Dovecot's LMTP proxy does them.
    pub master_socket: Option<String>,
    /// How long connecting to the service (and its handshake) may take.
    pub connect_timeout: HumanDuration,
    /// How long one answer of the service may take. Keep it above the service's
    /// `auth_failure_delay` (2 s by default), by which it holds back every failure.
    pub request_timeout: HumanDuration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Passthrough,
            socket: None,
            master_socket: None,
            connect_timeout: secs(5),
            request_timeout: secs(30),
        }
    }
}

impl AuthConfig {
    /// Checks the section found at `field` (`auth`, `listeners[1].auth`) by itself.
    pub(super) fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let zero = |d: &HumanDuration| d.0 == Duration::ZERO;
        if zero(&self.connect_timeout) {
            return Err(err(
                format_args!("{field}.connect_timeout"),
                "must be longer than 0s",
            ));
        }
        if zero(&self.request_timeout) {
            return Err(err(
                format_args!("{field}.request_timeout"),
                "must be longer than 0s",
            ));
        }
        for (name, value) in [
            ("socket", &self.socket),
            ("master_socket", &self.master_socket),
        ] {
            if value.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(err(format_args!("{field}.{name}"), "is empty"));
            }
        }
        if self.mode == AuthMode::Passthrough
            && (self.socket.is_some() || self.master_socket.is_some())
        {
            return Err(err(
                format_args!("{field}.mode"),
                "is passthrough, which uses no auth service: set `mode: dovecot` or remove the sockets",
            ));
        }
        Ok(())
    }

    /// Checks that the section found at `field` has what a listener of LMTP (`lmtp`) or of a
    /// login protocol needs.
    pub(super) fn validate_for(&self, field: &str, lmtp: bool) -> Result<(), ConfigError> {
        match self.mode {
            AuthMode::Passthrough => {}
            AuthMode::Dovecot if lmtp => {
                if self.master_socket.is_none() {
                    return Err(err(
                        format_args!("{field}.master_socket"),
                        "is needed by an LMTP listener in dovecot mode (recipients are looked up over the auth service's auth-master socket); or give the listener `auth: {mode: passthrough}`",
                    ));
                }
            }
            AuthMode::Dovecot => {
                if self.socket.is_none() {
                    return Err(err(
                        format_args!("{field}.socket"),
                        "is needed in dovecot mode: the auth service's client socket (a path, or HOST:PORT)",
                    ));
                }
            }
        }
        Ok(())
    }
}
