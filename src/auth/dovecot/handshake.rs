//! What the auth service announces when a client connects: its protocol version, the SASL
//! mechanisms it offers with their security flags, its pid, the connection's id and cookie.
//!
//! Which mechanisms a front end may *advertise* is the front end's decision, made from the
//! flags the way Dovecot's login processes make it ([`Mechanism::advertisable`]).

use super::wire::ServerLine;

/// The protocol major version this client speaks. A service with another major version speaks
/// another protocol.
pub const MAJOR_VERSION: u32 = 1;

/// The minor version this client announces: 2 lets an empty `resp=` mean an empty initial
/// response rather than none.
pub const MINOR_VERSION: u32 = 2;

/// Security properties of a mechanism, from its `MECH` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MechFlags {
    /// Not to be advertised (APOP: usable only through its own command).
    pub private: bool,
    /// Logs in without credentials (ANONYMOUS).
    pub anonymous: bool,
    /// Sends the password in clear (PLAIN, LOGIN).
    pub plaintext: bool,
    /// Open to passive dictionary attacks.
    pub dictionary: bool,
    /// Open to active (non-dictionary) attacks.
    pub active: bool,
    pub forward_secrecy: bool,
    /// The server proves itself to the client too (SCRAM, DIGEST-MD5).
    pub mutual_auth: bool,
}

impl MechFlags {
    /// Flags from their names on a `MECH` line; unknown names are ignored.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> MechFlags {
        let mut flags = MechFlags::default();
        for name in names {
            match name {
                "private" => flags.private = true,
                "anonymous" => flags.anonymous = true,
                "plaintext" => flags.plaintext = true,
                "dictionary" => flags.dictionary = true,
                "active" => flags.active = true,
                "forward-secrecy" => flags.forward_secrecy = true,
                "mutual-auth" => flags.mutual_auth = true,
                _ => {}
            }
        }
        flags
    }
}

/// A SASL mechanism the service offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    /// Its name as the service spells it (`PLAIN`, `SCRAM-SHA-256`).
    pub name: String,
    pub flags: MechFlags,
}

impl Mechanism {
    /// Whether a front end may list it (IMAP `AUTH=`, POP3 `SASL`, ManageSieve `"SASL"`), by
    /// Dovecot's rule: never a private one, and a plaintext one only on a secured connection
    /// (TLS, or a trusted network) or where plaintext logins are allowed
    /// (`disable_plaintext_auth = no`).
    pub fn advertisable(&self, secured: bool, plaintext_allowed: bool) -> bool {
        !self.flags.private && (secured || plaintext_allowed || !self.flags.plaintext)
    }
}

/// The service's side of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// Its protocol version (`major` is always [`MAJOR_VERSION`]).
    pub version: (u32, u32),
    /// The mechanisms in the order announced.
    pub mechanisms: Vec<Mechanism>,
    /// The auth process's pid (`SPID`).
    pub server_pid: u32,
    /// This connection's id at the service (`CUID`).
    pub connect_uid: u32,
    /// This connection's cookie (`COOKIE`): what a login process hands to Dovecot's master to
    /// prove a login; a proxy does not need it.
    pub cookie: String,
}

impl Handshake {
    /// The mechanism called `name`, compared without case as Dovecot does.
    pub fn mechanism(&self, name: &str) -> Option<&Mechanism> {
        self.mechanisms
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }

    /// The mechanisms a front end may advertise (see [`Mechanism::advertisable`]).
    pub fn advertisable(
        &self,
        secured: bool,
        plaintext_allowed: bool,
    ) -> impl Iterator<Item = &Mechanism> {
        self.mechanisms
            .iter()
            .filter(move |m| m.advertisable(secured, plaintext_allowed))
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The service speaks another major version of the protocol.
    Version { major: u32, minor: u32 },
    /// The handshake was incomplete or out of order.
    Broken(&'static str),
}

/// Collects the service's handshake lines until `DONE`.
#[derive(Debug, Default)]
pub struct HandshakeBuilder {
    version: Option<(u32, u32)>,
    mechanisms: Vec<Mechanism>,
    server_pid: Option<u32>,
    connect_uid: Option<u32>,
    cookie: Option<String>,
}

impl HandshakeBuilder {
    /// Takes one line: `Ok(Some)` once `DONE` completes the handshake. Commands this client
    /// does not know are skipped, as the protocol allows.
    pub fn feed(&mut self, line: ServerLine) -> Result<Option<Handshake>, HandshakeError> {
        if self.version.is_none() && !matches!(line, ServerLine::Version { .. }) {
            return Err(HandshakeError::Broken(
                "the service did not begin with VERSION",
            ));
        }
        match line {
            ServerLine::Version { major, minor } => {
                if major != MAJOR_VERSION {
                    return Err(HandshakeError::Version { major, minor });
                }
                self.version = Some((major, minor));
            }
            ServerLine::Mech { name, flags } => self.mechanisms.push(Mechanism {
                name,
                flags: MechFlags::from_names(flags.iter().map(String::as_str)),
            }),
            ServerLine::Spid(pid) => self.server_pid = Some(pid),
            ServerLine::Cuid(uid) => self.connect_uid = Some(uid),
            ServerLine::Cookie(cookie) => {
                if self.cookie.replace(cookie).is_some() {
                    return Err(HandshakeError::Broken("the service sent two cookies"));
                }
            }
            ServerLine::Done => return self.finish().map(Some),
            ServerLine::Ok { .. } | ServerLine::Cont { .. } | ServerLine::Fail { .. } => {
                return Err(HandshakeError::Broken(
                    "the service answered a request before DONE",
                ))
            }
            ServerLine::Unknown(_) => {}
        }
        Ok(None)
    }

    fn finish(&mut self) -> Result<Handshake, HandshakeError> {
        if self.mechanisms.is_empty() {
            return Err(HandshakeError::Broken("the service offers no mechanism"));
        }
        let missing = HandshakeError::Broken;
        Ok(Handshake {
            version: self.version.ok_or(missing("no VERSION"))?,
            mechanisms: std::mem::take(&mut self.mechanisms),
            server_pid: self.server_pid.ok_or(missing("no SPID before DONE"))?,
            connect_uid: self.connect_uid.ok_or(missing("no CUID before DONE"))?,
            cookie: self.cookie.take().ok_or(missing("no COOKIE before DONE"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::parse_server_line;
    use super::*;

    /// What Dovecot 2.3.19 sent on a connection to `auth-client`.
    const DOVECOT_2_3: &str = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n\
        MECH\tCRAM-MD5\tdictionary\tactive\nMECH\tSCRAM-SHA-256\tmutual-auth\n\
        MECH\tAPOP\tprivate\tdictionary\tactive\nSPID\t6889\nCUID\t1\n\
        COOKIE\t97f98ef8ab6baad1ae90f0c6e9165b8f\nDONE";

    fn run(text: &str) -> Result<Option<Handshake>, HandshakeError> {
        let mut builder = HandshakeBuilder::default();
        let mut done = None;
        for line in text.split('\n') {
            let parsed = parse_server_line(line.as_bytes()).expect("parses");
            if let Some(h) = builder.feed(parsed)? {
                done = Some(h);
            }
        }
        Ok(done)
    }

    #[test]
    fn dovecots_handshake_lists_its_mechanisms_with_flags() {
        let h = run(DOVECOT_2_3).unwrap().unwrap();
        assert_eq!(h.version, (1, 2));
        assert_eq!((h.server_pid, h.connect_uid), (6889, 1));
        assert_eq!(h.cookie, "97f98ef8ab6baad1ae90f0c6e9165b8f");
        let names: Vec<&str> = h.mechanisms.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "APOP"]
        );
        let cram = h.mechanism("cram-md5").unwrap();
        assert!(cram.flags.dictionary && cram.flags.active && !cram.flags.plaintext);
        assert!(h.mechanism("scram-sha-256").unwrap().flags.mutual_auth);
        assert!(h.mechanism("GSSAPI").is_none());
    }

    #[test]
    fn advertised_mechanisms_follow_dovecots_rule() {
        let h = run(DOVECOT_2_3).unwrap().unwrap();
        let names = |secured, plaintext_allowed| -> Vec<String> {
            h.advertisable(secured, plaintext_allowed)
                .map(|m| m.name.clone())
                .collect()
        };
        // Private APOP never; plaintext PLAIN and LOGIN only when secured or allowed.
        assert_eq!(names(false, false), ["CRAM-MD5", "SCRAM-SHA-256"]);
        assert_eq!(
            names(true, false),
            ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
        );
        assert_eq!(names(false, true), names(true, false));
    }

    #[test]
    fn unknown_lines_and_flags_are_skipped() {
        let text = DOVECOT_2_3
            .replace("SPID", "FUTURE\tthing\nSPID")
            .replace("MECH\tPLAIN\tplaintext", "MECH\tPLAIN\tplaintext\tshiny");
        let h = run(&text).unwrap().unwrap();
        assert!(h.mechanism("PLAIN").unwrap().flags.plaintext);
    }

    #[test]
    fn another_major_version_is_refused() {
        assert_eq!(
            run("VERSION\t2\t0\nDONE"),
            Err(HandshakeError::Version { major: 2, minor: 0 })
        );
    }

    #[test]
    fn incomplete_or_disordered_handshakes_are_refused() {
        for text in [
            "MECH\tPLAIN\nVERSION\t1\t2",
            "VERSION\t1\t2\nSPID\t1\nCUID\t1\nCOOKIE\tc\nDONE",
            "VERSION\t1\t2\nMECH\tPLAIN\nCUID\t1\nCOOKIE\tc\nDONE",
            "VERSION\t1\t2\nMECH\tPLAIN\nSPID\t1\nCUID\t1\nDONE",
            "VERSION\t1\t2\nMECH\tPLAIN\nCOOKIE\ta\nCOOKIE\tb",
            "VERSION\t1\t2\nOK\t1\tuser=x",
        ] {
            assert!(
                matches!(run(text), Err(HandshakeError::Broken(_))),
                "{text:?}"
            );
        }
    }
}
