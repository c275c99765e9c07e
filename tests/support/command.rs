//! Running the command-line programs the tests drive (curl, swaks, promtool, sieve-connect,
//! the `director` binary itself) to their end, and keeping what they said.

#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// How a program ended and what it wrote.
#[derive(Debug)]
pub struct Ran {
    /// Whether it exited 0.
    pub ok: bool,
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Standard output, then standard error: the whole text, for a search or a message.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to its end with `input` on its standard input (`None`: nothing to read).
pub fn run(cmd: &mut Command, input: Option<&[u8]>) -> std::io::Result<Ran> {
    let out = match input {
        None => cmd.stdin(Stdio::null()).output()?,
        Some(bytes) => {
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()?
        }
    };
    Ok(ran(&out))
}

/// What a finished program's [`Output`] says.
pub fn ran(out: &Output) -> Ran {
    Ran {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `openssl ARGS...` in `dir` (certificates and keys for a test); panics with its
/// stderr unless it succeeds.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = run(Command::new("openssl").args(args).current_dir(dir), None).expect("run openssl");
    assert!(out.ok, "openssl {args:?}: {}", out.stderr);
}
