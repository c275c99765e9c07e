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

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
