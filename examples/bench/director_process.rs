//! The director under benchmark: the release binary next to the example, run as its own
//! process (`director serve -c FILE`) so that its CPU and memory are its own; and its admin
//! verbs (`director -c FILE VERB...`), run with the same binary.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a director may take to listen (under valgrind, `scripts/bench callgrind`, it
/// takes seconds).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running director; dropping it kills it (also when the benchmark panics).
pub struct DirectorProcess {
    child: Child,
    /// Its configuration file (the admin verbs read the admin socket from it).
    config: PathBuf,
}

/// The `director` binary of this build.
fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("director")
}

impl DirectorProcess {
    /// Writes `yaml` to `config` and starts the director with it; returns once `listening`
    /// accepts connections.
    pub fn start(config: &Path, yaml: &str, listening: SocketAddr) -> DirectorProcess {
        Self::try_start(config, yaml, listening, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`DirectorProcess::start`] with the director's log (stderr) in `log` rather than the
    /// benchmark's stderr; an error with the log when the director exits before it listens.
    pub fn try_start(
        config: &Path,
        yaml: &str,
        listening: SocketAddr,
        log: Option<&Path>,
    ) -> Result<DirectorProcess, String> {
        Self::start_at(config, yaml, listening, log, "warn")
    }

    /// [`DirectorProcess::start`] logging at `level` (`RUST_LOG`) into `log`, as deployed.
    pub fn start_logging(
        config: &Path,
        yaml: &str,
        listening: SocketAddr,
        log: &Path,
        level: &str,
    ) -> DirectorProcess {
        Self::start_at(config, yaml, listening, Some(log), level).unwrap_or_else(|e| panic!("{e}"))
    }

    fn start_at(
        config: &Path,
        yaml: &str,
        listening: SocketAddr,
        log: Option<&Path>,
        level: &str,
    ) -> Result<DirectorProcess, String> {
        std::fs::write(config, yaml).unwrap();
        let bin = binary();
        let stderr = match log {
            Some(path) => Stdio::from(File::create(path).unwrap()),
            None => Stdio::inherit(),
        };
        let child = crate::measure::wrapped(&bin)
            .args(["serve", "-c"])
            .arg(config)
            .env("RUST_LOG", level)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut process = DirectorProcess {
            child,
            config: config.to_owned(),
        };
        let deadline = Instant::now() + START_DEADLINE;
        while TcpStream::connect(listening).is_err() {
            if let Some(status) = process.child.try_wait().unwrap() {
                let said = log
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                return Err(format!(
                    "the director exited ({status}) before listening:\n{said}"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the director did not listen within {START_DEADLINE:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL, as a crash would: no clean leave.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs admin verb `args` against it (`--json` added); the parsed output, or the error
    /// `director` printed.
    pub fn admin(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "director {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("director {args:?}: {e}"))
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        self.admin(&["status"]).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for DirectorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
