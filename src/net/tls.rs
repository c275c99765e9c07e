//! TLS set-up with rustls: the server side for clients (implicit TLS and STARTTLS), the client
//! side for backends.
//!
//! Every configuration is built with `rustls::crypto::ring::default_provider()` passed in
//! explicitly, so no process-wide default provider has to be installed. Errors name the file
//! and say what is wrong with it, for the operator who wrote the configuration.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::state::backend::Backend;

/// Which configured file an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The server certificate chain presented to clients.
    Certificate,
    /// The private key of that certificate.
    Key,
    /// The certificate authorities that backend certificates are checked against.
    Ca,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Certificate => "certificate file",
            FileKind::Key => "key file",
            FileKind::Ca => "CA file",
        })
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read at all (missing, permissions, ...).
    #[error("{kind} {}: cannot read: {source}", .path.display())]
    Read {
        /// Which file.
        kind: FileKind,
        /// Where it was looked for.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{kind} {}: not valid PEM: {problem}", .path.display())]
    Pem {
        /// Which file.
        kind: FileKind,
        /// Where it is.
        path: PathBuf,
        /// What is wrong with it (`pem_problem`).
        problem: String,
    },
    /// The file holds no `BEGIN CERTIFICATE` block.
    #[error("{kind} {}: no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)", .path.display())]
    NoCertificate {
        /// Which file.
        kind: FileKind,
        /// Where it is.
        path: PathBuf,
    },
    /// The key file holds no private key in a supported format.
    #[error("key file {}: no private key found (expected a PEM PKCS#8, PKCS#1 or SEC1 key)", .path.display())]
    NoKey {
        /// Where it is.
        path: PathBuf,
    },
    /// rustls refused the certificate and key together (most often: the key does not belong to
    /// the certificate, or its algorithm is not supported).
    #[error("certificate file {} with key file {}: {source}", .cert.display(), .key.display())]
    KeyRejected {
        /// The certificate chain's file.
        cert: PathBuf,
        /// The key's file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// A certificate of the CA file cannot serve as a trust anchor.
    #[error("CA file {}: certificate #{index} cannot be used as a trust anchor: {source}", .path.display())]
    BadCaCertificate {
        /// Where the CA file is.
        path: PathBuf,
        /// Position of the certificate in the file, counting from 1.
        index: usize,
        /// What rustls said.
        source: rustls::Error,
    },
    /// Backend certificates are to be verified but there is nothing to verify them against.
    #[error("backend TLS certificate verification is on but no CA file is given: set the CA file, or turn verification off for backends on a private network")]
    CaFileRequired,
    /// A backend host that cannot be a TLS server name.
    #[error("{host:?} is neither a DNS name nor an IP address, so it cannot be a TLS server name")]
    BadServerName {
        /// The host as configured.
        host: String,
    },
    /// Any other refusal by rustls while building a configuration.
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider: ring, passed explicitly to every builder.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

/// Builds the server configuration clients are served with, from a PEM certificate chain
/// (server certificate first, then intermediates) and a PEM private key (PKCS#8, PKCS#1 or
/// SEC1). TLS 1.2 and 1.3; no client certificates are asked for; no ALPN.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(FileKind::Certificate, cert_file)?;
    let key = read_key(key_file)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::KeyRejected {
            cert: cert_file.to_path_buf(),
            key: key_file.to_path_buf(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// Wraps a server configuration for use on accepted connections (see
/// [`crate::net::stream::ClientStream::start_tls`]).
pub fn acceptor(config: Arc<ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}

/// Builds the connector the director uses to talk TLS to backends. No client certificate is
/// sent.
///
/// With `verify`, a backend's certificate must chain to one of the certificates in `ca_file`
/// (which is then required: the director does not use the system's root store) and match the
/// name it is reached by (see [`server_name`]). A self-signed certificate made with a plain
/// `openssl req -x509` is marked as a CA (`CA:TRUE`) and is refused as a server's own
/// certificate; give it `-addext basicConstraints=critical,CA:FALSE`, or sign backend
/// certificates with a CA of their own.
///
/// Without `verify`, any certificate is accepted and `ca_file` is ignored. This is meant for
/// backends on a private network with self-signed certificates: the connection is encrypted
/// and the handshake signatures are still checked, but nothing proves who the backend is.
pub fn connector(ca_file: Option<&Path>, verify: bool) -> Result<TlsConnector, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = if verify {
        let ca_file = ca_file.ok_or(TlsError::CaFileRequired)?;
        let mut roots = RootCertStore::empty();
        for (i, cert) in read_certificates(FileKind::Ca, ca_file)?
            .into_iter()
            .enumerate()
        {
            roots
                .add(cert)
                .map_err(|source| TlsError::BadCaCertificate {
                    path: ca_file.to_path_buf(),
                    index: i + 1,
                    source,
                })?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                provider: provider(),
            }))
            .with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The backends' TLS connectors, one per (CA file, verify) pair that the configured backends
/// use, built once at start (and again at a reload) so that a login does not read files.
#[derive(Clone, Default)]
pub struct BackendTlsContext {
    /// Connectors by (CA file, verify), built at start from the configuration.
    pub connectors: Vec<(Option<PathBuf>, bool, TlsConnector)>,
}

impl fmt::Debug for BackendTlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendTlsContext({} connectors)", self.connectors.len())
    }
}

impl BackendTlsContext {
    /// The connector for `backend`'s CA file and verification setting.
    pub fn connector(&self, backend: &Backend) -> Option<TlsConnector> {
        let s = &backend.settings;
        self.connectors
            .iter()
            .find(|(ca, verify, _)| *ca == s.tls_ca_file && *verify == s.tls_verify)
            .map(|(_, _, c)| c.clone())
    }
}

/// The name a backend's certificate is checked against: a DNS name, or an IP address for an
/// IP literal (`192.0.2.1`, `2001:db8::1` or `[2001:db8::1]`).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadServerName {
        host: host.to_owned(),
    })
}

/// Reads a file, naming it in the error.
fn read_file(kind: FileKind, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        kind,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM file, in order; at least one.
fn read_certificates(
    kind: FileKind,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(kind, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            kind,
            path: path.to_path_buf(),
            problem: pem_problem(e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            kind,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(FileKind::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::Pem {
            kind: FileKind::Key,
            path: path.to_path_buf(),
            problem: pem_problem(e),
        },
    })
}

/// What is wrong with a PEM file, in the words operators saw before the parser moved into
/// `rustls-pki-types` (its own text shows markers as byte lists).
fn pem_problem(e: pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "section end {:?} missing",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "illegal section start: {:?}",
            String::from_utf8_lossy(&line)
        ),
        pem::Error::Base64Decode(e) => e,
        e => e.to_string(),
    }
}

/// A certificate verifier that trusts any certificate, for backends on a private network with
/// self-signed certificates (`connector(_, false)`). It still checks that the backend signed
/// the handshake with the key of the certificate it sent, using the provider's algorithms.
#[derive(Debug)]
struct AcceptAnyCertificate {
    /// Supplies the signature algorithms handshake signatures are checked with.
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "director-tls-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, file: &str) -> PathBuf {
            self.0.join(file)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn openssl(args: &[&str]) {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed certificate for `localhost` and 127.0.0.1, with a new key given by
    /// `newkey` (e.g. `rsa:2048`, `ec -pkeyopt ec_paramgen_curve:P-256`): `<name>.crt`,
    /// `<name>.key` (PKCS#8). CA:FALSE because webpki refuses a CA certificate as the
    /// server's own.
    fn self_signed(dir: &TempDir, name: &str, newkey: &[&str]) -> (PathBuf, PathBuf) {
        let (crt, key) = (
            dir.path(&format!("{name}.crt")),
            dir.path(&format!("{name}.key")),
        );
        let mut args = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ];
        args.extend_from_slice(newkey);
        args.extend_from_slice(&[
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ]);
        openssl(&args);
        (crt, key)
    }

    fn ec_key() -> [&'static str; 4] {
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    }

    /// Serves one TLS connection on 127.0.0.1 that answers "pong" to "ping"; returns its port.
    async fn tls_server(config: Arc<ServerConfig>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = acceptor(config);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // A refused handshake is the client's test to check.
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut buf = [0; 4];
                if tls.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                    let _ = tls.write_all(b"pong").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        port
    }

    /// Connects to the server with `connector` as `host`, and plays ping/pong.
    async fn ping(port: u16, connector: &TlsConnector, host: &str) -> io::Result<()> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut tls = connector.connect(server_name(host).unwrap(), tcp).await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }

    #[tokio::test]
    async fn verified_connection_by_name_and_by_ip() {
        let dir = TempDir::new("verified");
        let (crt, key) = self_signed(&dir, "server", &["-newkey", "rsa:2048"]);
        let config = server_config(&crt, &key).unwrap();
        let connector = connector(Some(&crt), true).unwrap();
        for host in ["localhost", "127.0.0.1"] {
            let port = tls_server(config.clone()).await;
            ping(port, &connector, host).await.unwrap();
        }
    }

    #[tokio::test]
    async fn unverified_connection_accepts_any_certificate() {
        let dir = TempDir::new("unverified");
        let (crt, key) = self_signed(&dir, "server", &ec_key());
        let port = tls_server(server_config(&crt, &key).unwrap()).await;
        // A name the certificate does not carry, and no CA: still accepted.
        ping(port, &connector(None, false).unwrap(), "backend1.example")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn wrong_ca_or_wrong_name_fails_verification() {
        let dir = TempDir::new("wrong-ca");
        let (crt, key) = self_signed(&dir, "server", &ec_key());
        let (other_crt, _) = self_signed(&dir, "other", &ec_key());
        let config = server_config(&crt, &key).unwrap();
        for (ca, host) in [(&other_crt, "localhost"), (&crt, "backend1.example")] {
            let port = tls_server(config.clone()).await;
            let err = ping(port, &connector(Some(ca), true).unwrap(), host)
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("invalid peer certificate"),
                "CA {ca:?}, {host}: {err}"
            );
        }
    }

    #[test]
    fn key_formats_pkcs8_pkcs1_sec1() {
        let dir = TempDir::new("formats");
        let (rsa_crt, rsa_pkcs8) = self_signed(&dir, "rsa", &["-newkey", "rsa:2048"]);
        let rsa_pkcs1 = dir.path("rsa-pkcs1.key");
        openssl(&[
            "rsa",
            "-traditional",
            "-in",
            rsa_pkcs8.to_str().unwrap(),
            "-out",
            rsa_pkcs1.to_str().unwrap(),
        ]);
        let (ec_crt, ec_pkcs8) = self_signed(&dir, "ec", &ec_key());
        let ec_sec1 = dir.path("ec-sec1.key");
        openssl(&[
            "ec",
            "-in",
            ec_pkcs8.to_str().unwrap(),
            "-out",
            ec_sec1.to_str().unwrap(),
        ]);
        for (crt, key, marker) in [
            (&rsa_crt, &rsa_pkcs8, "BEGIN PRIVATE KEY"),
            (&rsa_crt, &rsa_pkcs1, "BEGIN RSA PRIVATE KEY"),
            (&ec_crt, &ec_pkcs8, "BEGIN PRIVATE KEY"),
            (&ec_crt, &ec_sec1, "BEGIN EC PRIVATE KEY"),
        ] {
            assert!(std::fs::read_to_string(key).unwrap().contains(marker));
            server_config(crt, key).unwrap_or_else(|e| panic!("{marker}: {e}"));
        }
        // A key that belongs to another certificate.
        let err = server_config(&rsa_crt, &ec_pkcs8).unwrap_err();
        assert!(matches!(err, TlsError::KeyRejected { .. }), "{err}");
        assert!(err.to_string().contains(rsa_crt.to_str().unwrap()), "{err}");
    }

    /// The error of a connector that was expected to fail (`TlsConnector` is not `Debug`).
    fn connector_err(ca_file: Option<&Path>, verify: bool) -> TlsError {
        match connector(ca_file, verify) {
            Ok(_) => panic!("connector({ca_file:?}, {verify}) was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = TempDir::new("errors");
        let (crt, key) = self_signed(&dir, "server", &ec_key());
        let missing = dir.path("missing.pem");
        let m = missing.display().to_string();

        let err = server_config(&missing, &key).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("certificate file {m}: cannot read: ")),
            "{err}"
        );
        let err = server_config(&crt, &missing).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("key file {m}: cannot read: ")),
            "{err}"
        );
        let err = connector_err(Some(&missing), true);
        assert!(
            err.to_string()
                .starts_with(&format!("CA file {m}: cannot read: ")),
            "{err}"
        );

        // The key where the certificate should be, and the other way round.
        let err = server_config(&key, &key).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "certificate file {}: no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)",
                key.display()
            )
        );
        let err = server_config(&crt, &crt).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("key file {}: no private key found", crt.display())),
            "{err}"
        );
        let garbage = dir.path("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let err = connector_err(Some(&garbage), true);
        assert!(matches!(err, TlsError::Pem { .. }), "{err}");

        assert!(matches!(
            connector_err(None, true),
            TlsError::CaFileRequired
        ));
    }

    #[test]
    fn server_names() {
        assert_eq!(
            server_name("imap1.example").unwrap(),
            ServerName::try_from("imap1.example").unwrap()
        );
        for ip in ["192.0.2.1", "2001:db8::1", "[2001:db8::1]"] {
            assert!(
                matches!(server_name(ip).unwrap(), ServerName::IpAddress(_)),
                "{ip}"
            );
        }
        assert!(matches!(
            server_name("bad name").unwrap_err(),
            TlsError::BadServerName { .. }
        ));
        assert!(matches!(
            server_name("").unwrap_err(),
            TlsError::BadServerName { .. }
        ));
    }
}
