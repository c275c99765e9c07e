//! The invariant this program exists for: a user is never served by two backends at once.
//! When a user's backend stops serving (down, maintenance) while the user still has a session
//! there, a new login waits until that session has ended before going elsewhere.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use director::state::backend::AdminState;
use director::state::moves::{MoveReason, Mover};
use director::state::State;
use support::client::{imap_login, Conn};
use support::director::TestDirector;
use support::dovecot::{user, PASSWORD};

#[test]
fn a_new_login_waits_for_the_old_backends_sessions_to_end() {
    let (pool, d) = TestDirector::with_pool(2);
    let u = user(11);
    let (mut old, first) = imap_login(d.imap, &u, PASSWORD);
    let first_ip = pool.backends.iter().find(|b| b.name == first).unwrap().ip;
    // The backend is taken down without moving anyone yet (as the moment between a health
    // transition and its evacuation).
    d.state.set_admin(first_ip, AdminState::Down).unwrap();
    // The move arrives 1.5 s later and ends the old session.
    let state: Arc<dyn State> = d.state.clone();
    let mover = Mover::new(state, d.sessions.clone());
    let mover_thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(mover.evacuate(first_ip, MoveReason::Maintenance, false))
    });
    let started = Instant::now();
    let (mut new, second) = imap_login(d.imap, &u, PASSWORD);
    let waited = started.elapsed();
    assert_ne!(
        second, first,
        "the new session must leave the downed backend"
    );
    // The new login could only complete once the old session was gone.
    assert!(
        waited >= Duration::from_millis(1000),
        "the login did not wait for the old session to end ({waited:?})"
    );
    let report = mover_thread.join().unwrap();
    assert_eq!(report.kicked, 1, "{report:?}");
    // The old connection was ended by the director.
    let rest = old
        .until_closed(Duration::from_secs(5))
        .expect("old session closed");
    assert!(String::from_utf8_lossy(&rest).contains("BYE"), "{rest:?}");
    new.imap_ok("n1", "NOOP");
    let _ = Conn::connect(d.imap);
}
