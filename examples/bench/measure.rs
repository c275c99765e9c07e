//! What the benchmarks read of a process and of a run: CPU time, RSS, percentiles.

use std::time::Duration;

use crate::dovecot;

/// RSS of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The `p`th percentile of sorted `v` (nearest rank).
pub fn percentile(v: &[Duration], p: usize) -> Duration {
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank - 1]
}

/// utime and stime of process `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The command name may hold spaces; the fields after it are fixed: state is field 3,
    // utime 14, stime 15.
    let after = &stat[stat.rfind(')').expect("(comm)") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    (fields[11].parse().unwrap(), fields[12].parse().unwrap())
}

/// One clock tick (`getconf CLK_TCK`, the unit of `/proc/PID/stat` times).
pub fn clock_tick() -> Duration {
    let hz: u64 = dovecot::command_stdout("getconf", &["CLK_TCK"])
        .parse()
        .expect("getconf CLK_TCK");
    Duration::from_nanos(1_000_000_000 / hz)
}

/// Context switches of process `pid` so far, voluntary and not, over all its threads (each
/// is a sleep and a wake-up: work a proxy does in the kernel besides its syscalls).
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A command that runs `program`, under the tool `BENCH_WRAP` names if set (e.g.
/// `valgrind --tool=callgrind`: [`crate::versus::callgrind`] sets it for the proxies it
/// measures). The tool execs the program in place, so the child's pid is the program's.
pub fn wrapped(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    match words.next() {
        None => std::process::Command::new(program),
        Some(tool) => {
            let mut c = std::process::Command::new(tool);
            c.args(words).arg(program);
            c
        }
    }
}
