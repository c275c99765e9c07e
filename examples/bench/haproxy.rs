//! Debian's HAProxy as the benchmark's reference proxy: TCP mode, round robin over the same
//! backends as the director, no health checks, no logging, `option splice-auto` (its bulk
//! relay at its best: splice(2) when a transfer is large), run in the foreground (`-db`) as
//! one process (its threads included in its `/proc/PID/stat`). It parses nothing and routes
//! no user: the cost of a generic proxy that the director is measured against.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Connections HAProxy takes: two descriptors each must fit in this machine's 20,000 per
/// process with its splice pipes (`maxpipes`) beside them (it refuses to start when it
/// cannot raise its limit to what maxconn and maxpipes need).
pub const MAXCONN: usize = 9_300;

/// A running HAProxy; dropping it kills it.
pub struct Haproxy {
    child: Child,
}

impl Haproxy {
    /// Writes a config to `dir/haproxy.cfg` for a listener on `listen` in front of
    /// `backends`, starts HAProxy and returns once `listen` accepts connections.
    pub fn start(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Haproxy {
        let mut servers = String::new();
        for (i, b) in backends.iter().enumerate() {
            servers += &format!("  server b{i} {b}\n");
        }
        let config = dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n  maxconn {MAXCONN}\n  maxpipes 256\n  ulimit-n 19900\n\
                 defaults\n  mode tcp\n  option splice-auto\n  maxconn {MAXCONN}\n  timeout connect 5s\n  \
                 timeout client 1h\n  timeout server 1h\n\
                 listen imap\n  bind {listen}\n  balance roundrobin\n{servers}"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = crate::measure::wrapped(binary())
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start haproxy (scripts/install-deps installs it): {e}"));
        let mut h = Haproxy { child };
        // Generous: under valgrind (`scripts/bench callgrind`) it starts in seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(listen).is_err() {
            if let Some(status) = h.child.try_wait().unwrap() {
                let said = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
                panic!("haproxy exited ({status}) before listening:\n{said}");
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it and waits until it is gone (its port free again).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `haproxy` on the PATH or in /usr/sbin (not on every user's PATH).
fn binary() -> String {
    if Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy".into()
    } else {
        "haproxy".into()
    }
}
