//! `cluster`: several directors acting as one, their shared state (backends, health verdicts,
//! sticky records, membership, moves) kept in etcd (DESIGN.md, "Cluster mode"). Without the
//! section a director is single: its state is its own, kept in `state_file` if set.
//!
//! Only what the file says is checked here; the files it names are read by
//! [`EtcdConfig::check_files`] and [`EtcdConfig::password`], called by `check-config` and
//! by the code that connects to etcd.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{err, ConfigError};

/// The shortest membership lease: a lease is kept alive several times per TTL, so a shorter
/// one would expire on an ordinary hiccup (a GC pause of etcd, a busy machine).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// The longest membership lease: beyond it a dead director holds up every move for minutes.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(5 * 60);
/// The most moves one director runs at once.
pub const MAX_MOVE_PARALLELISM: usize = 10_000;
/// The shortest explicit `record_refresh`: every refresh is an etcd write.
pub const MIN_RECORD_REFRESH: Duration = Duration::from_secs(1);
/// The longest `director_id`: it is part of etcd keys and of every membership listing.
pub const MAX_DIRECTOR_ID_LEN: usize = 64;

/// The `cluster` section: this director's place among the others, and how they agree.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This director's name among the others (the key of its membership, the author of its
    /// acknowledgements): 1 to 64 of `A-Z a-z 0-9 . _ -`, different on every director.
    pub director_id: String,
    /// What other directors show as this one's address in membership listings (free text,
    /// e.g. `10.0.0.5:143`). `None`: the first TCP listener's address
    /// ([`super::Config::cluster_advertise`]).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the shared state lives.
    pub etcd: EtcdConfig,
    /// The TTL of this director's membership lease. A director cut off from etcd fences
    /// itself before this much time has passed since its last renewal, and movers stop
    /// waiting for its acknowledgements once the lease has expired.
    #[serde(default = "default_lease_ttl", deserialize_with = "super::duration")]
    pub lease_ttl: Duration,
    /// How long a move (kick, move, flush, evacuation) waits for every live director to end
    /// the user's sessions. Longer than `lease_ttl`, so that a mover never goes on before a
    /// director that cannot hear of the move has fenced itself.
    #[serde(default = "default_move_timeout", deserialize_with = "super::duration")]
    pub move_timeout: Duration,
    /// Moves this director runs at once (Dovecot's director: 100); more wait their turn.
    #[serde(default = "default_move_parallelism")]
    pub move_parallelism: usize,
    /// How often the sticky records of users with sessions here are refreshed in etcd.
    /// `None`: `user_expire` / 4 ([`ClusterConfig::record_refresh_for`]).
    #[serde(default, deserialize_with = "super::optional_duration")]
    pub record_refresh: Option<Duration>,
    /// While fenced, keep relaying the sessions this director has instead of ending them,
    /// accepting that a user moved meanwhile by another director is on two backends. New
    /// logins fail either way.
    #[serde(default)]
    pub keep_sessions_when_fenced: bool,
}

/// `cluster.etcd`: how this director reaches etcd (v3 API).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// The cluster's members, `http://host:port` or `https://host:port`, all of one scheme.
    pub endpoints: Vec<String>,
    /// Where the director's keys live (`backends/`, `users/`, `directors/`...): a directory
    /// of its own in a shared etcd, and a way to run two separate director clusters on one.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The CA that etcd's server certificates chain to; required with `https` endpoints (the
    /// director trusts no system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate for etcd's `--client-cert-auth`; with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// An etcd user (etcd's `auth enable`); with `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// The file holding `user`'s password, its first line ([`EtcdConfig::password`]): a
    /// file, not the password itself, so the configuration can be shown and shared.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How long connecting to an endpoint may take before the next one is tried.
    #[serde(default = "default_etcd_timeout", deserialize_with = "super::duration")]
    pub connect_timeout: Duration,
    /// How long one etcd request may take; a login waiting on it gets a temporary failure
    /// after that.
    #[serde(default = "default_etcd_timeout", deserialize_with = "super::duration")]
    pub request_timeout: Duration,
}

pub(super) fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_move_timeout() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_move_parallelism() -> usize {
    100
}
pub(super) fn default_prefix() -> String {
    "/director/".into()
}
pub(super) fn default_etcd_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `30s`, `2m 30s`: a duration as the file writes it.
fn shown(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

impl ClusterConfig {
    /// How often sticky records are refreshed when the top-level `user_expire` is
    /// `user_expire`: `record_refresh`, or a quarter of `user_expire`.
    pub fn record_refresh_for(&self, user_expire: Duration) -> Duration {
        self.record_refresh.unwrap_or(user_expire / 4)
    }

    /// Checks the section by itself and against `user_expire`.
    pub(super) fn validate(&self, user_expire: Duration) -> Result<(), ConfigError> {
        check_director_id(&self.director_id)?;
        if let Some(a) = &self.advertise {
            if a.trim().is_empty() {
                return Err(err(
                    "cluster.advertise",
                    "is empty: remove it to show the first listener's address",
                ));
            }
            if a.chars().any(char::is_control) || a.len() > 255 {
                return Err(err(
                    "cluster.advertise",
                    "must be one line of at most 255 bytes (e.g. 10.0.0.5:143)",
                ));
            }
        }
        self.etcd.validate()?;
        let ttl = self.lease_ttl;
        if ttl < MIN_LEASE_TTL {
            return Err(err(
                "cluster.lease_ttl",
                format_args!(
                    "{} is below the minimum {}",
                    shown(ttl),
                    shown(MIN_LEASE_TTL)
                ),
            ));
        }
        if ttl > MAX_LEASE_TTL {
            return Err(err(
                "cluster.lease_ttl",
                format_args!(
                    "{} is above the maximum {}",
                    shown(ttl),
                    shown(MAX_LEASE_TTL)
                ),
            ));
        }
        if ttl.subsec_nanos() != 0 {
            return Err(err(
                "cluster.lease_ttl",
                format_args!(
                    "{} is not whole seconds (etcd counts lease TTLs in seconds)",
                    shown(ttl)
                ),
            ));
        }
        if self.move_timeout <= ttl {
            return Err(err(
                "cluster.move_timeout",
                format_args!(
                    "must be longer than cluster.lease_ttl ({}), so that a move never goes on before a director cut off from etcd has fenced itself (it is {})",
                    shown(ttl),
                    shown(self.move_timeout)
                ),
            ));
        }
        if self.move_parallelism == 0 {
            return Err(err("cluster.move_parallelism", "must be at least 1"));
        }
        if self.move_parallelism > MAX_MOVE_PARALLELISM {
            return Err(err(
                "cluster.move_parallelism",
                format_args!(
                    "{} is above the maximum {MAX_MOVE_PARALLELISM}",
                    self.move_parallelism
                ),
            ));
        }
        if let Some(r) = self.record_refresh {
            if r < MIN_RECORD_REFRESH {
                return Err(err(
                    "cluster.record_refresh",
                    format_args!(
                        "{} is below the minimum {} (every refresh is a write to etcd)",
                        shown(r),
                        shown(MIN_RECORD_REFRESH)
                    ),
                ));
            }
            if r >= user_expire {
                return Err(err(
                    "cluster.record_refresh",
                    format_args!(
                        "must be shorter than user_expire ({}), or records of users with sessions expire between refreshes (it is {})",
                        shown(user_expire),
                        shown(r)
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn check_director_id(id: &str) -> Result<(), ConfigError> {
    const FIELD: &str = "cluster.director_id";
    if id.is_empty() {
        return Err(err(
            FIELD,
            "is empty: give every director a name of its own (e.g. its host name)",
        ));
    }
    if id.len() > MAX_DIRECTOR_ID_LEN {
        return Err(err(
            FIELD,
            format_args!(
                "is {} characters long; at most {MAX_DIRECTOR_ID_LEN}",
                id.chars().count()
            ),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(err(
            FIELD,
            format_args!("{id:?} has {c:?}: use letters, digits, '.', '_' and '-' only"),
        ));
    }
    Ok(())
}

/// An endpoint's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Reads `http://host:port` or `https://host:port` (host: a DNS name, an IPv4 address or a
/// bracketed IPv6 address), nothing more; says what is wrong otherwise.
fn endpoint_scheme(endpoint: &str) -> Result<Scheme, String> {
    let (scheme, rest) = if let Some(rest) = endpoint.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err("must start with http:// or https://".into());
    };
    if let Some(c) = rest.chars().find(|c| matches!(c, '/' | '?' | '#' | '@')) {
        return Err(format!(
            "has {c:?} after the host: give only the scheme, host and port"
        ));
    }
    let port = if let Some(bracketed) = rest.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or("has an IPv6 address without its closing ']'")?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("[{ip}] is not an IPv6 address"))?;
        after
            .strip_prefix(':')
            .ok_or("needs a port (e.g. :2379) after the host")?
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or("needs a port (e.g. :2379) after the host")?;
        if host.contains(':') {
            return Err("has an IPv6 address: write it in brackets, e.g. http://[::1]:2379".into());
        }
        let good = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-');
        if host.is_empty() || !host.chars().all(good) {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(scheme),
        _ => Err(format!("{port:?} is not a port (1..65535)")),
    }
}

impl EtcdConfig {
    /// Whether the endpoints are `https` (they are all of one scheme).
    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    /// Checks the section by itself (not the files it names: [`EtcdConfig::check_files`]).
    fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(err(
                "cluster.etcd.endpoints",
                "at least one is needed (http://host:port or https://host:port)",
            ));
        }
        let mut first: Option<Scheme> = None;
        for (i, e) in self.endpoints.iter().enumerate() {
            let field = format!("cluster.etcd.endpoints[{i}]");
            let scheme = endpoint_scheme(e).map_err(|why| {
                err(
                    &field,
                    format_args!("{e:?} is not http://host:port or https://host:port: {why}"),
                )
            })?;
            if self.endpoints[..i].contains(e) {
                return Err(err(&field, format_args!("{e} is listed twice")));
            }
            match first {
                None => first = Some(scheme),
                Some(s) if s != scheme => {
                    return Err(err(
                        &field,
                        format_args!(
                            "is {} but endpoints[0] is {}: use one scheme for all",
                            scheme.name(),
                            s.name()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let tls = first == Some(Scheme::Https);
        if tls && self.ca_file.is_none() {
            return Err(err(
                "cluster.etcd.ca_file",
                "is needed with https endpoints: the CA that etcd's server certificates chain to (the director trusts no system roots)",
            ));
        }
        if !tls {
            for (name, file) in [
                ("ca_file", &self.ca_file),
                ("cert_file", &self.cert_file),
                ("key_file", &self.key_file),
            ] {
                if file.is_some() {
                    return Err(err(
                        format_args!("cluster.etcd.{name}"),
                        "is for https endpoints, and the endpoints are http: use https:// or remove it",
                    ));
                }
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(err(
                    "cluster.etcd.key_file",
                    "is needed with cert_file (both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "cluster.etcd.cert_file",
                    "is needed with key_file (both or neither)",
                ))
            }
            _ => {}
        }
        match (&self.user, &self.password_file) {
            (Some(u), _) if u.trim().is_empty() => {
                return Err(err("cluster.etcd.user", "is empty"));
            }
            (Some(_), None) => {
                return Err(err(
                    "cluster.etcd.password_file",
                    "is needed with user (both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "cluster.etcd.user",
                    "is needed with password_file (both or neither)",
                ))
            }
            _ => {}
        }
        let p = &self.prefix;
        if !(p.starts_with('/') && p.ends_with('/')) {
            return Err(err(
                "cluster.etcd.prefix",
                format_args!("{p:?} must start and end with '/' (e.g. /director/)"),
            ));
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                "cluster.etcd.prefix",
                format_args!("{p:?} has a space or control character"),
            ));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(err(
                    format_args!("cluster.etcd.{name}"),
                    "must be longer than 0s",
                ));
            }
        }
        Ok(())
    }

    /// Checks that the files the section names can be read now: the CA, certificate and key
    /// files (not empty), and the password file ([`EtcdConfig::password`]). `check-config`
    /// calls it, so that a file `serve` could not read is refused first.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (name, file) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(path) = file {
                let field = format!("cluster.etcd.{name}");
                let mut byte = [0u8; 1];
                let n = std::fs::File::open(path)
                    .and_then(|mut f| f.read(&mut byte))
                    .map_err(|e| file_err(&field, path, format_args!("cannot read: {e}")))?;
                if n == 0 {
                    return Err(file_err(&field, path, "is empty"));
                }
            }
        }
        self.password()?;
        Ok(())
    }

    /// The etcd password: the first line of `password_file` (its line end removed), read
    /// now. Refuses a file that group or others may read, and an empty password, as the
    /// admin token file is refused. `None` without `password_file`.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        const FIELD: &str = "cluster.etcd.password_file";
        let meta = std::fs::metadata(path)
            .map_err(|e| file_err(FIELD, path, format_args!("cannot read: {e}")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(file_err(
                    FIELD,
                    path,
                    format_args!(
                        "mode {mode:04o} lets group or others at the password: chmod 600 it"
                    ),
                ));
            }
        }
        let _ = meta;
        let text = std::fs::read_to_string(path)
            .map_err(|e| file_err(FIELD, path, format_args!("cannot read: {e}")))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(file_err(
                FIELD,
                path,
                "its first line is empty: it must hold the password",
            ));
        }
        Ok(Some(line.to_owned()))
    }
}

fn file_err(field: &str, path: &Path, message: impl std::fmt::Display) -> ConfigError {
    err(field, format_args!("{}: {message}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const MINIMAL: &str = "listeners:\n  - protocol: imap\n    address: 127.0.0.1:1143\nbackends:\n  - host: 10.0.0.1\n";

    /// `MINIMAL` with a cluster section: `director_id: d1`, one http endpoint, and `more`
    /// (lines indented under `cluster:`).
    fn with_cluster(more: &str) -> String {
        format!("{MINIMAL}cluster:\n  director_id: d1\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n{more}")
    }

    /// A cluster section whose `etcd` is `etcd` (a flow mapping).
    fn with_etcd(etcd: &str) -> String {
        format!("{MINIMAL}cluster:\n  director_id: d1\n  etcd: {etcd}\n")
    }

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().0
    }

    /// A file in a fresh temp dir, with `mode`.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "director-config-cluster-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            use std::os::unix::fs::PermissionsExt;
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn without_the_section_a_director_is_single() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.cluster, None);
        assert_eq!(c.record_refresh(), None);
        assert_eq!(c.cluster_advertise(), None);
    }

    #[test]
    fn defaults() {
        let c = Config::parse(&with_cluster("")).unwrap();
        let k = c.cluster.as_ref().unwrap();
        assert_eq!(
            *k,
            ClusterConfig {
                director_id: "d1".into(),
                advertise: None,
                etcd: EtcdConfig {
                    endpoints: vec!["http://127.0.0.1:2379".into()],
                    prefix: "/director/".into(),
                    ca_file: None,
                    cert_file: None,
                    key_file: None,
                    user: None,
                    password_file: None,
                    connect_timeout: Duration::from_secs(2),
                    request_timeout: Duration::from_secs(2),
                },
                lease_ttl: Duration::from_secs(10),
                move_timeout: Duration::from_secs(30),
                move_parallelism: 100,
                record_refresh: None,
                keep_sessions_when_fenced: false,
            }
        );
        assert!(!k.etcd.uses_tls());
        assert_eq!(k.etcd.password(), Ok(None));
        // user_expire (15m) / 4.
        assert_eq!(c.record_refresh(), Some(Duration::from_secs(225)));
        assert_eq!(c.cluster_advertise().as_deref(), Some("127.0.0.1:1143"));
    }

    #[test]
    fn every_option_is_read() {
        let c = Config::parse(&with_cluster(
            "  advertise: director1.example.org:143\n  lease_ttl: 5s\n  move_timeout: 1m\n  move_parallelism: 7\n  record_refresh: 90s\n  keep_sessions_when_fenced: true\n",
        ))
        .unwrap();
        let k = c.cluster.as_ref().unwrap();
        assert_eq!(k.advertise.as_deref(), Some("director1.example.org:143"));
        assert_eq!(
            c.cluster_advertise().as_deref(),
            Some("director1.example.org:143")
        );
        assert_eq!(k.lease_ttl, Duration::from_secs(5));
        assert_eq!(k.move_timeout, Duration::from_secs(60));
        assert_eq!(k.move_parallelism, 7);
        assert_eq!(c.record_refresh(), Some(Duration::from_secs(90)));
        assert!(k.keep_sessions_when_fenced);
        let c = Config::parse(&with_etcd(
            "{endpoints: [\"https://etcd1:2379\", \"https://[::1]:2379\"], prefix: /mail/dir/, ca_file: /ca.pem, cert_file: /c.pem, key_file: /k.pem, user: director, password_file: /pw, connect_timeout: 500ms, request_timeout: 3s}",
        ))
        .unwrap();
        let e = &c.cluster.as_ref().unwrap().etcd;
        assert!(e.uses_tls());
        assert_eq!(e.prefix, "/mail/dir/");
        assert_eq!(e.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(e.cert_file.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(e.key_file.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!(e.user.as_deref(), Some("director"));
        assert_eq!(e.password_file.as_deref(), Some(Path::new("/pw")));
        assert_eq!(e.connect_timeout, Duration::from_millis(500));
        assert_eq!(e.request_timeout, Duration::from_secs(3));
    }

    #[test]
    fn the_section_is_checked_field_by_field() {
        let cases: &[(String, &str)] = &[
            (
                format!("{MINIMAL}cluster:\n  etcd: {{endpoints: [http://a:1]}}\n"),
                "cluster: missing field `director_id`",
            ),
            (
                with_cluster("  bogus: 1\n"),
                "cluster.bogus: unknown field `bogus`",
            ),
            (
                with_cluster("").replace("d1", "\"\""),
                "cluster.director_id: is empty",
            ),
            (
                with_cluster("").replace("d1", "\"dir one\""),
                "cluster.director_id: \"dir one\" has ' '",
            ),
            (
                with_cluster("").replace("d1", "d/1"),
                "cluster.director_id: \"d/1\" has '/'",
            ),
            (
                with_cluster("").replace("d1", &"x".repeat(65)),
                "cluster.director_id: is 65 characters long; at most 64",
            ),
            (
                with_cluster("  advertise: \"  \"\n"),
                "cluster.advertise: is empty",
            ),
            (
                with_cluster("  lease_ttl: 1s\n"),
                "cluster.lease_ttl: 1s is below the minimum 2s",
            ),
            (
                with_cluster("  lease_ttl: 6m\n  move_timeout: 10m\n"),
                "cluster.lease_ttl: 6m is above the maximum 5m",
            ),
            (
                with_cluster("  lease_ttl: 2500ms\n"),
                "cluster.lease_ttl: 2s 500ms is not whole seconds",
            ),
            (
                with_cluster("  lease_ttl: soon\n"),
                "cluster.lease_ttl: \"soon\" is not a duration",
            ),
            (
                with_cluster("  move_timeout: 10s\n"),
                "cluster.move_timeout: must be longer than cluster.lease_ttl (10s)",
            ),
            (
                with_cluster("  lease_ttl: 40s\n"),
                "cluster.move_timeout: must be longer than cluster.lease_ttl (40s)",
            ),
            (
                with_cluster("  move_parallelism: 0\n"),
                "cluster.move_parallelism: must be at least 1",
            ),
            (
                with_cluster("  move_parallelism: 10001\n"),
                "cluster.move_parallelism: 10001 is above the maximum 10000",
            ),
            (
                with_cluster("  record_refresh: 500ms\n"),
                "cluster.record_refresh: 500ms is below the minimum 1s",
            ),
            (
                with_cluster("  record_refresh: 15m\n"),
                "cluster.record_refresh: must be shorter than user_expire (15m)",
            ),
            (
                format!(
                    "{}state_file: /var/lib/director/state.yaml\n",
                    with_cluster("")
                ),
                "state_file: not used with cluster: etcd holds the state; remove it",
            ),
            (
                format!("{MINIMAL}cluster:\n  director_id: d1\n"),
                "cluster: missing field `etcd`",
            ),
        ];
        for (text, expected) in cases {
            let e = error_of(text);
            assert!(e.starts_with(expected), "expected {expected:?}, got {e:?}");
        }
    }

    #[test]
    fn etcd_is_checked_field_by_field() {
        let cases = [
            ("{}", "cluster.etcd: missing field `endpoints`"),
            ("{endpoints: []}", "cluster.etcd.endpoints: at least one is needed"),
            (
                "{endpoints: [\"http://a:2379\", \"etcd2:2379\"]}",
                "cluster.etcd.endpoints[1]: \"etcd2:2379\" is not http://host:port or https://host:port: must start with http://",
            ),
            (
                "{endpoints: [\"grpc://a:2379\"]}",
                "cluster.etcd.endpoints[0]: \"grpc://a:2379\" is not",
            ),
            ("{endpoints: [\"http://a\"]}", "cluster.etcd.endpoints[0]: \"http://a\" is not http://host:port or https://host:port: needs a port"),
            ("{endpoints: [\"http://a:0\"]}", "is not a port"),
            ("{endpoints: [\"http://a:99999\"]}", "\"99999\" is not a port"),
            ("{endpoints: [\"http://a:2379/v3\"]}", "has '/' after the host"),
            ("{endpoints: [\"http://u@a:2379\"]}", "has '@' after the host"),
            ("{endpoints: [\"http://:2379\"]}", "\"\" is not a host name"),
            ("{endpoints: [\"http://a b:2379\"]}", "\"a b\" is not a host name"),
            ("{endpoints: [\"http://::1:2379\"]}", "write it in brackets"),
            ("{endpoints: [\"http://[::x]:2379\"]}", "[::x] is not an IPv6 address"),
            (
                "{endpoints: [\"http://a:1\", \"http://b:1\", \"http://a:1\"]}",
                "cluster.etcd.endpoints[2]: http://a:1 is listed twice",
            ),
            (
                "{endpoints: [\"http://a:1\", \"https://b:1\"], ca_file: /ca}",
                "cluster.etcd.endpoints[1]: is https but endpoints[0] is http: use one scheme for all",
            ),
            (
                "{endpoints: [\"https://a:1\"]}",
                "cluster.etcd.ca_file: is needed with https endpoints",
            ),
            (
                "{endpoints: [\"http://a:1\"], ca_file: /ca}",
                "cluster.etcd.ca_file: is for https endpoints",
            ),
            (
                "{endpoints: [\"http://a:1\"], cert_file: /c, key_file: /k}",
                "cluster.etcd.cert_file: is for https endpoints",
            ),
            (
                "{endpoints: [\"https://a:1\"], ca_file: /ca, cert_file: /c}",
                "cluster.etcd.key_file: is needed with cert_file (both or neither)",
            ),
            (
                "{endpoints: [\"https://a:1\"], ca_file: /ca, key_file: /k}",
                "cluster.etcd.cert_file: is needed with key_file (both or neither)",
            ),
            (
                "{endpoints: [\"http://a:1\"], user: director}",
                "cluster.etcd.password_file: is needed with user (both or neither)",
            ),
            (
                "{endpoints: [\"http://a:1\"], password_file: /pw}",
                "cluster.etcd.user: is needed with password_file (both or neither)",
            ),
            (
                "{endpoints: [\"http://a:1\"], user: \"\", password_file: /pw}",
                "cluster.etcd.user: is empty",
            ),
            (
                "{endpoints: [\"http://a:1\"], prefix: director}",
                "cluster.etcd.prefix: \"director\" must start and end with '/'",
            ),
            (
                "{endpoints: [\"http://a:1\"], prefix: /director}",
                "cluster.etcd.prefix: \"/director\" must start and end with '/'",
            ),
            (
                "{endpoints: [\"http://a:1\"], prefix: \"/dir ector/\"}",
                "cluster.etcd.prefix: \"/dir ector/\" has a space",
            ),
            (
                "{endpoints: [\"http://a:1\"], connect_timeout: 0s}",
                "cluster.etcd.connect_timeout: must be longer than 0s",
            ),
            (
                "{endpoints: [\"http://a:1\"], request_timeout: 0s}",
                "cluster.etcd.request_timeout: must be longer than 0s",
            ),
            (
                "{endpoints: [\"http://a:1\"], tls: true}",
                "cluster.etcd.tls: unknown field `tls`",
            ),
        ];
        for (etcd, expected) in cases {
            let e = error_of(&with_etcd(etcd));
            assert!(
                e.contains(expected),
                "{etcd}: expected {expected:?}, got {e:?}"
            );
            assert!(e.starts_with("cluster."), "{etcd}: {e}");
        }
        // Accepted forms: names, IPv4, bracketed IPv6, https with its CA.
        for etcd in [
            "{endpoints: [\"http://etcd-1.example.org:2379\", \"http://10.0.0.1:2379\", \"http://[2001:db8::1]:2379\"]}",
            "{endpoints: [\"https://etcd1:2379\"], ca_file: /ca}",
            "{endpoints: [\"http://a:1\"], prefix: /}",
        ] {
            Config::parse(&with_etcd(etcd)).unwrap_or_else(|e| panic!("{etcd}: {e}"));
        }
    }

    #[test]
    fn files_are_read_at_check_time() {
        let dir = Scratch::new("files");
        let ca = dir.file("ca.pem", "-----BEGIN CERTIFICATE-----\n", 0o644);
        let cert = dir.file("cert.pem", "-----BEGIN CERTIFICATE-----\n", 0o644);
        let key = dir.file("key.pem", "-----BEGIN PRIVATE KEY-----\n", 0o600);
        let empty = dir.file("empty.pem", "", 0o644);
        let pw = dir.file("pw", "s3cret\nignored\n", 0o600);
        let etcd = |ca: &Path, key: &Path, pw: &Path| {
            let text = with_etcd(&format!(
                "{{endpoints: [\"https://a:1\"], ca_file: {}, cert_file: {}, key_file: {}, user: director, password_file: {}}}",
                ca.display(),
                cert.display(),
                key.display(),
                pw.display()
            ));
            Config::parse(&text).unwrap().cluster.unwrap().etcd
        };
        let good = etcd(&ca, &key, &pw);
        good.check_files().unwrap();
        assert_eq!(good.password().unwrap().as_deref(), Some("s3cret"));
        assert!(
            !format!("{good:?}").contains("s3cret"),
            "Debug never shows the password"
        );

        let missing = dir.0.join("missing.pem");
        let e = etcd(&missing, &key, &pw).check_files().unwrap_err().0;
        assert!(
            e.starts_with(&format!(
                "cluster.etcd.ca_file: {}: cannot read",
                missing.display()
            )),
            "{e}"
        );
        let e = etcd(&ca, &empty, &pw).check_files().unwrap_err().0;
        assert_eq!(
            e,
            format!("cluster.etcd.key_file: {}: is empty", empty.display())
        );

        let open = dir.file("pw-open", "s3cret\n", 0o640);
        let e = etcd(&ca, &key, &open).check_files().unwrap_err().0;
        assert_eq!(
            e,
            format!(
                "cluster.etcd.password_file: {}: mode 0640 lets group or others at the password: chmod 600 it",
                open.display()
            )
        );
        let blank = dir.file("pw-blank", "\nsecond\n", 0o600);
        let e = etcd(&ca, &key, &blank).password().unwrap_err().0;
        assert!(
            e.starts_with("cluster.etcd.password_file: ") && e.contains("first line is empty"),
            "{e}"
        );
        let crlf = dir.file("pw-crlf", "s3cret\r\n", 0o600);
        assert_eq!(
            etcd(&ca, &key, &crlf).password().unwrap().as_deref(),
            Some("s3cret")
        );
        let bare = dir.file("pw-bare", "s3cret", 0o600);
        assert_eq!(
            etcd(&ca, &key, &bare).password().unwrap().as_deref(),
            Some("s3cret")
        );
    }

    /// The example's `cluster:` block is commented out (the example must run without etcd);
    /// uncommented, it parses, and its values are the defaults.
    #[test]
    fn example_cluster_block_parses_with_the_defaults() {
        let example = include_str!("../../config.yaml.example");
        let block: Vec<&str> = example
            .lines()
            .skip_while(|l| *l != "#cluster:")
            .take_while(|l| l.starts_with('#'))
            .map(|l| &l[1..])
            .collect();
        assert!(block.len() > 10, "the example has a #cluster: block");
        let text = format!("{example}\n{}\n", block.join("\n"));
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{}", block.join("\n")));
        let k = c.cluster.expect("the uncommented block is read");
        assert_eq!(k.lease_ttl, default_lease_ttl());
        assert_eq!(k.move_timeout, default_move_timeout());
        assert_eq!(k.move_parallelism, default_move_parallelism());
        assert_eq!(k.record_refresh, None);
        assert!(!k.keep_sessions_when_fenced);
        assert_eq!(k.advertise, None);
        assert_eq!(k.etcd.prefix, default_prefix());
        assert_eq!(k.etcd.connect_timeout, default_etcd_timeout());
        assert_eq!(k.etcd.request_timeout, default_etcd_timeout());
        assert_eq!(k.etcd.endpoints.len(), 3);
    }
}
