//! Figure 1: the login latency etcd adds. A single director without `cluster:` and a
//! director alone in a cluster (1-member etcd) over the same two backends; one client,
//! one login at a time (connect, `LOGIN`, `LOGOUT`; latency to the `LOGIN`'s `OK`).
//!
//! Per round and director: its records are dropped (`flush all -F`), then
//! `BENCH_CLUSTER_LATENCY_USERS` users (default 400) log in once each: **new users** (in a
//! cluster, one "create if absent" transaction and the wait until the watch brings it
//! back); then the same users again: **users with a record** (routed from the replica).
//! `BENCH_CLUSTER_ROUNDS` rounds (default 5), the directors' order reversed every other
//! round; the percentiles are over every login of the rounds. The member's own etcd
//! transaction time (its `director_etcd_request_duration_seconds{op="txn"}`) splits a new
//! user's cost into the transaction and the rest; its count of etcd requests of any kind
//! during the runs of users with a record shows whether they cost a round trip.

use std::time::Duration;

use super::directors::{sample, Director, Membership};
use super::{ms, timed_login, wait};
use crate::dovecot::Pool;
use crate::env::env_or;
use crate::etcd::EtcdCluster;
use crate::measure::percentile;

/// The logins of one kind through one director, over all rounds.
#[derive(Default)]
struct Samples {
    new: Vec<Duration>,
    record: Vec<Duration>,
    /// The member's etcd transactions during the new-user runs: count and total time.
    txns: f64,
    txn_seconds: f64,
    /// The member's etcd requests of any kind during the runs of users with a record.
    record_requests: f64,
}

pub fn run(pool: &Pool) {
    let users = env_or("BENCH_CLUSTER_LATENCY_USERS", 400usize);
    let rounds = env_or("BENCH_CLUSTER_ROUNDS", 5usize);
    let etcd = EtcdCluster::start_one();
    let single = Director::single(pool, "single");
    let member = Director::member(
        pool,
        "d1",
        &Membership::new(etcd.endpoints(), "/bench-latency/"),
        "",
    );
    println!(
        "{users} users per run, {rounds} rounds, one client; etcd {}",
        etcd.endpoint(0)
    );
    for d in [&single, &member] {
        for u in 1..=20 {
            timed_login(d.imap, u);
        }
    }
    let mut results = [Samples::default(), Samples::default()];
    for round in 0..rounds {
        let mut order = [0, 1];
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let d = [&single, &member][which];
            forget_records(d);
            let before = etcd_requests(d, &[("op", "txn")]);
            let mut new: Vec<Duration> = (1..=users).map(|u| timed_login(d.imap, u)).collect();
            let after = etcd_requests(d, &[("op", "txn")]);
            let requests_before = etcd_requests(d, &[]).0;
            let mut record: Vec<Duration> = (1..=users).map(|u| timed_login(d.imap, u)).collect();
            let s = &mut results[which];
            s.record_requests += etcd_requests(d, &[]).0 - requests_before;
            s.txns += after.0 - before.0;
            s.txn_seconds += after.1 - before.1;
            s.new.extend_from_slice(&new);
            s.record.extend_from_slice(&record);
            new.sort();
            record.sort();
            println!(
                "round {} {:<7} new user p50 {} ms p99 {} ms; with a record p50 {} ms p99 {} ms",
                round + 1,
                d.name,
                ms(percentile(&new, 50)),
                ms(percentile(&new, 99)),
                ms(percentile(&record, 50)),
                ms(percentile(&record, 99))
            );
        }
    }
    for s in &mut results {
        s.new.sort();
        s.record.sort();
    }
    let [alone, clustered] = &results;
    println!(
        "\n| Login (ms, {} logins each) | Single director | Cluster member (1-member etcd) | Added by etcd |",
        users * rounds
    );
    println!("|---|---|---|---|");
    for (what, a, c) in [
        ("with a record", &alone.record, &clustered.record),
        ("new user", &alone.new, &clustered.new),
    ] {
        for p in [50, 99] {
            let (x, y) = (percentile(a, p), percentile(c, p));
            println!(
                "| {what}, p{p} | {} | {} | {:+.2} |",
                ms(x),
                ms(y),
                (y.as_secs_f64() - x.as_secs_f64()) * 1e3
            );
        }
    }
    println!(
        "\nthe member's etcd requests of any kind (its lease renewals and refreshes included) during the runs of users with a record: {:.0} for {} logins",
        clustered.record_requests,
        users * rounds
    );
    if clustered.txns > 0.0 {
        println!(
            "the member's etcd transactions during the new-user runs: {:.0} for {} logins, mean {:.2} ms each",
            clustered.txns,
            users * rounds,
            clustered.txn_seconds / clustered.txns * 1e3
        );
    }
}

/// `d`'s etcd requests with `labels` so far (all when none): how many, and their seconds.
fn etcd_requests(d: &Director, labels: &[(&str, &str)]) -> (f64, f64) {
    let m = d.metrics_text();
    (
        sample(&m, "director_etcd_request_duration_seconds_count", labels),
        sample(&m, "director_etcd_request_duration_seconds_sum", labels),
    )
}

/// Drops every record of `d` (`flush all -F`) and waits until it holds none.
fn forget_records(d: &Director) {
    d.process
        .admin(&["flush", "all", "-F"])
        .unwrap_or_else(|e| panic!("{e}"));
    wait("the records to go", Duration::from_secs(30), || {
        d.records() == 0
    });
}
