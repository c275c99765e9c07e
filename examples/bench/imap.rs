//! The benchmark's IMAP client: blocking, one command at a time, panics on anything
//! unexpected (a benchmark that goes wrong must stop, not report figures).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct Imap {
    pub r: BufReader<TcpStream>,
    pub w: TcpStream,
}

impl Imap {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> Imap {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Imap {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let g = c.line();
        assert!(g.starts_with("* OK"), "greeting {g}");
        c
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }

    /// Sends `tag c` and returns the tagged reply.
    pub fn cmd(&mut self, tag: &str, c: &str) -> String {
        write!(self.w, "{tag} {c}\r\n").unwrap();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "closed during {c}");
            if l.starts_with(&format!("{tag} ")) {
                return l;
            }
        }
    }

    /// `LOGIN user` with the pool's password; panics unless it succeeds.
    pub fn login(&mut self, user: &str) {
        if let Err(r) = self.try_login(user) {
            panic!("{r}");
        }
    }

    /// `LOGIN user` with the pool's password; the tagged answer unless it is `OK`.
    pub fn try_login(&mut self, user: &str) -> Result<(), String> {
        let r = self.cmd("a", &format!("LOGIN {user} {}", crate::dovecot::PASSWORD));
        if r.starts_with("a OK") {
            Ok(())
        } else {
            Err(r)
        }
    }
}
