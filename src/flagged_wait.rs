//! A wait for an event that also sets a flag (the stop, an eviction, a session's kick),
//! cheap to poll again, and [`Signal`], such an event that fires once.
//!
//! A task polls every branch of its `select!` each time it wakes, and a login wakes its
//! connection's task some ten times; a registered wait (a `Notify`, a `watch`) takes a lock
//! on each of those polls. [`FlaggedWait`] polls its wait once to register it, and after
//! that only when the flag is up or the task's waker changed: in between, a poll is a flag
//! check.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

/// An event that fires once (a connection evicted, a session kicked) and stays fired: every
/// wait on it ends, whether it began before or after. Its flag is raised before the waiters
/// wake, and a wait checks the flag between polls ([`FlaggedWait`]).
#[derive(Default)]
pub struct Signal {
    fired: AtomicBool,
    notify: Notify,
}

impl Signal {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Completes once the signal has fired (at once if it has).
    pub async fn fired(&self) {
        // Taken before the flag is read: a fire in between still wakes it.
        let notified = pin!(self.notify.notified());
        if self.is_fired() {
            return;
        }
        FlaggedWait::new(|| self.is_fired(), notified).await
    }
}

/// `wait`, polled only when `flag()` is up or the waker changed since its last poll. The
/// event must raise the flag before it wakes the waiters, so that a wake-up it causes finds
/// the flag up. `wait` is pinned by the caller (`std::pin::pin!`).
pub struct FlaggedWait<F, W> {
    flag: F,
    wait: W,
    registered: Option<Waker>,
}

impl<F: Fn() -> bool, W: Future + Unpin> FlaggedWait<F, W> {
    pub fn new(flag: F, wait: W) -> Self {
        FlaggedWait {
            flag,
            wait,
            registered: None,
        }
    }
}

impl<F: Fn() -> bool + Unpin, W: Future + Unpin> Future for FlaggedWait<F, W> {
    type Output = W::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<W::Output> {
        let this = self.get_mut();
        let same_waker = this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if same_waker && !(this.flag)() {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.wait).poll(cx);
        if polled.is_pending() && !same_waker {
            this.registered = Some(cx.waker().clone());
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A wait that counts its polls and ends once `done` is up.
    async fn counted(done: Arc<AtomicBool>, polls: Arc<AtomicUsize>) {
        std::future::poll_fn(|_| {
            polls.fetch_add(1, Ordering::SeqCst);
            if done.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    struct Nop;
    impl std::task::Wake for Nop {
        fn wake(self: Arc<Self>) {}
    }

    fn waker() -> Waker {
        Waker::from(Arc::new(Nop))
    }

    #[test]
    fn polled_again_only_when_the_flag_is_up() {
        let done = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicUsize::new(0));
        let flag = done.clone();
        let inner = std::pin::pin!(counted(done.clone(), polls.clone()));
        let mut wait = FlaggedWait::new(move || flag.load(Ordering::SeqCst), inner);
        let waker = waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..10 {
            assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, to register");
        done.store(true, Ordering::SeqCst);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_signal_ends_the_waits_before_and_after_it_fires() {
        let signal = Arc::new(Signal::default());
        let before: Vec<_> = (0..3)
            .map(|_| {
                let s = signal.clone();
                tokio::spawn(async move { s.fired().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(!signal.is_fired());
        signal.fire();
        for w in before {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("a wait from before the fire ended")
                .unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), signal.fired())
            .await
            .expect("a wait from after the fire ends at once");
    }

    #[test]
    fn a_new_waker_polls_the_wait_again() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner = std::pin::pin!(counted(Arc::default(), polls.clone()));
        let mut wait = FlaggedWait::new(|| false, inner);
        for _ in 0..3 {
            let w = waker();
            assert!(Pin::new(&mut wait)
                .poll(&mut Context::from_waker(&w))
                .is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }
}
