//! Connections turned away before login: why (a named [`RefusalReason`], the same name in log
//! lines and in `director_connections_refused_total`), and the warning that reports them.
//!
//! A flood of bad peers must not flood the log: [`RefusalLog`] writes at most one WARN line
//! per reason per interval. The first refusal after a quiet interval is logged at once; those
//! that follow within the interval are counted and reported together when it ends
//! ("N connections refused in the last 10s: ... (last: ADDR)").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

/// Why a connection was turned away (or dropped) before its login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// A peer outside `proxy_trusted_networks` connected to a `proxy_protocol` listener.
    UntrustedProxyPeer,
    /// A trusted peer sent a PROXY header that does not parse, or none in time.
    BadProxyHeader,
    /// An LMTP client outside its listener's `allow_from`.
    NotAllowed,
    /// The client address already has `limits.max_preauth_per_ip` connections before login.
    PerIpLimit,
    /// The listener is full and holds only logged-in sessions: nothing may be dropped for it.
    ListenerFull,
    /// The oldest connection still before login, dropped to make room in a full listener.
    Evicted,
}

impl RefusalReason {
    /// Every reason (the catalogue starts each at 0: `metrics::REFUSAL_REASONS`).
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::UntrustedProxyPeer,
        RefusalReason::BadProxyHeader,
        RefusalReason::NotAllowed,
        RefusalReason::PerIpLimit,
        RefusalReason::ListenerFull,
        RefusalReason::Evicted,
    ];

    /// The label value in metrics.
    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::UntrustedProxyPeer => "untrusted_proxy_peer",
            RefusalReason::BadProxyHeader => "bad_proxy_header",
            RefusalReason::NotAllowed => "not_allowed",
            RefusalReason::PerIpLimit => "per_ip_limit",
            RefusalReason::ListenerFull => "listener_full",
            RefusalReason::Evicted => "evicted",
        }
    }

    /// What the log line says happened, after "N connections refused in the last 10s: ".
    pub fn describe(self) -> &'static str {
        match self {
            RefusalReason::UntrustedProxyPeer => {
                "PROXY header from untrusted peers (not in proxy_trusted_networks)"
            }
            RefusalReason::BadProxyHeader => "bad PROXY headers from trusted peers",
            RefusalReason::NotAllowed => "LMTP clients not in allow_from",
            RefusalReason::PerIpLimit => {
                "too many connections before login from one address (limits.max_preauth_per_ip)"
            }
            RefusalReason::ListenerFull => {
                "listener full of logged-in sessions (limits.max_connections)"
            }
            RefusalReason::Evicted => {
                "oldest connection before login dropped to make room (listener full)"
            }
        }
    }
}

/// Its label value, so that the metrics take the reason as it is.
impl AsRef<str> for RefusalReason {
    fn as_ref(&self) -> &str {
        self.name()
    }
}

/// One WARN line's worth of refusals of one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub reason: RefusalReason,
    /// Refusals since the last line.
    pub count: u64,
    /// The interval they fell in; `None` for the first refusal after a quiet interval,
    /// reported at once.
    pub window: Option<Duration>,
    /// The address of the last one (the TCP peer, or the client a trusted header named).
    pub last: Option<IpAddr>,
    /// What was wrong with the last one, when there is more to say (a PROXY header's error).
    pub detail: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let noun = if self.count == 1 {
            "connection"
        } else {
            "connections"
        };
        let verb = if self.reason == RefusalReason::Evicted {
            "dropped"
        } else {
            "refused"
        };
        write!(f, "{} {noun} {verb}", self.count)?;
        if let Some(w) = self.window {
            write!(f, " in the last {}", humantime::format_duration(w))?;
        }
        write!(f, ": {}", self.reason.describe())?;
        match (&self.last, &self.detail) {
            (Some(a), Some(d)) => write!(f, " (last: {a}: {d})"),
            (Some(a), None) => write!(f, " (last: {a})"),
            (None, Some(d)) => write!(f, " (last: {d})"),
            (None, None) => Ok(()),
        }
    }
}

/// Where reports go: the log, or a test's list.
type Sink = Arc<dyn Fn(Report) + Send + Sync>;

/// Counts refusals per reason and reports them at most once per interval each. Cheap to
/// clone: clones share the counts.
#[derive(Clone)]
pub struct RefusalLog {
    interval: Duration,
    sink: Sink,
    windows: Arc<Mutex<HashMap<RefusalReason, Window>>>,
}

/// The refusals of one reason since its last line, while a window is open.
struct Window {
    count: u64,
    last: Option<IpAddr>,
    detail: Option<String>,
}

/// The default interval between two lines of one reason.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new(DEFAULT_INTERVAL)
    }
}

impl RefusalLog {
    /// Reports to the log (WARN) at most once per `interval` per reason.
    pub fn new(interval: Duration) -> Self {
        Self::with_sink(
            interval,
            Arc::new(|r: Report| {
                warn!(reason = r.reason.name(), count = r.count, "{r}");
            }),
        )
    }

    /// Reports to `sink` instead of the log (tests).
    pub fn with_sink(interval: Duration, sink: Arc<dyn Fn(Report) + Send + Sync>) -> Self {
        RefusalLog {
            interval,
            sink,
            windows: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Notes one refusal. The first of a quiet interval is reported at once; the next ones
    /// when the interval ends (by a timer: must be called inside a tokio runtime).
    /// `detail` is text the director wrote (an error), never bytes the client sent.
    pub fn record(&self, reason: RefusalReason, last: Option<IpAddr>, detail: Option<String>) {
        let mut windows = self.windows.lock().unwrap();
        if let Some(w) = windows.get_mut(&reason) {
            w.count += 1;
            w.last = last;
            w.detail = detail;
            return;
        }
        windows.insert(
            reason,
            Window {
                count: 0,
                last: None,
                detail: None,
            },
        );
        drop(windows);
        (self.sink)(Report {
            reason,
            count: 1,
            window: None,
            last,
            detail,
        });
        let this = self.clone();
        tokio::spawn(async move { this.report_until_quiet(reason).await });
    }

    /// Every interval, reports what was counted in it; closes the window after a quiet one.
    async fn report_until_quiet(self, reason: RefusalReason) {
        loop {
            tokio::time::sleep(self.interval).await;
            let report = {
                let mut windows = self.windows.lock().unwrap();
                let Some(w) = windows.get_mut(&reason) else {
                    return;
                };
                if w.count == 0 {
                    windows.remove(&reason);
                    return;
                }
                let r = Report {
                    reason,
                    count: w.count,
                    window: Some(self.interval),
                    last: w.last.take(),
                    detail: w.detail.take(),
                };
                w.count = 0;
                r
            };
            (self.sink)(report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics start every reason at 0 by name: the catalogue lists the same names.
    #[test]
    fn the_metrics_catalogue_lists_every_reason() {
        assert_eq!(
            RefusalReason::ALL.map(RefusalReason::name),
            crate::metrics::REFUSAL_REASONS
        );
    }

    fn collecting(interval: Duration) -> (RefusalLog, Arc<Mutex<Vec<Report>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let log = RefusalLog::with_sink(interval, Arc::new(move |r| s.lock().unwrap().push(r)));
        (log, seen)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_makes_one_line_per_interval() {
        let (log, seen) = collecting(Duration::from_secs(10));
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        // 10,000 refusals over 25 s, the last from another address.
        for i in 0..10_000u32 {
            let addr = if i == 9_999 { other } else { peer };
            log.record(RefusalReason::UntrustedProxyPeer, Some(addr), None);
            if i % 400 == 399 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Then quiet: the last window is reported, and no more lines come.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:#?}");
        assert_eq!(seen[0].count, 1);
        assert_eq!(seen[0].window, None);
        assert_eq!(seen.iter().map(|r| r.count).sum::<u64>(), 10_000);
        let last = seen.last().unwrap();
        assert_eq!(last.last, Some(other));
        assert!(seen[1].count >= 3_600, "{seen:#?}");
        assert_eq!(
            seen[1].to_string(),
            format!(
                "{} connections refused in the last 10s: PROXY header from untrusted peers \
                 (not in proxy_trusted_networks) (last: 198.51.100.7)",
                seen[1].count
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reasons_are_counted_apart_and_a_quiet_reason_logs_again_at_once() {
        let (log, seen) = collecting(Duration::from_secs(10));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        log.record(RefusalReason::PerIpLimit, Some(a), None);
        log.record(
            RefusalReason::BadProxyHeader,
            Some(a),
            Some("no header".into()),
        );
        log.record(RefusalReason::PerIpLimit, Some(a), None);
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "first of each reason at once"
        );
        tokio::time::sleep(Duration::from_secs(31)).await;
        // One more line: the second PerIpLimit; then both windows closed.
        assert_eq!(seen.lock().unwrap().len(), 3);
        log.record(RefusalReason::PerIpLimit, Some(a), None);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:#?}");
        assert_eq!(seen[3].window, None);
        assert_eq!(
            seen[1].to_string(),
            "1 connection refused: bad PROXY headers from trusted peers (last: 192.0.2.1: no header)"
        );
    }
}
