//! What an `AUTH` line tells the auth service about the client, as Dovecot's login processes
//! tell it: the service (protocol), the session id, both ends of the client's connection, how
//! the connection is secured. Passdbs use these (`%{rip}`, `%s`, `allow_nets`...), the auth
//! penalty is counted per `rip`, and the service's log names them.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::wire::escape_into;

/// How the client's connection is protected (`secured`, `secured=tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Neither TLS nor a trusted network.
    #[default]
    Insecure,
    /// Not TLS, but from a trusted network (Dovecot's `login_trusted_networks`, or a local
    /// socket).
    Trusted,
    /// TLS (implicit, or after STARTTLS), at the director or at a trusted proxy before it.
    Tls,
}

/// The client of one authentication, as the `AUTH` line describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The protocol: `imap`, `pop3`, `sieve`, `lmtp`... (the passdb's `%s`). Required.
    pub service: String,
    /// The session id the director logs for this connection.
    pub session_id: Option<String>,
    /// The address the client connected to (`lip`, `lport`).
    pub local: Option<SocketAddr>,
    /// The client's address (`rip`, `rport`): the real client, from a PROXY header or a
    /// trusted front end's forwarded address if there was one.
    pub remote: Option<SocketAddr>,
    /// The director's own end of the TCP connection (`real_lip`, `real_lport`), sent only
    /// where it differs from `local`.
    pub real_local: Option<SocketAddr>,
    /// The TCP peer (`real_rip`, `real_rport`: a load balancer that sent a PROXY header),
    /// sent only where it differs from `remote`.
    pub real_remote: Option<SocketAddr>,
    pub transport: Transport,
    /// Whether the client presented a TLS certificate that verified.
    pub valid_client_cert: bool,
    /// The user name in that certificate (`cert_username`).
    pub cert_username: Option<String>,
    /// The server name the client asked for in TLS (SNI: `local_name`).
    pub local_name: Option<String>,
    /// The client's software, from IMAP `ID` (`client_id`).
    pub client_id: Option<String>,
    /// Skip the auth penalty for this request (`no-penalty`). Dovecot's login processes never
    /// set it; a director shared by many clients behind one address might.
    pub no_penalty: bool,
    /// Ask for the mechanism's final server data in `OK` (`final-resp-ok`) rather than in one
    /// more `CONT` round: only for a protocol that can carry data with its success reply.
    pub final_response_ok: bool,
}

impl RequestInfo {
    /// A request for `service` with nothing else known.
    pub fn new(service: impl Into<String>) -> Self {
        RequestInfo {
            service: service.into(),
            ..RequestInfo::default()
        }
    }

    /// The `AUTH` line after `AUTH<TAB><id><TAB>`, newline included: `mechanism`, then the
    /// parameters in the order Dovecot's login processes send them, `resp` last (the service
    /// refuses anything after it). An initial response, even empty, is sent as `resp=`.
    pub fn auth_line_tail(&self, mechanism: &str, initial_response: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        escape_into(&mut out, mechanism.as_bytes());
        param(&mut out, "service", &self.service);
        if self.final_response_ok {
            out.extend_from_slice(b"\tfinal-resp-ok");
        }
        match self.transport {
            Transport::Insecure => {}
            Transport::Trusted => out.extend_from_slice(b"\tsecured"),
            Transport::Tls => out.extend_from_slice(b"\tsecured=tls"),
        }
        if self.no_penalty {
            out.extend_from_slice(b"\tno-penalty");
        }
        if self.valid_client_cert {
            out.extend_from_slice(b"\tvalid-client-cert");
        }
        optional(&mut out, "session", &self.session_id);
        optional(&mut out, "cert_username", &self.cert_username);
        push_addresses(
            &mut out,
            [self.local, self.remote],
            [self.real_local, self.real_remote],
        );
        optional(&mut out, "local_name", &self.local_name);
        optional(&mut out, "client_id", &self.client_id);
        if let Some(response) = initial_response {
            param(&mut out, "resp", &STANDARD.encode(response));
        }
        out.push(b'\n');
        out
    }
}

/// Appends both ends of the client's connection as Dovecot's clients send them (`lip`, `rip`,
/// `lport`, `rport`), then the director's own TCP ends (`real_*`) where they differ from those.
/// Shared with the auth-master lookups, which describe the client the same way.
pub(super) fn push_addresses(
    out: &mut Vec<u8>,
    [local, remote]: [Option<SocketAddr>; 2],
    [real_local, real_remote]: [Option<SocketAddr>; 2],
) {
    // An IPv4 client seen on a dual-stack socket (`::ffff:192.0.2.1`) is sent as IPv4, the
    // way a passdb's networks are written.
    let ip = |a: Option<SocketAddr>| a.map(|a| a.ip().to_canonical().to_string());
    let port = |a: Option<SocketAddr>| a.map(|a| a.port()).filter(|&p| p != 0);
    let differs =
        |real: Option<SocketAddr>, seen: Option<SocketAddr>| real.filter(|r| Some(*r) != seen);
    let (real_local, real_remote) = (differs(real_local, local), differs(real_remote, remote));
    optional(out, "lip", &ip(local));
    optional(out, "rip", &ip(remote));
    optional(out, "lport", &port(local).map(|p| p.to_string()));
    optional(out, "rport", &port(remote).map(|p| p.to_string()));
    optional(out, "real_lip", &ip(real_local));
    optional(out, "real_rip", &ip(real_remote));
    optional(out, "real_lport", &port(real_local).map(|p| p.to_string()));
    optional(out, "real_rport", &port(real_remote).map(|p| p.to_string()));
}

/// Appends `<TAB>key=value`, the value tab-escaped.
pub(super) fn param(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b'\t');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    escape_into(out, value.as_bytes());
}

/// [`param`] for a value that may be absent or empty (then nothing is sent).
pub(super) fn optional(out: &mut Vec<u8>, key: &str, value: &Option<String>) {
    if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
        param(out, key, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(info: &RequestInfo, mech: &str, resp: Option<&[u8]>) -> String {
        String::from_utf8(info.auth_line_tail(mech, resp)).unwrap()
    }

    #[test]
    fn a_bare_request_names_the_mechanism_and_service() {
        assert_eq!(
            tail(&RequestInfo::new("imap"), "PLAIN", None),
            "PLAIN\tservice=imap\n"
        );
    }

    #[test]
    fn a_full_request_sends_what_a_login_process_sends_with_resp_last() {
        let info = RequestInfo {
            service: "pop3".into(),
            session_id: Some("abc123".into()),
            local: Some("192.0.2.1:110".parse().unwrap()),
            remote: Some("[::ffff:198.51.100.7]:51000".parse().unwrap()),
            real_local: Some("192.0.2.1:110".parse().unwrap()),
            real_remote: Some("10.0.0.9:40000".parse().unwrap()),
            transport: Transport::Tls,
            valid_client_cert: true,
            cert_username: Some("bob".into()),
            local_name: Some("mail.example.org".into()),
            client_id: Some("Thunderbird".into()),
            no_penalty: true,
            final_response_ok: true,
        };
        assert_eq!(
            tail(&info, "PLAIN", Some(b"\0bob\0pw")),
            "PLAIN\tservice=pop3\tfinal-resp-ok\tsecured=tls\tno-penalty\tvalid-client-cert\t\
             session=abc123\tcert_username=bob\tlip=192.0.2.1\trip=198.51.100.7\tlport=110\t\
             rport=51000\treal_rip=10.0.0.9\treal_rport=40000\tlocal_name=mail.example.org\t\
             client_id=Thunderbird\tresp=AGJvYgBwdw==\n"
        );
    }

    #[test]
    fn trusted_is_secured_without_tls_and_an_empty_initial_response_is_sent() {
        let info = RequestInfo {
            transport: Transport::Trusted,
            ..RequestInfo::new("sieve")
        };
        assert_eq!(
            tail(&info, "LOGIN", Some(b"")),
            "LOGIN\tservice=sieve\tsecured\tresp=\n"
        );
    }

    #[test]
    fn client_chosen_text_cannot_add_parameters_or_lines() {
        let info = RequestInfo {
            session_id: Some("s\tresp=AAAA\nCANCEL\t1".into()),
            client_id: Some("x\r\x01".into()),
            ..RequestInfo::new("imap\tnologin")
        };
        let line = info.auth_line_tail("PLAIN", None);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let fields: Vec<&[u8]> = line[..line.len() - 1].split(|&b| b == b'\t').collect();
        assert_eq!(fields.len(), 4, "{:?}", String::from_utf8_lossy(&line));
        assert_eq!(fields[1], b"service=imap\x01tnologin");
    }
}
