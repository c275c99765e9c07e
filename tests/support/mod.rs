//! Shared helpers of the integration tests.

pub mod admin_cli;
pub mod auth_service;
pub mod client;
pub mod cluster;
pub mod command;
pub mod crowd;
pub mod director;
pub mod director_log;
pub mod dovecot;
pub mod etcd;
pub mod imap_session;
pub mod logins;
pub mod logs;
pub mod member_process;
pub mod partition;
pub mod ports;
pub mod rng;
pub mod runtime_thread;
pub mod sasl;
pub mod sasl_digest;
pub mod scrape;
pub mod serve;
pub mod slapd;
pub mod swaks;
pub mod wait;
pub mod who_oracle;
