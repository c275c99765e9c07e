//! Figure 6: fail-over of the health checker.
//!
//! Three members of one cluster with default health settings (interval 2s, fast_interval
//! 500ms, fall 2), for `lease_ttl` 10s (the default) and 3s. Once one of them holds the
//! checker's seat and both backends are up: SIGKILL that director, and right after kill
//! backend2 (its Dovecot master and children). Then `director status --json` of a
//! survivor is polled: the time until another director holds the seat
//! (`cluster.members[].checker`), until the killed one has left the members, and until
//! backend2 shows `down`, each counted from the kill. For reference, with the checker
//! alive, the time from killing backend2 to `down` (first set-up only).

use std::time::{Duration, Instant};

use super::directors::{Director, Membership};
use super::wait;
use crate::dovecot::Pool;
use crate::etcd::EtcdCluster;

/// `status`'s view of the checker: the id of the member that holds the seat.
fn checker(s: &serde_json::Value) -> Option<String> {
    s["cluster"]["members"]
        .as_array()?
        .iter()
        .find(|m| m["checker"] == true)
        .and_then(|m| m["id"].as_str())
        .map(str::to_owned)
}

fn members(s: &serde_json::Value) -> Vec<String> {
    s["cluster"]["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn health(s: &serde_json::Value, ip: std::net::IpAddr) -> String {
    s["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["ip"] == ip.to_string()))
        .and_then(|b| b["health"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// What one fail-over took, from the kill.
struct Failover {
    ttl: u64,
    seat: Duration,
    left: Duration,
    down: Duration,
}

pub fn run(pool: &Pool) {
    let victim = pool.backend(1);
    let mut baseline = None;
    let mut rows = Vec::new();
    for ttl in [10u64, 3] {
        let etcd = EtcdCluster::start_one();
        let mut cluster = Membership::new(etcd.endpoints(), "/bench-failover/");
        cluster.extra = format!("  lease_ttl: {ttl}s\n");
        let mut ds: Vec<Director> = (1..=3)
            .map(|i| Director::member(pool, &format!("f{i}"), &cluster, ""))
            .collect();
        let ready = |d: &Director| {
            let s = d.process.status();
            members(&s).len() == 3
                && checker(&s).is_some()
                && pool.backends.iter().all(|b| health(&s, b.ip) == "up")
        };
        wait(
            "3 members, a checker, backends up",
            Duration::from_secs(30),
            || ds.iter().all(ready),
        );
        // Let the checker's first checks pass (status says "up" before any check).
        std::thread::sleep(Duration::from_secs(3));
        if baseline.is_none() {
            let t = Instant::now();
            victim.kill();
            wait(
                "backend2 down with the checker alive",
                Duration::from_secs(30),
                || health(&ds[0].process.status(), victim.ip) == "down",
            );
            baseline = Some(t.elapsed());
            victim.start();
            wait("backend2 up again", Duration::from_secs(30), || {
                health(&ds[0].process.status(), victim.ip) == "up"
            });
        }
        let seat_holder = checker(&ds[0].process.status()).expect("a checker");
        let k = ds.iter().position(|d| d.name == seat_holder).unwrap();
        let survivor = (k + 1) % 3;
        let t0 = Instant::now();
        ds[k].process.kill();
        victim.kill();
        let (mut seat, mut left, mut down) = (None, None, None);
        let deadline = t0 + Duration::from_secs(60);
        while (seat.is_none() || left.is_none() || down.is_none()) && Instant::now() < deadline {
            let s = ds[survivor].process.status();
            let at = t0.elapsed();
            if seat.is_none() && checker(&s).is_some_and(|c| c != seat_holder) {
                seat = Some(at);
            }
            if left.is_none() && !members(&s).contains(&seat_holder) {
                left = Some(at);
            }
            if down.is_none() && health(&s, victim.ip) == "down" {
                down = Some(at);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        victim.start();
        let f = Failover {
            ttl,
            seat: seat.expect("another director took the seat within 60 s"),
            left: left.expect("the killed director left the members within 60 s"),
            down: down.expect("backend2 went down within 60 s"),
        };
        println!(
            "lease_ttl {ttl}s: killed {seat_holder} (the checker) and backend2; seat taken after {:.2} s, {seat_holder} gone from the members after {:.2} s, backend2 down after {:.2} s",
            f.seat.as_secs_f64(),
            f.left.as_secs_f64(),
            f.down.as_secs_f64()
        );
        rows.push(f);
        wait("backend2 up again", Duration::from_secs(30), || {
            health(&ds[survivor].process.status(), victim.ip) == "up"
        });
    }
    println!("\n| Checker killed (SIGKILL), backend2 killed right after | Seat taken by another director | Killed director gone from members | backend2 marked down |");
    println!("|---|---|---|---|");
    for f in &rows {
        println!(
            "| lease_ttl {}s | {:.2} s | {:.2} s | {:.2} s |",
            f.ttl,
            f.seat.as_secs_f64(),
            f.left.as_secs_f64(),
            f.down.as_secs_f64()
        );
    }
    if let Some(b) = baseline {
        println!(
            "| reference: checker alive, backend2 killed | – | – | {:.2} s |",
            b.as_secs_f64()
        );
    }
}
