//! Figure 4: the etcd write rate of sticky-record refreshes.
//!
//! From the code (`src/state/cluster/mod.rs`, `refresh_loop` / `refresh_once`): every tick
//! (`record_refresh` / 4, kept within 1 s..10 s) a director rewrites, one transaction each,
//! the record of every user it holds sessions of whose last refresh is at least
//! `record_refresh` old. A record written just after a tick is `k * tick - ε` old at the
//! k-th tick after, so it is due again after `(floor(record_refresh / tick) + 1) * tick`:
//! the period. With the default `user_expire` 15m, `record_refresh` is 225 s, the tick 10 s
//! and the period 230 s.
//!
//! Measured at a scale that runs here: two members with `user_expire: 40s` (so
//! `record_refresh` 10 s, tick 2.5 s, period 12.5 s), `BENCH_CLUSTER_REFRESH_USERS` users
//! (default 2000) holding one session each, half through each director. After the logins
//! and a few seconds, etcd's own counters (`/metrics` of the etcd member) are read at the
//! start and end of a window of `BENCH_CLUSTER_REFRESH_WINDOW` seconds (default 25, two
//! periods), and the revision every second. Scaled to 100,000 users with the default refresh
//! as rate × (100,000 / users) × (period here / period at the default).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::directors::{http_get, sample, Director, Membership};
use super::hold_all;
use crate::dovecot::Pool;
use crate::env::env_or;
use crate::etcd::{EtcdCluster, CLIENT_PORT};

/// The period of a record's refresh (see the module's documentation).
fn period(record_refresh: Duration) -> Duration {
    let tick = (record_refresh / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let k = (record_refresh.as_secs_f64() / tick.as_secs_f64()).floor() + 1.0;
    tick.mul_f64(k)
}

/// etcd's write counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Counters {
    /// Every committed write transaction (put, delete, txn with a write) adds one.
    revision: f64,
    puts: f64,
    deletes: f64,
    proposals: f64,
    /// The size of etcd's database file: without compaction every revision stays in it.
    db_bytes: f64,
}

fn counters(etcd: SocketAddr) -> Counters {
    let m = http_get(etcd, "/metrics");
    Counters {
        revision: sample(&m, "etcd_debugging_mvcc_current_revision", &[]),
        puts: sample(&m, "etcd_mvcc_put_total", &[]),
        deletes: sample(&m, "etcd_mvcc_delete_total", &[]),
        proposals: sample(&m, "etcd_server_proposals_committed_total", &[]),
        db_bytes: sample(&m, "etcd_mvcc_db_total_size_in_bytes", &[]),
    }
}

/// A director's etcd transactions so far: count and seconds.
fn txns(d: &Director) -> (f64, f64) {
    let m = d.metrics_text();
    let l = [("op", "txn")];
    (
        sample(&m, "director_etcd_request_duration_seconds_count", &l),
        sample(&m, "director_etcd_request_duration_seconds_sum", &l),
    )
}

pub fn run(pool: &Pool) {
    let n = env_or("BENCH_CLUSTER_REFRESH_USERS", 2000usize).min(super::USERS);
    let window = Duration::from_secs(env_or("BENCH_CLUSTER_REFRESH_WINDOW", 25u64));
    let small_refresh = Duration::from_secs(10);
    let default_refresh = Duration::from_secs(225);
    let etcd = EtcdCluster::start_one();
    let etcd_addr = SocketAddr::from((etcd.ip(0), CLIENT_PORT));
    let cluster = Membership::new(etcd.endpoints(), "/bench-refresh/");
    let ds: Vec<Director> = (1..=2)
        .map(|i| Director::member(pool, &format!("r{i}"), &cluster, "user_expire: 40s\n"))
        .collect();
    let t = Instant::now();
    let sessions: Vec<(usize, SocketAddr)> = (1..=n).map(|u| (u, ds[u % 2].imap)).collect();
    let held = hold_all(&sessions, 4);
    println!(
        "{} sessions held ({} users, half through each of 2 directors) in {:.1} s; user_expire 40s, record_refresh 10s (default: user_expire / 4)",
        held.len(),
        n,
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(5));
    let start = counters(etcd_addr);
    let txn_start: Vec<(f64, f64)> = ds.iter().map(txns).collect();
    let t0 = Instant::now();
    let mut per_second = Vec::new();
    let mut last = start.revision;
    for s in 1..=window.as_secs() {
        let until = Duration::from_secs(s);
        if let Some(rest) = until.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
        let r = counters(etcd_addr).revision;
        per_second.push(r - last);
        last = r;
    }
    let secs = t0.elapsed().as_secs_f64();
    let end = counters(etcd_addr);
    let txn_end: Vec<(f64, f64)> = ds.iter().map(txns).collect();
    let rate = |f: fn(&Counters) -> f64| (f(&end) - f(&start)) / secs;
    let writes = rate(|c| c.revision);
    let (dir_txns, dir_txn_s) = txn_start
        .iter()
        .zip(&txn_end)
        .fold((0.0, 0.0), |(n, s), (a, b)| (n + b.0 - a.0, s + b.1 - a.1));
    let (p_small, p_default) = (period(small_refresh), period(default_refresh));
    let expected = n as f64 / p_small.as_secs_f64();
    let scaled =
        writes * (100_000.0 / n as f64) * (p_small.as_secs_f64() / p_default.as_secs_f64());
    let computed = 100_000.0 / p_default.as_secs_f64();
    println!(
        "etcd revisions per second, each second of the {secs:.0} s window: {:?}",
        per_second.iter().map(|v| *v as u64).collect::<Vec<_>>()
    );
    println!(
        "\n| etcd writes, {n} users with sessions, refresh 10 s (period {:.1} s) | Per second |",
        p_small.as_secs_f64()
    );
    println!("|---|---|");
    println!("| write transactions (etcd revision) | {writes:.1} |");
    println!("| puts (`etcd_mvcc_put_total`) | {:.1} |", rate(|c| c.puts));
    println!(
        "| deletes (`etcd_mvcc_delete_total`) | {:.1} |",
        rate(|c| c.deletes)
    );
    println!(
        "| raft proposals committed | {:.1} |",
        rate(|c| c.proposals)
    );
    println!("| expected from the code: users / period | {expected:.1} |");
    println!(
        "| etcd database growth (no compaction: etcd 3.4's default) | {:.0} KiB/s, {:.0} bytes per write |",
        rate(|c| c.db_bytes) / 1024.0,
        (end.db_bytes - start.db_bytes) / (end.revision - start.revision).max(1.0)
    );
    println!(
        "| directors' etcd transactions (both), mean time | {:.1}/s, {:.2} ms |",
        dir_txns / secs,
        if dir_txns > 0.0 {
            dir_txn_s / dir_txns * 1e3
        } else {
            0.0
        }
    );
    println!(
        "\n| At 100,000 active users, default refresh (225 s, tick 10 s, period {:.0} s) | Writes/s |",
        p_default.as_secs_f64()
    );
    println!("|---|---|");
    println!(
        "| computed from the code: 100,000 / {:.0} s | {computed:.0} |",
        p_default.as_secs_f64()
    );
    println!(
        "| measured here, scaled: {writes:.1} × (100,000 / {n}) × ({:.1} s / {:.0} s) | {scaled:.0} |",
        p_small.as_secs_f64(),
        p_default.as_secs_f64()
    );
    drop(held);
}
