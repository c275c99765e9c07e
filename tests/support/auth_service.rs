//! A Dovecot 2.3 instance that runs only its auth service (`dovecot -F -c CONF`, `protocols =`,
//! no mail processes), for the tests of the director's auth clients. Dropping it kills it.
//!
//! Every instance offers, on its own `127.X.Y.1` (the harness's address blocks):
//! - `auth-client` (unix, mode 0666): authentication only, never returns a password;
//! - `inet_listener director-login` on [`LOGIN_PORT`]: a *login* socket (its name ends in
//!   `-login`), which answers a successful `proxy` login with the client's password (`pass=`);
//! - `auth-master` (unix, mode 0600, owned by the current uid as the master creates it): passdb
//!   and userdb lookups without a password (`PASS`, `USER`), what Dovecot's LMTP proxy asks;
//! - whatever [`AuthServiceConfig::extra_listeners`] adds (Dovecot types a listener by the
//!   suffix of its name: `-login`, `-master`, `-userdb`, else a plain client socket).
//!
//! Users come from a passwd-file (`user:{PLAIN}pass::::::extra fields`, `username_format=%Ln`);
//! a caller's own passdb text (LDAP...) goes before it. The userdb is static. Mechanisms:
//! PLAIN LOGIN CRAM-MD5 DIGEST-MD5 SCRAM-SHA-1 SCRAM-SHA-256, in that order.
//!
//! The penalty and the failure delay are off (`auth_failure_delay = 0`, no
//! `anvil-auth-penalty` socket): failed logins from one address would slow the later ones
//! down. Dovecot still flushes failures every 500 ms.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use director::auth::dovecot::{AuthClient, AuthClientOptions, Endpoint};

use super::dovecot::{
    allocate_block, current_uid, kill_children, remove_unless_kept, service_instance_settings,
    signal, spawn_dovecot, Started, Watchdog,
};

/// The TCP port of the login listener, on the instance's own address.
pub const LOGIN_PORT: u16 = 10990;

/// The mechanisms every instance offers, as its `MECH` lines name them.
pub const MECHANISMS: [&str; 6] = [
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "DIGEST-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
];

/// A listener of `service auth` beyond the three every instance has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    /// `unix_listener NAME { mode = 0600 }`, in the instance's base dir.
    Unix(String),
    /// `inet_listener NAME { port = PORT }`, on the instance's address.
    Inet(String, u16),
}

/// What an instance holds beyond what every one has.
#[derive(Debug, Clone, Default)]
pub struct AuthServiceConfig {
    /// The passwd-file, one entry a line, in Dovecot's passwd-file format.
    pub users: Vec<String>,
    /// Raw Dovecot config placed before the passwd-file passdb (`passdb { driver = ldap ... }`,
    /// a master passdb...).
    pub extra_passdb: Option<String>,
    /// `auth_master_user_separator` (`*`), when set.
    pub master_user_separator: Option<String>,
    pub extra_listeners: Vec<Listener>,
    /// Raw top-level settings appended at the end of the config (`auth_debug = yes`...).
    pub extra_settings: String,
}

impl AuthServiceConfig {
    /// A config whose passwd-file is `users` (one entry a line).
    pub fn with_users(users: &str) -> Self {
        AuthServiceConfig {
            users: users.lines().map(str::to_owned).collect(),
            ..AuthServiceConfig::default()
        }
    }
}

pub struct AuthService {
    dir: PathBuf,
    ip: IpAddr,
    config_path: PathBuf,
    extra_listeners: Vec<Listener>,
    master: Option<Child>,
    watchdog: Watchdog,
}

impl AuthService {
    /// Writes the config and the passwd-file, starts the instance and waits until every
    /// listener accepts connections.
    pub fn start(config: AuthServiceConfig) -> AuthService {
        let ((x, y), dir) = allocate_block(1);
        let ip = IpAddr::V4(Ipv4Addr::new(127, x, y, 1));
        fs::create_dir_all(dir.join("state")).unwrap();
        // The auth process runs as Dovecot's internal user.
        fs::set_permissions(dir.join("state"), fs::Permissions::from_mode(0o755)).unwrap();
        let mut passwd = config.users.join("\n");
        passwd.push('\n');
        fs::write(dir.join("passwd"), passwd).unwrap();
        let config_path = dir.join("dovecot.conf");
        fs::write(&config_path, config_text(&config, ip, &dir)).unwrap();
        let mut service = AuthService {
            watchdog: Watchdog::spawn(&dir),
            dir,
            ip,
            config_path,
            extra_listeners: config.extra_listeners,
            master: None,
        };
        service.run();
        let master = fs::metadata(service.master_socket()).unwrap();
        assert_eq!(
            (master.mode() & 0o777, master.uid()),
            (0o600, current_uid()),
            "auth-master must be 0600 and ours"
        );
        service
    }

    /// The unix socket that only authenticates (`auth-client`).
    pub fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.base_dir().join("auth-client"))
    }

    /// The TCP login listener (`director-login`).
    pub fn tcp(&self) -> Endpoint {
        Endpoint::Tcp(SocketAddr::new(self.ip, LOGIN_PORT).to_string())
    }

    /// The `auth-master` socket (passdb and userdb lookups).
    pub fn master_socket(&self) -> PathBuf {
        self.base_dir().join("auth-master")
    }

    /// An extra listener by its name.
    pub fn endpoint(&self, name: &str) -> Endpoint {
        match self
            .extra_listeners
            .iter()
            .find(|l| listener_name(l) == name)
        {
            Some(Listener::Unix(name)) => Endpoint::Unix(self.base_dir().join(name)),
            Some(Listener::Inet(_, port)) => {
                Endpoint::Tcp(SocketAddr::new(self.ip, *port).to_string())
            }
            None => panic!("no listener {name} in {:?}", self.extra_listeners),
        }
    }

    /// An auth client of `endpoint` with this answer timeout.
    pub fn client(&self, endpoint: Endpoint, request_timeout: Duration) -> AuthClient {
        AuthClient::new(AuthClientOptions {
            request_timeout,
            ..AuthClientOptions::new(endpoint)
        })
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The instance's directory (config, passwd-file, logs, `run/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Dovecot's `base_dir`, where the unix sockets are.
    pub fn base_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Dovecot's log, then what the master wrote to stderr (config errors).
    pub fn log(&self) -> String {
        let mut log = fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default();
        log.push_str(&fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default());
        log
    }

    /// Starts the master (again, after [`AuthService::kill`]) and waits until every listener
    /// accepts connections.
    pub fn run(&mut self) {
        assert!(self.master.is_none(), "already running");
        self.master = Some(spawn_dovecot(&self.config_path, &self.dir));
        let mut sockets = vec![
            self.unix(),
            self.tcp(),
            Endpoint::Unix(self.master_socket()),
        ];
        sockets.extend(
            self.extra_listeners
                .iter()
                .map(|l| self.endpoint(listener_name(l))),
        );
        let started = Started {
            who: format!("auth service {}", self.ip),
            awaited: "accept connections on every listener".into(),
            config: &self.config_path,
        };
        let master = std::cell::RefCell::new(self.master.take());
        started.wait(
            || {
                let mut master = master.borrow_mut();
                master.as_mut().unwrap().try_wait().unwrap().is_some()
            },
            || sockets.iter().all(accepts),
            || self.log(),
        );
        self.master = master.into_inner();
    }

    /// Kills the master and all its children (SIGKILL): the listeners refuse connections.
    pub fn kill(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let pid = master.id();
        signal(pid, "STOP");
        kill_children(pid, "KILL");
        signal(pid, "KILL");
        let _ = master.wait();
    }

    /// The pid of the auth process (the master starts it on the first connection).
    pub fn auth_pid(&self) -> u32 {
        let master = self.master.as_ref().expect("running").id();
        children(master)
            .into_iter()
            .find(|&pid| {
                // Its title is `<instance_name>/auth` (auth workers: `.../auth-worker`).
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).next().unwrap().ends_with(b"/auth"))
            })
            .expect("an auth process")
    }

    /// Stops the auth process (SIGSTOP): the kernel still accepts connections, nothing answers.
    pub fn freeze(&self) {
        signal(self.auth_pid(), "STOP");
    }

    /// Lets a frozen auth process go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.auth_pid(), "CONT");
    }
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.kill();
        self.watchdog.disarm();
        remove_unless_kept(&self.dir);
    }
}

fn listener_name(listener: &Listener) -> &str {
    match listener {
        Listener::Unix(name) | Listener::Inet(name, _) => name,
    }
}

fn accepts(endpoint: &Endpoint) -> bool {
    match endpoint {
        Endpoint::Unix(path) => UnixStream::connect(path).is_ok(),
        Endpoint::Tcp(addr) => TcpStream::connect(addr.as_str()).is_ok(),
    }
}

fn config_text(config: &AuthServiceConfig, ip: IpAddr, dir: &Path) -> String {
    let d = dir.display();
    let mut out = service_instance_settings("auth", ip, dir);
    out.push_str(
        "protocols =\n\
         auth_mechanisms = plain login cram-md5 digest-md5 scram-sha-1 scram-sha-256\n\
         disable_plaintext_auth = no\n\
         auth_failure_delay = 0\n\
         auth_verbose = yes\n",
    );
    if let Some(separator) = &config.master_user_separator {
        let _ = writeln!(out, "auth_master_user_separator = {separator}");
    }
    if let Some(passdb) = &config.extra_passdb {
        let _ = writeln!(out, "{passdb}");
    }
    let _ = write!(
        out,
        "passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%Ln {d}/passwd\n}}\n\
         userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home=/nonexistent\n}}\n\
         service auth {{\n\
         \x20 unix_listener auth-client {{\n    mode = 0666\n  }}\n\
         \x20 unix_listener auth-master {{\n    mode = 0600\n  }}\n\
         \x20 inet_listener director-login {{\n    port = {LOGIN_PORT}\n  }}\n"
    );
    for listener in &config.extra_listeners {
        let _ = match listener {
            Listener::Unix(name) => {
                writeln!(out, "  unix_listener {name} {{\n    mode = 0600\n  }}")
            }
            Listener::Inet(name, port) => {
                writeln!(out, "  inet_listener {name} {{\n    port = {port}\n  }}")
            }
        };
    }
    out.push_str(
        "}\n\
         service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n",
    );
    out.push_str(&config.extra_settings);
    out.push('\n');
    out
}

/// The direct children of `pid` (every Dovecot service is a child of the master).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let status = fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"));
        if ppid.and_then(|p| p.trim().parse().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}
