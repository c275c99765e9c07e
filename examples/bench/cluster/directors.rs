//! The directors of the cluster benchmark: each its own process over the pool's backends,
//! with one IMAP listener, its own admin socket and metrics listener, its log in the pool's
//! directory; single (state of its own) or a member of a cluster in etcd. Health checks
//! keep their defaults (interval 2s, fast_interval 500ms, rise 2, fall 2): what an operator
//! gets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::director_process::DirectorProcess;
use crate::dovecot::{self, Pool};
use crate::ports;

/// A director process of the benchmark.
pub struct Director {
    /// `single`, `d1`, ...: its `director_id` in a cluster.
    pub name: String,
    /// Its IMAP listener.
    pub imap: SocketAddr,
    /// Its metrics listener (`/metrics`).
    pub metrics: SocketAddr,
    /// From its spawn until it listened (a member loads its replica before listening).
    pub start_time: Duration,
    pub process: DirectorProcess,
}

/// Where a cluster member keeps its state and how it holds its lease.
#[derive(Debug, Clone)]
pub struct Membership {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// `cluster.etcd.prefix`: a fresh prefix is a fresh cluster.
    pub prefix: String,
    /// More lines of the `cluster:` section (indented by two), e.g. `  lease_ttl: 3s\n`.
    pub extra: String,
}

impl Membership {
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Membership {
        Membership {
            endpoints,
            prefix: prefix.to_owned(),
            extra: String::new(),
        }
    }
}

impl Director {
    /// A director without `cluster:`: its state is its own.
    pub fn single(pool: &Pool, name: &str) -> Director {
        Self::try_start(pool, name, "", None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Cluster member `name` (its `director_id`), with `top` (more top-level YAML).
    pub fn member(pool: &Pool, name: &str, cluster: &Membership, top: &str) -> Director {
        Self::try_start(pool, name, top, Some(cluster)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a director; an error (with its log) when it exits before it listens.
    pub fn try_start(
        pool: &Pool,
        name: &str,
        top: &str,
        cluster: Option<&Membership>,
    ) -> Result<Director, String> {
        let [imap_port, metrics_port] = ports::free_ports(2)[..] else {
            unreachable!()
        };
        let dir = pool.dir();
        let mut yaml = format!(
            "trusted_networks: [127.0.0.0/8]\nlisteners:\n  - {{protocol: imap, address: 127.0.0.1:{imap_port}}}\n\
             backend_defaults:\n  ports: {{imap: {}}}\nbackends:\n",
            dovecot::IMAP_PORT
        );
        for b in &pool.backends {
            yaml += &format!("  - host: {}\n", b.ip);
        }
        yaml += &format!(
            "admin:\n  socket: {}/admin-{name}.sock\nmetrics:\n  address: 127.0.0.1:{metrics_port}\nshutdown_grace: 1s\n{top}",
            dir.display()
        );
        if let Some(c) = cluster {
            yaml += &format!(
                "cluster:\n  director_id: {name}\n{}  etcd:\n    endpoints: [{}]\n    prefix: {}\n",
                c.extra,
                c.endpoints.join(", "),
                c.prefix
            );
        }
        let imap = ports::local(imap_port);
        let log = dir.join(format!("director-{name}.log"));
        let t = Instant::now();
        let process = DirectorProcess::try_start(
            &dir.join(format!("director-{name}.yaml")),
            &yaml,
            imap,
            Some(&log),
        )?;
        let d = Director {
            name: name.to_owned(),
            imap,
            metrics: ports::local(metrics_port),
            start_time: t.elapsed(),
            process,
        };
        if cluster.is_some() {
            // A member listens even while it cannot hold its lease yet (it answers logins
            // with a temporary failure then): wait until it serves, as a load balancer
            // polling /readyz would.
            super::wait("the member to serve", Duration::from_secs(30), || {
                d.process.status()["cluster"]["serving"] == true
            });
        }
        Ok(d)
    }

    /// Its `/metrics` text.
    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
    }

    /// Sticky records it holds (`status`).
    pub fn records(&self) -> u64 {
        self.process.status()["records"].as_u64().unwrap_or(0)
    }
}

/// The body of `GET path` from `addr` (HTTP/1.0, so the server closes when done).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.contains(" 200 "), "GET {addr}{path}: {head}");
    body.to_owned()
}

/// The sum of the samples of metric `name` whose labels include each of `labels`
/// (Prometheus text format); 0 when there is none.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n == name
            && labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}
