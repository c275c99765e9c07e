//! Real Dovecot processes for tests: a [`Pool`] of backends sharing one Maildir store, each
//! running Dovecot 2.3 (this machine's) or 2.4 (Debian 13's, see [`dovecot24`]), and a
//! [`RefDirector`], a real Dovecot 2.3 director whose ring answers are the reference for ours.
//!
//! Std only and self-contained: it is also included from examples with
//! `#[path = "../tests/support/dovecot.rs"] mod dovecot;`.
//!
//! # Facts about Dovecot 2.3.19 (Debian 12) that this file relies on
//!
//! - Every instance has its own config with its own `base_dir`, `state_dir`, `instance_name`,
//!   `log_path` and `listen` address. Each gets a loopback address `127.X.Y.Z` of its own
//!   (all of 127/8 is loopback on Linux), so the same fixed high ports serve every instance and
//!   no root is needed for the ports.
//! - `dovecot -F -c CONF` runs the master in the foreground: it is our child, so we reap it and
//!   nothing is left as a zombie. It still writes `$base_dir/master.pid`. Config errors go to
//!   its stderr (kept in `stderr.log` next to the log), everything later to `log_path`.
//! - Login processes (`imap-login` ...) hold the listening sockets too, so a dead backend needs
//!   the master *and* its children killed before its ports refuse connections. SIGSTOP on the
//!   tree gives a hung backend: connections are accepted by the kernel, nothing answers.
//! - `imap_id_send = x-backend backend1` (no quotes needed) makes a post-login `ID NIL` answer
//!   `* ID ("x-backend" "backend1")`. `login_greeting` is the pre-login banner.
//! - curl: `curl imap://IP:PORT/ -u user:pass -X 'ID NIL'` prints the untagged `* ID` line.
//!   curl logs in with `AUTHENTICATE PLAIN` (SASL-IR) unless `--login-options AUTH=LOGIN`; it
//!   does STARTTLS when the server offers it and the certificate verifies. For POP3, a custom
//!   command (`-X STAT`) makes curl wait for a multi-line answer and hang: use a plain
//!   `pop3://IP:PORT/` (LIST) instead.
//! - `imap_id_send` applies before login too: a pre-login `ID` on a backend already names it
//!   (through a proxy, only the post-login `ID` reaches the backend).
//! - With `login_trusted_networks = 127.0.0.0/8`: IMAP `ID ("x-originating-ip" "A"
//!   "x-originating-port" "P")` before `LOGIN`, and POP3 `XCLIENT ADDR=A PORT=P` (the greeting
//!   then shows `+OK [XCLIENT]`, the answer is `+OK Updated`), make Dovecot log `rip=A`. On the
//!   `haproxy = yes` ports a `PROXY TCP4 ...` line sets both `rip` and `lip` from the header; without
//!   one no greeting comes, and Dovecot closes the connection after `haproxy_timeout` (3 s).
//! - Timings here (2 shared cores): `Pool::start(2)` about 0.15 s, `start(8)` 0.4 s; `kill` 15
//!   ms; `start` again 70 ms; `stop` (graceful SIGTERM) 1.1 s, which is why `Drop` kills.
//! - Users: passwd-file `user:{PLAIN}password::::::`; the password may hold `"`, `\`, `{3}`
//!   and spaces, never `:` or a newline. With `username_format=%Ln` in passdb and userdb, the
//!   logins `User0001` and `user0001@any.domain` (an LMTP recipient) are one user.
//! - Master user: a second passwd-file passdb with `master = yes` and `result_success =
//!   continue`, plus `auth_master_user_separator = *`: `user0001*master` with the master
//!   password logs in as `user0001` (`doveadm who` lists it as `user0001`).
//! - Mail processes run as `vmail` (created here with `useradd` when missing) with homes
//!   `<pool>/home/%Ln`; Dovecot creates the home and `Maildir` on first login or delivery.
//! - Certificates: rustls refuses a self-signed CA certificate as a server certificate, so the
//!   pool makes a CA (`ca.pem`) and a leaf (`cert.pem`, `key.pem`, EC P-256) signed by it,
//!   valid for `localhost`, `127.0.0.1` and every backend address.
//! - The reference director: `director_mail_servers` must not be empty (an empty list is a
//!   fatal "Empty server list"); every host there starts with 100 vhosts; weights are then set
//!   over the admin socket (`HOST-SET`, what `doveadm director add HOST N` sends) and apply at
//!   once on a one-director ring (`director_servers` = itself). The ring answers with no
//!   backend running. `doveadm director status USER` takes about 35 ms per call, so
//!   [`RefDirector::hashed`] speaks the admin socket (`$base_dir/director-admin`) itself:
//!   `VERSION\tdirector-doveadm\t1\t0\n` both ways, then per user
//!   `USER-LOOKUP\tUSER\tTAG\n` → `CURRENT\tEXPIRES\tHASHED\tINITIAL\n`.
//! - `USER-LOOKUP` (and so `doveadm director status`) takes a username made only of digits as
//!   a ready-made *hash*, not as a name: never compare such names against it.
//! - The static passdb of a director can pick the backend port per protocol:
//!   `proxy=y nopassword=y port=%{if;%s;eq;imap;10143;%{if;%s;eq;pop3;10110;10024}}`.

#![allow(dead_code)]

#[path = "dovecot24.rs"]
pub mod dovecot24;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// IMAP port of every backend (and of the reference director), on its own address.
pub const IMAP_PORT: u16 = 10143;
/// IMAP with implicit TLS.
pub const IMAPS_PORT: u16 = 10993;
/// POP3.
pub const POP3_PORT: u16 = 10110;
/// POP3 with implicit TLS.
pub const POP3S_PORT: u16 = 10995;
/// LMTP (TCP: a unix-socket LMTP cannot be proxied to).
pub const LMTP_PORT: u16 = 10024;
/// ManageSieve.
pub const SIEVE_PORT: u16 = 14190;
/// IMAP expecting a PROXY (v1 or v2) header first (`haproxy = yes`).
pub const IMAP_HAPROXY_PORT: u16 = 11143;
/// POP3 expecting a PROXY header first.
pub const POP3_HAPROXY_PORT: u16 = 11110;
/// The reference director's ring port (`director_servers`).
pub const DIRECTOR_RING_PORT: u16 = 9090;

/// Number of ordinary test users: `user0001` ..= `user0200`.
pub const USER_COUNT: usize = 200;
/// Password of every ordinary test user.
pub const PASSWORD: &str = "secret";

/// A user whose password holds all of the quoting traps of [`SPECIAL_USERS`] at once.
pub const TRICKY_USER: &str = "tricky.user";
/// [`TRICKY_USER`]'s password.
pub const TRICKY_PASSWORD: &str = "a \"b\\ c {3}";

/// A Dovecot master user of every backend: `user0101*master` with [`MASTER_PASSWORD`] logs in
/// as `user0101` (`auth_master_user_separator = *`).
pub const MASTER_USER: &str = "master";
/// [`MASTER_USER`]'s password.
pub const MASTER_PASSWORD: &str = "masterpass";

/// Users whose passwords are traps for quoting, and those passwords: a double quote, a
/// backslash, an ending like an IMAP literal announcement, spaces, and all of them at once.
pub const SPECIAL_USERS: [(&str, &str); 5] = [
    ("quote.user", "pa\"ss"),
    ("backslash.user", "pa\\ss"),
    ("literal.user", "secret{3}"),
    ("space.user", "pa ss word"),
    (TRICKY_USER, TRICKY_PASSWORD),
];

/// The name of ordinary test user `i` (1-based): `user(1)` is `user0001`.
pub fn user(i: usize) -> String {
    format!("user{i:04}")
}

/// Set to `1` to keep the temporary directories (configs, logs, mail) after a test.
pub const KEEP_ENV: &str = "DIRECTOR_TEST_KEEP";

/// How long a Dovecot instance may take to start before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Counter that makes every pool and director of this process use other addresses.
static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// Which Dovecot a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DovecotVersion {
    /// Debian 12's 2.3.19, installed on this machine.
    V2_3,
    /// Debian 13's 2.4.1, in the chroot of [`dovecot24`].
    V2_4,
}

impl std::fmt::Display for DovecotVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DovecotVersion::V2_3 => "2.3",
            DovecotVersion::V2_4 => "2.4",
        })
    }
}

/// Set to `2.4` to start every backend whose version a test does not choose as a 2.4 one: a
/// way to explore how an existing suite fares against 2.4 (tests that append 2.3 settings or
/// expect 2.3's exact `ID` answer fail for those reasons). CI does not set it.
pub const VERSION_ENV: &str = "DIRECTOR_TEST_DOVECOT";

/// The version of backends a test does not choose: 2.3 unless [`VERSION_ENV`] says `2.4`.
fn default_version() -> DovecotVersion {
    if std::env::var(VERSION_ENV).is_ok_and(|v| v == "2.4") {
        DovecotVersion::V2_4
    } else {
        DovecotVersion::V2_3
    }
}

/// Options for [`Pool::start_with`].
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Number of backends (at most 250).
    pub backends: usize,
    /// Extra configuration appended to every backend's 2.3 `dovecot.conf`.
    pub extra_config: String,
    /// Which Dovecot backend `i` runs at first; backends past the end of the list run 2.3 (or
    /// what [`VERSION_ENV`] says).
    pub versions: Vec<DovecotVersion>,
    /// Extra configuration appended to every backend's 2.4 config (2.4 syntax).
    pub extra_config_24: String,
}

impl PoolOptions {
    /// `n` backends, all running Dovecot 2.4.
    pub fn v24(n: usize) -> PoolOptions {
        PoolOptions {
            backends: n,
            versions: vec![DovecotVersion::V2_4; n],
            ..PoolOptions::default()
        }
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            backends: 2,
            extra_config: String::new(),
            versions: Vec::new(),
            extra_config_24: String::new(),
        }
    }
}

/// Paths of the TLS files of a pool.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate that signed [`TlsFiles::cert`]: the CA file for clients.
    pub ca: PathBuf,
    /// The server certificate (leaf), valid for `localhost`, `127.0.0.1` and the backends.
    pub cert: PathBuf,
    /// The server certificate's private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// A pool of Dovecot backends sharing one Maildir store. Dropping it stops them all.
pub struct Pool {
    /// The backends, `backend1` first.
    pub backends: Vec<Backend>,
    /// The TLS files the backends use; a director under test may use them too.
    pub tls: TlsFiles,
    /// The pool's temporary directory.
    dir: PathBuf,
    /// Kills the backends should this process die without dropping the pool.
    watchdog: Watchdog,
}

/// One Dovecot backend of a [`Pool`].
pub struct Backend {
    /// `backend1`, `backend2`...: its greeting, `hostname` and `x-backend` ID value.
    pub name: String,
    /// Its own loopback address.
    pub ip: IpAddr,
    /// Its 2.3 config file.
    config: PathBuf,
    /// Its 2.4 config file: the same users, store, addresses and names.
    config24: PathBuf,
    /// Which Dovecot it runs (or will run when started next).
    version: Mutex<DovecotVersion>,
    /// Its directory (config, logs, base_dir, state_dir).
    dir: PathBuf,
    /// The running master, if any.
    master: Mutex<Option<Child>>,
}

impl Pool {
    /// Starts `n` backends and waits until each accepts IMAP logins.
    pub fn start(n: usize) -> Pool {
        Pool::start_with(PoolOptions {
            backends: n,
            ..PoolOptions::default()
        })
    }

    /// Starts a pool as described by `options`.
    pub fn start_with(options: PoolOptions) -> Pool {
        check_installed();
        assert!(
            (1..=250).contains(&options.backends),
            "a pool has 1 to 250 backends"
        );
        let (block, dir) = allocate_block(options.backends);
        let ips: Vec<IpAddr> = (1..=options.backends)
            .map(|z| IpAddr::V4(Ipv4Addr::new(127, block.0, block.1, z as u8)))
            .collect();
        let tls = make_tls(&dir.join("tls"), &ips);
        let ids = mail_ids();
        let home = dir.join("home");
        fs::create_dir_all(&home).unwrap();
        if let Some((uid, gid)) = ids.vmail {
            std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        }
        let passwd = dir.join("passwd");
        fs::write(&passwd, passwd_file()).unwrap();
        fs::write(
            dir.join("passwd.masters"),
            format!("{MASTER_USER}:{{PLAIN}}{MASTER_PASSWORD}::::::\n"),
        )
        .unwrap();

        let mut backends = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let name = format!("backend{}", i + 1);
            let bdir = dir.join(&name);
            fs::create_dir_all(bdir.join("state")).unwrap();
            let config = bdir.join("dovecot.conf");
            let config24 = bdir.join("dovecot24.conf");
            let mut c = BackendConfig {
                name: &name,
                ip: *ip,
                dir: &bdir,
                pool_dir: &dir,
                tls: &tls,
                ids: &ids,
                extra: &options.extra_config,
            };
            fs::write(&config, backend_config(&c)).unwrap();
            c.extra = &options.extra_config_24;
            fs::write(&config24, dovecot24::backend_config(&c)).unwrap();
            let version = options
                .versions
                .get(i)
                .copied()
                .unwrap_or_else(default_version);
            backends.push(Backend {
                name,
                ip: *ip,
                config,
                config24,
                version: Mutex::new(version),
                dir: bdir,
                master: Mutex::new(None),
            });
        }
        let watchdog = Watchdog::spawn(&dir);
        let pool = Pool {
            backends,
            tls,
            dir,
            watchdog,
        };
        // Start all first, then wait: the masters come up in parallel.
        for b in &pool.backends {
            b.spawn();
        }
        for b in &pool.backends {
            b.wait_ready();
        }
        pool
    }

    /// Backend `i`, 0-based (`pool.backend(0).name == "backend1"`).
    pub fn backend(&self, i: usize) -> &Backend {
        &self.backends[i]
    }

    /// The backend with this address.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.ip == ip)
    }

    /// Address `z` of the pool's loopback block (`127.X.Y.z`), for a fake server beside the
    /// backends: no backend has it unless the pool has `z` backends or more.
    pub fn spare_ip(&self, z: u8) -> IpAddr {
        let IpAddr::V4(v4) = self.backends[0].ip else {
            unreachable!("pools are on IPv4 loopback")
        };
        let [_, x, y, _] = v4.octets();
        IpAddr::V4(Ipv4Addr::new(127, x, y, z))
    }

    /// The pool's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The passwd-file of the test users.
    pub fn passwd_path(&self) -> PathBuf {
        self.dir.join("passwd")
    }

    /// The home directory of `user` on the shared store (`user0001@x.org` → `home/user0001`).
    pub fn home(&self, user: &str) -> PathBuf {
        let name = user.split_once('@').map_or(user, |(n, _)| n);
        self.dir.join("home").join(name.to_ascii_lowercase())
    }

    /// The message files of `user`'s INBOX (`Maildir/new` and `Maildir/cur`), sorted; empty if
    /// the user has no mail yet.
    pub fn inbox_messages(&self, user: &str) -> Vec<PathBuf> {
        let maildir = self.home(user).join("Maildir");
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = fs::read_dir(maildir.join(sub)) {
                out.extend(entries.flatten().map(|e| e.path()));
            }
        }
        out.sort();
        out
    }

    /// The contents of `user`'s INBOX messages, in [`Pool::inbox_messages`] order.
    pub fn inbox_contents(&self, user: &str) -> Vec<String> {
        self.inbox_messages(user)
            .iter()
            .map(|p| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned())
            .collect()
    }

    /// Waits (10 s at most) until `user` has a message containing `needle`; returns it.
    pub fn wait_for_message(&self, user: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .inbox_contents(user)
                .into_iter()
                .find(|m| m.contains(needle));
            if let Some(message) = found {
                return message;
            }
            assert!(
                Instant::now() < deadline,
                "{user} did not get {needle:?} within 10s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for b in &self.backends {
            b.kill();
        }
        self.watchdog.disarm();
        remove_unless_kept(&self.dir);
    }
}

impl Backend {
    /// The address of a port on this backend.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }
    /// IMAP (plain, STARTTLS offered).
    pub fn imap(&self) -> SocketAddr {
        self.addr(IMAP_PORT)
    }
    /// IMAP with implicit TLS.
    pub fn imaps(&self) -> SocketAddr {
        self.addr(IMAPS_PORT)
    }
    /// IMAP expecting a PROXY header.
    pub fn imap_haproxy(&self) -> SocketAddr {
        self.addr(IMAP_HAPROXY_PORT)
    }
    /// POP3 (plain, STLS offered).
    pub fn pop3(&self) -> SocketAddr {
        self.addr(POP3_PORT)
    }
    /// POP3 with implicit TLS.
    pub fn pop3s(&self) -> SocketAddr {
        self.addr(POP3S_PORT)
    }
    /// POP3 expecting a PROXY header.
    pub fn pop3_haproxy(&self) -> SocketAddr {
        self.addr(POP3_HAPROXY_PORT)
    }
    /// LMTP.
    pub fn lmtp(&self) -> SocketAddr {
        self.addr(LMTP_PORT)
    }
    /// ManageSieve.
    pub fn sieve(&self) -> SocketAddr {
        self.addr(SIEVE_PORT)
    }

    /// The greeting this backend sends before login (`backend1 ready.`).
    pub fn greeting(&self) -> String {
        format!("{} ready.", self.name)
    }

    /// The config file of the Dovecot it runs.
    pub fn config_path(&self) -> PathBuf {
        match self.version() {
            DovecotVersion::V2_3 => self.config.clone(),
            DovecotVersion::V2_4 => self.config24.clone(),
        }
    }

    /// Which Dovecot it runs (or runs when started next).
    pub fn version(&self) -> DovecotVersion {
        *self.version.lock().unwrap()
    }

    /// Makes it run `version` when started next, over the same store on the same address:
    /// what an operator's upgrade of one backend does. Panics while it runs.
    pub fn set_version(&self, version: DovecotVersion) {
        assert!(
            !self.is_running(),
            "{} runs: stop it before changing its Dovecot",
            self.name
        );
        *self.version.lock().unwrap() = version;
    }

    /// `doveadm` of the Dovecot it runs with `-c CONF` added: add the rest of the arguments.
    pub fn doveadm_command(&self) -> Command {
        let mut cmd = match self.version() {
            DovecotVersion::V2_3 => Command::new("doveadm"),
            DovecotVersion::V2_4 => dovecot24::command("doveadm"),
        };
        cmd.arg("-c").arg(self.config_path());
        cmd
    }

    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dovecot.log")
    }

    /// Runs `doveadm -c CONF ARGS...` against this backend (e.g. `who`) and returns its
    /// stdout; panics if it fails.
    pub fn doveadm(&self, args: &[&str]) -> String {
        run_doveadm(self.doveadm_command(), &self.name, args)
    }

    /// How many connections `doveadm who` lists for `user` on this backend (one line per
    /// user and protocol: `user0001 3 imap (pids) (ips)`): the backend's own word on who is
    /// logged in there.
    pub fn who(&self, user: &str) -> usize {
        self.doveadm(&["who"])
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(user)).then(|| f.next().unwrap().parse::<usize>().unwrap())
            })
            .sum()
    }

    /// Its log so far, plus anything the master wrote to stderr (config errors).
    pub fn log(&self) -> String {
        let mut out = fs::read_to_string(self.log_path()).unwrap_or_default();
        let stderr = fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        if !stderr.trim().is_empty() {
            out.push_str("--- stderr ---\n");
            out.push_str(&stderr);
        }
        out
    }

    /// The master's pid while it runs (the one in `$base_dir/master.pid`).
    pub fn master_pid(&self) -> Option<u32> {
        self.master.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// Whether the master is running (it may be paused).
    pub fn is_running(&self) -> bool {
        let mut guard = self.master.lock().unwrap();
        match guard.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Starts it again (same config, same addresses) and waits until it accepts logins.
    /// Does nothing if it runs.
    pub fn start(&self) {
        if self.is_running() {
            return;
        }
        self.spawn();
        self.wait_ready();
    }

    /// Stops it cleanly (SIGTERM, as `doveadm stop` would), SIGKILL after 10 seconds.
    pub fn stop(&self) {
        let Some(pid) = self.master_pid() else { return };
        signal_tree(pid, "CONT");
        signal(pid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.is_running() {
                self.wait_ports_closed();
                *self.master.lock().unwrap() = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Kills it at once: SIGKILL to the master and all its children. Returns when its IMAP
    /// port refuses connections.
    pub fn kill(&self) {
        let mut guard = self.master.lock().unwrap();
        let Some(mut child) = guard.take() else {
            return;
        };
        let pid = child.id();
        if child.try_wait().ok().flatten().is_none() {
            // Stop the master first so it cannot start new children meanwhile.
            signal(pid, "STOP");
            kill_children(pid, "KILL");
            signal(pid, "KILL");
        }
        let _ = child.wait();
        drop(guard);
        self.wait_ports_closed();
    }

    /// Freezes it (SIGSTOP to the master and its children): connections are accepted by the
    /// kernel but nothing answers.
    pub fn pause(&self) {
        if let Some(pid) = self.master_pid() {
            signal(pid, "STOP");
            kill_children(pid, "STOP");
        }
    }

    /// Undoes [`Backend::pause`].
    pub fn resume(&self) {
        if let Some(pid) = self.master_pid() {
            signal_tree(pid, "CONT");
        }
    }

    /// Starts the master without waiting.
    fn spawn(&self) {
        let child = match self.version() {
            DovecotVersion::V2_3 => spawn_dovecot(&self.config, &self.dir),
            DovecotVersion::V2_4 => {
                spawn_with(dovecot24::command("dovecot"), &self.config24, &self.dir)
            }
        };
        *self.master.lock().unwrap() = Some(child);
    }

    /// Waits until the backend greets on its IMAP port, or panics with its log.
    fn wait_ready(&self) {
        let expected = self.greeting();
        let started = Started {
            who: format!("Dovecot {} {} ({})", self.version(), self.name, self.ip),
            awaited: format!("accept connections on {}", self.imap()),
            config: &self.config_path(),
        };
        started.wait(
            || !self.is_running(),
            || {
                let Some(greeting) = read_greeting(self.imap()) else {
                    return false;
                };
                assert!(
                    greeting.contains(&expected),
                    "{} greeted {greeting:?}, expected {expected:?}: another server on {}?",
                    self.name,
                    self.imap()
                );
                true
            },
            || self.log(),
        );
    }

    /// Waits (up to 5 s) until the IMAP port refuses connections.
    fn wait_ports_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.imap(), Duration::from_millis(200)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A real Dovecot 2.3 director, the reference for our ring. Dropping it stops it.
pub struct RefDirector {
    /// Its own loopback address; it also proxies IMAP/POP3/LMTP on the backend ports there.
    pub ip: IpAddr,
    /// The `director_username_hash` template it was started with.
    pub username_hash: String,
    /// Its config file.
    config: PathBuf,
    /// Its temporary directory.
    dir: PathBuf,
    /// The running master.
    master: Mutex<Option<Child>>,
    /// Kills the director should this process die without dropping it.
    watchdog: Watchdog,
}

/// What the director says about one user (one `USER-LOOKUP` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStatus {
    /// The host of the user's record, if it has one.
    pub current: Option<IpAddr>,
    /// Where the ring sends the user now (`Hashed:`); `None` if no host takes users.
    pub hashed: Option<IpAddr>,
    /// Where the ring of `director_mail_servers` at 100 vhosts each would send it.
    pub initial: Option<IpAddr>,
}

impl RefDirector {
    /// Starts a director over `hosts` (address, weight = vhost count) hashing users with the
    /// `username_hash` template (`%Lu`, `%Ln`, `%Ld`...). The hosts need not run.
    pub fn start(hosts: &[(IpAddr, u32)], username_hash: &str) -> RefDirector {
        check_installed();
        assert!(
            !hosts.is_empty(),
            "a Dovecot director needs at least one mail host"
        );
        let (block, dir) = allocate_block(1);
        let ip = IpAddr::V4(Ipv4Addr::new(127, block.0, block.1, 1));
        fs::create_dir_all(dir.join("state")).unwrap();
        let config = dir.join("dovecot.conf");
        let servers: Vec<String> = hosts.iter().map(|(h, _)| h.to_string()).collect();
        fs::write(
            &config,
            director_config(ip, &dir, &servers.join(" "), username_hash),
        )
        .unwrap();
        let director = RefDirector {
            ip,
            username_hash: username_hash.to_owned(),
            config,
            watchdog: Watchdog::spawn(&dir),
            dir,
            master: Mutex::new(None),
        };
        *director.master.lock().unwrap() = Some(spawn_dovecot(&director.config, &director.dir));
        director.wait_ready();
        let mut admin = director.admin();
        for (host, weight) in hosts {
            admin.host_set(*host, *weight);
        }
        director
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        let mut out = fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default();
        out.push_str(&fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default());
        out
    }

    /// Its config file, for `doveadm -c`.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Runs `doveadm -c CONF ARGS...` and returns its stdout; panics if it fails.
    pub fn doveadm(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("doveadm");
        cmd.arg("-c").arg(&self.config);
        run_doveadm(cmd, "the reference director", args)
    }

    /// The `Hashed:` line of `doveadm director status USER`, through the doveadm command (slow:
    /// about 35 ms; for checking [`RefDirector::hashed`]).
    pub fn hashed_by_doveadm(&self, user: &str) -> Option<IpAddr> {
        let out = self.doveadm(&["director", "status", user]);
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("Hashed:"))
            .unwrap_or_else(|| panic!("no Hashed: line in {out:?}"));
        parse_host(line.trim())
    }

    /// Adds a host or changes its weight (`doveadm director add HOST WEIGHT`).
    pub fn set_host(&self, host: IpAddr, weight: u32) {
        self.admin().host_set(host, weight);
    }

    /// Removes a host (`doveadm director remove HOST`).
    pub fn remove_host(&self, host: IpAddr) {
        self.admin().simple(&format!("HOST-REMOVE\t{host}"));
    }

    /// Marks a host down or up (`doveadm director down|up HOST`).
    pub fn set_down(&self, host: IpAddr, down: bool) {
        let cmd = if down { "HOST-DOWN" } else { "HOST-UP" };
        self.admin().simple(&format!("{cmd}\t{host}"));
    }

    /// The host the director's ring gives each user (the `Hashed:` answer), in order. `None`
    /// when no host takes users. One admin connection, requests pipelined: thousands of users
    /// take well under a second.
    pub fn hashed(&self, users: &[String]) -> Vec<Option<IpAddr>> {
        self.status(users).into_iter().map(|s| s.hashed).collect()
    }

    /// The director's full answer for each user.
    pub fn status(&self, users: &[String]) -> Vec<UserStatus> {
        for u in users {
            assert!(
                !u.is_empty() && !u.bytes().all(|b| b.is_ascii_digit()),
                "the director takes the all-digit username {u:?} as a hash: leave it out"
            );
        }
        self.admin().lookups(users)
    }

    /// A connection to the admin socket, handshake done.
    fn admin(&self) -> Admin {
        Admin::connect(&self.dir.join("run").join("director-admin"))
    }

    /// Waits until the admin socket answers.
    fn wait_ready(&self) {
        let socket = self.dir.join("run").join("director-admin");
        let started = Started {
            who: format!("reference Dovecot director ({})", self.ip),
            awaited: format!("open {}", socket.display()),
            config: &self.config,
        };
        started.wait(
            || match self.master.lock().unwrap().as_mut() {
                Some(c) => c.try_wait().ok().flatten().is_some(),
                None => true,
            },
            || UnixStream::connect(&socket).is_ok(),
            || self.log(),
        );
    }
}

impl Drop for RefDirector {
    fn drop(&mut self) {
        if let Some(mut child) = self.master.lock().unwrap().take() {
            let pid = child.id();
            signal(pid, "STOP");
            kill_children(pid, "KILL");
            signal(pid, "KILL");
            let _ = child.wait();
        }
        self.watchdog.disarm();
        remove_unless_kept(&self.dir);
    }
}

/// A shell loop that outlives this process only to clean up after it: if the test process
/// dies without running destructors (SIGKILL, Ctrl-C), it kills every Dovecot master whose
/// `master.pid` lies under the directory (checking that the pid still runs a config from
/// there), their children, and removes the directory unless kept.
pub struct Watchdog {
    child: Mutex<Option<Child>>,
}

const WATCHDOG_SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 1; done
for f in $(find "$2" -name master.pid 2>/dev/null); do
  p=$(cat "$f")
  if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF "$2/"; then
    kill -STOP "$p"; pkill -KILL -P "$p"; kill -KILL "$p"
  fi
done
[ "$3" = 1 ] || rm -rf "$2"
"#;

impl Watchdog {
    pub fn spawn(dir: &Path) -> Watchdog {
        let keep = std::env::var(KEEP_ENV).unwrap_or_default();
        let child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("dovecot-watchdog")
            .arg(std::process::id().to_string())
            .arg(dir)
            .arg(keep)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Watchdog {
            child: Mutex::new(child),
        }
    }

    /// Ends the watchdog (and its `sleep`): the owner cleaned up itself.
    pub fn disarm(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            signal(child.id(), "STOP");
            kill_children(child.id(), "KILL");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One connection to a director's admin socket (the `doveadm director` protocol).
struct Admin {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Admin {
    fn connect(path: &Path) -> Admin {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut admin = Admin {
            stream,
            reader,
            path: path.to_owned(),
        };
        admin.send("VERSION\tdirector-doveadm\t1\t0\n");
        let line = admin.line();
        assert!(
            line.starts_with("VERSION\tdirector-doveadm\t1\t"),
            "{} answered the handshake with {line:?}",
            path.display()
        );
        admin
    }

    fn send(&mut self, text: &str) {
        self.stream
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.path.display()));
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read from {}: {e}", self.path.display()));
        assert!(n > 0, "{} closed the connection", self.path.display());
        line.truncate(line.trim_end_matches('\n').len());
        line
    }

    /// Sends a command answered by one line that must be `OK`.
    fn simple(&mut self, cmd: &str) {
        self.send(&format!("{cmd}\n"));
        let answer = self.line();
        assert_eq!(answer, "OK", "director answered {cmd:?} with {answer:?}");
    }

    fn host_set(&mut self, host: IpAddr, weight: u32) {
        self.simple(&format!("HOST-SET\t{host}\t{weight}"));
    }

    /// Pipelined `USER-LOOKUP`s: a writer thread sends while this one reads.
    fn lookups(&mut self, users: &[String]) -> Vec<UserStatus> {
        let mut requests = String::new();
        for u in users {
            let _ = writeln!(requests, "USER-LOOKUP\t{}\t", tab_escape(u));
        }
        let mut writer = self.stream.try_clone().unwrap();
        let path = self.path.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                writer
                    .write_all(requests.as_bytes())
                    .unwrap_or_else(|e| panic!("write to {}: {e}", path.display()));
            });
            users
                .iter()
                .map(|u| {
                    let line = self.line();
                    let f: Vec<&str> = line.split('\t').collect();
                    assert_eq!(f.len(), 4, "bad USER-LOOKUP answer for {u:?}: {line:?}");
                    UserStatus {
                        current: parse_host(f[0]),
                        hashed: parse_host(f[2]),
                        initial: parse_host(f[3]),
                    }
                })
                .collect()
        })
    }
}

/// Dovecot's `str_tabescape`.
fn tab_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\x01' => out.push_str("\x011"),
            '\t' => out.push_str("\x01t"),
            '\r' => out.push_str("\x01r"),
            '\n' => out.push_str("\x01n"),
            c => out.push(c),
        }
    }
    out
}

/// An address in a director answer; empty or unparsable (`n/a`) is `None`.
fn parse_host(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// Panics with the install hint unless `dovecot` and `doveadm` are on the PATH.
fn check_installed() {
    for tool in ["dovecot", "doveadm"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).is_file()
            || Path::new("/usr/bin").join(tool).is_file();
        if !found {
            panic!(
                "Dovecot is not installed ({tool} not found): run ./scripts/test (it installs the Debian packages)"
            );
        }
    }
}

/// Picks a free `127.X.Y.*` block for this process and call, and makes its directory.
pub fn allocate_block(hosts: usize) -> ((u8, u8), PathBuf) {
    let pid = std::process::id();
    for _ in 0..512 {
        let c = NEXT_BLOCK.fetch_add(1, Ordering::Relaxed);
        // X from the pid (consecutive test binaries differ), Y from the counter; X moves on
        // after 256 blocks. Never X = 0, so never 127.0.0.1.
        let x = 1 + ((pid + c / 256) % 254) as u8;
        let y = (c % 256) as u8;
        let free = (1..=hosts).all(|z| {
            let ip = Ipv4Addr::new(127, x, y, z as u8);
            TcpListener::bind((ip, IMAP_PORT)).is_ok()
        });
        if !free {
            continue;
        }
        let dir = std::env::temp_dir().join(format!("director-test-{pid}-{c}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // Dovecot's unprivileged processes must reach the configs, sockets and homes.
        set_mode(&dir, 0o755);
        return ((x, y), dir);
    }
    panic!("no free 127.X.Y.* address block for Dovecot test instances");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Removes a test's directory, unless [`KEEP_ENV`] asks to keep it (then says where it is).
pub fn remove_unless_kept(dir: &Path) {
    if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("{KEEP_ENV}=1: keeping {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Who the Dovecot processes run as.
struct MailIds {
    /// Whether we are root (then Dovecot's own users dovecot/dovenull are used).
    root: bool,
    /// The user name mail processes run as (`vmail`, or the current user if not root).
    user: String,
    /// uid and gid of that user.
    vmail: Option<(u32, u32)>,
}

fn mail_ids() -> MailIds {
    let uid = current_uid();
    if uid != 0 {
        let name = command_stdout("id", &["-un"]);
        let gid = command_stdout("id", &["-g"]).parse().ok();
        return MailIds {
            root: false,
            user: name,
            vmail: gid.map(|g| (uid, g)),
        };
    }
    if !Command::new("id")
        .arg("vmail")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "vmail",
            ])
            .status();
        // Another test may have created it meanwhile: check again rather than trust the status.
        let exists = Command::new("id")
            .arg("vmail")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            exists,
            "cannot create the system user vmail that owns the test mail (useradd: {status:?})"
        );
    }
    let uid = command_stdout("id", &["-u", "vmail"]).parse().unwrap();
    let gid = command_stdout("id", &["-g", "vmail"]).parse().unwrap();
    MailIds {
        root: true,
        user: "vmail".into(),
        vmail: Some((uid, gid)),
    }
}

pub fn current_uid() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn command_stdout(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The passwd-file of the test users.
fn passwd_file() -> String {
    let mut out = String::new();
    for i in 1..=USER_COUNT {
        let _ = writeln!(out, "{}:{{PLAIN}}{PASSWORD}::::::", user(i));
    }
    for (u, p) in SPECIAL_USERS {
        let _ = writeln!(out, "{u}:{{PLAIN}}{p}::::::");
    }
    out
}

/// Makes a CA and a leaf certificate for `localhost`, `127.0.0.1` and `ips`.
fn make_tls(dir: &Path, ips: &[IpAddr]) -> TlsFiles {
    fs::create_dir_all(dir).unwrap();
    let mut san = String::from("DNS:localhost,IP:127.0.0.1");
    for ip in ips {
        let _ = write!(san, ",IP:{ip}");
    }
    fs::write(
        dir.join("leaf.ext"),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={san}\n"
        ),
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "3650",
                "-subj",
                "/CN=director test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ][..],
        ]
        .concat(),
        [
            &["req", "-new"][..],
            &ec[..],
            &[
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=localhost",
            ][..],
        ]
        .concat(),
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem \
         -days 3650 -extfile leaf.ext"
            .split_whitespace()
            .collect(),
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("run openssl (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Readable by the director under test whoever runs it; the key is a throwaway.
    set_mode(&dir.join("key.pem"), 0o644);
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

/// Everything a backend's config depends on.
struct BackendConfig<'a> {
    name: &'a str,
    ip: IpAddr,
    dir: &'a Path,
    pool_dir: &'a Path,
    tls: &'a TlsFiles,
    ids: &'a MailIds,
    extra: &'a str,
}

/// Settings every instance needs to live beside others, and to run as non-root.
/// [`instance_settings`] for an instance that runs no mail processes (an auth service): its
/// internal users are the current user unless we are root.
pub fn service_instance_settings(name: &str, ip: IpAddr, dir: &Path) -> String {
    let root = current_uid() == 0;
    let user = if root {
        String::new()
    } else {
        command_stdout("id", &["-un"])
    };
    let ids = MailIds {
        root,
        user,
        vmail: None,
    };
    instance_settings(name, ip, dir, &ids)
}

fn instance_settings(name: &str, ip: IpAddr, dir: &Path, ids: &MailIds) -> String {
    let d = dir.display();
    let instance = format!(
        "director-test-{}-{}",
        std::process::id(),
        dir.file_name().unwrap().to_string_lossy()
    );
    let mut out = format!(
        "# {name}: written by tests/support/dovecot.rs\n\
         base_dir = {d}/run\n\
         state_dir = {d}/state\n\
         instance_name = {instance}-{name}\n\
         log_path = {d}/dovecot.log\n\
         listen = {ip}\n\
         shutdown_clients = yes\n"
    );
    if !ids.root {
        let _ = write!(
            out,
            "default_internal_user = {u}\ndefault_login_user = {u}\n",
            u = ids.user
        );
    }
    out
}

/// What every login service of a backend may take.
const LOGIN_LIMITS: &str = "  service_count = 0\n  client_limit = 1000\n  process_limit = 64\n";

/// A backend's login service for `proto` (`imap`, `pop3`) with its plain, implicit-TLS
/// (`<proto>s`) and PROXY-header (`<proto>_haproxy`) listeners on `ports`, in that order.
fn login_service(proto: &str, ports: [u16; 3]) -> String {
    login_service_with(proto, ports, LOGIN_LIMITS)
}

/// [`login_service`] with other limits (2.4 names one of them differently).
fn login_service_with(proto: &str, [plain, tls, haproxy]: [u16; 3], limits: &str) -> String {
    format!(
        "service {proto}-login {{\n  inet_listener {proto} {{\n    port = {plain}\n  }}\n  \
         inet_listener {proto}s {{\n    port = {tls}\n    ssl = yes\n  }}\n  \
         inet_listener {proto}_haproxy {{\n    port = {haproxy}\n    haproxy = yes\n  }}\n\
         {limits}}}\n"
    )
}

/// The mail services of a backend, written alike in 2.3 and 2.4: LMTP on TCP, and imap and
/// pop3 processes for many sessions.
fn mail_services() -> String {
    format!(
        "service lmtp {{\n  inet_listener lmtp {{\n    port = {LMTP_PORT}\n  }}\n}}\n\
         service imap {{\n  client_limit = 100\n  process_limit = 1000\n}}\n\
         service pop3 {{\n  process_limit = 1000\n}}\n"
    )
}

fn backend_config(c: &BackendConfig) -> String {
    let pool = c.pool_dir.display();
    let mut out = instance_settings(c.name, c.ip, c.dir, c.ids);
    let name = c.name;
    let dh = if Path::new("/usr/share/dovecot/dh.pem").exists() {
        "ssl_dh = </usr/share/dovecot/dh.pem\n"
    } else {
        ""
    };
    let (uid, gid) = c.ids.vmail.unwrap_or((0, 0));
    let _ = write!(
        out,
        r#"protocols = imap pop3 lmtp sieve
hostname = {name}
login_greeting = {name} ready.
imap_id_send = x-backend {name}
login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_verbose = yes
verbose_proctitle = yes
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
{dh}mail_location = maildir:~/Maildir
mmap_disable = yes
mail_fsync = always
mail_max_userip_connections = 100000
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Ln {pool}/passwd
}}
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {pool}/passwd.masters
  master = yes
  result_success = continue
}}
userdb {{
  driver = passwd-file
  args = username_format=%Ln {pool}/passwd
  default_fields = uid={uid} gid={gid} home={pool}/home/%Ln
}}
{imap_login}{pop3_login}service managesieve-login {{
  inet_listener sieve {{
    port = {SIEVE_PORT}
  }}
{LOGIN_LIMITS}}}
{services}protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"#,
        cert = c.tls.cert.display(),
        key = c.tls.key.display(),
        imap_login = login_service("imap", [IMAP_PORT, IMAPS_PORT, IMAP_HAPROXY_PORT]),
        pop3_login = login_service("pop3", [POP3_PORT, POP3S_PORT, POP3_HAPROXY_PORT]),
        services = mail_services(),
    );
    out.push_str(c.extra);
    out.push('\n');
    out
}

fn director_config(ip: IpAddr, dir: &Path, mail_servers: &str, username_hash: &str) -> String {
    let mut out = instance_settings("refdirector", ip, dir, &mail_ids());
    // The director proxies the plain ports only.
    let login_service = |proto: &str, port: u16| {
        format!(
            "service {proto}-login {{\n  executable = {proto}-login director\n  \
             inet_listener {proto} {{\n    port = {port}\n  }}\n  \
             inet_listener {proto}s {{\n    port = 0\n  }}\n}}\n"
        )
    };
    let (imap_login, pop3_login) = (
        login_service("imap", IMAP_PORT),
        login_service("pop3", POP3_PORT),
    );
    let _ = write!(
        out,
        r#"protocols = imap pop3 lmtp
ssl = no
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_verbose = yes
login_greeting = refdirector ready.
login_trusted_networks = 127.0.0.0/8
director_servers = {ip}:{DIRECTOR_RING_PORT}
director_mail_servers = {mail_servers}
director_username_hash = {username_hash}
passdb {{
  driver = static
  args = proxy=y nopassword=y port=%{{if;%s;eq;imap;{IMAP_PORT};%{{if;%s;eq;pop3;{POP3_PORT};{LMTP_PORT}}}}}
}}
service director {{
  unix_listener login/director {{
    mode = 0666
  }}
  fifo_listener login/proxy-notify {{
    mode = 0666
  }}
  unix_listener director-userdb {{
    mode = 0600
  }}
  inet_listener {{
    port = {DIRECTOR_RING_PORT}
  }}
}}
{imap_login}{pop3_login}service lmtp {{
  inet_listener lmtp {{
    port = {LMTP_PORT}
  }}
}}
protocol lmtp {{
  lmtp_proxy = yes
  auth_socket_path = director-userdb
}}
"#
    );
    out
}

/// Runs `cmd` (`doveadm -c CONFIG`) with `ARGS...` against the instance `who` and returns its
/// stdout; panics if it fails.
fn run_doveadm(mut cmd: Command, who: &str, args: &[&str]) -> String {
    let out = cmd.args(args).output().expect("run doveadm");
    assert!(
        out.status.success(),
        "doveadm {args:?} on {who} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `dovecot -F -c CONFIG`, its stderr appended to `dir/stderr.log`.
pub fn spawn_dovecot(config: &Path, dir: &Path) -> Child {
    spawn_with(Command::new("dovecot"), config, dir)
}

/// Starts `cmd` (a `dovecot`) with `-F -c CONFIG`, its stderr appended to `dir/stderr.log`.
fn spawn_with(mut cmd: Command, config: &Path, dir: &Path) -> Child {
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap();
    cmd.arg("-F")
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(stderr.try_clone().unwrap())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "Dovecot is not installed or cannot run ({e}): run ./scripts/test (it installs the Debian packages)"
            )
        })
}

/// Reads the first line a server sends on `addr`, if it connects and greets within 2 s.
fn read_greeting(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 4096 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A Dovecot instance being started, for the messages of [`Started::wait`].
pub struct Started<'a> {
    /// The instance, as a message names it.
    pub who: String,
    /// What it does once ready (`accept connections on ...`).
    pub awaited: String,
    pub config: &'a Path,
}

impl Started<'_> {
    /// Polls every 25 ms until `ready`, for at most [`START_DEADLINE`]; panics with the
    /// instance's `log` if it `exited` first or takes longer.
    pub fn wait(
        &self,
        exited: impl Fn() -> bool,
        mut ready: impl FnMut() -> bool,
        log: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if exited() {
                panic!(
                    "{} exited during start; config {}\n{}",
                    self.who,
                    self.config.display(),
                    log()
                );
            }
            if ready() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not {} within {START_DEADLINE:?}; config {}\n{}",
                    self.who,
                    self.awaited,
                    self.config.display(),
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// `kill -SIG PID`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// `pkill -SIG -P PID`: the direct children (Dovecot's services are all children of master).
pub fn kill_children(pid: u32, sig: &str) {
    let _ = Command::new("pkill")
        .arg(format!("-{sig}"))
        .arg("-P")
        .arg(pid.to_string())
        .status();
}

/// Sends `sig` to the children, then to the master.
fn signal_tree(pid: u32, sig: &str) {
    kill_children(pid, sig);
    signal(pid, sig);
}
