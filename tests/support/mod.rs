//! Shared helpers of the integration tests.

pub mod client;
pub mod director;
pub mod dovecot;
pub mod logins;
pub mod logs;
