//! Benchmarks of the director against a direct connection to the same real Dovecot backend.
//! Run with `./scripts/bench [cpu|idle|fetch|profile|callgrind|storm|records|auth|cluster]` (release build); it prints the figures for
//! BENCHMARKS.md.
//!
//! - No argument: the director beside HAProxy and direct connections in front of the same two
//!   backends: logins/s, CPU per session, NOOP round trip, bulk relay, idle memory, listen
//!   backlog, a reconnect storm; one table of ratios ([`versus`]).
//! - `cpu`: only logins/s and the proxy CPU per session, director beside HAProxy, 6 rounds.
//! - `idle`: only the RSS per idle session (director and HAProxy; the director over TLS).
//! - `fetch`: only the large FETCH (bulk relay), the three targets in turn, 4 rounds.
//! - `profile`: `perf record` of the director during logins, and the top of the report.
//! - `callgrind`: user-space instructions per session, director and HAProxy (valgrind).
//! - `storm`: only the reconnect storm.
//! - `auth`: logins through a Dovecot auth service (dovecot mode) against passthrough and
//!   direct logins ([`auth`]).
//! - `cluster`: what cluster mode costs (etcd in the login path, logins/s over two
//!   directors, a move across three, etcd writes of record refreshes, memory per record,
//!   the checker's fail-over) ([`cluster`]).
//! - `records`: 10 million sticky records in this process: RSS, route lookup, purge pause,
//!   counting and paging ([`records`]).

#[path = "../../tests/support/command.rs"]
mod command;
#[path = "../../tests/support/dovecot.rs"]
mod dovecot;
#[path = "../../tests/support/env.rs"]
mod env;
#[path = "../../tests/support/etcd.rs"]
mod etcd;
#[path = "../../tests/support/partition.rs"]
mod partition;
#[path = "../../tests/support/ports.rs"]
mod ports;
#[path = "../../tests/support/wait.rs"]
mod wait;

mod auth;
#[path = "../../tests/support/auth_service.rs"]
mod auth_service;
mod cluster;
mod director_process;
mod haproxy;
mod imap;
mod measure;
mod records;
mod versus;

/// The director's allocator (src/main.rs), so that `records` measures the table as the
/// director holds it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    match std::env::args().nth(1).as_deref() {
        None => versus::run(),
        Some("auth") => auth::run(),
        Some("cluster") => cluster::run(),
        Some("profile") => versus::profile(),
        Some("storm") => versus::storm_only(),
        Some("cpu") => versus::cpu_only(),
        Some("idle") => versus::idle_only(),
        Some("callgrind") => versus::callgrind(),
        Some("records") => records::run(),
        Some("fetch") => versus::fetch_only(),
        Some(other) => {
            panic!("unknown benchmark {other:?}: none (director vs HAProxy vs direct), `cpu`, `idle`, `fetch`, `profile`, `callgrind`, `storm`, `records`, `auth` or `cluster`")
        }
    }
}
