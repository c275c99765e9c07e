//! The mail protocols by name: what a listener speaks and which port a backend has for each.
//! A value of the configuration file that the whole program uses (front ends, backends,
//! sessions, metrics labels); `protocol::decision` re-exports it.

use std::fmt;

/// The mail protocols the director serves. Each has its own front end and backend login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Imap,
    Pop3,
    Lmtp,
    Sieve,
}

impl Protocol {
    /// Lower-case name used in configuration, logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Lmtp => "lmtp",
            Protocol::Sieve => "sieve",
        }
    }

    /// The port a backend listens on for this protocol unless configured otherwise.
    pub fn default_backend_port(self) -> u16 {
        match self {
            Protocol::Imap => 143,
            Protocol::Pop3 => 110,
            Protocol::Lmtp => 24,
            Protocol::Sieve => 4190,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
