//! A crowd of IMAP clients for chaos tests: threads that log in as random users through
//! random directors, hold each session a random while with NOOPs, and log out, over and
//! over until stopped. They count what they saw: sessions, temporary refusals (by kind) and
//! wrong answers, which a test fails on.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::imap_session::{Held, ImapSession, Refusal};
use super::rng::Rng;

/// What the crowd is made of.
#[derive(Debug, Clone)]
pub struct CrowdOptions {
    /// The directors' IMAP listeners; each login picks one at random.
    pub directors: Vec<SocketAddr>,
    pub users: Vec<String>,
    pub threads: usize,
    /// Shortest and longest hold of a session, in milliseconds.
    pub hold_ms: (u64, u64),
}

/// What the crowd saw.
#[derive(Debug, Default)]
pub struct CrowdReport {
    /// Logins that gave a session.
    pub ok: usize,
    /// Sessions per director (index in [`CrowdOptions::directors`]).
    pub ok_by_director: Vec<usize>,
    /// Temporary refusals, by kind.
    pub temporary: BTreeMap<String, usize>,
    /// Sessions per backend (as their `ID` answer named it, `?` when it did not).
    pub ok_by_backend: BTreeMap<String, usize>,
    /// Sessions the director or backend ended during their hold.
    pub ended_early: usize,
    /// Those sessions by how they ended: the `* BYE` line, or `closed without BYE`.
    pub ended_by: BTreeMap<String, usize>,
    /// Wrong answers and stalled sessions, each with when, where and who.
    pub wrong: Vec<String>,
}

impl CrowdReport {
    /// All temporary refusals.
    pub fn temporary_total(&self) -> usize {
        self.temporary.values().sum()
    }
}

/// Running clients; [`Crowd::stop`] ends them.
pub struct Crowd {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    report: Arc<Mutex<CrowdReport>>,
    ok: Arc<AtomicUsize>,
}

impl Crowd {
    /// Starts the clients, each with its own part of `rng`'s sequence; `clock` is the test's
    /// start, for the times in [`CrowdReport::wrong`].
    pub fn start(options: CrowdOptions, rng: &Rng, clock: Instant) -> Crowd {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let report = Arc::new(Mutex::new(CrowdReport {
            ok_by_director: vec![0; options.directors.len()],
            ..CrowdReport::default()
        }));
        let threads = (0..options.threads)
            .map(|t| {
                let (options, stop, report, ok) =
                    (options.clone(), stop.clone(), report.clone(), ok.clone());
                let mut rng = rng.fork(t as u64 + 1);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        client_round(&options, &mut rng, &report, &ok, clock);
                    }
                })
            })
            .collect();
        Crowd {
            stop,
            threads,
            report,
            ok,
        }
    }

    /// Sessions so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients (each finishes its session's hold) and returns what they saw.
    pub fn stop(self) -> CrowdReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a crowd client panicked");
        }
        std::mem::take(&mut *self.report.lock().unwrap())
    }
}

/// One login, hold and logout.
fn client_round(
    o: &CrowdOptions,
    rng: &mut Rng,
    report: &Mutex<CrowdReport>,
    ok: &AtomicUsize,
    clock: Instant,
) {
    let d = rng.below(o.directors.len());
    let user = rng.pick(&o.users).clone();
    let hold = Duration::from_millis(rng.between(o.hold_ms.0, o.hold_ms.1));
    match ImapSession::login(o.directors[d], &user) {
        Ok(mut session) => {
            ok.fetch_add(1, Ordering::Relaxed);
            {
                let mut r = report.lock().unwrap();
                r.ok += 1;
                r.ok_by_director[d] += 1;
                *r.ok_by_backend.entry(session.backend.clone()).or_default() += 1;
            }
            match session.hold(hold) {
                Held::Open => session.logout(),
                Held::Ended => {
                    let mut r = report.lock().unwrap();
                    r.ended_early += 1;
                    let how = session.bye.as_deref().unwrap_or("closed without BYE");
                    *r.ended_by.entry(how.to_owned()).or_default() += 1;
                }
                Held::Stalled => report.lock().unwrap().wrong.push(format!(
                    "{:.1}s {user} via director {}: a NOOP of a held session got no answer (backend {})",
                    clock.elapsed().as_secs_f64(),
                    d + 1,
                    session.backend
                )),
            }
        }
        Err(refusal) => {
            let mut r = report.lock().unwrap();
            match &refusal {
                Refusal::Temporary(_) => *r.temporary.entry(refusal.kind()).or_default() += 1,
                Refusal::Wrong(why) => r.wrong.push(format!(
                    "{:.1}s {user} via director {}: {why}",
                    clock.elapsed().as_secs_f64(),
                    d + 1
                )),
            }
            drop(r);
            // A dead or fenced director refuses at once: do not spin on it.
            std::thread::sleep(Duration::from_millis(rng.between(30, 150)));
        }
    }
}
