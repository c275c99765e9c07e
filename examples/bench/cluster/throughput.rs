//! Figure 2: logins/s through two cluster directors against one, and against a single
//! director without `cluster:`, all over the same two backends on the same machine.
//!
//! `BENCH_CLUSTER_CLIENTS` client threads (default 4), each connecting, logging in and out
//! in a loop, until `BENCH_CLUSTER_LOGINS` logins (default 3000) are done; users
//! `user0001`..`user1000` in turn, every one with a record already (a warm-up pass), so
//! this is the steady state of logins that need no etcd write. Three set-ups:
//! - `single`: every client through the single director;
//! - `cluster, 1 director`: every client through member d1 (d2 runs, idle but watching);
//! - `cluster, 2 directors`: half the clients through d1, half through d2.
//!
//! `BENCH_CLUSTER_ROUNDS` rounds (default 5), the order reversed every other round; the
//! table gives the median of the rounds, and the median of each round's ratio to the single
//! director (the machine's load drifts between rounds more than within one). CPU per login: utime + stime of the set-up's
//! director processes (both members for the cluster set-ups) over the run, per login.

use std::net::SocketAddr;

use super::directors::{Director, Membership};
use super::load;
use crate::dovecot::Pool;
use crate::env::env_or;
use crate::etcd::EtcdCluster;
use crate::measure::{clock_tick, cpu_ticks, percentile};

/// Users of this figure.
const USERS: usize = 1000;

struct Run {
    logins_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
}

pub fn run(pool: &Pool) {
    let logins = env_or("BENCH_CLUSTER_LOGINS", 3000usize);
    let clients = env_or("BENCH_CLUSTER_CLIENTS", 4usize);
    let rounds = env_or("BENCH_CLUSTER_ROUNDS", 5usize);
    let etcd = EtcdCluster::start_one();
    let cluster = Membership::new(etcd.endpoints(), "/bench-throughput/");
    let single = Director::single(pool, "single");
    let d1 = Director::member(pool, "d1", &cluster, "");
    let d2 = Director::member(pool, "d2", &cluster, "");
    let users: Vec<usize> = (1..=USERS).collect();
    println!(
        "{logins} logins per run, {clients} clients, {rounds} rounds, {USERS} users with records"
    );
    load(&[single.imap], USERS, clients, &users);
    load(&[d1.imap, d2.imap], USERS, clients, &users);

    let setups: [(&str, Vec<SocketAddr>, Vec<&Director>); 3] = [
        ("single", vec![single.imap], vec![&single]),
        ("cluster, 1 director", vec![d1.imap], vec![&d1, &d2]),
        (
            "cluster, 2 directors",
            vec![d1.imap, d2.imap],
            vec![&d1, &d2],
        ),
    ];
    let tick = clock_tick();
    let mut runs: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let mut order = [0, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (name, addrs, processes) = &setups[i];
            let cpu = || -> u64 {
                processes
                    .iter()
                    .map(|d| {
                        let (u, s) = cpu_ticks(d.process.pid());
                        u + s
                    })
                    .sum()
            };
            let before = cpu();
            let (wall, mut latencies) = load(addrs, logins, clients, &users);
            let ticks = cpu() - before;
            latencies.sort();
            let run = Run {
                logins_per_s: logins as f64 / wall.as_secs_f64(),
                p50_ms: percentile(&latencies, 50).as_secs_f64() * 1e3,
                p99_ms: percentile(&latencies, 99).as_secs_f64() * 1e3,
                cpu_us: (tick * ticks as u32).as_secs_f64() * 1e6 / logins as f64,
            };
            println!(
                "round {} {:<20} {:>6.0} logins/s  p50 {:>5.2} ms  p99 {:>6.2} ms  director CPU/login {:.0} µs",
                round + 1,
                name,
                run.logins_per_s,
                run.p50_ms,
                run.p99_ms,
                run.cpu_us
            );
            runs[i].push(run);
        }
    }
    let median = |mut x: Vec<f64>| {
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let of = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
    println!(
        "\nmedian of {rounds} rounds ({clients} clients):\n\n| Set-up | Logins/s | vs single (median of the rounds' ratios) | p50 (ms) | p99 (ms) | Director CPU per login (µs) |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, (name, _, _)) in setups.iter().enumerate() {
        let ratio = median(
            runs[i]
                .iter()
                .zip(&runs[0])
                .map(|(r, s)| r.logins_per_s / s.logins_per_s)
                .collect(),
        );
        println!(
            "| {name} | {:.0} | {ratio:.2} | {:.2} | {:.2} | {:.0} |",
            of(i, |r| r.logins_per_s),
            of(i, |r| r.p50_ms),
            of(i, |r| r.p99_ms),
            of(i, |r| r.cpu_us)
        );
    }
}
