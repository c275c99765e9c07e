//! Sockets and bytes: accepting connections (`listener`, with `admission` deciding who may take
//! a slot and `refusals` reporting who was turned away), plain and TLS streams (`stream`,
//! `tls`), the relay that copies bytes once a session is logged in (`relay`), address
//! networks (`network`) and DNS names of backends (`resolve`).

pub mod admission;
pub mod listener;
pub mod refusals;
pub mod relay;
pub mod resolve;
pub mod shutdown;
pub mod stream;
pub mod tls;
