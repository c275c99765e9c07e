//! A cluster member run as operators run it, a `director serve` process (so that a test can
//! SIGKILL it and start it again on the same file): the pool's backends, fast health checks,
//! the `cluster:` section of [`super::cluster`], its own admin socket, and its listeners (IMAP
//! and the others, metrics for `/readyz`) on fixed ports of a loopback address of its own in
//! the pool's block (`127.X.Y.100` and up), which no client's ephemeral port can take while
//! it is down.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::admin_cli::AdminCli;
use super::cluster::member_options;
use super::command::Ran;
use super::director::config_yaml;
use super::dovecot::Pool;
use super::ports::free_ports_on;
use super::serve::Serve;

/// Addresses a member's configuration gives port 0, in order: the five listeners of
/// [`config_yaml`] (plain IMAP first), then `metrics.address`.
const PORTS: usize = 6;

/// How many times a member is started before the test gives up ([`start`]).
const STARTS: u32 = 10;

/// The last byte of the next member's address (`127.X.Y.100` and up).
static NEXT_ADDRESS: AtomicU8 = AtomicU8::new(100);

/// A running (or killed) cluster member process.
pub struct MemberProcess {
    /// Its `director_id` (`d1`...).
    pub id: String,
    /// Its plain IMAP listener (STARTTLS offered; plaintext LOGIN allowed from loopback).
    pub imap: SocketAddr,
    /// Its metrics listener (`/readyz`).
    pub metrics: SocketAddr,
    /// Its admin verbs, through its own socket.
    pub cli: AdminCli,
    serve: Serve,
}

impl MemberProcess {
    /// Starts member `id` over `pool` in the cluster on `endpoints`, with its files in
    /// `dir/ID` and `env` in its environment; returns once it listens (it has joined: a
    /// member binds its listeners after reaching etcd).
    pub fn start(
        pool: &Pool,
        dir: &Path,
        endpoints: &[String],
        id: &str,
        env: &[(&str, &str)],
    ) -> MemberProcess {
        let yaml = config_yaml(
            pool,
            &member_options(endpoints, id, "metrics:\n  address: 127.0.0.1:0\n"),
        );
        assert_eq!(
            yaml.matches("127.0.0.1:0").count(),
            PORTS,
            "unexpected port-0 addresses in:\n{yaml}"
        );
        let z = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
        assert!(z >= 100, "too many members for one test process");
        let ip = pool.spare_ip(z);
        let ports = free_ports_on(ip, PORTS);
        let mut yaml = yaml;
        for p in &ports {
            yaml = yaml.replacen("127.0.0.1:0", &SocketAddr::new(ip, *p).to_string(), 1);
        }
        let dir = dir.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let imap = SocketAddr::new(ip, ports[0]);
        let mut serve = Serve::prepare(&dir, &yaml, env);
        start(&mut serve, id, imap);
        MemberProcess {
            id: id.to_owned(),
            imap,
            metrics: SocketAddr::new(ip, ports[PORTS - 1]),
            cli: AdminCli::over(serve.config.clone()),
            serve,
        }
    }

    /// SIGKILL: a crash, with its lease left to expire in etcd.
    pub fn kill(&mut self) {
        self.serve.kill();
    }

    /// Starts it again on the same configuration file; returns once it listens.
    pub fn restart(&mut self) {
        assert!(
            !self.serve.running(),
            "{} still runs: kill it first",
            self.id
        );
        start(&mut self.serve, &self.id, self.imap);
    }

    /// Whether its process runs.
    pub fn running(&mut self) -> bool {
        self.serve.running()
    }

    /// `director -c ITS_CONFIG ARGS...`, whatever the outcome.
    pub fn admin(&self, args: &[&str]) -> Ran {
        self.cli.run(args, None)
    }

    /// The status code of `GET /readyz`; `None` when nothing answers within 2 s.
    pub fn readyz(&self) -> Option<u16> {
        self.readyz_answer().map(|(status, _)| status)
    }

    /// The status code and body of `GET /readyz` (the body says why it is not ready).
    pub fn readyz_answer(&self) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        // `HTTP/1.1 200 OK`, headers, a blank line, the body.
        let status = answer.get(9..12)?.parse().ok()?;
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((status, body.trim().to_owned()))
    }

    /// What it logged so far, over all its runs.
    pub fn log(&self) -> String {
        self.serve.log()
    }
}

/// Starts `serve` and waits until it listens on `imap`, again (at most [`STARTS`] times in
/// all, half a second apart) when it exits first, as a service manager would: a member
/// exits at start when etcd does not answer within `request_timeout` (1 s here), or answers
/// "no leader" while it elects one after a member was killed, or when a loaded machine's
/// first etcd writes take longer.
fn start(serve: &mut Serve, id: &str, imap: SocketAddr) {
    for attempt in 1..=STARTS {
        match serve.try_start(imap) {
            Ok(()) => return,
            Err(log) if attempt < STARTS => {
                let last = log.lines().last().unwrap_or_default().to_owned();
                eprintln!("{id} exited at start (attempt {attempt}), starting it again: {last}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(log) => panic!("{id} did not start in {STARTS} attempts:\n{log}"),
        }
    }
}
