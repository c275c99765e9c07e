//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): how a load balancer
//! in front of the director tells it the real client address, and how the director tells a
//! backend the same.
//!
//! Inbound, [`read_header`] reads one header from a fresh connection, before the mail protocol
//! starts. It reads exactly the header's bytes: the client's first command follows it on the
//! same stream and must not be lost. The grammar is the pure function [`parse`], fed whatever
//! bytes have arrived so far; it answers "need more" until a header is complete.
//!
//! Outbound, [`encode_v2`] builds the binary header the director sends first to a backend
//! (Dovecot's `haproxy_trusted_networks`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport and the 2-byte length.
const V2_PREFIX_LEN: usize = 16;
/// What a version 1 line starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The spec's limit for a version 1 line, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// The shortest header of either version (`PROXY UNKNOWN\r\n`); reading this much first can
/// never read past a header.
const MIN_HEADER_LEN: usize = 15;

/// Address block sizes of version 2 for each family that carries addresses.
const V2_INET_LEN: usize = 12;
const V2_INET6_LEN: usize = 36;
/// The version 2 transport number of STREAM (TCP); the only one with client addresses.
const V2_STREAM: u8 = 1;

/// What a PROXY header says about the connection.
///
/// Both fields are `None` when the header carries no usable addresses (version 1 `UNKNOWN`,
/// version 2 `LOCAL`, or a family such as `AF_UNIX`): the caller then keeps the TCP peer and
/// local addresses of the connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The real client: where the load balancer's connection came from.
    pub source: Option<SocketAddr>,
    /// The address the client connected to on the load balancer.
    pub destination: Option<SocketAddr>,
}

impl ProxyHeader {
    /// A header that carries no addresses.
    pub const UNKNOWN: ProxyHeader = ProxyHeader {
        source: None,
        destination: None,
    };
}

/// Why a PROXY header was refused. The connection should be closed: the peer is either not a
/// load balancer configured for the PROXY protocol, or it is broken.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The stream starts with something else (a client talking directly, or a load balancer
    /// without `send-proxy`).
    #[error("not a PROXY protocol header: the connection must start with \"PROXY \" (v1) or the v2 signature; is the load balancer set to send the PROXY protocol?")]
    BadSignature,
    /// A version 2 signature with another version number.
    #[error("PROXY v2 header has version {0}, only 2 is supported")]
    BadVersion(u8),
    /// A version 2 command other than LOCAL (0) or PROXY (1).
    #[error("PROXY v2 header has command {0}, expected 0 (LOCAL) or 1 (PROXY)")]
    BadCommand(u8),
    /// A version 2 family/transport byte the spec does not define.
    #[error("PROXY v2 header has address family/transport byte {0:#04x}, which the spec does not define")]
    BadFamily(u8),
    /// A version 1 line that does not follow the grammar.
    #[error("malformed PROXY v1 header: {0}")]
    Malformed(String),
    /// An address or port that does not parse, or an address block too short for its family.
    #[error("bad address in PROXY header: {0}")]
    BadAddress(String),
    /// A version 1 line with no CRLF within the spec's 107 bytes.
    #[error("PROXY v1 header has no CRLF within {V1_MAX_LEN} bytes")]
    TooLong,
    /// The connection ended in the middle of the header.
    #[error("connection closed after {0} bytes, in the middle of the PROXY header")]
    Truncated(usize),
    /// The header did not arrive in time.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// Reading the socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Reads one PROXY header (version 1 or 2) from the start of `stream`, and not one byte more:
/// what follows belongs to the mail protocol.
///
/// The whole header must arrive within `timeout`. No buffering is needed around `stream`:
/// reads are sized so that they cannot go past the end of a header (version 1 is read a
/// byte or two at a time up to its CRLF, version 2 by its announced length).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyError> {
    match tokio::time::timeout(timeout, read_header_untimed(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(timeout)),
    }
}

async fn read_header_untimed<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<ProxyHeader, ProxyError> {
    let mut buf = Vec::with_capacity(V2_PREFIX_LEN + V2_INET6_LEN);
    loop {
        if let Some((header, len)) = parse(&buf)? {
            debug_assert_eq!(len, buf.len(), "read_header read past the header");
            return Ok(header);
        }
        let start = buf.len();
        buf.resize(start + safe_read_len(&buf), 0);
        let n = stream.read(&mut buf[start..]).await?;
        if n == 0 {
            return Err(ProxyError::Truncated(start));
        }
        buf.truncate(start + n);
    }
}

/// How many more bytes can be read after `buf` (a header prefix that [`parse`] found
/// incomplete) without any risk of reading past the end of the header.
fn safe_read_len(buf: &[u8]) -> usize {
    if buf.len() < MIN_HEADER_LEN {
        MIN_HEADER_LEN - buf.len()
    } else if buf[0] == V2_SIGNATURE[0] {
        if buf.len() < V2_PREFIX_LEN {
            V2_PREFIX_LEN - buf.len()
        } else {
            V2_PREFIX_LEN + v2_payload_len(buf) - buf.len()
        }
    } else if buf.last() == Some(&b'\r') {
        // The LF may be the last byte of the header.
        1
    } else {
        // At least CR LF is still to come.
        2
    }
}

/// The length of a version 2 header's address block and TLVs, from bytes 15 and 16.
fn v2_payload_len(buf: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([buf[14], buf[15]]))
}

/// Parses a PROXY header (version 1 or 2) at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` is a valid beginning of a header but too short to decide,
/// and `Ok(Some((header, len)))` once a header is complete: `len` is its length in bytes,
/// and `buf[len..]` is the start of the mail protocol. Errors are reported as soon as the
/// bytes seen so far cannot start a valid header.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(&b) if b == V1_PREFIX[0] => parse_v1(buf),
        Some(&b) if b == V2_SIGNATURE[0] => parse_v2(buf),
        Some(_) => Err(ProxyError::BadSignature),
    }
}

/// Whether `buf` starts with `prefix`, or is a beginning of it.
fn matches_prefix(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if !matches_prefix(buf, V1_PREFIX) {
        return Err(ProxyError::BadSignature);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let end = match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf > 0 && window[lf - 1] == b'\r' => lf + 1,
        Some(_) => {
            return Err(ProxyError::Malformed(
                "line ends with LF without CR".to_string(),
            ))
        }
        None if buf.len() >= V1_MAX_LEN => return Err(ProxyError::TooLong),
        None => return Ok(None),
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end - 2])
        .map_err(|_| ProxyError::Malformed("line is not ASCII".to_string()))?;
    if line.contains('\r') {
        return Err(ProxyError::Malformed("CR inside the line".to_string()));
    }
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or_default();
    let header = match protocol {
        // The spec: anything may follow UNKNOWN and the receiver must ignore it.
        "UNKNOWN" => ProxyHeader::UNKNOWN,
        "TCP4" | "TCP6" => {
            let fields: Vec<&str> = fields.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(ProxyError::Malformed(format!(
                    "{protocol} needs 4 fields separated by single spaces (source, destination, source port, destination port), got {}",
                    fields.len()
                )));
            };
            let v6 = protocol == "TCP6";
            ProxyHeader {
                source: Some(SocketAddr::new(v1_addr(src, v6)?, v1_port(sport)?)),
                destination: Some(SocketAddr::new(v1_addr(dst, v6)?, v1_port(dport)?)),
            }
        }
        other => {
            return Err(ProxyError::Malformed(format!(
                "protocol {other:?}, expected TCP4, TCP6 or UNKNOWN"
            )))
        }
    };
    Ok(Some((header, end)))
}

fn v1_addr(text: &str, v6: bool) -> Result<IpAddr, ProxyError> {
    let parsed = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    parsed.map_err(|_| {
        let family = if v6 { "IPv6" } else { "IPv4" };
        ProxyError::BadAddress(format!("{text:?} is not an {family} address"))
    })
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    // `u16::from_str` would also take "+25"; the spec wants plain decimal digits.
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    match text.parse::<u16>() {
        Ok(port) if digits => Ok(port),
        _ => Err(ProxyError::BadAddress(format!(
            "{text:?} is not a port number (0 to 65535)"
        ))),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if !matches_prefix(buf, &V2_SIGNATURE) {
        return Err(ProxyError::BadSignature);
    }
    // Check the version and command as soon as they arrive.
    if let Some(&ver_cmd) = buf.get(12) {
        let (version, command) = (ver_cmd >> 4, ver_cmd & 0x0f);
        if version != 2 {
            return Err(ProxyError::BadVersion(version));
        }
        if command > 1 {
            return Err(ProxyError::BadCommand(command));
        }
    }
    if let Some(&fam) = buf.get(13) {
        // Families UNSPEC, INET, INET6, UNIX; transports UNSPEC, STREAM, DGRAM.
        if fam >> 4 > 3 || fam & 0x0f > 2 {
            return Err(ProxyError::BadFamily(fam));
        }
    }
    if buf.len() < V2_PREFIX_LEN {
        return Ok(None);
    }
    let total = V2_PREFIX_LEN + v2_payload_len(buf);
    if buf.len() < total {
        return Ok(None);
    }
    let is_proxy = buf[12] & 0x0f == 1;
    let fam = buf[13];
    // The address block is followed by TLVs, which the director has no use for.
    let block = &buf[V2_PREFIX_LEN..total];
    let header = match (is_proxy, fam >> 4, fam & 0x0f) {
        // LOCAL: a health check or the load balancer's own connection; no client behind it.
        (false, _, _) => ProxyHeader::UNKNOWN,
        (true, 1, V2_STREAM) => {
            let b = v2_block(block, V2_INET_LEN, "IPv4")?;
            let ip = |at: usize| IpAddr::from([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            v2_header(ip(0), ip(4), &b[8..])
        }
        (true, 2, V2_STREAM) => {
            let b = v2_block(block, V2_INET6_LEN, "IPv6")?;
            let ip = |at: usize| {
                let bytes: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes");
                IpAddr::from(bytes)
            };
            v2_header(ip(0), ip(16), &b[32..])
        }
        // UNSPEC, AF_UNIX or datagrams: nothing a TCP client address can be made of.
        _ => ProxyHeader::UNKNOWN,
    };
    Ok(Some((header, total)))
}

/// The first `need` bytes of a version 2 address block, or an error if it is shorter.
fn v2_block<'a>(block: &'a [u8], need: usize, family: &str) -> Result<&'a [u8], ProxyError> {
    block.get(..need).ok_or_else(|| {
        ProxyError::BadAddress(format!(
            "v2 {family} address block is {} bytes, at least {need} are needed",
            block.len()
        ))
    })
}

/// A header from version 2 addresses and the 4 bytes of source and destination ports.
fn v2_header(src: IpAddr, dst: IpAddr, ports: &[u8]) -> ProxyHeader {
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    ProxyHeader {
        source: Some(SocketAddr::new(src, sport)),
        destination: Some(SocketAddr::new(dst, dport)),
    }
}

/// Encodes a version 2 PROXY header (command PROXY, transport STREAM, no TLVs) saying that
/// a client at `source` connected to `destination`.
///
/// When one address is IPv4 and the other IPv6, the IPv4 one is sent as an IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`), since a header has a single family.
#[must_use]
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_PREFIX_LEN + V2_INET6_LEN);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&(V2_INET_LEN as u16).to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&(V2_INET6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What follows the header on the wire: the client's first command.
    const AFTER: &[u8] = b"A001 CAPABILITY\r\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn both(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader {
            source: Some(addr(src)),
            destination: Some(addr(dst)),
        }
    }

    /// Feeds `input` to `parse` in chunks of `chunk` bytes, as a socket might deliver it;
    /// returns the first definite answer and the number of bytes fed so far.
    fn parse_in_chunks(
        input: &[u8],
        chunk: usize,
    ) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        let mut seen = 0;
        loop {
            seen = (seen + chunk).min(input.len());
            match parse(&input[..seen]) {
                Ok(None) if seen < input.len() => continue,
                other => return other,
            }
        }
    }

    /// Checks that `header` parses to `expected` whatever the chunking, with the client's
    /// bytes after it left untouched.
    fn check(header: &[u8], expected: ProxyHeader) {
        let mut input = header.to_vec();
        input.extend_from_slice(AFTER);
        for chunk in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] {
            let (got, len) = parse_in_chunks(&input, chunk)
                .unwrap_or_else(|e| panic!("chunk {chunk}: {e}"))
                .unwrap_or_else(|| panic!("chunk {chunk}: incomplete"));
            assert_eq!(got, expected, "chunk {chunk}");
            assert_eq!(len, header.len(), "chunk {chunk}");
            assert_eq!(&input[len..], AFTER, "chunk {chunk}");
        }
    }

    /// Checks that `input` is refused whatever the chunking.
    fn check_err(input: &[u8], expect: fn(&ProxyError) -> bool) {
        for chunk in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] {
            match parse_in_chunks(input, chunk) {
                Err(e) => assert!(expect(&e), "chunk {chunk}: unexpected error {e:?}"),
                Ok(r) => panic!("chunk {chunk}: expected an error, got {r:?}"),
            }
        }
    }

    fn v2(ver_cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(fam);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn v1_spec_examples() {
        check(
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            both("192.168.0.1:56324", "192.168.0.11:443"),
        );
        check(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 993\r\n",
            both("[2001:db8::1]:1234", "[2001:db8::2]:993"),
        );
        check(b"PROXY UNKNOWN\r\n", ProxyHeader::UNKNOWN);
        check(
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            ProxyHeader::UNKNOWN,
        );
        check(
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            both("255.255.255.255:65535", "255.255.255.255:65535"),
        );
    }

    #[test]
    fn v1_longest_line_is_accepted() {
        // 107 bytes exactly, the spec's worst case.
        let line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), V1_MAX_LEN);
        check(line, ProxyHeader::UNKNOWN);
    }

    #[test]
    fn v1_errors() {
        let malformed = |e: &ProxyError| matches!(e, ProxyError::Malformed(_));
        let bad_addr = |e: &ProxyError| matches!(e, ProxyError::BadAddress(_));
        check_err(b"A001 LOGIN user pass\r\n", |e| {
            matches!(e, ProxyError::BadSignature)
        });
        check_err(b"PROXI TCP4\r\n", |e| matches!(e, ProxyError::BadSignature));
        check_err(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", malformed);
        check_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", malformed);
        check_err(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", malformed);
        check_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", malformed);
        check_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", malformed);
        check_err(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", bad_addr);
        check_err(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", bad_addr);
        check_err(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", bad_addr);
        check_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", bad_addr);
        check_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", bad_addr);
        check_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r\n", bad_addr);
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        long.extend_from_slice(b"\r\n");
        check_err(&long, |e| matches!(e, ProxyError::TooLong));
    }

    #[test]
    fn v2_spec_layouts() {
        // PROXY, AF_INET, STREAM: 192.168.0.1:56324 -> 192.168.0.11:443.
        let inet = [192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb];
        check(
            &v2(0x21, 0x11, &inet),
            both("192.168.0.1:56324", "192.168.0.11:443"),
        );
        // The same with TLVs after the addresses (ALPN "h2", then a NOOP), which are skipped.
        let mut with_tlvs = inet.to_vec();
        with_tlvs.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        check(
            &v2(0x21, 0x11, &with_tlvs),
            both("192.168.0.1:56324", "192.168.0.11:443"),
        );
        // PROXY, AF_INET6, STREAM.
        let mut inet6 = Vec::new();
        inet6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        inet6.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        inet6.extend_from_slice(&[0x04, 0xd2, 0x03, 0xe1]);
        check(
            &v2(0x21, 0x21, &inet6),
            both("[2001:db8::1]:1234", "[2001:db8::2]:993"),
        );
        // LOCAL, with or without addresses: keep the connection's own.
        check(&v2(0x20, 0x00, &[]), ProxyHeader::UNKNOWN);
        check(&v2(0x20, 0x11, &inet), ProxyHeader::UNKNOWN);
        // PROXY over AF_UNIX (216 bytes of paths), UNSPEC, or DGRAM: no TCP addresses.
        check(&v2(0x21, 0x31, &[0; 216]), ProxyHeader::UNKNOWN);
        check(&v2(0x21, 0x00, &[]), ProxyHeader::UNKNOWN);
        check(&v2(0x21, 0x12, &inet), ProxyHeader::UNKNOWN);
    }

    #[test]
    fn v2_errors() {
        let inet = [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2];
        check_err(&v2(0x11, 0x11, &inet), |e| {
            matches!(e, ProxyError::BadVersion(1))
        });
        check_err(&v2(0x22, 0x11, &inet), |e| {
            matches!(e, ProxyError::BadCommand(2))
        });
        check_err(&v2(0x21, 0x41, &inet), |e| {
            matches!(e, ProxyError::BadFamily(0x41))
        });
        check_err(&v2(0x21, 0x13, &inet), |e| {
            matches!(e, ProxyError::BadFamily(0x13))
        });
        check_err(&v2(0x21, 0x11, &inet[..8]), |e| {
            matches!(e, ProxyError::BadAddress(_))
        });
        check_err(&v2(0x21, 0x21, &[0; 12]), |e| {
            matches!(e, ProxyError::BadAddress(_))
        });
        let mut bad_sig = v2(0x21, 0x11, &inet);
        bad_sig[7] = b'q';
        check_err(&bad_sig, |e| matches!(e, ProxyError::BadSignature));
    }

    #[test]
    fn encode_round_trips() {
        let cases = [
            ("192.0.2.1:50000", "198.51.100.7:993"),
            ("[2001:db8::1]:50000", "[2001:db8::7]:143"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
        ];
        for (src, dst) in cases {
            let bytes = encode_v2(addr(src), addr(dst));
            check(&bytes, both(src, dst));
        }
        assert_eq!(encode_v2(addr("1.2.3.4:1"), addr("5.6.7.8:2")).len(), 28);
        assert_eq!(encode_v2(addr("[::1]:1"), addr("[::2]:2")).len(), 52);
    }

    #[test]
    fn encode_maps_mixed_families_to_ipv6() {
        let bytes = encode_v2(addr("192.0.2.1:50000"), addr("[2001:db8::7]:993"));
        assert_eq!(bytes[13], 0x21);
        check(
            &bytes,
            both("[::ffff:192.0.2.1]:50000", "[2001:db8::7]:993"),
        );
        let bytes = encode_v2(addr("[2001:db8::1]:50000"), addr("198.51.100.7:143"));
        check(
            &bytes,
            both("[2001:db8::1]:50000", "[::ffff:198.51.100.7]:143"),
        );
    }

    #[test]
    fn encode_matches_hand_written_bytes() {
        let expected = v2(
            0x21,
            0x11,
            &[192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb],
        );
        assert_eq!(
            encode_v2(addr("192.168.0.1:56324"), addr("192.168.0.11:443")),
            expected
        );
    }

    /// Runs `read_header` over `input` delivered in chunks of `chunk` bytes through a pipe,
    /// and returns the header and every byte left on the stream after it.
    async fn read_over_pipe(
        input: &[u8],
        chunk: usize,
    ) -> (Result<ProxyHeader, ProxyError>, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(4096);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(chunk) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let result = read_header(&mut server, Duration::from_secs(5)).await;
        writer.await.unwrap();
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        (result, rest)
    }

    #[tokio::test]
    async fn read_header_leaves_the_client_bytes() {
        let headers: Vec<(Vec<u8>, ProxyHeader)> = vec![
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
                both("192.168.0.1:56324", "192.168.0.11:443"),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::UNKNOWN),
            (
                encode_v2(addr("[2001:db8::1]:5"), addr("[2001:db8::2]:6")),
                both("[2001:db8::1]:5", "[2001:db8::2]:6"),
            ),
            (v2(0x20, 0x00, &[]), ProxyHeader::UNKNOWN),
        ];
        for (header, expected) in headers {
            let mut input = header.clone();
            input.extend_from_slice(AFTER);
            for chunk in [1, 2, 3, 7, 16, 512] {
                let (got, rest) = read_over_pipe(&input, chunk).await;
                assert_eq!(got.unwrap(), expected, "chunk {chunk}");
                assert_eq!(rest, AFTER, "chunk {chunk}");
            }
            // All at once from a slice: whatever is left in it was not consumed.
            let mut slice = &input[..];
            assert_eq!(
                read_header(&mut slice, Duration::from_secs(5))
                    .await
                    .unwrap(),
                expected
            );
            assert_eq!(slice, AFTER);
        }
    }

    /// The error of reading a header from all of `input`, which must fail.
    async fn read_header_err(mut input: &[u8]) -> ProxyError {
        read_header(&mut input, Duration::from_secs(5))
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn read_header_truncated() {
        let err = read_header_err(b"PROXY TCP4 192.168.0.1 19").await;
        assert!(matches!(err, ProxyError::Truncated(25)), "{err:?}");
        let err = read_header_err(b"").await;
        assert!(matches!(err, ProxyError::Truncated(0)), "{err:?}");
    }

    #[tokio::test]
    async fn read_header_bad_signature() {
        let err = read_header_err(b"* OK IMAP4rev1 ready\r\n").await;
        assert!(matches!(err, ProxyError::BadSignature), "{err:?}");
        assert!(err.to_string().contains("PROXY"));
    }

    #[tokio::test(start_paused = true)]
    async fn read_header_times_out() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        // Half a header, then silence.
        client.write_all(b"PROXY TCP4 1.2").await.unwrap();
        let err = read_header(&mut server, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Timeout(_)), "{err:?}");
        assert_eq!(err.to_string(), "no complete PROXY header within 3s");
        drop(client);
    }

    #[test]
    fn safe_reads_never_pass_the_header() {
        // For every prefix that `parse` finds incomplete, the suggested read fits.
        let headers = [
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
            encode_v2(addr("1.2.3.4:1"), addr("5.6.7.8:2")),
            v2(0x20, 0x00, &[]),
        ];
        for header in headers {
            for cut in 0..header.len() {
                assert!(parse(&header[..cut]).unwrap().is_none());
                let n = safe_read_len(&header[..cut]);
                assert!(n >= 1 && cut + n <= header.len(), "{header:?} cut {cut}");
            }
        }
    }
}
