//! The director under benchmark: the release binary next to the example, run as its own
//! process (`director serve -c FILE`) so that its CPU and memory are its own.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running director; dropping it kills it (also when the benchmark panics).
pub struct DirectorProcess(Child);

impl DirectorProcess {
    /// Writes `yaml` to `config` and starts the director with it; returns once `listening`
    /// accepts connections.
    pub fn start(config: &Path, yaml: &str, listening: SocketAddr) -> DirectorProcess {
        std::fs::write(config, yaml).unwrap();
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .and_then(|p| p.parent())
            .unwrap()
            .join("director");
        let child = Command::new(&bin)
            .args(["serve", "-c"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let process = DirectorProcess(child);
        crate::wait::wait_for("the director to listen", Duration::from_secs(20), || {
            TcpStream::connect(listening).is_ok()
        });
        process
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for DirectorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
