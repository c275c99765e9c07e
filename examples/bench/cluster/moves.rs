//! Figure 3: how long a move of users across 3 directors takes.
//!
//! Three members of one cluster; `BENCH_CLUSTER_MOVE_USERS` users (default 1000,
//! `user1001`..`user2000`) log in once each through a director picked at random (a fixed
//! seed), and `BENCH_CLUSTER_MOVE_HELD` of them (default 300) keep their session, spread
//! evenly over the 3 directors. Then `director down HOST` runs, on a director that does not
//! hold the checker's seat, for the backend that holds the most records: it sets the
//! backend down and moves each of its users (every director ends its sessions of the user
//! and acknowledges, then the record points to the other backend). Meanwhile the checker's
//! janitor (`src/server/mod.rs`, every 2 s) finds users on a backend that no longer serves
//! and moves them too: two movers share the work user by user. Measured: until the command
//! returns, and until every director's replica shows no record on that backend; users moved
//! per second (records that were there / that time); and the held sessions ended, as their
//! clients see it (`BYE` or a closed connection), checked against `doveadm who` on the
//! backend itself.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::directors::{Director, Membership};
use super::{hold_all, load, wait, Held, Rng, USERS};
use crate::dovecot::Pool;
use crate::env::env_or;
use crate::etcd::EtcdCluster;

pub fn run(pool: &Pool) {
    let n_users = env_or("BENCH_CLUSTER_MOVE_USERS", 1000usize).min(USERS);
    let n_held = env_or("BENCH_CLUSTER_MOVE_HELD", 300usize).min(n_users);
    let etcd = EtcdCluster::start_one();
    let cluster = Membership::new(etcd.endpoints(), "/bench-move/");
    let ds: Vec<Director> = (1..=3)
        .map(|i| Director::member(pool, &format!("d{i}"), &cluster, ""))
        .collect();
    let users: Vec<usize> = (USERS - n_users + 1..=USERS).collect();
    // Held sessions: user k of the first n_held through director k % 3.
    let to_hold: Vec<(usize, std::net::SocketAddr)> = users[..n_held]
        .iter()
        .enumerate()
        .map(|(k, &u)| (u, ds[k % 3].imap))
        .collect();
    let mut held: Vec<Held> = hold_all(&to_hold, 4);
    // The others: one login each through a random director.
    let mut rng = Rng::new(0x5eed);
    for &u in &users[n_held..] {
        let d = &ds[rng.below(3)];
        load(&[d.imap], 1, 1, &[u]);
    }
    wait(
        "every record in every replica",
        Duration::from_secs(30),
        || ds.iter().all(|d| d.records() >= n_users as u64),
    );
    let status = ds[0].process.status();
    let on = |s: &serde_json::Value, ip: IpAddr| -> u64 {
        s["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["ip"] == ip.to_string())
            .and_then(|b| b["users"].as_u64())
            .unwrap_or(0)
    };
    let from = pool
        .backends
        .iter()
        .max_by_key(|b| on(&status, b.ip))
        .unwrap();
    let records_on_from = on(&status, from.ip);
    let held_on_from = held.iter().filter(|h| h.backend == from.name).count();
    let who_before = sessions_on(from);
    println!(
        "{n_users} users with records, {n_held} sessions held ({} per director); {} holds {records_on_from} records and {held_on_from} held sessions (doveadm who: {who_before})",
        n_held / 3,
        from.name
    );

    // The admin's director is any of them; here one that does not run the health checks
    // (two in three, at random), so that the checker's janitor is another director.
    let checker = status["cluster"]["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["checker"] == true))
        .and_then(|m| m["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let admin = ds.iter().find(|d| d.name != checker).unwrap();
    let t0 = Instant::now();
    let reply = admin
        .process
        .admin(&["down", &from.ip.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let command = t0.elapsed();
    wait(
        "no record left on the backend",
        Duration::from_secs(120),
        || ds.iter().all(|d| on(&d.process.status(), from.ip) == 0),
    );
    let everywhere = t0.elapsed();
    let count = |k: &str| reply[k].as_u64().unwrap_or(0);
    let (mut ended_on_from, mut ended_elsewhere) = (0, 0);
    for h in &mut held {
        if h.ended() {
            if h.backend == from.name {
                ended_on_from += 1;
            } else {
                ended_elsewhere += 1;
            }
        }
    }
    let who_after = sessions_on(from);
    println!(
        "`director down {}` on {} ({checker} runs the checks) replied: moved {}, dropped {}, kicked {} (its own sessions), busy {}, failed {}",
        from.ip,
        admin.name,
        count("moved"),
        count("dropped"),
        count("kicked"),
        count("busy"),
        count("failed")
    );
    println!(
        "\n| Move of {records_on_from} users off {} (3 directors, `down` on {}) | Value |",
        from.name, admin.name
    );
    println!("|---|---|");
    println!(
        "| until the command returned | {:.2} s |",
        command.as_secs_f64()
    );
    println!(
        "| until no director's replica had a record there | {:.2} s |",
        everywhere.as_secs_f64()
    );
    println!(
        "| users moved per second ({records_on_from} records off {}, to the last replica) | {:.0} |",
        from.name,
        records_on_from as f64 / everywhere.as_secs_f64()
    );
    println!(
        "| of which moved by the command (its reply) / left busy (another mover had them) | {} / {} |",
        count("moved"),
        count("busy")
    );
    println!(
        "| held sessions there, ended (seen by the clients) | {ended_on_from} of {held_on_from} |"
    );
    println!(
        "| held sessions elsewhere, ended | {ended_elsewhere} of {} |",
        held.len() - held_on_from
    );
    println!(
        "| sessions on {} per `doveadm who`, before / after | {who_before} / {who_after} |",
        from.name
    );
}

/// Connections of the pool's users on backend `b`, as `doveadm who` lists them (one line per
/// user and protocol: `user0001 3 imap (pids) (ips)`).
fn sessions_on(b: &crate::dovecot::Backend) -> usize {
    b.doveadm(&["who"])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            f.next().filter(|u| u.starts_with("user"))?;
            f.next()?.parse::<usize>().ok()
        })
        .sum()
}
