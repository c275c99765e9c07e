//! The dashboard against a real Prometheus (Debian's package): Prometheus scrapes a director
//! that serves real Dovecot backends under some traffic, then every panel's PromQL is run
//! through Prometheus' HTTP API. Each must parse and return data, so a renamed metric that a
//! panel still uses fails here. The alert rules' expressions are checked the same way. The
//! director is a cluster member over a real etcd, so the Cluster row shows real series.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::auth_service::{AuthService, AuthServiceConfig, LOGIN_PORT};
use support::client::{imap_login, Conn};
use support::cluster::cluster_section;
use support::director::{DirectorOptions, TestDirector};
use support::dovecot::{user, PASSWORD};
use support::etcd::EtcdCluster;
use support::ports::free_port;
use support::wait::wait_for;

struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP GET; returns (status, body).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: director\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus runs (Debian package prometheus, installed by ./scripts/test)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Prometheus { child, addr };
    wait_for(
        "prometheus to become ready",
        Duration::from_secs(30),
        || get(addr, "/-/ready").map(|(s, _)| s) == Some(200),
    );
    p
}

/// Runs an instant query; returns the number of series in the result.
fn query(p: &Prometheus, expr: &str) -> Result<usize, String> {
    let (status, body) =
        get(p.addr, &format!("/api/v1/query?query={}", urlencode(expr))).ok_or("no answer")?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("HTTP {status}: {body}"));
    }
    Ok(v["data"]["result"].as_array().map_or(0, |a| a.len()))
}

/// A panel's expression with the dashboard's variables filled in as Grafana would.
fn instantiate(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$backend", ".*")
}

/// Every `director_*` metric name an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("director_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.push(name);
    }
    names
}

fn catalogued(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    director::metrics::CATALOGUE
        .iter()
        .any(|m| m.name == name || m.name == base)
}

#[test]
fn every_panel_and_alert_query_returns_data_from_a_real_prometheus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("dashboards/director.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<(String, String)> = Vec::new();
    // Rows (type "row") only group panels; tests/alerts.rs checks that none hides any.
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        for t in p["targets"].as_array().unwrap() {
            exprs.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    // Names first: a renamed metric fails here even before Prometheus runs.
    for (title, e) in &exprs {
        for name in metric_names(e) {
            assert!(
                catalogued(&name),
                "panel {title:?} uses {name}, not in the catalogue"
            );
        }
    }
    let alerts = std::fs::read_to_string(root.join("dashboards/alerts.yml")).unwrap();
    for name in metric_names(&alerts) {
        assert!(
            catalogued(&name),
            "alerts.yml uses {name}, not in the catalogue"
        );
    }

    // A director under traffic, with a health checker, and one backend that dies so the
    // check-result and move series exist. Its logins go through a real Dovecot auth service,
    // so that the auth series exist too.
    let users: String = (1..=50)
        .map(|i| format!("{}:{{PLAIN}}{PASSWORD}::::::proxy=y\n", user(i)))
        .collect();
    let auth = AuthService::start(AuthServiceConfig::with_users(&users));
    // A cluster member (over a real etcd), so that the cluster and etcd series are real.
    let etcd = EtcdCluster::start_one();
    let (pool, d) = TestDirector::start_with_pool(
        3,
        &DirectorOptions::with_extra(&format!(
            "metrics: {{address: 127.0.0.1:0}}\n\
             health: {{interval: 300ms, fast_interval: 100ms, rise: 2, fall: 2}}\n\
             auth: {{mode: dovecot, socket: \"{}:{LOGIN_PORT}\", master_socket: {}}}\n{}",
            auth.ip(),
            auth.master_socket().display(),
            cluster_section(&etcd.endpoints(), "d1", "")
        )),
    );
    let prom = start_prometheus(pool.dir(), d.metrics.expect("metrics listener"));
    // Prometheus applies its first target list a few seconds after start: wait for the first
    // scrape, so that the traffic below spans several scrapes and rate() has samples.
    wait_for(
        "prometheus to scrape the director",
        Duration::from_secs(30),
        || query(&prom, "up{job=\"director\"} == 1").unwrap_or(0) != 0,
    );
    let mut open = Vec::new();
    for i in 1..=12 {
        let (mut c, _) = imap_login(d.imap, &user(i), PASSWORD);
        c.imap_ok("s", "SELECT INBOX");
        open.push(c);
    }
    let mut bad = Conn::connect(d.imap);
    bad.line();
    bad.imap("b", &format!("LOGIN {} wrong", user(1)));
    // Moves: take a backend down through the checker.
    pool.backend(2).kill();
    wait_for(
        "the killed backend to be marked down",
        Duration::from_secs(20),
        || {
            !d.state
                .backends()
                .backends
                .values()
                .all(|b| b.health == director::state::backend::Health::Up)
        },
    );
    // Some more traffic over several scrapes, so rate() has samples.
    for round in 0..6 {
        for i in 13..=16 {
            let (mut c, _) = imap_login(d.imap, &user(i + round * 4), PASSWORD);
            c.imap("z", "LOGOUT");
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    // Every query must parse at once and return data within a few scrapes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut empty = Vec::new();
    for (title, e) in &exprs {
        let q = instantiate(e);
        loop {
            match query(&prom, &q) {
                Ok(0) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                Ok(0) => {
                    empty.push(format!("{title}: {q}"));
                    break;
                }
                Ok(_) => break,
                Err(err) => panic!("panel {title:?}: {q} does not run: {err}"),
            }
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    drop(open);
}
