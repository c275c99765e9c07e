//! Shared helpers of the integration tests.

pub mod client;
pub mod director;
pub mod director_log;
pub mod dovecot;
pub mod logins;
pub mod logs;
