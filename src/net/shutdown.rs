//! A graceful stop (SIGTERM): the phases every connection watches, and how the director knows
//! that every connection has finished.
//!
//! 1. [`Phase::Draining`]: listeners stop accepting; clients that have not logged in get the
//!    protocol's goodbye and are closed; an LMTP client between transactions gets `421`.
//! 2. After `shutdown_grace` (or as soon as no connection is left), [`Phase::Closing`]:
//!    relayed sessions are closed with the protocol's BYE and LMTP transactions still under
//!    way get `421`.
//!
//! Every connection task holds a [`Shutdown`]; the director's [`ShutdownTrigger`] sees when
//! the last one is dropped.

use std::time::Duration;

use tokio::sync::watch;

/// Where a stop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections; pre-login clients are sent away; sessions go on.
    Draining,
    /// The grace is over: every session is closed now.
    Closing,
}

/// A connection's view of the stop. Cheap to clone; while any clone is alive, the director
/// counts the connection as live.
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: watch::Receiver<Phase>,
}

/// The director's side: moves the phase on and waits for connections to finish.
#[derive(Debug)]
pub struct ShutdownTrigger {
    phase: watch::Sender<Phase>,
}

/// A new trigger and the first [`Shutdown`] to hand out.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (ShutdownTrigger { phase: tx }, Shutdown { phase: rx })
}

impl Default for Shutdown {
    /// A stop that never comes (front ends driven alone, in tests).
    fn default() -> Self {
        let (tx, rx) = watch::channel(Phase::Running);
        // The sender is dropped: `reached` then waits forever.
        drop(tx);
        Shutdown { phase: rx }
    }
}

impl Shutdown {
    /// Completes when the stop reaches `phase` (never, if the trigger is gone).
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.clone();
        if rx.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Completes when the director starts to stop: no new clients.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }

    /// Completes when the grace is over: sessions must end now.
    pub async fn closing(&self) {
        self.reached(Phase::Closing).await
    }

    /// Whether the director is stopping.
    pub fn is_stopping(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    /// Whether the grace is over: sessions must end now.
    pub fn is_closing(&self) -> bool {
        *self.phase.borrow() >= Phase::Closing
    }
}

impl ShutdownTrigger {
    /// Moves the stop on to `phase` (never back).
    pub fn set(&self, phase: Phase) {
        self.phase.send_if_modified(|p| {
            let changed = *p < phase;
            if changed {
                *p = phase;
            }
            changed
        });
    }

    /// Connections (and listeners) still holding a [`Shutdown`].
    pub fn live(&self) -> usize {
        self.phase.receiver_count()
    }

    /// Completes when no [`Shutdown`] is left: every connection has finished.
    pub async fn all_done(&self) {
        self.phase.closed().await
    }

    /// Whether every connection finishes within `wait`.
    pub async fn all_done_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.all_done()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn phases_are_seen_in_order_and_the_end_of_every_holder() {
        let (trigger, shutdown) = channel();
        let held = shutdown.clone();
        let task = tokio::spawn(async move {
            held.draining().await;
            let stopping = held.is_stopping();
            held.closing().await;
            stopping
        });
        assert_eq!(trigger.live(), 2);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!task.is_finished());
        trigger.set(Phase::Draining);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!task.is_finished(), "draining is not closing");
        trigger.set(Phase::Closing);
        trigger.set(Phase::Draining); // never back
        assert!(task.await.unwrap());
        drop(shutdown);
        assert!(
            trigger.all_done_within(Duration::from_secs(1)).await,
            "every holder gone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn default_never_fires() {
        let s = Shutdown::default();
        assert!(!s.is_stopping());
        assert!(tokio::time::timeout(Duration::from_secs(60), s.draining())
            .await
            .is_err());
    }
}
