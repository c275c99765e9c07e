//! Polling: what a test waits for (a log line, a session gone, a backend marked down) happens
//! on another thread or process a moment later, so the helpers here ask again every 20 ms
//! until it holds or the time is up. Std only: the benchmark example includes it too.

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Calls `f` every 20 ms until it returns `Some`, for at most `timeout`; panics naming `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("waited {timeout:?} in vain for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for a condition without a value.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    wait_until(what, timeout, || done().then_some(()))
}
