//! What an in-process director logs, captured for tests that assert on log lines (a
//! `session ended` line, a rate-limited refusal line). One tracing subscriber per test
//! process, so every test of a file shares the capture.

#![allow(dead_code)]

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use super::logs::LOG_WAIT;
use super::wait::wait_until;

/// Everything the director logged in this test process (all tests share it).
static DIRECTOR_LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        DIRECTOR_LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the director's log (it runs in-process) to the capture, at `info`.
pub fn capture_director_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
    });
}

/// What was captured so far.
pub fn director_log() -> String {
    String::from_utf8_lossy(&DIRECTOR_LOG.lock().unwrap()).into_owned()
}

/// Waits up to [`LOG_WAIT`] until the director has logged a line that `matches`; returns the
/// first such line. Panics naming `what`.
pub fn wait_director_line(what: &str, matches: impl Fn(&str) -> bool) -> String {
    wait_until(what, LOG_WAIT, || {
        director_log()
            .lines()
            .find(|l| matches(l))
            .map(str::to_owned)
    })
}
