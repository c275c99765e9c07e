//! An address as text, written on the stack: the same text as std's `Display`, IPv4 digits
//! written by hand. Each login shows a few addresses (its log lines, the IMAP `ID` command,
//! the backend label of its metrics), and std's formatting cost a thousand instructions
//! apiece, plus an allocation when a `String` was wanted.

use std::fmt::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The text of an address: `as_str()`, or displayed.
#[derive(Clone, Copy)]
pub struct AddrText {
    buf: [u8; MAX_LEN],
    len: u8,
}

/// The longest text: `[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%4294967295]:65535`.
const MAX_LEN: usize = 64;

/// The text of a socket address (`127.0.0.1:143`, `[::1]:993`).
pub fn socket(addr: SocketAddr) -> AddrText {
    let mut text = AddrText::empty();
    match addr {
        SocketAddr::V4(a) => {
            text.ipv4(*a.ip());
            text.push(b':');
            text.number(a.port());
        }
        // Rare here: std's form.
        SocketAddr::V6(a) => {
            let _ = write!(text, "{a}");
        }
    }
    text
}

/// The text of a port (`143`).
pub fn port(port: u16) -> AddrText {
    let mut text = AddrText::empty();
    text.number(port);
    text
}

/// The text of an IP address (`127.0.0.1`, `::1`).
pub fn ip(ip: IpAddr) -> AddrText {
    let mut text = AddrText::empty();
    match ip {
        IpAddr::V4(v4) => text.ipv4(v4),
        IpAddr::V6(v6) => {
            let _ = write!(text, "{v6}");
        }
    }
    text
}

impl AddrText {
    fn empty() -> Self {
        AddrText {
            buf: [0; MAX_LEN],
            len: 0,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole `str`s and ASCII digits and punctuation are ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("?")
    }

    fn push(&mut self, b: u8) {
        self.buf[usize::from(self.len)] = b;
        self.len += 1;
    }

    fn ipv4(&mut self, v4: Ipv4Addr) {
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b'.');
            }
            self.number(u16::from(octet));
        }
    }

    fn number(&mut self, value: u16) {
        let mut digits = [0u8; 5];
        let (mut n, mut v) = (0, value);
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for d in digits[..n].iter().rev() {
            self.push(*d);
        }
    }
}

impl Write for AddrText {
    /// Appends `s` whole, or fails (and appends nothing) when it does not fit.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let at = usize::from(self.len);
        let end = at + s.len();
        if end > MAX_LEN {
            return Err(fmt::Error);
        }
        self.buf[at..end].copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

impl fmt::Display for AddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for AddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_std_s() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:143",
            "255.255.255.255:65535",
            "10.20.3.100:10143",
            "[::1]:993",
            "[2001:db8::7%3]:4190",
            "[::ffff:198.51.100.1]:24",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(socket(a).as_str(), a.to_string());
            assert_eq!(socket(a).to_string(), a.to_string());
            assert_eq!(ip(a.ip()).as_str(), a.ip().to_string());
            assert_eq!(port(a.port()).as_str(), a.port().to_string());
        }
        let longest: IpAddr = "::ffff:255.255.255.255".parse().unwrap();
        assert_eq!(ip(longest).as_str(), longest.to_string());
    }
}
