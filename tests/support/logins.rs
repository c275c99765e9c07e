//! Logins in a loop, as a crowd of users would make them, for tests that change things under
//! them (a backend killed or hung, an attack going on): each login is timed and what the client
//! saw is kept, so a test can count client-visible failures.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::quote;
use super::dovecot::PASSWORD;

/// One IMAP login through the director that never panics: `Ok(backend name)` or what the
/// client saw go wrong.
pub fn try_login(addr: SocketAddr, u: &str) -> Result<String, String> {
    let s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let read = |r: &mut BufReader<TcpStream>, line: &mut String| {
        line.clear();
        r.read_line(line).map_err(|e| format!("read: {e}"))?;
        if line.is_empty() {
            return Err("closed".to_string());
        }
        Ok(())
    };
    read(&mut r, &mut line)?;
    if !line.starts_with("* OK") {
        return Err(format!("greeting {line:?}"));
    }
    write!(
        w,
        "a LOGIN {} {}\r\nb ID NIL\r\n",
        quote(u),
        quote(PASSWORD)
    )
    .map_err(|e| format!("write: {e}"))?;
    loop {
        read(&mut r, &mut line)?;
        if line.starts_with("a ") {
            if !line.starts_with("a OK") {
                return Err(format!("{u}: {}", line.trim_end()));
            }
            break;
        }
    }
    let mut backend = String::from("?");
    loop {
        // The login succeeded: whatever happens later is not a failed login.
        if read(&mut r, &mut line).is_err() {
            return Ok(backend);
        }
        if let Some(i) = line.find("\"x-backend\" \"") {
            backend = line[i + 13..].split('"').next().unwrap_or("?").to_owned();
        }
        if line.starts_with("b ") {
            let _ = w.write_all(b"c LOGOUT\r\n");
            return Ok(backend);
        }
    }
}

/// One login of a [`LoginLoop`]: when it started and ended, and what the client saw.
pub type Timed = (Instant, Instant, Result<String, String>);

/// Logins in a loop on a thread until stopped.
pub struct LoginLoop {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Timed>>,
}

impl LoginLoop {
    pub fn start(addr: SocketAddr, users: Vec<String>) -> LoginLoop {
        Self::start_paced(addr, users, Duration::ZERO)
    }

    /// Like [`LoginLoop::start`], with a pause after each login.
    pub fn start_paced(addr: SocketAddr, users: Vec<String>, pause: Duration) -> LoginLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            'outer: loop {
                for u in &users {
                    if s.load(Ordering::Relaxed) {
                        break 'outer;
                    }
                    let t = Instant::now();
                    let r = try_login(addr, u);
                    out.push((t, Instant::now(), r));
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
            }
            out
        });
        LoginLoop { stop, thread }
    }

    pub fn finish(self) -> Vec<Timed> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
