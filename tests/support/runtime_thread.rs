//! An async service (a director, an LMTP service) on a thread and runtime of its own, so that
//! the tests around it stay plain blocking code. Dropping it stops the service.

#![allow(dead_code)]

use std::future::Future;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

/// A running service thread.
pub struct RuntimeThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RuntimeThread {
    /// Runs `service` on a new two-worker runtime. Once up, it sends the test what it needs
    /// (addresses, handles) on its first argument; it must end when its second resolves.
    /// Returns the thread and what was sent; panics naming `what` if nothing was.
    pub fn start<T, F, Fut>(what: &str, service: F) -> (RuntimeThread, T)
    where
        T: Send + 'static,
        F: FnOnce(mpsc::Sender<T>, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(service(tx, stop_rx));
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        let started = rx.recv().unwrap_or_else(|_| panic!("{what} started"));
        let t = RuntimeThread {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        (t, started)
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
