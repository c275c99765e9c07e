//! Dovecot 2.4 backends (Debian 13's 2.4.1) behind the director, in one test binary so that
//! CI pays for them once: the protocol checks of the 2.3 suite run again against 2.4 backends
//! shared by the tests of [`protocols`], a pool of one 2.3 and one 2.4 backend ([`mixed`]),
//! and the rolling upgrade of a live pool from 2.3 to 2.4 as an operator does it ([`upgrade`]).
//!
//! How a 2.4 backend runs on this Debian 12 machine and how its config differs from 2.3's:
//! `tests/support/dovecot24.rs`.
//!
//! # Where 2.4 differs, as seen through the director
//!
//! - A post-login `ID NIL` answers `* ID ("name" "Dovecot" "x-backend" "backendN")`: 2.4's
//!   `imap_id_send` has `name = Dovecot` by default. The director relays it as it comes.
//! - A login is logged as `Logged in: user=<...>` (2.3: `Login: user=<...>`), with the same
//!   `rip=`, `lip=`, `TLS`/`secured` and `session=` fields: `support::logs` reads both.
//! - Nothing else the director does needed a change: IMAP ID `x-originating-ip`, POP3 and LMTP
//!   `XCLIENT`, PROXY v2 on `haproxy = yes` listeners, STARTTLS and implicit TLS to the
//!   backend, master-user logins, the built-in health checks and `doveadm who` work as with 2.3
//!   once the backend has the 2.4 spelling of the same settings (README, "Dovecot 2.4
//!   backends").

#[path = "../support/mod.rs"]
mod support;

mod mixed;
mod protocols;
mod upgrade;

use std::sync::OnceLock;

use support::dovecot::{Pool, PoolOptions};

/// The 2.4 backends that the tests of [`protocols`] share: started by the first test that
/// asks, never stopped by a test (a test that kills or pauses a backend starts its own pool).
/// When the test process ends, the pool's watchdog stops them and removes their directory.
pub fn shared_pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        Pool::start_with(PoolOptions {
            extra_config_24: "auth_failure_delay = 0\n".into(),
            ..PoolOptions::v24(3)
        })
    })
}
