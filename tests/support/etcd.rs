//! Real etcd for tests: an [`EtcdCluster`] of Debian's `etcd` 3.4 processes on loopback,
//! each a member with its own address, data directory and log, which a test can kill and
//! restart; and a [`Partition`] that cuts one client process off from every member while the
//! others go on talking to them.
//!
//! # Layout
//!
//! Member `i` (0-based) listens on `127.X.Y.(i+1)`: peers on [`PEER_PORT`], clients on
//! [`CLIENT_PORT`] ([`EtcdCluster::endpoints`]) and on [`CUTTABLE_PORT`]
//! ([`EtcdCluster::cuttable_endpoints`]), a second client listener kept for the one client
//! a test means to cut off. Cutting drops the packets of that port only, so the members'
//! own traffic and every other client stay up. Data in `DIR/mI.etcd`, log in `DIR/mI.log`.
//!
//! # Facts about etcd 3.4.23 (Debian 12's etcd-server) that this file relies on
//!
//! - `etcd` runs in the foreground as our child and needs no privilege for these ports; with
//!   `--logger zap --log-outputs stderr` it logs JSON lines to stderr (kept in the log file).
//!   Installing `etcd-server` starts a system etcd on 127.0.0.1:2379 unless a `policy-rc.d`
//!   forbids it (`scripts/install-deps` does); our members never use 127.0.0.1.
//! - `--listen-client-urls` takes several URLs and serves the same gRPC API (and HTTP
//!   `/version`, `/health`) on each; only `--advertise-client-urls` (the normal one) is
//!   published in the member list. A client that syncs its endpoints from the member list
//!   would move off the cuttable URLs: the director's client must not (etcdctl does not).
//! - A new cluster forms with `--initial-cluster` naming every member and
//!   `--initial-cluster-state new`. A member restarted on its data directory takes its
//!   cluster from its WAL (`restarting local member`, same member id) and rejoins; the
//!   `--initial-cluster*` flags matter only to a new member (`existing` is passed anyway).
//! - Timing: heartbeat [`HEARTBEAT_MS`] ms and election timeout [`ELECTION_MS`] ms instead
//!   of 100 and 1000, so a dead leader is replaced after about half a second. A leader that
//!   stalls (its raft loop waits for the WAL's fsync) for ten heartbeats costs an election;
//!   here, with other builds loading both cores and the disk (load 7.5), 159 WAL fsyncs all
//!   took under 32 ms and no needless election happened. `--initial-election-tick-advance`
//!   (default on) makes a new cluster elect its first leader within a few ticks of its
//!   members seeing each other.
//! - A write that reaches a follower while its dead leader is not yet detected is forwarded
//!   to the dead leader and lost: the client sees `etcdserver: request timed out` after 5 s
//!   or its own `--command-timeout`, not a new leader's answer. Hence
//!   [`EtcdCluster::wait_ready`] after a kill, before a test relies on a write.
//! - Without a quorum a write never commits: `etcdctl put` fails once its
//!   `--command-timeout` is over (`context deadline exceeded`).
//! - `etcdctl endpoint health` does a linearizable read through the endpoint: it answers
//!   only when that member has a live leader and a quorum. It writes no key and keeps the
//!   revision at 1, so the fixture waits with it rather than with a write.
//! - Each member preallocates a 64 MB WAL (and the next one): a data directory takes about
//!   120 MB on disk. Creating it (fallocate, fsync) is most of a new member's start.
//! - etcdctl flags may come after the command, and a flag given twice takes the last value,
//!   so a test can override the helper's timeouts.
//! - The ports are not etcd's usual 2379/2380, so that a system etcd listening on
//!   `0.0.0.0:2379` does not take them from us.
//! - Timings here (2 shared cores): a 3-member cluster serves 0.5 s after the spawn on an
//!   idle machine, 2.3 s while other builds write (the WAL's creation waits for the disk);
//!   one member 0.2 s; a killed member restarted on its data serves again in 60 ms.

#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::command::{run, Ran};
use super::dovecot::{allocate_block, remove_unless_kept};
pub use super::partition::Partition;

/// Client port of every member, on its own address.
pub const CLIENT_PORT: u16 = 12379;
/// Peer (raft) port of every member.
pub const PEER_PORT: u16 = 12380;
/// The second client port, for the one client a [`Partition`] cuts off.
pub const CUTTABLE_PORT: u16 = 12381;

/// Raft heartbeat interval (etcd's default 100 ms).
pub const HEARTBEAT_MS: u32 = 50;
/// Raft election timeout (etcd's default 1000 ms): 10 heartbeats.
pub const ELECTION_MS: u32 = 500;

/// How long a member may take to serve before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Timeouts of the fixture's own etcdctl calls (a test's arguments may override them).
const DIAL_TIMEOUT: &str = "--dial-timeout=2s";
const COMMAND_TIMEOUT: &str = "--command-timeout=5s";

/// Tells what to do when a program of the fixture is missing.
const INSTALL_HINT: &str =
    "install Debian's etcd-server and etcd-client (./scripts/install-deps does)";

/// Running etcd members forming one cluster, with their data in a temporary directory.
/// Dropping it kills every member and removes the directory (unless `DIRECTOR_TEST_KEEP=1`).
pub struct EtcdCluster {
    /// Member `i`'s address.
    ips: Vec<Ipv4Addr>,
    /// Data directories and logs.
    dir: PathBuf,
    /// `--initial-cluster-token`: the directory's name, so no two clusters ever mix.
    token: String,
    /// Member `i`'s process; `None` while killed.
    members: Vec<Option<Child>>,
}

impl EtcdCluster {
    /// Starts a cluster of `members` etcd processes (3 or 5 for a quorum that survives a
    /// loss); returns once every member answers a linearizable read.
    pub fn start(members: usize) -> EtcdCluster {
        assert!(
            (1..=9).contains(&members),
            "{members} members: 1 to 9 please"
        );
        program("etcd");
        let (ips, dir) = allocate(members);
        let token = dir
            .file_name()
            .expect("a named directory")
            .to_string_lossy()
            .into_owned();
        // From here on a panic drops `cluster`: members spawned so far die, the directory goes.
        let mut cluster = EtcdCluster {
            ips,
            dir,
            token,
            members: (0..members).map(|_| None).collect(),
        };
        for i in 0..members {
            cluster.spawn(i, "new");
        }
        cluster.wait_ready();
        cluster
    }

    /// A cluster of one member.
    pub fn start_one() -> EtcdCluster {
        EtcdCluster::start(1)
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.ips[i]
    }

    /// `http://IP:`[`CLIENT_PORT`] of every member, for clients that are never cut off.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", self.ips[i])
    }

    /// `http://IP:`[`CUTTABLE_PORT`] of every member: the URLs of the one client that
    /// [`EtcdCluster::partition`] cuts off.
    pub fn cuttable_endpoints(&self) -> Vec<String> {
        (0..self.len())
            .map(|i| format!("http://{}:{CUTTABLE_PORT}", self.ips[i]))
            .collect()
    }

    /// A partition, not cut yet, between every member and the clients of
    /// [`EtcdCluster::cuttable_endpoints`]. It does not borrow the cluster; dropping it heals.
    pub fn partition(&self) -> Partition {
        Partition::new(&self.ips, CUTTABLE_PORT)
    }

    /// Whether member `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.members[i] {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Kills member `i` with SIGKILL and reaps it. If it led, writes stall until the others
    /// elect a leader: [`EtcdCluster::wait_ready`] waits for that.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts killed member `i` again on its data directory with the same flags, and waits
    /// until it serves, which needs a quorum of running members with it.
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "member {i} still runs: kill it first");
        self.spawn(i, "existing");
        self.wait_serving(&[i]);
    }

    /// Starts every killed member again (a whole cluster can come back only together) and
    /// waits until all serve.
    pub fn restart_all(&mut self) {
        let stopped: Vec<usize> = (0..self.len()).filter(|&i| !self.is_running(i)).collect();
        for &i in &stopped {
            self.spawn(i, "existing");
        }
        self.wait_serving(&stopped);
    }

    /// Waits until every running member answers a linearizable read: a leader is elected
    /// among the running members and they form a quorum. Panics with the logs otherwise.
    pub fn wait_ready(&mut self) {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.is_running(i)).collect();
        self.wait_serving(&running);
    }

    /// `etcdctl ARGS` (API v3) against every member's normal endpoint; its standard output.
    /// Panics with etcdctl's error unless it succeeds. E.g. `["get", "--prefix", "/director/"]`.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let ran = etcdctl_at(&self.endpoints(), args);
        assert!(ran.ok, "etcdctl {args:?} failed:\n{}", ran.text());
        ran.stdout
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What member `i` logged so far, over all its runs.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("m{i}.log"))
    }

    fn name(i: usize) -> String {
        format!("m{i}")
    }

    /// Spawns member `i` with `--initial-cluster-state STATE`; its output goes to its log.
    fn spawn(&mut self, i: usize, state: &str) {
        let ip = self.ips[i];
        let initial_cluster = (0..self.len())
            .map(|m| format!("{}=http://{}:{PEER_PORT}", Self::name(m), self.ips[m]))
            .collect::<Vec<_>>()
            .join(",");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let child = Command::new(program("etcd"))
            .arg(format!("--name={}", Self::name(i)))
            .arg(format!(
                "--data-dir={}",
                self.dir.join(format!("m{i}.etcd")).display()
            ))
            .arg(format!("--listen-peer-urls=http://{ip}:{PEER_PORT}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://{ip}:{PEER_PORT}"
            ))
            .arg(format!(
                "--listen-client-urls=http://{ip}:{CLIENT_PORT},http://{ip}:{CUTTABLE_PORT}"
            ))
            .arg(format!("--advertise-client-urls=http://{ip}:{CLIENT_PORT}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_MS}"))
            .args(["--logger=zap", "--log-outputs=stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run etcd: {e}: {INSTALL_HINT}"));
        self.members[i] = Some(child);
    }

    /// Polls `members` until each answers `endpoint health`; panics with a member's log when
    /// it exits or [`START_DEADLINE`] passes.
    fn wait_serving(&mut self, members: &[usize]) {
        let deadline = Instant::now() + START_DEADLINE;
        let mut waiting = members.to_vec();
        loop {
            for &i in &waiting {
                let child = self.members[i].as_mut().expect("member was spawned");
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "etcd member {i} exited ({status}); its log {}:\n{}",
                        self.log_path(i).display(),
                        self.log(i)
                    );
                }
            }
            waiting.retain(|&i| !self.serves(i));
            if waiting.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let logs: String = waiting
                    .iter()
                    .map(|&i| format!("--- member {i} ({}):\n{}", self.endpoint(i), self.log(i)))
                    .collect();
                panic!("etcd members {waiting:?} did not serve within {START_DEADLINE:?}:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether member `i` accepts connections and answers a linearizable read.
    fn serves(&self, i: usize) -> bool {
        let addr = SocketAddr::from((self.ips[i], CLIENT_PORT));
        // A refused connect is quick; etcdctl would retry it until its dial timeout.
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            && etcdctl_at(
                &[self.endpoint(i)],
                &["--command-timeout=1s", "endpoint", "health"],
            )
            .ok
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.len() {
            self.kill(i);
        }
        remove_unless_kept(&self.dir);
    }
}

/// `etcdctl ARGS` (API v3) against `endpoints`, with a 2 s dial and 5 s command timeout
/// unless `args` give others, to its end.
pub fn etcdctl_at(endpoints: &[String], args: &[&str]) -> Ran {
    run(
        Command::new(program("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args([DIAL_TIMEOUT, COMMAND_TIMEOUT])
            .args(args),
        None,
    )
    .unwrap_or_else(|e| panic!("run etcdctl: {e}: {INSTALL_HINT}"))
}

/// `name` in /usr/bin, where Debian puts etcd and etcdctl.
fn program(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(path.is_file(), "{name} is not installed: {INSTALL_HINT}");
    path
}

/// A harness address block whose `127.X.Y.1..=members` have the three ports free, and its
/// directory.
fn allocate(members: usize) -> (Vec<Ipv4Addr>, PathBuf) {
    for _ in 0..16 {
        let ((x, y), dir) = allocate_block(members);
        let ips: Vec<Ipv4Addr> = (1..=members)
            .map(|z| Ipv4Addr::new(127, x, y, z as u8))
            .collect();
        let free = ips.iter().all(|&ip| {
            [CLIENT_PORT, PEER_PORT, CUTTABLE_PORT]
                .iter()
                .all(|&port| TcpListener::bind((ip, port)).is_ok())
        });
        if free {
            return (ips, dir);
        }
        let _ = fs::remove_dir_all(&dir);
    }
    panic!("no 127.X.Y.* block with etcd's ports free");
}
