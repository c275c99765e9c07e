//! Where log lines go: stderr, a batch at a time. A relayed session logs two `info` lines,
//! and a `write(2)` each cost a login more than all the formatting; so `info` and below are
//! gathered and written together, at most [`MAX_DELAY`] after the first of them (or once
//! [`FLUSH_BYTES`] are waiting), while a `warn` or `error` line is written at once with
//! whatever waits before it: what precedes a failure is never held back. Lines are written
//! in the order they were logged, each whole.
//!
//! The delay is kept by a thread that sleeps until a batch starts, so an idle director does
//! not wake up for its log. Every exit path of the binary flushes ([`flush`]): the end of
//! `main`, a panic (the hook flushes first), the second stop signal.

use std::io::Write;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Longest an `info` line waits before it is written.
pub const MAX_DELAY: Duration = Duration::from_millis(50);

/// Bytes that make a batch worth writing before its delay is up.
pub const FLUSH_BYTES: usize = 32 * 1024;

/// The lines not yet written, since when the oldest has waited, and where they go (behind
/// the same lock, so that batches keep their order).
struct Pending {
    buf: Vec<u8>,
    since: Option<Instant>,
    out: Box<dyn Write + Send>,
}

/// A log sink: the process's writes to stderr ([`sink`]).
pub struct LogSink {
    pending: Mutex<Pending>,
    /// Wakes the flusher when a batch starts.
    started: Condvar,
}

/// The process's sink; the first call starts its flusher thread.
pub fn sink() -> &'static LogSink {
    static SINK: OnceLock<&'static LogSink> = OnceLock::new();
    SINK.get_or_init(|| {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new(Box::new(std::io::stderr()))));
        sink.start_flusher();
        sink
    })
}

/// Takes a whole formatted line for the process's sink: written now when `urgent` (a
/// warning or an error), else batched (`crate::log_line::Direct`).
pub fn take_line(line: &[u8], urgent: bool) {
    sink().take(line, urgent);
}

/// Writes out every line logged so far.
pub fn flush() {
    sink().flush();
}

impl LogSink {
    /// A sink writing to `out`, with no flusher yet ([`LogSink::start_flusher`]).
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        LogSink {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                since: None,
                out,
            }),
            started: Condvar::new(),
        }
    }

    /// Starts the thread that writes each batch out when its delay is up.
    pub fn start_flusher(&'static self) {
        let _ = std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || self.flusher());
    }

    /// Takes one formatted line (or several): written now when `urgent`, else batched.
    fn take(&self, line: &[u8], urgent: bool) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.buf.extend_from_slice(line);
        let overdue = p.since.is_some_and(|t| t.elapsed() >= MAX_DELAY);
        if urgent || overdue || p.buf.len() >= FLUSH_BYTES {
            write_out(&mut p);
        } else if p.since.is_none() {
            p.since = Some(Instant::now());
            self.started.notify_one();
        }
    }

    pub fn flush(&self) {
        write_out(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Writes each batch out when its delay is up; sleeps while there is none.
    fn flusher(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match p.since {
                None => {
                    p = self.started.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                Some(since) => {
                    let left = MAX_DELAY.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        write_out(&mut p);
                    } else {
                        p = self
                            .started
                            .wait_timeout(p, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        }
    }
}

/// Writes the waiting lines out. A failed write is dropped: there is nowhere else to say so.
fn write_out(p: &mut Pending) {
    if !p.buf.is_empty() {
        let _ = p.out.write_all(&p.buf);
        let _ = p.out.flush();
        p.buf.clear();
        if p.buf.capacity() > 4 * FLUSH_BYTES {
            p.buf.shrink_to(FLUSH_BYTES);
        }
    }
    p.since = None;
}

/// What tracing-subscriber writes one event's line to.
pub struct SinkWriter {
    sink: &'static LogSink,
    urgent: bool,
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sink.take(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for &'static LogSink {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter {
            sink: self,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> SinkWriter {
        SinkWriter {
            sink: self,
            urgent: matches!(*meta.level(), Level::WARN | Level::ERROR),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A sink writing into a shared vector, and that vector.
    fn sink() -> (&'static LogSink, Arc<Mutex<Vec<u8>>>) {
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = Box::leak(Box::new(LogSink::new(Box::new(Shared(written.clone())))));
        (sink, written)
    }

    fn text(written: &Mutex<Vec<u8>>) -> String {
        String::from_utf8(written.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn info_lines_wait_and_a_warning_takes_them_out_first() {
        let (sink, written) = sink();
        sink.take(b"1 info\n", false);
        sink.take(b"2 info\n", false);
        assert_eq!(text(&written), "", "no flusher: nothing written yet");
        sink.take(b"3 warn\n", true);
        assert_eq!(text(&written), "1 info\n2 info\n3 warn\n");
        sink.take(b"4 info\n", false);
        sink.flush();
        assert_eq!(text(&written), "1 info\n2 info\n3 warn\n4 info\n");
    }

    #[test]
    fn a_full_batch_is_written_without_waiting() {
        let (sink, written) = sink();
        let line = [b'x'; 1000];
        for _ in 0..FLUSH_BYTES / 1000 + 1 {
            sink.take(&line, false);
        }
        assert!(written.lock().unwrap().len() >= FLUSH_BYTES);
    }

    #[test]
    fn the_flusher_writes_a_waiting_line_by_itself() {
        let (sink, written) = sink();
        sink.start_flusher();
        sink.take(b"alone\n", false);
        // MAX_DELAY is 50 ms; the deadline only keeps a broken flusher from hanging the test.
        let deadline = Instant::now() + Duration::from_secs(10);
        while text(&written).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the flusher never wrote the line"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(text(&written), "alone\n");
    }

    #[test]
    fn through_tracing_info_waits_and_warn_and_error_do_not() {
        let (sink, written) = sink();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("first");
            assert_eq!(text(&written), "");
            tracing::warn!("second");
            let both = text(&written);
            assert!(both.contains("first") && both.contains("second"), "{both}");
            tracing::info!("third");
            assert!(!text(&written).contains("third"));
            tracing::error!("fourth");
            assert!(
                text(&written).ends_with("third\nERROR director::log_sink::tests: fourth\n"),
                "{}",
                text(&written)
            );
        });
    }
}
