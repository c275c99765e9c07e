//! Sockets and bytes, below any protocol: who may take a slot (`admission`, with `refusals`
//! reporting who was turned away), plain and TLS streams (`stream`, `tls`), a connection to a backend (`connect`), the relay that
//! copies bytes once a session is logged in (`relay`), the graceful stop every connection
//! watches (`shutdown`) and DNS names of backends (`resolve`). The listener that accepts
//! connections and hands them to a protocol is `crate::server::listener`.

pub mod admission;
pub mod connect;
pub mod refusals;
pub mod relay;
pub mod resolve;
pub mod shutdown;
pub mod splice;
pub mod stream;
pub mod tls;
