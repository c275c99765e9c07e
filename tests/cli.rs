//! The `director` binary as an operator runs it: `check-config` accepts good files and names
//! the field of bad ones, `route` prints the ring's backend, and `serve` serves real IMAP
//! logins to a Dovecot pool until SIGTERM, then exits 0.

mod support;

use std::fs;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use director::routing::ring::Ring;
use director::routing::user_hash::UserHash;
use support::client::imap_login;
use support::director::{config_yaml, DirectorOptions};
use support::dovecot::{user, Pool, PASSWORD};

const BIN: &str = env!("CARGO_BIN_EXE_director");

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

/// Runs `director ARGS` to completion.
fn director(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the director binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `director check-config -c PATH`: (exit code, stdout, stderr).
fn check_config(path: &Path) -> (Option<i32>, String, String) {
    let out = director(&["check-config", "-c", path.to_str().unwrap()]);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

const GOOD: &str = "\
trusted_networks: [127.0.0.0/8]
user_expire: 5m
listeners:
  - protocol: imap
    address: 127.0.0.1:1143
  - protocol: pop3
    address: 127.0.0.1:1110
backends:
  - host: 127.0.0.1
    weight: 100
  - host: 127.0.0.2
    weight: 0
";

#[test]
fn check_config_accepts_a_good_file() {
    let dir = scratch("good");
    let path = write(&dir, "good.yaml", GOOD);
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains(path.to_str().unwrap()), "{stdout}");
}

#[test]
fn check_config_accepts_the_shipped_example() {
    // Its backends (10.0.0.x) are not reachable: check-config only resolves them.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml.example");
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("OK (2 backends)"), "{stdout}");
}

#[test]
fn check_config_names_what_is_wrong() {
    let dir = scratch("bad");
    let cases = [
        (
            "unknown-key.yaml",
            format!("{GOOD}bogus: 1\n"),
            "bogus: unknown field `bogus`",
        ),
        (
            "unknown-backend-key.yaml",
            GOOD.replace("weight: 100", "wieght: 100"),
            "backends[0].wieght: unknown field `wieght`",
        ),
        (
            "weight.yaml",
            GOOD.replace("weight: 100", "weight: 1200"),
            "backends[0].weight: 1200 is above the maximum 1000",
        ),
        (
            "duration.yaml",
            GOOD.replace("user_expire: 5m", "user_expire: soon"),
            "user_expire: \"soon\" is not a duration",
        ),
        (
            "limit-duration.yaml",
            format!("{GOOD}limits:\n  preauth_timeout: 10 parsecs\n"),
            "limits.preauth_timeout: \"10 parsecs\" is not a duration",
        ),
        (
            // `.invalid` never resolves (RFC 6761); check-config resolves every host.
            "unresolvable.yaml",
            GOOD.replace("host: 127.0.0.2", "host: no-such-host.invalid"),
            "backends[1].host: backend host \"no-such-host.invalid\"",
        ),
    ];
    for (file, yaml, expected) in cases {
        let path = write(&dir, file, &yaml);
        let (code, stdout, stderr) = check_config(&path);
        assert!(
            code.is_some_and(|c| c != 0),
            "{file}: exit {code:?}\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert!(!stdout.contains("OK"), "{file}: {stdout}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
        assert!(
            stderr.contains(path.to_str().unwrap()),
            "{file}: the message should name the file: {stderr}"
        );
    }

    let missing = dir.join("no-such-config.yaml");
    let (code, stdout, stderr) = check_config(&missing);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {stdout}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
}

/// Parses `route`'s `USER\thash=H\tbackend=IP`.
fn route_line(stdout: &str) -> (String, u32, IpAddr) {
    let fields: Vec<&str> = stdout.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 3, "{stdout:?}");
    let hash = fields[1]
        .strip_prefix("hash=")
        .expect(stdout)
        .parse()
        .unwrap();
    let ip = fields[2]
        .strip_prefix("backend=")
        .expect(stdout)
        .parse()
        .unwrap();
    (fields[0].to_owned(), hash, ip)
}

#[test]
fn route_prints_the_rings_backend() {
    let dir = scratch("route");
    let backends = [("10.1.0.1", 100u32), ("10.1.0.2", 50), ("10.1.0.3", 200)];
    let mut yaml = String::from(
        "username_hash: \"%Ln\"\nlisteners: [{protocol: imap, address: 127.0.0.1:1143}]\nbackends:\n",
    );
    for (host, w) in backends {
        yaml += &format!("  - {{host: {host}, weight: {w}}}\n");
    }
    let path = write(&dir, "route.yaml", &yaml);
    let ring = Ring::build(backends.map(|(h, w)| (h.parse().unwrap(), w)));
    let hash = UserHash::new("%Ln").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        // %Ln: the domain is dropped and case ignored.
        let login = format!("User{i}@Example.ORG");
        let out = director(&["route", "-c", path.to_str().unwrap(), &login]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (who, h, ip) = route_line(&text(&out.stdout));
        assert_eq!(who, login);
        assert_eq!(h, hash.hash(&format!("user{i}")), "{login}");
        assert_eq!(Some(ip), ring.lookup(h), "{login}");
        seen.insert(ip);
    }
    assert_eq!(seen.len(), 3, "30 users should reach all three backends");

    // No backend takes new users: nothing to print, and a non-zero exit.
    let zero = write(
        &dir,
        "zero.yaml",
        &yaml
            .replace("weight: 100", "weight: 0")
            .replace("weight: 50", "weight: 0")
            .replace("weight: 200", "weight: 0"),
    );
    let out = director(&["route", "-c", zero.to_str().unwrap(), "user1"]);
    assert!(!out.status.success());
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("no backend"),
        "{}",
        text(&out.stderr)
    );
}

/// Ports that were free a moment ago (bound together, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Kills the child on drop unless it has been waited for, so a failed test leaves no server.
struct Server {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Server {
    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `within` for the process to exit.
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn serve_relays_a_login_and_stops_on_sigterm() {
    let pool = Pool::start(2);
    let dir = scratch("serve");
    // The test harness's configuration, with listeners on fixed ports.
    let mut yaml = config_yaml(&pool, &DirectorOptions::default());
    let ports = free_ports(yaml.matches("127.0.0.1:0").count());
    for p in &ports {
        yaml = yaml.replacen("127.0.0.1:0,", &format!("127.0.0.1:{p},"), 1);
    }
    assert!(!yaml.contains("127.0.0.1:0"), "{yaml}");
    let imap: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    assert!(yaml.contains(&format!("protocol: imap, address: {imap}, tls: starttls")));
    let path = write(&dir, "serve.yaml", &yaml);
    let config = path.to_str().unwrap();

    let stderr = dir.join("serve.stderr");
    let child = Command::new(BIN)
        .args(["serve", "-c", config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start director serve");
    let mut server = Server {
        child: Some(child),
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(imap).is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not listen on {imap}:\n{}",
            server.log()
        );
        assert!(
            server.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "serve exited:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // `route` over the same file predicts the backend; the login lands there.
    let u = user(5);
    let out = director(&["route", "-c", config, &u]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, _, ip) = route_line(&text(&out.stdout));
    let expected = pool.by_ip(ip).expect("a pool backend").name.clone();
    let (mut c, landed) = imap_login(imap, &u, PASSWORD);
    assert_eq!(landed, expected, "{}", server.log());
    let r = c.imap("a2", "SELECT INBOX");
    assert!(r.last().unwrap().starts_with("a2 OK"), "{r:?}");

    // SIGTERM with that session still open: the server exits 0, promptly.
    let pid = server.child.as_ref().unwrap().id();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = server.wait(Duration::from_secs(10));
    let log = server.log();
    let status = status.unwrap_or_else(|| panic!("serve still running 10 s after SIGTERM:\n{log}"));
    assert_eq!(status.code(), Some(0), "{status:?}\n{log}");
    // The log is a file here, as under systemd: plain `key=value`, which operators grep for,
    // with no terminal colour codes in between.
    assert!(log.contains("logged in"), "{log}");
    assert!(log.contains(&format!("user={u} ")), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log file:\n{log}");
    assert!(
        TcpStream::connect(imap).is_err(),
        "{imap} still accepts connections after exit"
    );
    drop(c);
}

#[test]
fn check_config_checks_the_admin_token_file_as_serve_does() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("token");
    let token = dir.join("token");
    let yaml = format!(
        "{}admin:\n  socket: {}\n  tcp:\n    address: 127.0.0.1:0\n    token_file: {}\n    allow_from: [127.0.0.0/8]\n",
        GOOD.replace("1143", "0").replace("1110", "0"),
        dir.join("admin.sock").display(),
        token.display()
    );
    let path = write(&dir, "admin.yaml", &yaml);
    let set = |text: Option<&str>, mode: u32| {
        let _ = fs::remove_file(&token);
        if let Some(text) = text {
            fs::write(&token, text).unwrap();
            fs::set_permissions(&token, fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    let long = "0123456789abcdef0123456789abcdef\n";
    for (what, content, mode, expected) in [
        (
            "readable by others",
            Some(long),
            0o644,
            "mode 0644 lets group or others",
        ),
        (
            "readable by the group",
            Some(long),
            0o640,
            "mode 0640 lets group or others",
        ),
        ("missing", None, 0, "cannot read"),
        ("empty", Some(""), 0o600, "shorter than 16 characters"),
    ] {
        set(content, mode);
        let (code, stdout, stderr) = check_config(&path);
        assert_eq!(code, Some(2), "{what}: stdout: {stdout}\nstderr: {stderr}");
        assert!(!stdout.contains("OK"), "{what}: {stdout}");
        let field = format!("admin.tcp.token_file: {}: ", token.display());
        assert!(
            stderr.contains(&field) && stderr.contains(expected),
            "{what}: {stderr}"
        );
        // serve refuses the same file with the same words.
        let out = director(&["serve", "-c", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{what}: serve started");
        let serve_err = text(&out.stderr);
        assert!(
            serve_err.contains(&field) && serve_err.contains(expected),
            "{what}: serve said {serve_err}"
        );
    }
    set(Some(long), 0o600);
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
}
