//! `scripts/bench records`: the single director's sticky records at scale (issue 13, target
//! 5), in this process, no backend needed.
//!
//! `BENCH_RECORDS` records (default 10,000,000) are made the way a login makes them: a
//! username (`first.last12345@domain`, ~27 bytes), hashed as the router hashes it (MD5 of the
//! `%Lu` template), noted and bound to the backend the ring names (10 backends). Half are
//! made 10 minutes after the other half (synthetic instants; `user_expire` is 15 minutes).
//!
//! Figures:
//! - RSS (`VmRSS`) before and after the fill, and per record;
//! - ns per route lookup: [`Router::route`] of random known users (the login's path: hash,
//!   username noted and record read under one lock, maintenance, the ring's place for the
//!   fallbacks), `BENCH_RECORDS_LOOKUPS` each run
//!   (default 1,000,000), median of `BENCH_RECORDS_RUNS` runs (default 5); and the same for
//!   the record alone (`record(hash)`). The table is held as the director holds it (its
//!   allocator, mimalloc, which asks for transparent huge pages: a random read of the table
//!   misses the TLB far less than with 4 KiB pages);
//! - the purge of the older half at a time when it has expired, while another thread looks
//!   random users up and times each lookup: the longest lookup is the longest pause a login
//!   saw (the same looker-up for a second without a purge shows the pauses the machine
//!   makes anyway); and the longest the purge held one shard's lock, timed by the table;
//! - what `status` and a Prometheus scrape cost at that size (counting the records), and
//!   `map` (its first page, and every page one after the other).

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use director::config::Config;
use director::routing::sticky::SHARDS;
use director::routing::user_hash::UserHash;
use director::state::backend::{AdminState, Backend, Health};
use director::state::local::LocalState;
use director::state::router::Router;

use crate::env::env_or;
use crate::measure::rss_kib;

const FIRST: [&str; 16] = [
    "maria", "jose", "anna", "li", "mohammed", "olga", "james", "fatima", "chen", "sofia", "david",
    "yuki", "ahmed", "emma", "ivan", "lucia",
];
const LAST: [&str; 16] = [
    "garcia",
    "smith",
    "wang",
    "mueller",
    "rossi",
    "tanaka",
    "kowalski",
    "silva",
    "nguyen",
    "dubois",
    "johansson",
    "ali",
    "novak",
    "kim",
    "jensen",
    "costa",
];
const DOMAINS: [&str; 4] = [
    "example.org",
    "mail.example.com",
    "uni.example.edu",
    "ex.net",
];

/// The `i`th user's name: unique, of a realistic length and shape.
fn username(i: u64) -> String {
    let r = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!(
        "{}.{}{}@{}",
        FIRST[(r >> 60) as usize],
        LAST[((r >> 56) & 15) as usize],
        i,
        DOMAINS[((r >> 54) & 3) as usize]
    )
}

/// SplitMix64: the random users of the lookups.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// Runs a future of the local state, which never waits.
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the local state never waits"),
    }
}

fn backends(n: usize) -> Vec<Backend> {
    let mut yaml = "listeners: [{protocol: imap, address: 127.0.0.1:1}]\nbackends:\n".to_owned();
    for i in 0..n {
        yaml += &format!("  - host: 10.0.0.{}\n", i + 1);
    }
    let cfg = Config::parse(&yaml).expect("bench configuration");
    (0..n)
        .map(|i| Backend {
            ip: format!("10.0.0.{}", i + 1).parse().unwrap(),
            host: format!("10.0.0.{}", i + 1).into(),
            weight: 100,
            tag: "".into(),
            admin: AdminState::Up,
            health: Health::Up,
            settings: Arc::new(cfg.backend_settings(i)),
        })
        .collect()
}

/// Lookup times in power-of-two buckets of nanoseconds (no list of every time: RSS is
/// measured in the same process).
struct Histogram {
    buckets: [u64; 64],
    count: u64,
    longest: Duration,
    /// Lookups over 1 ms and over 10 ms, exactly.
    over_1ms: u64,
    over_10ms: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: [0; 64],
            count: 0,
            longest: Duration::ZERO,
            over_1ms: 0,
            over_10ms: 0,
        }
    }

    fn add(&mut self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.buckets[(64 - ns.leading_zeros() as usize).min(63)] += 1;
        self.count += 1;
        self.longest = self.longest.max(d);
        self.over_1ms += u64::from(d > Duration::from_millis(1));
        self.over_10ms += u64::from(d > Duration::from_millis(10));
    }

    /// The upper bound of the bucket that holds the `q` quantile.
    fn below(&self, q: f64) -> Duration {
        let want = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Duration::from_nanos(1u64 << i.min(63));
            }
        }
        self.longest
    }
}

/// CPU time of the calling thread (a purge's wall time also counts the time it was not
/// running: 2 shared cores).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn run() {
    let n: u64 = env_or("BENCH_RECORDS", 10_000_000u64);
    let lookups: usize = env_or("BENCH_RECORDS_LOOKUPS", 1_000_000usize);
    let runs: usize = env_or("BENCH_RECORDS_RUNS", 5usize);
    let expire = Duration::from_secs(15 * 60);
    let pid = std::process::id();
    println!("records: {n}, lookups per run: {lookups}, runs: {runs}, user_expire 15m");

    let before = rss_kib(pid);
    let state = Arc::new(LocalState::new(backends(10), expire));
    let router = Router::new(state.clone(), UserHash::default());
    let hasher = UserHash::default();
    let t0 = Instant::now();
    let later = t0 + Duration::from_secs(10 * 60);
    let set = state.backends();
    let ring = set.ring("").expect("a ring");
    let fill = Instant::now();
    let mut name = String::new();
    for i in 0..n {
        name.clear();
        name.push_str(&username(i));
        let hash = hasher.hash(&name);
        let at = if i % 2 == 0 { t0 } else { later };
        state.note_username(hash, &name);
        state.bind(hash, ring.lookup(hash).expect("a backend"), at);
    }
    let fill = fill.elapsed();
    let after = rss_kib(pid);
    let live = state.record_counts(later).total;
    println!(
        "fill: {:.1} s ({:.0} ns per record); live records {live}",
        fill.as_secs_f64(),
        fill.as_nanos() as f64 / n as f64
    );
    println!(
        "RSS: before {:.0} MiB, after {:.0} MiB: {:.0} MiB for the records, {:.1} bytes per record",
        mib(before),
        mib(after),
        mib(after - before),
        (after - before) as f64 * 1024.0 / n as f64
    );

    // Lookups: random known users; the names are made beforehand (not timed).
    let mut rng = Rng(0x5EED);
    let names: Vec<String> = (0..lookups).map(|_| username(rng.below(n))).collect();
    let hashes: Vec<u32> = names.iter().map(|u| router.hash(u)).collect();
    let (mut route_ns, mut record_ns, mut hash_ns, mut table_ns) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let per = |start: Instant| start.elapsed().as_nanos() as f64 / lookups as f64;
    for _ in 0..runs {
        let start = Instant::now();
        for u in &names {
            let route = now_or_never(router.route(u, "")).expect("a route");
            std::hint::black_box(route);
        }
        route_ns.push(per(start));
        let now = Instant::now();
        let start = Instant::now();
        for u in &names {
            let r = state.record(router.hash(u), now).expect("a record");
            std::hint::black_box(r);
        }
        record_ns.push(per(start));
        let start = Instant::now();
        for u in &names {
            std::hint::black_box(router.hash(u));
        }
        hash_ns.push(per(start));
        let start = Instant::now();
        for h in &hashes {
            std::hint::black_box(state.record(*h, now).expect("a record"));
        }
        table_ns.push(per(start));
    }
    for (what, ns) in [
        ("route lookup (Router::route)", route_ns),
        ("record lookup (hash + record)", record_ns),
        ("  of which the user hash (MD5)", hash_ns),
        ("  of which the table (record of a known hash)", table_ns),
    ] {
        println!(
            "{what}: median {:.0} ns (runs: {:?})",
            median(ns.clone()),
            ns.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
    }

    // What status and a scrape read: counts, never a list.
    let mut count_ms = Vec::new();
    let mut counts = Default::default();
    for _ in 0..runs {
        let start = Instant::now();
        counts = state.record_counts(later);
        count_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "count of live records ({}, {} backends): median {:.0} ms",
        counts.total,
        counts.by_backend.len(),
        median(count_ms)
    );

    // `map`: the first page, then every page one after the other.
    let everyone = |_: IpAddr| true;
    let start = Instant::now();
    let first = state.records_page(later, None, 1000, &everyone);
    println!(
        "map: first page of {}: {:.2} ms",
        first.records.len(),
        start.elapsed().as_secs_f64() * 1e3
    );
    for limit in [1000, 100_000] {
        let start = Instant::now();
        let (mut pages, mut listed, mut after) = (0, 0, None);
        loop {
            let page = state.records_page(later, after, limit, &everyone);
            pages += 1;
            listed += page.records.len();
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let took = start.elapsed();
        println!(
            "map: every page of {limit}: {pages} pages, {listed} records in {:.1} s ({:.2} ms per page)",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e3 / pages as f64
        );
    }

    // Purge of the older half, a looker-up timing every lookup meanwhile; and the same
    // looker-up for a second without a purge, for the pauses the machine makes anyway.
    let hashes = Arc::new(hashes);
    let look = |stop: Arc<AtomicBool>| {
        let (state, hashes) = (state.clone(), hashes.clone());
        std::thread::spawn(move || {
            let mut times = Histogram::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let h = hashes[i % hashes.len()];
                let start = Instant::now();
                std::hint::black_box(state.record(h, later));
                times.add(start.elapsed());
                i += 1;
            }
            times
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = look(stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let quiet = quiet.join().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let looker = look(stop.clone());
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let cpu = thread_cpu();
    let purged = state.purge(t0 + Duration::from_secs(20 * 60));
    let cpu = thread_cpu() - cpu;
    let purge = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let times = looker.join().unwrap();
    println!(
        "purge: {} expired records dropped in {:.0} ms ({:.0} ms of CPU), {} shards: {:.0} µs each on average, longest hold of a shard's lock {:?}",
        purged.records,
        purge.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3,
        SHARDS,
        purge.as_secs_f64() * 1e6 / SHARDS as f64,
        purged.longest_hold
    );
    for (what, times) in [
        ("lookups during the purge", times),
        ("lookups for 1 s without a purge", quiet),
    ] {
        println!(
            "{what}: {}, p50 < {:?}, p99.9 < {:?}, longest {:?}; over 1 ms: {}, over 10 ms: {}",
            times.count,
            times.below(0.5),
            times.below(0.999),
            times.longest,
            times.over_1ms,
            times.over_10ms,
        );
    }
    println!("RSS after the purge: {:.0} MiB", mib(rss_kib(pid)));
}
