//! TODO stub
use std::net::IpAddr;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct ResolveError;
pub async fn resolve_host(h: &str) -> Result<Vec<IpAddr>, ResolveError> {
    h.parse().map(|ip| vec![ip]).map_err(|_| ResolveError)
}
