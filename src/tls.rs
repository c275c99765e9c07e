//! TODO stub
use std::path::Path;
use std::sync::Arc;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct TlsError;
pub fn server_config(_c: &Path, _k: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Err(TlsError)
}
pub fn acceptor(c: Arc<rustls::ServerConfig>) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(c)
}
pub fn connector(_ca: Option<&Path>, _v: bool) -> Result<tokio_rustls::TlsConnector, TlsError> {
    Err(TlsError)
}
pub fn server_name(_h: &str) -> Result<rustls::pki_types::ServerName<'static>, TlsError> {
    Err(TlsError)
}
