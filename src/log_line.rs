//! The text form of a log line (`log_format: text`): what tracing-subscriber's default
//! formatter writes without colours, at a fraction of the cost, since a relayed session logs
//! two lines and those lines were a fifth of the CPU a login cost in user space.
//!
//! ```text
//! 2026-12-01T16:23:34.385744Z  INFO director::login: logged in session=d1a2 user=bob ...
//! ```
//!
//! A line is built in a buffer of its thread, then written whole: the timestamp (UTC,
//! microseconds) and level, the span scope if any (`name{fields}:`), the target, the message
//! and the fields as `key=value` (strings and `?` values in their `Debug` form, `%` values as
//! displayed). Control characters left in the line (a newline in an error text, an ESC) are
//! escaped, so one event is always one line and nothing can colour or rewrite a terminal.
//! Untrusted text arrives already cut and escaped ([`crate::untrusted`]).

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The text formatter; give it to `tracing_subscriber::fmt().event_format(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextLine;

thread_local! {
    /// The line being built, and its fields (formatted first: a `log` record's target is one
    /// of them). Kept per thread so that a line costs no allocation.
    static BUFFERS: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
}

/// A buffer grown past this by a huge line is given back rather than kept.
const KEPT_CAPACITY: usize = 4096;

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        BUFFERS.with(|buffers| {
            let Ok(mut buffers) = buffers.try_borrow_mut() else {
                // An event logged while formatting one (a Debug impl that logs).
                let (mut line, mut fields) = (String::new(), String::new());
                format_line(ctx, event, &mut line, &mut fields);
                return writer.write_str(&line);
            };
            let (line, fields) = &mut *buffers;
            line.clear();
            fields.clear();
            format_line(ctx, event, line, fields);
            let result = writer.write_str(line);
            for buffer in [line, fields] {
                if buffer.capacity() > KEPT_CAPACITY {
                    *buffer = String::new();
                }
            }
            result
        })
    }
}

/// Writes the whole line for `event`, newline included, into `line` (`fields` is scratch).
fn format_line<S, N>(
    ctx: &FmtContext<'_, S, N>,
    event: &Event<'_>,
    line: &mut String,
    fields: &mut String,
) where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let mut visitor = Fields {
        out: fields,
        first: true,
        log_target: None,
    };
    event.record(&mut visitor);
    let log_target = visitor.log_target.take();

    push_timestamp(line, SystemTime::now());
    line.push(' ');
    line.push_str(level_name(event.metadata().level()));
    line.push(' ');
    if let Some(scope) = ctx.event_scope() {
        let mut any = false;
        for span in scope.from_root() {
            line.push_str(span.metadata().name());
            let ext = span.extensions();
            if let Some(f) = ext.get::<FormattedFields<N>>() {
                if !f.is_empty() {
                    let _ = write!(line, "{{{f}}}");
                }
            }
            line.push(':');
            any = true;
        }
        if any {
            line.push(' ');
        }
    }
    line.push_str(log_target.as_deref().unwrap_or(event.metadata().target()));
    line.push_str(": ");
    push_escaped(line, fields);
    line.push('\n');
}

/// The level as the default formatter pads it (five wide, right-aligned).
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Collects an event's fields as `key=value`, the message first and bare.
struct Fields<'a> {
    out: &'a mut String,
    first: bool,
    /// The original target of a record from the `log` crate (the event's own is `log`).
    log_target: Option<String>,
}

impl Fields<'_> {
    fn pad(&mut self) {
        if !self.first {
            self.out.push(' ');
        }
        self.first = false;
    }

    /// Starts a `key=` (a raw identifier's `r#` left out); false for the `log` crate's
    /// metadata fields, which are not shown.
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        self.pad();
        self.out.push_str(name.strip_prefix("r#").unwrap_or(name));
        self.out.push('=');
        true
    }
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.pad();
            let _ = write!(self.out, "{value:?}");
        } else if self.key(field) {
            let _ = write!(self.out, "{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => {
                self.pad();
                self.out.push_str(value);
            }
            "log.target" => self.log_target = Some(value.to_owned()),
            _ => {
                if self.key(field) {
                    let _ = write!(self.out, "{value:?}");
                }
            }
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            let _ = write!(self.out, "{value}");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            let _ = write!(self.out, "{value}");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.out.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.key(field) {
            return;
        }
        let _ = write!(self.out, "{value}");
        let mut source = value.source();
        if source.is_some() {
            let _ = write!(self.out, " {}.sources=[", field.name());
            let mut first = true;
            while let Some(s) = source {
                let _ = write!(self.out, "{}{s}", if first { "" } else { ", " });
                first = false;
                source = s.source();
            }
            self.out.push(']');
        }
    }
}

/// Whether [`Direct`] lines may go straight to the process's log sink: the text format
/// writes there ([`allow_direct`]).
static DIRECT: AtomicBool = AtomicBool::new(false);

/// Lets [`Direct`] lines be written: called where the text format is installed with the
/// process's log sink as its writer (the binary's `init_logs`), never otherwise.
pub fn allow_direct() {
    DIRECT.store(true, Ordering::Relaxed);
}

/// Whether a line may be written [`Direct`]. The caller asks `tracing::enabled!` for its
/// level as well, at its own call site: the filter (`log_level`, `RUST_LOG`) still decides.
pub fn direct() -> bool {
    DIRECT.load(Ordering::Relaxed)
}

/// A text line built and written without tracing's dispatch, for the lines every session
/// logs (logged in, session ended): tracing spent ~400 instructions a field on them, a tenth
/// of a login's user-space work. The text is what [`TextLine`] writes for the same event
/// (the message, then `key=value` fields: [`Direct::text`] for what `%value` writes,
/// [`Direct::debug`] for `?value`, [`Direct::u64`] for a number), which each such line's
/// tests check against the `tracing` event written in its `else` branch. No span scope is
/// written: the director opens none.
pub struct Direct {
    line: String,
    /// Where the message starts: what follows is escaped when the line is finished.
    fields: usize,
    urgent: bool,
}

impl Direct {
    /// A line at `level` from `target` (the caller's `module_path!()`), with its message.
    pub fn new(level: Level, target: &str, message: &str) -> Direct {
        let mut line = String::with_capacity(256);
        push_timestamp(&mut line, SystemTime::now());
        line.push(' ');
        line.push_str(level_name(&level));
        line.push(' ');
        line.push_str(target);
        line.push_str(": ");
        let fields = line.len();
        line.push_str(message);
        Direct {
            line,
            fields,
            urgent: matches!(level, Level::WARN | Level::ERROR),
        }
    }

    fn key(&mut self, key: &str) -> &mut String {
        self.line.push(' ');
        self.line.push_str(key);
        self.line.push('=');
        &mut self.line
    }

    /// `key=value`, as `key = %value` writes a value displayed as this text.
    pub fn text(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key).push_str(value);
        self
    }

    /// `key=value` for untrusted text, as `key = %untrusted::shown(value)` writes it.
    pub fn shown(&mut self, key: &str, value: &str) -> &mut Self {
        if crate::untrusted::is_plain(value) {
            self.text(key, value)
        } else {
            self.display(key, crate::untrusted::shown(value))
        }
    }

    /// `key=value` for a displayed value (`key = %value`).
    pub fn display(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        let _ = write!(self.key(key), "{value}");
        self
    }

    /// `key=value` for a debugged value (`key = ?value`).
    pub fn debug(&mut self, key: &str, value: impl fmt::Debug) -> &mut Self {
        let _ = write!(self.key(key), "{value:?}");
        self
    }

    /// `key=value` for a number (`key = value`).
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let len = value.checked_ilog10().map_or(1, |l| l as usize + 1);
        put_digits(&mut digits[..len], value);
        // ASCII digits.
        self.key(key)
            .push_str(std::str::from_utf8(&digits[..len]).unwrap_or("?"));
        self
    }

    /// The finished line: control characters in the message and fields escaped, as
    /// [`TextLine`] escapes them, and the newline.
    pub fn finish(mut self) -> String {
        if crate::untrusted::may_hold_controls(&self.line.as_bytes()[self.fields..]) {
            let fields = self.line.split_off(self.fields);
            push_escaped(&mut self.line, &fields);
        }
        self.line.push('\n');
        self.line
    }

    /// Writes the line to the process's log sink ([`crate::log_sink`]).
    pub fn write(self) {
        let urgent = self.urgent;
        crate::log_sink::take_line(self.finish().as_bytes(), urgent);
    }
}

/// A duration as a log field: `duration = %log_line::elapsed(d)` writes what `?d` writes
/// (`1.5s`, `12.000341ms`, `870µs`, `15ns`: the largest unit under which it is at least 1,
/// every non-zero decimal), at a tenth of the cost of `Duration`'s `Debug`.
pub fn elapsed(d: Duration) -> Elapsed {
    Elapsed(d)
}

/// See [`elapsed`].
#[derive(Debug, Clone, Copy)]
pub struct Elapsed(Duration);

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, nanos) = (self.0.as_secs(), self.0.subsec_nanos());
        let (whole, part, width, unit) = if secs > 0 {
            (secs, nanos, 9, "s")
        } else if nanos >= 1_000_000 {
            (u64::from(nanos / 1_000_000), nanos % 1_000_000, 6, "ms")
        } else if nanos >= 1_000 {
            (u64::from(nanos / 1_000), nanos % 1_000, 3, "µs")
        } else {
            (u64::from(nanos), 0, 0, "ns")
        };
        // "18446744073709551615.999999999µs" fits.
        let mut text = [0u8; 40];
        let mut len = whole.checked_ilog10().map_or(1, |l| l as usize + 1);
        put_digits(&mut text[..len], whole);
        if part > 0 {
            let mut fraction = [b'0'; 9];
            put_digits(&mut fraction[..width], u64::from(part));
            let used = fraction[..width]
                .iter()
                .rposition(|d| *d != b'0')
                .map_or(0, |i| i + 1);
            text[len] = b'.';
            text[len + 1..len + 1 + used].copy_from_slice(&fraction[..used]);
            len += 1 + used;
        }
        let unit = unit.as_bytes();
        text[len..len + unit.len()].copy_from_slice(unit);
        len += unit.len();
        // ASCII digits, a dot and the unit (µ is whole UTF-8).
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
    }
}

/// Appends `text` with control characters escaped (`\n`, `\r`, `\t`, else `\u{..}`): DEL,
/// C0 and C1 never reach the log as themselves.
fn push_escaped(out: &mut String, text: &str) {
    // Most lines hold none.
    if !crate::untrusted::may_hold_controls(text.as_bytes()) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// `2026-12-01T16:23:34.385744Z`: RFC 3339, UTC, microseconds (the default formatter's form).
/// The text up to the second is kept per thread and made again only when the second changes.
fn push_timestamp(out: &mut String, now: SystemTime) {
    thread_local! {
        /// The second last written, and its text (`2026-12-01T16:23:34.`).
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let mut text = [0u8; 27];
    let prefix = SECOND.with(|second| match second.get() {
        (s, prefix) if s == secs => prefix,
        _ => {
            let prefix = second_text(secs);
            second.set((secs, prefix));
            prefix
        }
    });
    text[..20].copy_from_slice(&prefix);
    put_digits(&mut text[20..26], u64::from(since.subsec_micros()));
    text[26] = b'Z';
    // ASCII digits and punctuation only.
    out.push_str(std::str::from_utf8(&text).unwrap_or("?"));
}

/// `2026-12-01T16:23:34.` for `secs` after the epoch.
fn second_text(secs: u64) -> [u8; 20] {
    let (year, month, day) = civil_date((secs / 86_400) as i64);
    let in_day = secs % 86_400;
    let mut text = *b"0000-00-00T00:00:00.";
    put_digits(&mut text[0..4], year.max(0) as u64);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], in_day / 3600);
    put_digits(&mut text[14..16], in_day / 60 % 60);
    put_digits(&mut text[17..19], in_day % 60);
    text
}

/// Writes `value` in decimal into all of `slot`, zero-padded (its last digits if too long).
fn put_digits(slot: &mut [u8], value: u64) {
    let mut v = value;
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Year, month and day of the day `days` after 1970-01-01 (proleptic Gregorian calendar;
/// the well-known era arithmetic: 400-year eras of 146,097 days starting in March).
fn civil_date(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// For tests: the lines a subscriber with [`TextLine`] writes for the events `f` logs.
#[cfg(test)]
pub(crate) fn logged(f: impl FnOnce()) -> String {
    tests::logged_by(true, f)
}

/// For tests: `text`'s lines without their timestamps.
#[cfg(test)]
pub(crate) fn without_time(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Lines written with [`TextLine`] (`ours`) or tracing-subscriber's default formatter
    /// without colours.
    pub(super) fn logged_by(ours: bool, f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.0.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone());
        if ours {
            tracing::subscriber::with_default(builder.event_format(TextLine).finish(), f);
        } else {
            tracing::subscriber::with_default(builder.finish(), f);
        }
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_line_has_time_level_target_message_and_fields() {
        let text = logged(|| {
            let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
            tracing::info!(session = %"d1", backend = %ip, bytes = 42u64, ok = true,
                reason = "sticky", took = ?Duration::from_millis(3), "logged in");
        });
        let (time, rest) = text.split_once(' ').unwrap();
        assert_eq!(time.len(), "2026-12-01T16:23:34.385744Z".len(), "{text}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{text}");
        assert_eq!(
            rest,
            " INFO director::log_line::tests: logged in session=d1 backend=192.0.2.7 \
             bytes=42 ok=true reason=\"sticky\" took=3ms\n"
        );
    }

    #[test]
    fn lines_read_as_the_default_formatter_s() {
        let event = || {
            let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
            let e = std::io::Error::other("refused");
            tracing::info!(session = %"d1", backend = %ip, bytes = 42u64, r#type = -3i64,
                reason = "a \"b\"", took = ?Duration::from_millis(3), "logged in");
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "no message args {}",
                7
            );
            tracing::error!(n = 1u64);
        };
        assert_eq!(
            without_time(&logged_by(true, event)),
            without_time(&logged_by(false, event))
        );
    }

    #[test]
    fn one_event_is_one_line_whatever_its_text_holds() {
        let text = logged(|| {
            tracing::warn!(error = %"first\nsecond\u{1b}[31m\u{85}", "failed:\tagain");
        });
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(
            text.ends_with(
                "WARN director::log_line::tests: failed:\\tagain error=first\\nsecond\\u{1b}[31m\\u{85}\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn elapsed_reads_as_debug_writes_it() {
        let mut cases = vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(999),
            Duration::from_nanos(1_000),
            Duration::from_nanos(1_001),
            Duration::from_nanos(999_999),
            Duration::from_nanos(1_000_000),
            Duration::from_nanos(1_000_001),
            Duration::from_nanos(999_999_999),
            Duration::from_secs(1),
            Duration::new(1, 1),
            Duration::new(1, 500_000_000),
            Duration::new(59, 999_999_999),
            Duration::new(86_400, 120),
            Duration::MAX,
        ];
        // A spread of others (a fixed LCG: the same every run).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let nanos = (x >> 11) % 3_000_000_000_000;
            cases.push(Duration::from_nanos(nanos >> (x % 40)));
        }
        for d in cases {
            assert_eq!(elapsed(d).to_string(), format!("{d:?}"));
        }
    }

    #[test]
    fn dates_are_the_calendar_s() {
        for (days, date) in [
            (0, (1970, 1, 1)),
            (11_016, (2000, 2, 29)),
            (20_788, (2026, 12, 1)),
            (-1, (1969, 12, 31)),
            (47_541, (2100, 3, 1)),
        ] {
            assert_eq!(civil_date(days), date, "day {days}");
        }
        let mut s = String::new();
        push_timestamp(
            &mut s,
            UNIX_EPOCH + Duration::new(1_796_142_214, 385_744_123),
        );
        assert_eq!(s, "2026-12-01T16:23:34.385744Z");
        // The second's text is kept: the same second again, then the next ones.
        for (at, text) in [
            (
                Duration::new(1_796_142_214, 5_000),
                "2026-12-01T16:23:34.000005Z",
            ),
            (
                Duration::new(1_796_142_215, 0),
                "2026-12-01T16:23:35.000000Z",
            ),
            (
                Duration::new(1_796_169_599, 999_999_999),
                "2026-12-01T23:59:59.999999Z",
            ),
            (
                Duration::new(1_796_169_600, 1_000),
                "2026-12-02T00:00:00.000001Z",
            ),
        ] {
            let mut s = String::new();
            push_timestamp(&mut s, UNIX_EPOCH + at);
            assert_eq!(s, text);
        }
    }
}
