//! Reload (SIGHUP, `director reload`) and graceful stop (SIGTERM) of a real `director serve`
//! process over real Dovecot backends: live IMAP, POP3 and LMTP sessions survive a reload;
//! listeners come and go; a renewed certificate is used by new handshakes; a broken file is
//! refused with the running configuration kept; SIGTERM says goodbye, gives relayed sessions
//! their grace, logs their end and exits 0; a second SIGTERM exits at once.

mod support;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::admin_cli::AdminCli;
use support::client::{imap_login, pop3_login, Conn};
use support::command::openssl;
use support::director::{config_yaml, with_listener, DirectorOptions};
use support::dovecot::{user, Pool, PASSWORD};
use support::ports::{free_port, local as addr};
use support::serve::{fixed_ports, scratch, with_ports, Serve};
use support::wait::{wait_for, wait_until};

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
    let yaml = with_listener(
        &config_yaml(pool, &DirectorOptions::with_extra(extra)),
        "{protocol: lmtp, address: 127.0.0.1:0}",
    );
    let (yaml, ports) = fixed_ports(&yaml);
    // In order: lmtp, imap, imaps, pop3, pop3s, sieve.
    let p = Ports {
        lmtp: ports[0],
        imap: ports[1],
        imaps: ports[2],
        pop3: ports[3],
    };
    (yaml, p)
}

/// `director serve` over `pool` in `dir`, with the configuration of [`config`]; returns it,
/// the configuration and its ports.
fn start_serve(pool: &Pool, dir: &Path, extra: &str) -> (Serve, String, Ports) {
    let (yaml, ports) = config(pool, extra);
    let serve = Serve::start(dir, &yaml, addr(ports.imap));
    (serve, yaml, ports)
}

/// The greeting a new connection to `port` gets.
fn greeting(port: u16) -> String {
    Conn::connect(addr(port)).line()
}

/// A new self-signed certificate and key for `localhost` / 127.0.0.1 with common name `cn`.
fn new_cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (format!("{cn}.pem"), format!("{cn}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &cert,
        ],
    );
    (dir.join(cert), dir.join(key))
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
    let dir = scratch("reload", "reload");
    let (mut serve, yaml, ports) = start_serve(&pool, &dir, "");
    let before = served_subject(ports.imaps);

    // Live sessions: IMAP logged in and relayed, POP3 logged in, an LMTP transaction mid-way.
    let (u_imap, u_pop, u_lmtp) = (user(1), user(2), user(3));
    let (mut imap, _) = imap_login(addr(ports.imap), &u_imap, PASSWORD);
    imap.imap_ok("a2", "SELECT INBOX");
    let mut pop = pop3_login(addr(ports.pop3), &u_pop, PASSWORD);
    pop.pop3_ok("STAT");
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
    let new_port = free_port();
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
    imap.imap_ok("a3", "NOOP");
    imap.imap_ok("a4", "STATUS INBOX (MESSAGES)");
    assert!(pop.pop3("STAT").starts_with("+OK"), "{}", serve.log());
    pop.pop3_ok("NOOP");
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
    wait_for("a debug line", Duration::from_secs(5), || {
        serve.log().contains(" DEBUG ")
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
    wait_for("the SIGHUP refusal", Duration::from_secs(10), || {
        serve.log().lines().any(|l| {
            l.contains("configuration reload refused") && l.contains("limits.max_connections")
        })
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
    wait_for("the SIGHUP reload", Duration::from_secs(10), || {
        greeting(ports.imap).contains("Hup ready.")
    });
    assert!(serve.running(), "{}", serve.log());
    assert!(serve.log().contains("SIGHUP"), "{}", serve.log());
    imap.imap_ok("a5", "NOOP");
}

#[test]
fn sigterm_says_goodbye_gives_the_grace_and_exits_0() {
    let pool = Pool::start(1);
    let dir = scratch("reload", "sigterm");
    let (mut serve, _, ports) = start_serve(&pool, &dir, "shutdown_grace: 2s\n");

    let u = user(4);
    let (mut relayed, _) = imap_login(addr(ports.imap), &u, PASSWORD);
    relayed.imap_ok("a2", "SELECT INBOX");
    let mut preauth_imap = Conn::imap_greeted(addr(ports.imap));
    let mut preauth_pop = Conn::pop3_greeted(addr(ports.pop3));
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
    wait_for("listeners closed", Duration::from_secs(5), || {
        TcpStream::connect(addr(ports.imap)).is_err()
    });
    // The relayed session still works within the grace, then gets BYE.
    relayed.imap_ok("a3", "NOOP");
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
    let (mut serve, _, ports) = start_serve(&pool, &dir, "shutdown_grace: 10m\n");
    let (mut relayed, _) = imap_login(addr(ports.imap), &u, PASSWORD);
    serve.signal("TERM");
    wait_for("the stop under way", Duration::from_secs(10), || {
        serve.log().contains("shutting down")
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
    let cli = AdminCli::over(serve.config.clone());
    cli.json(&["status"])["backends"]
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
    let dir = scratch("reload", "health");
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
    let (yaml, ports) = fixed_ports(&listed(2, ""));
    let fix = |y: String| with_ports(&y, &ports);
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
    wait_for("every backend down", Duration::from_secs(10), || {
        backends(&serve).iter().all(|(_, h)| h == "down")
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
