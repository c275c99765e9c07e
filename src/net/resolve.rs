//! Backend host names to addresses, at start-up and on reload.
//!
//! As in Dovecot's director, a name with several addresses stands for several backends: each
//! address becomes a backend of its own, so the result is every address, in a stable order.
//! IP literals are taken as they are, without any lookup.

use std::net::IpAddr;

use hickory_resolver::config::{LookupIpStrategy, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;

/// Why a backend host gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name exists nowhere, or has neither A nor AAAA records.
    #[error("backend host {host:?}: no address found (not in /etc/hosts, and DNS has no A or AAAA record for it)")]
    NoAddress {
        /// The host as configured.
        host: String,
    },
    /// The lookup itself failed: the name is malformed, or the DNS servers did not answer.
    #[error("backend host {host:?}: lookup failed: {source}")]
    Lookup {
        /// The host as configured.
        host: String,
        /// What hickory-resolver said.
        source: NetError,
    },
}

/// Looks up backend host names: `/etc/hosts` first, then the DNS servers of
/// `/etc/resolv.conf`, asking for both A and AAAA records.
///
/// Create one and keep it (clones share it): it holds the system configuration, read once,
/// and a cache of answers.
#[derive(Clone)]
pub struct Resolver {
    /// The hickory resolver; cheap to clone, shared by clones.
    inner: TokioResolver,
}

impl Resolver {
    /// A resolver with the system's configuration (`/etc/resolv.conf`, `/etc/hosts`).
    ///
    /// If `/etc/resolv.conf` cannot be read, a warning is logged and hickory's default
    /// configuration is used (public DNS servers), still after `/etc/hosts`.
    pub fn from_system() -> Resolver {
        let (config, options) = match hickory_resolver::system_conf::read_system_conf() {
            Ok(conf) => conf,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot read the system resolver configuration (/etc/resolv.conf); \
                     using hickory-resolver's default DNS servers"
                );
                // Google's public servers: hickory's default configuration up to 0.24, the
                // one the warning names.
                (
                    ResolverConfig::udp_and_tcp(&hickory_resolver::config::GOOGLE),
                    ResolverOpts::default(),
                )
            }
        };
        Resolver::new(config, options)
    }

    /// A resolver with the given configuration; `/etc/hosts` is always consulted and both
    /// address families are always asked for.
    fn new(config: ResolverConfig, mut options: ResolverOpts) -> Resolver {
        options.use_hosts_file = ResolveHosts::Always;
        // Every address is a backend: IPv4 and IPv6 both, not the first family that answers.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        Resolver {
            inner: build(config, options),
        }
    }

    /// The addresses of a backend host, sorted and without duplicates; never empty.
    ///
    /// An IP literal (`192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`) is returned as is, without
    /// a lookup.
    pub async fn resolve_host(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some(ip) = ip_literal(host) {
            return Ok(vec![ip]);
        }
        let lookup = self.inner.lookup_ip(host).await.map_err(|source| {
            if source.is_no_records_found() {
                ResolveError::NoAddress {
                    host: host.to_owned(),
                }
            } else {
                ResolveError::Lookup {
                    host: host.to_owned(),
                    source,
                }
            }
        })?;
        let mut addresses: Vec<IpAddr> = lookup.iter().collect();
        addresses.sort();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(ResolveError::NoAddress {
                host: host.to_owned(),
            });
        }
        Ok(addresses)
    }
}

/// The addresses of one backend host, as [`Resolver::resolve_host`] finds them, with a
/// resolver made for this one call: IP literals need no resolver at all, and a program that
/// looks up several names should keep one [`Resolver`] instead.
pub async fn resolve_host(host: &str) -> Result<Vec<IpAddr>, ResolveError> {
    if let Some(ip) = ip_literal(host) {
        return Ok(vec![ip]);
    }
    Resolver::from_system().resolve_host(host).await
}

/// A Tokio resolver with this configuration.
fn build(config: ResolverConfig, options: ResolverOpts) -> TokioResolver {
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        // Only a TLS set-up for DNS servers can fail, and none is used.
        .expect("a resolver without DNS over TLS")
}

/// `host` as an IP address, if it is one (IPv6 possibly in brackets).
fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::Hosts;

    /// A resolver that knows only the given hosts file and has no DNS servers, so tests need
    /// no network and fail fast.
    fn hosts_only(hosts_file: &str) -> Resolver {
        let mut options = ResolverOpts::default();
        options.use_hosts_file = ResolveHosts::Never;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let mut inner = build(ResolverConfig::default(), options);
        let mut hosts = Hosts::default();
        hosts.read_hosts_conf(hosts_file.as_bytes()).unwrap();
        inner.set_hosts(std::sync::Arc::new(hosts));
        Resolver { inner }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn ip_literals_are_not_looked_up() {
        // A resolver that could not look anything up.
        let resolver = hosts_only("");
        for (host, ip) in [
            ("192.0.2.1", "192.0.2.1"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("::ffff:192.0.2.1", "::ffff:192.0.2.1"),
        ] {
            assert_eq!(resolver.resolve_host(host).await.unwrap(), ips(&[ip]));
            assert_eq!(resolve_host(host).await.unwrap(), ips(&[ip]));
        }
    }

    #[tokio::test]
    async fn localhost_from_the_system() {
        let addresses = Resolver::from_system()
            .resolve_host("localhost")
            .await
            .unwrap();
        assert!(
            addresses.contains(&"127.0.0.1".parse().unwrap()),
            "{addresses:?}"
        );
        assert!(addresses.iter().all(IpAddr::is_loopback), "{addresses:?}");
        assert!(addresses.windows(2).all(|w| w[0] < w[1]), "{addresses:?}");
        assert_eq!(resolve_host("localhost").await.unwrap(), addresses);
    }

    #[tokio::test]
    async fn every_address_of_a_name_sorted_and_deduplicated() {
        let resolver = hosts_only(
            "10.0.0.3 imap\n\
             10.0.0.1 imap\n\
             2001:db8::2 imap\n\
             10.0.0.2 imap other\n\
             10.0.0.1 imap\n",
        );
        assert_eq!(
            resolver.resolve_host("imap").await.unwrap(),
            ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::2"])
        );
        assert_eq!(
            resolver.resolve_host("other").await.unwrap(),
            ips(&["10.0.0.2"])
        );
    }

    #[tokio::test]
    async fn unknown_name_is_an_error_naming_the_host() {
        let resolver = hosts_only("10.0.0.1 imap\n");
        let err = resolver.resolve_host("pop3").await.unwrap_err();
        assert!(
            err.to_string().starts_with("backend host \"pop3\": "),
            "{err}"
        );
    }
}
