//! The `director` binary as an operator runs it: `check-config` accepts good files and names
//! the field of bad ones, `route` prints the ring's backend, and `serve` serves real IMAP
//! logins to a Dovecot pool until SIGTERM, then exits 0.

mod support;

use std::fs;
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use director::routing::ring::Ring;
use director::routing::user_hash::UserHash;
use support::client::imap_login;
use support::command::{run, Ran};
use support::director::{config_yaml, DirectorOptions};
use support::dovecot::{user, Pool, PASSWORD};
use support::ports::local;
use support::serve::{fixed_ports, scratch, Serve, BIN};

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

/// Runs `director ARGS` to completion.
fn director(args: &[&str]) -> Ran {
    run(Command::new(BIN).args(args), None).expect("run the director binary")
}

/// `director check-config -c PATH`: (exit code, stdout, stderr).
fn check_config(path: &Path) -> (Option<i32>, String, String) {
    let out = director(&["check-config", "-c", path.to_str().unwrap()]);
    (out.code, out.stdout, out.stderr)
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
    let dir = scratch("cli", "good");
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
    assert!(stdout.contains("mode: single director"), "{stdout}");
}

#[test]
fn check_config_says_the_mode_and_checks_the_cluster_section() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("cli", "cluster");
    let (code, stdout, stderr) = check_config(&write(&dir, "single.yaml", GOOD));
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("mode: single director: no state_file"),
        "{stdout}"
    );

    let cluster = format!(
        "{GOOD}cluster:\n  director_id: director1\n  etcd:\n    endpoints: [http://127.0.0.1:2379, http://127.0.0.2:2379]\n"
    );
    // etcd is not contacted: nothing listens on these ports.
    let (code, stdout, stderr) = check_config(&write(&dir, "cluster.yaml", &cluster));
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("mode: cluster: director_id director1, state in etcd http://127.0.0.1:2379 http://127.0.0.2:2379 under /director/"),
        "{stdout}"
    );

    let password = dir.join("etcd.password");
    fs::write(&password, "s3cret\n").unwrap();
    fs::set_permissions(&password, fs::Permissions::from_mode(0o644)).unwrap();
    let missing_ca = dir.join("no-such-ca.pem");
    let cases = [
        (
            "state-file.yaml",
            format!(
                "{cluster}state_file: {}\n",
                dir.join("state.yaml").display()
            ),
            "state_file: not used with cluster: etcd holds the state; remove it".to_owned(),
        ),
        (
            "timeout.yaml",
            format!("{cluster}  move_timeout: 5s\n"),
            "cluster.move_timeout: must be longer than cluster.lease_ttl (10s)".to_owned(),
        ),
        (
            "endpoint.yaml",
            cluster.replace("http://127.0.0.2:2379", "127.0.0.2:2379"),
            "cluster.etcd.endpoints[1]: \"127.0.0.2:2379\" is not http://host:port".to_owned(),
        ),
        (
            "password.yaml",
            format!(
                "{cluster}    user: director\n    password_file: {}\n",
                password.display()
            ),
            format!(
                "cluster.etcd.password_file: {}: mode 0644 lets group or others",
                password.display()
            ),
        ),
        (
            "ca.yaml",
            format!(
                "{}    ca_file: {}\n",
                cluster.replace("http://", "https://"),
                missing_ca.display()
            ),
            format!(
                "cluster.etcd.ca_file: {}: cannot read",
                missing_ca.display()
            ),
        ),
    ];
    for (file, yaml, expected) in cases {
        let path = write(&dir, file, &yaml);
        let (code, stdout, stderr) = check_config(&path);
        assert_eq!(code, Some(2), "{file}: stdout: {stdout}\nstderr: {stderr}");
        assert!(!stdout.contains("OK"), "{file}: {stdout}");
        assert!(stderr.contains(&expected), "{file}: {stderr}");
    }
    fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).unwrap();
    let yaml = format!(
        "{cluster}    user: director\n    password_file: {}\n",
        password.display()
    );
    let (code, stdout, stderr) = check_config(&write(&dir, "password-ok.yaml", &yaml));
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn check_config_names_what_is_wrong() {
    let dir = scratch("cli", "bad");
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
    let dir = scratch("cli", "route");
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
        assert!(out.ok, "{}", out.stderr);
        let (who, h, ip) = route_line(&out.stdout);
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
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("no backend"), "{}", out.stderr);
}

#[test]
fn serve_relays_a_login_and_stops_on_sigterm() {
    let pool = Pool::start(2);
    let dir = scratch("cli", "serve");
    // The test harness's configuration, with listeners on fixed ports.
    let (yaml, ports) = fixed_ports(&config_yaml(&pool, &DirectorOptions::default()));
    assert!(!yaml.contains("127.0.0.1:0"), "{yaml}");
    let imap = local(ports[0]);
    assert!(yaml.contains(&format!("protocol: imap, address: {imap}, tls: starttls")));
    let mut server = Serve::start(&dir, &yaml, imap);
    let config = server.config.to_str().unwrap().to_owned();
    let config = config.as_str();

    // `route` over the same file predicts the backend; the login lands there.
    let u = user(5);
    let out = director(&["route", "-c", config, &u]);
    assert!(out.ok, "{}", out.stderr);
    let (_, _, ip) = route_line(&out.stdout);
    let expected = pool.by_ip(ip).expect("a pool backend").name.clone();
    let (mut c, landed) = imap_login(imap, &u, PASSWORD);
    assert_eq!(landed, expected, "{}", server.log());
    c.imap_ok("a2", "SELECT INBOX");

    // SIGTERM with that session still open: the server exits 0, promptly.
    server.signal("TERM");
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
    let dir = scratch("cli", "token");
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
        assert!(!out.ok, "{what}: serve started");
        let serve_err = out.stderr;
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
