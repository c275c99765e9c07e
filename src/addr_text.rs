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

/// The decimal digits of every octet (left-aligned) and how many there are.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let (h, t, o) = ((i / 100) as u8, (i / 10 % 10) as u8, (i % 10) as u8);
        table[i] = if i >= 100 {
            ([b'0' + h, b'0' + t, b'0' + o], 3)
        } else if i >= 10 {
            ([b'0' + t, b'0' + o, 0], 2)
        } else {
            ([b'0' + o, 0, 0], 1)
        };
        i += 1;
    }
    table
};

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
        // At most 15 bytes, three digits written for every octet and the unused ones
        // written over by what follows.
        let mut at = usize::from(self.len);
        assert!(at + 16 <= MAX_LEN, "an IPv4 address comes first");
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                self.buf[at] = b'.';
                at += 1;
            }
            let (digits, n) = OCTETS[usize::from(octet)];
            self.buf[at..at + 3].copy_from_slice(&digits);
            at += usize::from(n);
        }
        self.len = at as u8;
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
        // Every octet, in every place.
        for o in 0..=255u8 {
            let a = SocketAddr::from(([o, 255 - o, o / 3, 9], u16::from(o) * 257));
            assert_eq!(socket(a).as_str(), a.to_string());
        }
    }
}
