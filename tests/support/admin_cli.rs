//! The `director` binary's admin verbs (`status`, `move`, `kick`, `import`...) run against a
//! director under test, which they reach through the admin socket its configuration names.

#![allow(dead_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::command::{run, Ran};
use super::director::TestDirector;
use super::serve::BIN;

/// The CLI over one configuration file.
pub struct AdminCli {
    pub config: PathBuf,
    /// Whether the file is this CLI's own copy (made by [`AdminCli::of`]), removed with it.
    owned: bool,
}

impl AdminCli {
    /// Writes `d`'s configuration to a file of its own for the CLI.
    pub fn of(d: &TestDirector) -> AdminCli {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let config = std::env::temp_dir().join(format!(
            "director-admin-test-{}-{}.yaml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config, &d.yaml).unwrap();
        AdminCli {
            config,
            owned: true,
        }
    }

    /// The CLI over a director's own configuration file (left in place when dropped).
    pub fn over(config: PathBuf) -> AdminCli {
        AdminCli {
            config,
            owned: false,
        }
    }

    /// Runs `director -c CONFIG ARGS...` with `stdin` as its input.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Ran {
        let mut cmd = Command::new(BIN);
        cmd.arg("-c").arg(&self.config).args(args);
        run(&mut cmd, stdin.map(str::as_bytes)).expect("run director")
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args, None);
        assert!(
            r.ok,
            "director {args:?} failed:\n{}\n{}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    /// Runs a verb (with `stdin`) that must fail and say `reason` on stderr.
    pub fn fails(&self, args: &[&str], stdin: Option<&str>, reason: &str) {
        let r = self.run(args, stdin);
        assert!(!r.ok && r.stderr.contains(reason), "{}", r.stderr);
    }

    /// Runs a verb with `--json` that must succeed; returns what it printed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// The `status --json` entry of backend `ip`.
    pub fn backend_status(&self, ip: IpAddr) -> serde_json::Value {
        let s = self.json(&["status"]);
        s["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["ip"] == ip.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("{ip} not in status: {s}"))
    }
}

/// A copy made by [`AdminCli::of`] is removed with it.
impl Drop for AdminCli {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.config);
        }
    }
}
