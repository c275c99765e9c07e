//! A real network partition on loopback: nftables rules that drop every TCP packet to and
//! from one port on some addresses, so that the processes talking through that port lose each
//! other while everything else on the machine goes on. [`super::etcd`] uses it to cut one
//! client off from etcd (`EtcdCluster::partition`).
//!
//! # Facts about nftables 1.0.6 and Linux that this file relies on
//!
//! - Changing the ruleset needs `CAP_NET_ADMIN`: the tests run as root. Without it `nft`
//!   fails and so does the test (a partition test must not pass by cutting nothing).
//! - Each [`Partition`] has a table of its own (`inet director_cut_PID_N`); `nft -f -` loads
//!   it atomically and `nft delete table` removes it with its chains. Other tables, the
//!   host's own included, stay untouched, and tests in parallel do not clash: the rules name
//!   the addresses of one test's block and one port.
//! - Only the `input` hook drops. On loopback every packet, both ways, passes `output` and
//!   then `input` once, so `tcp dport P` catches what goes to the server and `tcp sport P`
//!   what comes back. Dropped on input, a packet looks lost on the wire: the sender's stack
//!   sent it and retransmits it later, as across a real partition. (A drop on `output` would
//!   hand the sending call `EPERM` inside the kernel; TCP hides that, other protocols not.)
//! - The rules are stateless (no `ct state`), so they hit established connections as well as
//!   new ones and need no conntrack; `drop` is final across tables, so an `accept` of another
//!   table (say `ct state established accept`) does not let the packets through.
//! - Nothing answers a dropped packet (no RST, no ICMP): a new connection hangs in SYN-SENT
//!   until the client's own timeout; on an established one, writes are queued and reads wait;
//!   neither side sees an error before its keepalive or timeout. After [`Partition::heal`],
//!   TCP's next retransmission delivers what was queued (0.3 s after the heal, in a probe here) and
//!   the connection goes on as if nothing happened.
//! - Loopback's offloads (GSO/TSO) change nothing: the hooks see every (super-)packet.
//! - A test process killed by SIGKILL leaves its table behind; the next [`Partition`] deletes
//!   the tables of processes that no longer exist.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::command::{run, Ran};

/// The start of every table's name; the rest is `PID_N`.
const TABLE_PREFIX: &str = "director_cut_";

/// Counter that gives every partition of this process its own table.
static NEXT_TABLE: AtomicU32 = AtomicU32::new(0);

/// A cut that can be made and healed: while it is made, no TCP packet to or from `port` on
/// any of `addrs` arrives. Dropping it heals.
pub struct Partition {
    /// The nftables table (family `inet`) that holds the rules while cut.
    table: String,
    /// The addresses whose `port` is cut off.
    addrs: Vec<Ipv4Addr>,
    /// The port: the server side of the connections that lose their packets.
    port: u16,
    /// Whether the table is loaded.
    cut: bool,
}

impl Partition {
    /// A partition of `port` on `addrs`, not cut yet. Removes the tables that test processes
    /// which died without healing left behind.
    pub fn new(addrs: &[Ipv4Addr], port: u16) -> Partition {
        assert!(!addrs.is_empty(), "a partition needs an address");
        remove_stale_tables();
        let n = NEXT_TABLE.fetch_add(1, Ordering::Relaxed);
        Partition {
            table: format!("{TABLE_PREFIX}{}_{n}", std::process::id()),
            addrs: addrs.to_vec(),
            port,
            cut: false,
        }
    }

    /// Starts dropping the packets. Panics when `nft` refuses (not root?).
    pub fn cut(&mut self) {
        if self.cut {
            return;
        }
        let ruleset = self.ruleset();
        let loaded = nft(&["-f", "-"], Some(ruleset.as_bytes()));
        assert!(
            loaded.ok,
            "nft refused the partition's rules (this needs root, CAP_NET_ADMIN):\n{}\n{ruleset}",
            loaded.text()
        );
        self.cut = true;
    }

    /// Stops dropping: packets flow again, queued ones are retransmitted.
    pub fn heal(&mut self) {
        if !self.cut {
            return;
        }
        let deleted = nft(&["delete", "table", "inet", &self.table], None);
        assert!(
            deleted.ok,
            "nft could not delete table {}: {}",
            self.table,
            deleted.text()
        );
        self.cut = false;
    }

    /// Whether the packets are being dropped.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// The table's name, to look at it with `nft list table inet NAME`.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The rules: one base chain on `input` that drops both directions.
    fn ruleset(&self) -> String {
        let addrs = self
            .addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = String::new();
        let _ = write!(
            out,
            "table inet {table} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tip daddr {{ {addrs} }} tcp dport {port} drop\n\
             \t\tip saddr {{ {addrs} }} tcp sport {port} drop\n\
             \t}}\n\
             }}\n",
            table = self.table,
            port = self.port,
        );
        out
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if self.cut {
            // No panic in drop: a failed delete shows up as a stale table, removed next time.
            let _ = nft(&["delete", "table", "inet", &self.table], None);
        }
    }
}

/// Deletes the tables of test processes that are gone.
fn remove_stale_tables() {
    let listed = nft(&["list", "tables"], None);
    for line in listed.stdout.lines() {
        let Some(name) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(TABLE_PREFIX)
            .and_then(|rest| rest.split('_').next())
        else {
            continue;
        };
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = nft(&["delete", "table", "inet", name], None);
        }
    }
}

/// Runs `nft` (in /usr/sbin, which a non-root PATH may lack) to its end.
fn nft(args: &[&str], input: Option<&[u8]>) -> Ran {
    let program = ["/usr/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| {
            panic!("nft is not installed: install Debian's nftables (./scripts/install-deps does)")
        });
    run(Command::new(program).args(args), input).unwrap_or_else(|e| panic!("run nft: {e}"))
}
