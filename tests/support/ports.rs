//! Loopback ports for servers a test starts itself (a `director serve` with fixed listeners,
//! Prometheus, the admin TCP API). Std only: the benchmark example includes it too.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, TcpListener};

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Ports that were free a moment ago (bound together, so all different, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Ports free on `ip` a moment ago. On an address of its own (`127.X.Y.Z`, not 127.0.0.1,
/// the source of every outgoing loopback connection), a port stays free while a server that
/// was killed is down: no client's ephemeral port can take it before the restart.
pub fn free_ports_on(ip: IpAddr, n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
