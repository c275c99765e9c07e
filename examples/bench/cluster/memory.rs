//! Figure 5: memory per sticky record in a director's replica.
//!
//! A member starts over an empty prefix (its backends only); its RSS is read
//! (`/proc/PID/status`, VmRSS). Then `BENCH_CLUSTER_RECORDS` records (default 200,000) are
//! written straight into etcd under `users/` in the director's own format
//! (`director::state::cluster::keys`: `{"b":"IP","r":MS}`, fresh so none expires), 128 to
//! a transaction (etcd's default `--max-txn-ops`), 4 transactions at a time. The director
//! takes them in through its watch; once its `status` counts them all, its RSS is read
//! again. Then a second director is started over the full prefix (it loads everything with
//! one range read) and its RSS read the same way. Per record: RSS growth / records.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use director::state::cluster::keys::{encode, now_ms, Keys, UserValue};
use director::state::cluster::replica::Versioned;
use etcd_client::{Client, Txn, TxnOp};

use super::directors::{Director, Membership};
use super::wait;
use crate::dovecot::Pool;
use crate::env::env_or;
use crate::etcd::EtcdCluster;
use crate::measure::rss_kib;

/// Puts per transaction: etcd's default `--max-txn-ops`.
const PER_TXN: usize = 128;
/// Transactions in flight.
const IN_FLIGHT: usize = 4;

pub fn run(pool: &Pool) {
    let n = env_or("BENCH_CLUSTER_RECORDS", 200_000usize);
    let etcd = EtcdCluster::start_one();
    let prefix = "/bench-memory/";
    let cluster = Membership::new(etcd.endpoints(), prefix);
    let d = Director::member(pool, "m1", &cluster, "");
    std::thread::sleep(Duration::from_secs(3));
    let empty = rss_kib(d.process.pid());

    let t = Instant::now();
    let backends: Vec<IpAddr> = pool.backends.iter().map(|b| b.ip).collect();
    write_records(&etcd.endpoints(), prefix, n, &backends);
    let written = t.elapsed();
    let took = wait(
        "the director to take every record in",
        Duration::from_secs(180),
        || {
            std::thread::sleep(Duration::from_millis(500));
            d.records() >= n as u64
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let full = rss_kib(d.process.pid());
    println!(
        "{n} records written in {:.1} s; the running director had them all {:.1} s later",
        written.as_secs_f64(),
        took.as_secs_f64()
    );
    let entry = std::mem::size_of::<(u32, Versioned<UserValue>)>();
    let per = |grown: u64| grown as f64 * 1024.0 / n as f64;
    println!("\n| Replica of {n} records | RSS | Per record |");
    println!("|---|---|---|");
    println!(
        "| member over an empty prefix | {:.1} MiB | – |",
        empty as f64 / 1024.0
    );
    println!(
        "| the same member after taking the records in through its watch | {:.1} MiB | {:.0} bytes |",
        full as f64 / 1024.0,
        per(full.saturating_sub(empty))
    );
    match Director::try_start(pool, "m2", "", Some(&cluster)) {
        Ok(d2) => {
            wait(
                "the second director's records",
                Duration::from_secs(60),
                || d2.records() >= n as u64,
            );
            std::thread::sleep(Duration::from_secs(2));
            let rss = rss_kib(d2.process.pid());
            println!(
                "| a member started over the {n} records (one range read before it listens; it listened {:.2} s after its spawn) | {:.1} MiB | {:.0} bytes |",
                d2.start_time.as_secs_f64(),
                rss as f64 / 1024.0,
                per(rss.saturating_sub(empty))
            );
        }
        Err(e) => {
            let gist: String = e
                .lines()
                .filter(|l| l.contains("rror") || l.contains("exited"))
                .take(4)
                .collect::<Vec<_>>()
                .join(" / ");
            println!("| a member started over the {n} records | did not start: {gist} | – |");
        }
    }
    println!(
        "\nin memory, one replica entry `(u32, Versioned<UserValue>)` is {entry} bytes (a HashMap adds 1 control byte per slot and keeps up to 1/8 of its slots free, after doubling)"
    );
}

/// Writes records `0..n` (the hash is the number) under `prefix`, backends in turn.
fn write_records(endpoints: &[String], prefix: &str, n: usize, backends: &[IpAddr]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let keys = Arc::new(Keys::new(prefix));
    let backends = Arc::new(backends.to_vec());
    rt.block_on(async move {
        let client = Client::connect(endpoints, None)
            .await
            .expect("connect to etcd");
        let refreshed = now_ms();
        let batches: Vec<std::ops::Range<usize>> = (0..n)
            .step_by(PER_TXN)
            .map(|s| s..(s + PER_TXN).min(n))
            .collect();
        let batches = Arc::new(tokio::sync::Mutex::new(batches));
        let mut tasks = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (client, batches, keys, backends) = (
                client.clone(),
                batches.clone(),
                keys.clone(),
                backends.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut kv = client.kv_client();
                loop {
                    let Some(range) = batches.lock().await.pop() else {
                        return;
                    };
                    let ops: Vec<TxnOp> = range
                        .map(|i| {
                            let value = UserValue {
                                backend: Some(backends[i % backends.len()]),
                                refreshed,
                                moving: None,
                            };
                            TxnOp::put(keys.user(i as u32), encode(&value), None)
                        })
                        .collect();
                    // A busy machine (other builds) can stall etcd's fsync past its
                    // request timeout: try again rather than give up the figure.
                    let mut tries = 0;
                    while let Err(e) = kv.txn(Txn::new().and_then(ops.clone())).await {
                        tries += 1;
                        assert!(tries < 5, "etcd txn, {tries} tries: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}
