//! What a configuration needs from outside the file, made ready (and so checked) before a
//! start or a reload uses it: backend names resolved, the certificate, key and CA files read,
//! listener sockets bound; and the configuration file read as the director runs it.
//!
//! [`Config`] checks what the file says on its own; the checks that need the runtime (the
//! check names against the check definitions, the check files, the credentials file) are
//! made by the part that reads them, [`HealthChecker::parts_of`], and [`load_config`] makes
//! both, so every command refuses a file that `serve` would refuse.

use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{AuthMode, BackendTls, Config, ConfigError};
use crate::health::checker::HealthChecker;
use crate::net::tls::BackendTlsContext;
use crate::routing::user_hash::UserHash;
use crate::server::listener::ListenSocket;
use crate::state::backend::{AdminState, Backend, Health};

/// Reads and checks the configuration file at `path`: [`Config::load`], then the health
/// checks, check files and credentials it names (whether or not `health.enabled`).
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    UserHash::from_config(&config).map_err(|e| e.in_file(path))?;
    HealthChecker::parts_of(&config).map_err(|e| e.in_file(path))?;
    Ok(config)
}

/// Resolves the configured backends: a host name with several addresses is several backends.
pub async fn resolve_backends(config: &Config) -> Result<Vec<Backend>, ConfigError> {
    let mut out: Vec<Backend> = Vec::new();
    for (i, b) in config.backends.iter().enumerate() {
        let ips = crate::net::resolve::resolve_host(&b.host)
            .await
            .map_err(|e| ConfigError(format!("backends[{i}].host: {e}")))?;
        let settings = Arc::new(config.backend_settings(i));
        for ip in ips {
            if out.iter().any(|o| o.ip == ip) {
                return Err(ConfigError(format!(
                    "backends[{i}].host: {} resolves to {ip}, which another backend already has",
                    b.host
                )));
            }
            out.push(Backend {
                ip,
                host: b.host.as_str().into(),
                weight: b.weight,
                tag: b.tag.as_str().into(),
                admin: AdminState::Up,
                health: Health::Up,
                settings: settings.clone(),
            });
        }
    }
    Ok(out)
}

/// What `check-config` checks beyond parsing: backends resolve, the certificate and key and
/// the backends' CA files load, the health checks and credentials load, the admin token and
/// the etcd files can be read. Returns the number of backends. (Listener addresses are not
/// bound: the running director may hold them; etcd is not contacted.)
pub async fn check(config: &Config) -> Result<usize, ConfigError> {
    let backends = resolve_backends(config).await?;
    server_tls(config)?;
    backend_tls(config)?;
    if config.health.enabled {
        HealthChecker::parts_of(config)?;
    }
    // The admin token file, with the checks `serve` makes (not readable by group or others).
    if let Some(t) = &config.admin.tcp {
        crate::admin::read_token(&t.token_file)?;
    }
    // The etcd CA, client certificate and key, and password files can be read.
    if let Some(cluster) = &config.cluster {
        cluster.etcd.check_files()?;
    }
    Ok(backends.len())
}

/// The director's own TLS acceptor (`tls` cert and key), read from the files now.
pub fn server_tls(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, ConfigError> {
    match &config.tls {
        Some(files) => Ok(Some(crate::net::tls::acceptor(
            crate::net::tls::server_config(&files.cert, &files.key)
                .map_err(|e| ConfigError(format!("tls: {e}")))?,
        ))),
        None => Ok(None),
    }
}

/// Binds `listeners[index]`.
pub async fn bind_listener(config: &Config, index: usize) -> Result<ListenSocket, ConfigError> {
    let i = index;
    let lc = &config.listeners[index];
    Ok(match (&lc.address, &lc.socket) {
        (Some(address), _) => {
            let backlog = config.limits.listen_backlog.unwrap_or_else(system_backlog);
            ListenSocket::Tcp(listen_tcp(*address, backlog).map_err(|e| {
                ConfigError(format!(
                    "listeners[{i}].address: cannot listen on {address}: {e}"
                ))
            })?)
        }
        (None, Some(path)) => ListenSocket::Unix(
            bind_unix(path).map_err(|e| {
                ConfigError(format!(
                    "listeners[{i}].socket: cannot listen on {}: {e}",
                    path.display()
                ))
            })?,
            path.clone(),
        ),
        (None, None) => unreachable!("checked by Config::validate"),
    })
}

/// A TCP listener on `address` with `backlog` (the kernel caps it at `net.core.somaxconn`).
/// Rust's own `bind` asks for 128: after a restart, a reconnect storm of thousands of clients
/// overflows that queue, and the kernel drops SYNs that clients retransmit only after 1 s, 3 s...
fn listen_tcp(address: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As Rust's own bind does: a restarted director must not wait for TIME_WAIT to clear.
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit it on Linux (a test checks): no setsockopt per connection.
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}

/// The system's largest listen backlog (`net.core.somaxconn`; 4096 since Linux 5.4).
pub fn system_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Binds a unix socket for a local MTA: a stale socket file is replaced, the parent
/// directory created, and the socket made writable by everyone (as Dovecot's `lmtp` socket,
/// mode 0666): restrict access with the directory's permissions.
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Builds the TLS connectors the backends need: those their settings ask for and, where an
/// auth service checks logins, those its passdb may ask for one user (`ssl=`, `starttls=`, with
/// `any-cert` or not) on any backend of the configuration or outside it (`backend_defaults`),
/// even though no backend is configured with TLS.
pub fn backend_tls(config: &Config) -> Result<BackendTlsContext, ConfigError> {
    let per_user =
        (0..config.listeners.len()).any(|i| config.listener_auth(i).0.mode == AuthMode::Dovecot);
    let mut wanted = Vec::new();
    for i in 0..config.backends.len() {
        let s = config.backend_settings(i);
        let field = format!("backends[{i}].tls_ca_file");
        if s.tls != BackendTls::None {
            wanted.push((field.clone(), s.tls_ca_file.clone(), s.tls_verify));
        }
        if per_user {
            wanted.push((field.clone(), s.tls_ca_file.clone(), false));
            if s.tls_ca_file.is_some() {
                wanted.push((field, s.tls_ca_file, true));
            }
        }
    }
    if per_user {
        let ca = config.backend_defaults.tls_ca_file.clone();
        let field = "backend_defaults.tls_ca_file".to_owned();
        wanted.push((field.clone(), ca.clone(), false));
        if ca.is_some() {
            wanted.push((field, ca, true));
        }
    }
    let mut ctx = BackendTlsContext::default();
    for (field, ca_file, verify) in wanted {
        if ctx
            .connectors
            .iter()
            .any(|(ca, v, _)| *ca == ca_file && *v == verify)
        {
            continue;
        }
        let connector = crate::net::tls::connector(ca_file.as_deref(), verify)
            .map_err(|e| ConfigError(format!("{field}: {e}")))?;
        ctx.connectors.push((ca_file, verify, connector));
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners:\n  - protocol: imap\n    address: 127.0.0.1:1143\nbackends:\n  - host: 10.0.0.1\nhealth:\n  enabled: false\n";

    /// A load refuses what the file's own checks and the runtime's checks refuse, and the
    /// error names the file and the field.
    #[test]
    fn load_names_the_file_and_the_field() {
        let dir = std::env::temp_dir().join(format!("director-prepare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("director.yaml");
        std::fs::write(&path, MINIMAL).unwrap();
        load_config(&path).expect("the minimal file loads");
        std::fs::write(&path, format!("{MINIMAL}username_hash: \"%x\"\n")).unwrap();
        let e = load_config(&path).unwrap_err().0;
        assert!(
            e.starts_with(&format!("{}: username_hash: ", path.display())),
            "{e}"
        );
        std::fs::write(&path, format!("{MINIMAL}user_expire: soon\n")).unwrap();
        let e = load_config(&path).unwrap_err().0;
        assert!(
            e.starts_with(&format!("{}: user_expire: ", path.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Accepted connections get TCP_NODELAY from the listening socket and, on a listener of
    /// one address, its address as their local one: neither is asked per connection.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_the_bound_address() {
        use crate::server::listener::ListenSocket;
        let listener = listen_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let socket = ListenSocket::Tcp(listener);
        let bound = socket.fixed_local_addr().expect("one address");
        let client = tokio::net::TcpStream::connect(bound).await.unwrap();
        let ListenSocket::Tcp(listener) = &socket else {
            unreachable!()
        };
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert!(!client.nodelay().unwrap());
        assert_eq!(accepted.local_addr().unwrap(), bound);
        let wildcard = ListenSocket::Tcp(listen_tcp("0.0.0.0:0".parse().unwrap(), 16).unwrap());
        assert_eq!(wildcard.fixed_local_addr(), None);
    }
}
