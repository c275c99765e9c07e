//! TODO stub
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncRead;

pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct ProxyError;
pub async fn read_header<S: AsyncRead + Unpin>(
    _s: &mut S,
    _t: Duration,
) -> Result<ProxyHeader, ProxyError> {
    Err(ProxyError)
}
pub fn encode_v2(_s: SocketAddr, _d: SocketAddr) -> Vec<u8> {
    Vec::new()
}
