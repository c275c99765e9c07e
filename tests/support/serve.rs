//! A `director serve` process, as an operator runs it: started from a configuration file
//! with listeners on fixed ports, waited for until it listens, signalled, reloaded, killed
//! with SIGKILL and started again on the same file, and killed on drop unless it has exited.

#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::command::run;
use super::ports::free_ports;

/// The `director` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_director");

/// A fresh directory `<suite>-<pid>-<test>` for one test's files.
pub fn scratch(suite: &str, test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{suite}-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `yaml` with its `127.0.0.1:0` addresses given `ports`, in order.
pub fn with_ports(yaml: &str, ports: &[u16]) -> String {
    let mut yaml = yaml.to_owned();
    for p in ports {
        yaml = yaml.replacen("127.0.0.1:0", &format!("127.0.0.1:{p}"), 1);
    }
    yaml
}

/// `yaml` with every `127.0.0.1:0` given a port that was free a moment ago, and those ports
/// in order.
pub fn fixed_ports(yaml: &str) -> (String, Vec<u16>) {
    let ports = free_ports(yaml.matches("127.0.0.1:0").count());
    (with_ports(yaml, &ports), ports)
}

/// A running `director serve`.
pub struct Serve {
    child: Option<Child>,
    stderr: PathBuf,
    /// Its configuration file (`dir/director.yaml`).
    pub config: PathBuf,
    /// Variables added to its environment, again at every restart.
    env: Vec<(String, String)>,
}

impl Serve {
    /// Writes `yaml` to `dir/director.yaml`, starts `director serve` on it (its log in
    /// `dir/serve.stderr`) and waits up to 20 s until `listening` accepts connections.
    pub fn start(dir: &Path, yaml: &str, listening: SocketAddr) -> Serve {
        Self::start_with_env(dir, yaml, listening, &[])
    }

    /// [`Serve::start`] with `env` added to the process's environment.
    pub fn start_with_env(
        dir: &Path,
        yaml: &str,
        listening: SocketAddr,
        env: &[(&str, &str)],
    ) -> Serve {
        let mut s = Serve::prepare(dir, yaml, env);
        s.try_start(listening).unwrap_or_else(|e| panic!("{e}"));
        s
    }

    /// Writes `yaml` to `dir/director.yaml` for a process with `env` added to its
    /// environment, not started yet ([`Serve::try_start`]).
    pub fn prepare(dir: &Path, yaml: &str, env: &[(&str, &str)]) -> Serve {
        let config = dir.join("director.yaml");
        fs::write(&config, yaml).unwrap();
        Serve {
            child: None,
            stderr: dir.join("serve.stderr"),
            config,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// Spawns the process on its configuration file (its log appended to, so that a
    /// restart keeps what the previous run said) and waits until `listening` accepts
    /// connections. `Err` with its log when it exits first; panics when it does not listen
    /// within 20 s.
    pub fn try_start(&mut self, listening: SocketAddr) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "-c", self.config.to_str().unwrap()])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start director serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(listening).is_err() {
            assert!(
                Instant::now() < deadline,
                "serve did not listen on {listening}:\n{}",
                self.log()
            );
            if !self.running() {
                self.child = None;
                return Err(format!("serve exited:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the process with SIGKILL (no clean stop: its sessions, lease and admin socket
    /// are left as a crash leaves them) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same configuration file and environment (after
    /// [`Serve::kill`], or after it exited) and waits until `listening` accepts connections.
    pub fn restart(&mut self, listening: SocketAddr) {
        assert!(!self.running(), "serve still runs: kill it first");
        self.try_start(listening).unwrap_or_else(|e| panic!("{e}"));
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether the process runs (false once killed or exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// `kill -SIG` to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes a new configuration file and runs `director reload`: (success, output).
    pub fn reload(&self, yaml: &str) -> (bool, String) {
        fs::write(&self.config, yaml).unwrap();
        let out = run(
            Command::new(BIN).args(["-c", self.config.to_str().unwrap(), "reload"]),
            None,
        )
        .unwrap();
        (out.ok, out.text())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
