//! Reload (SIGHUP, `director reload`) and graceful stop (SIGTERM) of a real `director serve`
//! process over real Dovecot backends: live IMAP, POP3 and LMTP sessions survive a reload;
//! listeners come and go; a renewed certificate is used by new handshakes; a broken file is
//! refused with the running configuration kept; SIGTERM says goodbye, gives relayed sessions
//! their grace, logs their end and exits 0; a second SIGTERM exits at once.

mod support;

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::client::{imap_login, pop3_login, Conn};
use support::director::{config_yaml, DirectorOptions};
use support::dovecot::{user, Pool, PASSWORD};
use support::logs::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_director");

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("reload-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
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

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The listeners of the test configuration, on fixed ports: IMAP (STARTTLS), IMAPS, POP3
/// (STLS), POP3S, ManageSieve, then LMTP.
struct Ports {
    imap: u16,
    imaps: u16,
    pop3: u16,
    lmtp: u16,
}

/// The test harness's configuration with fixed ports, an LMTP listener and `extra` added.
fn config(pool: &Pool, extra: &str) -> (String, Ports) {
    let o = DirectorOptions {
        extra: extra.to_owned(),
        ..DirectorOptions::default()
    };
    let mut yaml = config_yaml(pool, &o);
    yaml = yaml.replacen(
        "listeners:\n",
        "listeners:\n  - {protocol: lmtp, address: 127.0.0.1:0}\n",
        1,
    );
    let ports = free_ports(yaml.matches("127.0.0.1:0").count());
    for p in &ports {
        yaml = yaml.replacen("127.0.0.1:0", &format!("127.0.0.1:{p}"), 1);
    }
    // In order: lmtp, imap, imaps, pop3, pop3s, sieve.
    let p = Ports {
        lmtp: ports[0],
        imap: ports[1],
        imaps: ports[2],
        pop3: ports[3],
    };
    (yaml, p)
}

/// A `director serve` process; killed on drop unless it has exited.
struct Serve {
    child: Option<Child>,
    stderr: PathBuf,
    config: PathBuf,
}

impl Serve {
    fn start(dir: &Path, yaml: &str, wait_for: SocketAddr) -> Serve {
        let config = dir.join("director.yaml");
        fs::write(&config, yaml).unwrap();
        let stderr = dir.join("serve.stderr");
        let child = Command::new(BIN)
            .args(["serve", "-c", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start director serve");
        let mut s = Serve {
            child: Some(child),
            stderr,
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(wait_for).is_err() {
            assert!(
                Instant::now() < deadline,
                "serve did not listen:\n{}",
                s.log()
            );
            assert!(s.running(), "serve exited:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits up to `within` for the process to exit.
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
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
    fn reload(&self, yaml: &str) -> (bool, String) {
        fs::write(&self.config, yaml).unwrap();
        let out = Command::new(BIN)
            .args(["-c", self.config.to_str().unwrap(), "reload"])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
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

/// The greeting a new connection to `port` gets.
fn greeting(port: u16) -> String {
    Conn::connect(addr(port)).line()
}

/// A new self-signed certificate and key for `localhost` / 127.0.0.1 with common name `cn`.
fn new_cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The subject of the certificate a TLS handshake with `port` shows.
fn served_subject(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject in:\n{text}"))
        .to_owned()
}

/// Reads LMTP reply lines up to the last one of a reply (`250 ...`, not `250-...`).
fn lmtp_reply(c: &mut Conn) -> String {
    loop {
        let l = c.line();
        if l.len() < 4 || l.as_bytes()[3] == b' ' {
            return l;
        }
    }
}

#[test]
fn reload_keeps_sessions_and_applies_listeners_cert_and_refuses_broken_files() {
    let pool = Pool::start(2);
    let dir = scratch("reload");
    let (yaml, ports) = config(&pool, "");
    let mut serve = Serve::start(&dir, &yaml, addr(ports.imap));
    let before = served_subject(ports.imaps);

    // Live sessions: IMAP logged in and relayed, POP3 logged in, an LMTP transaction mid-way.
    let (u_imap, u_pop, u_lmtp) = (user(1), user(2), user(3));
    let (mut imap, _) = imap_login(addr(ports.imap), &u_imap, PASSWORD);
    let r = imap.imap("a2", "SELECT INBOX");
    assert!(r.last().unwrap().starts_with("a2 OK"), "{r:?}");
    let mut pop = pop3_login(addr(ports.pop3), &u_pop, PASSWORD);
    assert!(pop.pop3("STAT").starts_with("+OK"));
    let mut lmtp = Conn::connect(addr(ports.lmtp));
    assert!(lmtp.line().starts_with("220 "));
    lmtp.send(b"LHLO mta.test\r\n");
    assert!(lmtp_reply(&mut lmtp).starts_with("250 "));
    lmtp.send(b"MAIL FROM:<sender@example.org>\r\n");
    assert!(lmtp_reply(&mut lmtp).starts_with("250 "));
    lmtp.send(format!("RCPT TO:<{u_lmtp}>\r\n").as_bytes());
    let r = lmtp_reply(&mut lmtp);
    assert!(r.starts_with("250 "), "{r}\n{}", serve.log());

    // The new file: a new greeting, the plain POP3 listener removed (its session is live),
    // a new IMAP listener, a new certificate.
    let (cert, key) = new_cert(&dir, "reloaded.test");
    let new_port = free_ports(1)[0];
    let pop3_line = format!(
        "  - {{protocol: pop3, address: 127.0.0.1:{}, tls: starttls, proxy_protocol: false}}\n",
        ports.pop3
    );
    assert!(yaml.contains(&pop3_line), "{yaml}");
    let reloaded =
        yaml.replace(
            &pop3_line,
            &format!("  - {{protocol: imap, address: 127.0.0.1:{new_port}}}\n"),
        )
        .replace(
            &pool.tls.cert.display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &pool.tls.key.display().to_string(),
            &key.display().to_string(),
        ) + "greeting: Reloaded ready.\nlog_level: debug\n";
    let (ok, out) = serve.reload(&reloaded);
    assert!(ok, "reload failed: {out}\n{}", serve.log());
    assert!(
        out.contains("listeners: 5 kept, 1 added, 0 changed, 1 removed"),
        "{out}"
    );

    // Every live session still works.
    let r = imap.imap("a3", "NOOP");
    assert!(r.last().unwrap().starts_with("a3 OK"), "{r:?}");
    let r = imap.imap("a4", "STATUS INBOX (MESSAGES)");
    assert!(r.last().unwrap().starts_with("a4 OK"), "{r:?}");
    assert!(pop.pop3("STAT").starts_with("+OK"), "{}", serve.log());
    assert!(pop.pop3("NOOP").starts_with("+OK"));
    lmtp.send(b"DATA\r\n");
    assert!(lmtp_reply(&mut lmtp).starts_with("354"));
    lmtp.send(b"Subject: reload\r\n\r\ndelivered across a reload\r\n.\r\n");
    let r = lmtp_reply(&mut lmtp);
    assert!(r.starts_with("250 "), "{r}\n{}", serve.log());
    lmtp.send(b"QUIT\r\n");
    wait_until(
        "the LMTP message in the mailbox",
        Duration::from_secs(10),
        || {
            pool.inbox_contents(&u_lmtp)
                .into_iter()
                .find(|m| m.contains("delivered across a reload"))
        },
    );

    // The new listener answers with the new greeting; the removed one refuses connections.
    assert!(
        greeting(new_port).contains("Reloaded ready."),
        "{}",
        serve.log()
    );
    assert!(greeting(ports.imap).contains("Reloaded ready."));
    assert!(
        TcpStream::connect(addr(ports.pop3)).is_err(),
        "removed listener still accepts"
    );
    // New handshakes see the new certificate.
    let after = served_subject(ports.imaps);
    assert!(
        after.contains("reloaded.test"),
        "{after} (before: {before})"
    );
    assert!(!before.contains("reloaded.test"), "{before}");
    // The new log level is in force.
    wait_until("a debug line", Duration::from_secs(5), || {
        serve.log().contains(" DEBUG ").then_some(())
    });

    // Broken files are refused, each with its reason; the running configuration stays. A
    // file that does not parse or check is refused by the CLI itself (it cannot even find
    // the admin socket in it); the others by the director, which logs one line each.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    let not_checked = reloaded.replace("limits:\n", "limits:\n  max_connections: 0\n");
    let broken = [
        (not_checked.clone(), "limits.max_connections", false),
        ("listeners: [oops\n".to_owned(), "director.yaml", false),
        (
            reloaded.replace(&key.display().to_string(), "/nonexistent/key.pem"),
            "tls:",
            true,
        ),
        (
            reloaded.replace(
                &format!("127.0.0.1:{new_port}"),
                &format!("127.0.0.1:{taken}"),
            ),
            "cannot listen on",
            true,
        ),
    ];
    for (text, reason, by_director) in &broken {
        let (ok, out) = serve.reload(text);
        assert!(!ok, "a broken file was accepted:\n{text}");
        assert!(out.contains(reason), "{reason} not in {out}");
        assert!(out.contains("refused"), "{out}");
        if *by_director {
            assert!(out.contains("running one stays in force"), "{out}");
        }
        assert!(greeting(ports.imap).contains("Reloaded ready."));
        assert!(greeting(new_port).contains("Reloaded ready."));
    }
    // SIGHUP with a file that does not check: the director refuses it.
    fs::write(&serve.config, &not_checked).unwrap();
    serve.signal("HUP");
    wait_until("the SIGHUP refusal", Duration::from_secs(10), || {
        serve
            .log()
            .lines()
            .any(|l| {
                l.contains("configuration reload refused") && l.contains("limits.max_connections")
            })
            .then_some(())
    });
    assert!(greeting(ports.imap).contains("Reloaded ready."));
    let refusals: Vec<String> = serve
        .log()
        .lines()
        .filter(|l| l.contains("configuration reload refused"))
        .map(str::to_owned)
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    assert!(refusals[0].contains("tls:"), "{refusals:#?}");
    assert!(refusals[1].contains("cannot listen on"), "{refusals:#?}");
    drop(held);

    // SIGHUP reloads (and does not kill).
    fs::write(
        &serve.config,
        reloaded.replace("Reloaded ready.", "Hup ready."),
    )
    .unwrap();
    serve.signal("HUP");
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        greeting(ports.imap).contains("Hup ready.").then_some(())
    });
    assert!(serve.running(), "{}", serve.log());
    assert!(serve.log().contains("SIGHUP"), "{}", serve.log());
    let r = imap.imap("a5", "NOOP");
    assert!(r.last().unwrap().starts_with("a5 OK"), "{r:?}");
}

#[test]
fn sigterm_says_goodbye_gives_the_grace_and_exits_0() {
    let pool = Pool::start(1);
    let dir = scratch("sigterm");
    let (yaml, ports) = config(&pool, "shutdown_grace: 2s\n");
    let mut serve = Serve::start(&dir, &yaml, addr(ports.imap));

    let u = user(4);
    let (mut relayed, _) = imap_login(addr(ports.imap), &u, PASSWORD);
    let r = relayed.imap("a2", "SELECT INBOX");
    assert!(r.last().unwrap().starts_with("a2 OK"), "{r:?}");
    let mut preauth_imap = Conn::connect(addr(ports.imap));
    assert!(preauth_imap.line().starts_with("* OK"));
    let mut preauth_pop = Conn::connect(addr(ports.pop3));
    assert!(preauth_pop.line().starts_with("+OK"));
    let mut idle_lmtp = Conn::connect(addr(ports.lmtp));
    assert!(idle_lmtp.line().starts_with("220 "));

    serve.signal("TERM");
    // Clients not logged in are sent away at once, in their protocol.
    assert_eq!(preauth_imap.line(), "* BYE Server shutting down.");
    assert!(preauth_imap.ended());
    assert_eq!(preauth_pop.line(), "-ERR Server shutting down.");
    let l = idle_lmtp.line();
    assert!(l.starts_with("421 4.3.2 "), "{l}");
    // No new connections.
    wait_until("listeners closed", Duration::from_secs(5), || {
        TcpStream::connect(addr(ports.imap)).is_err().then_some(())
    });
    // The relayed session still works within the grace, then gets BYE.
    let r = relayed.imap("a3", "NOOP");
    assert!(r.last().unwrap().starts_with("a3 OK"), "{r:?}");
    assert_eq!(relayed.line(), "* BYE Server shutting down.");
    let status = serve.wait(Duration::from_secs(10));
    let log = serve.log();
    let status = status.unwrap_or_else(|| panic!("still running after the grace:\n{log}"));
    assert_eq!(status.code(), Some(0), "{log}");
    let ended = log
        .lines()
        .find(|l| l.contains("session ended") && l.contains(&format!("user={u} ")))
        .unwrap_or_else(|| panic!("no session ended line for {u}:\n{log}"));
    assert!(ended.contains("end=Shutdown"), "{ended}");
    assert!(
        log.lines()
            .filter(|l| l.contains("session ended") && l.contains("end=Shutdown"))
            .count()
            >= 4,
        "pre-login and LMTP connections log their end too:\n{log}"
    );

    // A second SIGTERM exits at once, without waiting for a long grace.
    let (yaml, ports) = config(&pool, "shutdown_grace: 10m\n");
    let mut serve = Serve::start(&dir, &yaml, addr(ports.imap));
    let (mut relayed, _) = imap_login(addr(ports.imap), &u, PASSWORD);
    serve.signal("TERM");
    wait_until("the stop under way", Duration::from_secs(10), || {
        serve.log().contains("shutting down").then_some(())
    });
    serve.signal("TERM");
    let status = serve.wait(Duration::from_secs(10));
    let log = serve.log();
    assert!(status.is_some(), "a second SIGTERM did not exit:\n{log}");
    assert!(log.contains("second stop signal"), "{log}");
    assert!(relayed.ended());
}

/// `director status --json` of the running director: every backend's ip and health.
fn backends(serve: &Serve) -> Vec<(String, String)> {
    let out = Command::new(BIN)
        .args(["-c", serve.config.to_str().unwrap(), "--json", "status"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["ip"].as_str().unwrap().to_owned(),
                b["health"].as_str().unwrap().to_ascii_lowercase(),
            )
        })
        .collect()
}

#[test]
fn reload_applies_health_settings_and_the_backend_list() {
    let pool = Pool::start(3);
    let dir = scratch("health");
    let health = "health:\n  interval: 300ms\n  fast_interval: 100ms\n  rise: 1\n  fall: 1\n";
    // One admin socket for every version of the file (the harness numbers them).
    let admin = format!("admin:\n  socket: {}/admin.sock\n", dir.display());
    let listed = |n: usize, extra: &str| {
        let o = DirectorOptions {
            configured_backends: Some(n),
            extra: format!("{admin}{health}{extra}"),
            ..DirectorOptions::default()
        };
        config_yaml(&pool, &o)
    };
    // Fixed ports, so that every reload keeps the listeners.
    let mut yaml = listed(2, "");
    let ports = free_ports(yaml.matches("127.0.0.1:0").count());
    let fix = |y: String| {
        let mut y = y;
        for p in &ports {
            y = y.replacen("127.0.0.1:0", &format!("127.0.0.1:{p}"), 1);
        }
        y
    };
    yaml = fix(yaml);
    let imap = addr(ports[0]);
    let serve = Serve::start(&dir, &yaml, imap);
    let ip = |i: usize| pool.backend(i).ip.to_string();
    let all_up = |want: usize| {
        let b = backends(&serve);
        (b.len() == want && b.iter().all(|(_, h)| h == "up")).then_some(b)
    };
    wait_until("two backends up", Duration::from_secs(10), || all_up(2));

    // A backend added to the file is added, checked, and takes users.
    let (ok, out) = serve.reload(&fix(listed(3, "")));
    assert!(ok, "{out}\n{}", serve.log());
    let b = wait_until("three backends up", Duration::from_secs(10), || all_up(3));
    assert!(b.iter().any(|(i, _)| *i == ip(2)), "{b:?}");
    let on_third = (1..=200)
        .map(user)
        .find_map(|u| {
            let (c, on) = imap_login(imap, &u, PASSWORD);
            (on == pool.backend(2).name).then_some((u, c))
        })
        .expect("a user on the added backend");

    // New health settings: a check that expects a banner no backend sends takes them all
    // down; the old check back brings them up.
    let checks = dir.join("checks");
    fs::create_dir_all(&checks).unwrap();
    fs::write(
        checks.join("imap.yaml"),
        "port: imap\ntimeout: 1s\nsteps:\n  - expect: \"* OK [NOT-THIS-BANNER]\"\n",
    )
    .unwrap();
    let strict = format!("  checks_dir: {}\n", checks.display());
    let (ok, out) = serve.reload(&fix(listed(3, &strict)));
    assert!(ok, "{out}");
    wait_until("every backend down", Duration::from_secs(10), || {
        backends(&serve)
            .iter()
            .all(|(_, h)| h == "down")
            .then_some(())
    });
    let (ok, out) = serve.reload(&fix(listed(3, "")));
    assert!(ok, "{out}");
    wait_until("every backend up again", Duration::from_secs(10), || {
        all_up(3)
    });

    // A backend taken out of the file is removed: its users' sessions are ended first.
    let (u, mut c) = on_third;
    let (ok, out) = serve.reload(&fix(listed(2, "")));
    assert!(ok, "{out}");
    assert!(
        c.until_closed(Duration::from_secs(10)).is_some(),
        "{u}'s session on the removed backend is still open"
    );
    let b = wait_until("two backends left", Duration::from_secs(10), || {
        let b = backends(&serve);
        (b.len() == 2).then_some(b)
    });
    assert!(!b.iter().any(|(i, _)| *i == ip(2)), "{b:?}");
    let (_c, now_on) = imap_login(imap, &u, PASSWORD);
    assert_ne!(now_on, pool.backend(2).name);
}
