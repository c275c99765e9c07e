//! No single host can take the connection slots, and only trusted load balancers may name
//! the client (through the running director, real Dovecot 2.3 backends behind it):
//!
//! - 11,000 idle connections from one address do not keep a client at another address from
//!   logging in (`limits.max_preauth_per_ip`);
//! - a full listener drops its oldest connection that has not logged in yet to make room,
//!   never a logged-in session, and each listener has its own pool;
//! - a PROXY header counts only from `proxy_trusted_networks`: anyone else is closed
//!   without a greeting, so cannot claim a trusted or LMTP `allow_from` address; a trusted
//!   header's address is what the caps, `allow_from` and the backend (`rip=`) see;
//! - a flood of bad headers makes a few WARN lines, not one per connection.
//!
//! The test process may hold 20,000 file descriptors: the director runs in-process, so every
//! connection counts twice while the director holds it.

mod support;

use std::io::Write;
use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

use support::client::{curl, quote, Conn};
use support::director::{
    config_yaml, ready, with_limits, with_listener, DirectorOptions, TestDirector,
};
use support::director_log::{capture_director_log, director_log};
use support::dovecot::{user, Pool, PASSWORD};
use support::logs::{field, wait_login};
use support::wait::wait_until;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The resident memory of this process (the director runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Logs in over IMAP as `u` on `c` (greeting already read) and selects the inbox.
fn imap_login(c: &mut Conn, u: &str) {
    c.imap_ok("a", &format!("LOGIN {} {}", quote(u), quote(PASSWORD)));
    c.imap_ok("b", "SELECT INBOX");
}

/// The director's configuration with `lines` added under `limits:`.
fn config_with_limits(pool: &Pool, o: &DirectorOptions, lines: &str) -> String {
    with_limits(&config_yaml(pool, o), lines)
}

#[test]
fn eleven_thousand_idle_connections_from_one_address_do_not_lock_out_another() {
    let pool = Pool::start(2);
    // The default limits: 10,000 connections per listener, 100 before login per address.
    // The pre-auth timeout is long, so that no flood connection is let go during the test.
    let yaml = config_yaml(&pool, &DirectorOptions::default()).replacen(
        "preauth_timeout: 20s",
        "preauth_timeout: 10m",
        1,
    );
    let d = TestDirector::start_yaml(&yaml);
    let before = rss_kib();
    let flood_started = Instant::now();
    let mut flood: Vec<TcpStream> = Vec::with_capacity(11_000);
    for i in 0..11_000 {
        let s = TcpStream::connect(d.imap).unwrap_or_else(|e| panic!("flood connect {i}: {e}"));
        flood.push(s);
    }
    let flood_time = flood_started.elapsed();
    // Wait until the director has answered the last flood connection: it was turned away.
    let mut last = Conn::from_stream(flood.pop().unwrap());
    assert_eq!(last.line(), "* BYE Too many connections from your address.");
    assert!(last.ended());
    let during = rss_kib();

    // A client from another address logs in through the director to a real backend.
    let started = Instant::now();
    let mut c = Conn::connect_from(ip("127.0.0.7"), d.imap);
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    let u = user(60);
    imap_login(&mut c, &u);
    let login_time = started.elapsed();
    let home = pool
        .by_ip(ready(d.router.route(&u, "")).unwrap().backend.ip)
        .unwrap();
    let line = wait_login(home, "imap-login", &u);
    assert_eq!(field(&line, "rip").as_deref(), Some("127.0.0.7"), "{line}");

    eprintln!(
        "flood: 11,000 connections from 127.0.0.1 in {flood_time:?}; this process's RSS \
         (director in-process) {before} KiB before, {during} KiB during the flood \
         (+{} KiB); a client from 127.0.0.7 was greeted and logged in in {login_time:?}",
        during.saturating_sub(before)
    );
    // Exactly 100 flood connections were greeted (and still wait); the others were told.
    let mut greeted = Vec::new();
    let mut refused = 0;
    for s in flood {
        let mut c = Conn::from_stream(s);
        match c.line().as_str() {
            l if l.starts_with("* OK") => greeted.push(c),
            "* BYE Too many connections from your address." => refused += 1,
            other => panic!("a flood connection got {other:?}"),
        }
    }
    assert_eq!((greeted.len(), refused), (100, 10_899));
    let r = greeted[0].imap("n", "NOOP");
    assert!(r.last().unwrap().starts_with("n OK"), "{r:?}");
    assert!(
        login_time < Duration::from_secs(5),
        "the login waited {login_time:?}: the pre-auth timeout freed a slot, not the cap"
    );
}

#[test]
fn a_full_listener_drops_its_oldest_connection_before_login() {
    let pool = Pool::start(1);
    let yaml = config_with_limits(&pool, &DirectorOptions::default(), "  max_connections: 3\n");
    let d = TestDirector::start_yaml(&yaml);
    let mut waiting: Vec<Conn> = (0..3).map(|_| Conn::imap_greeted(d.imap)).collect();
    let mut newcomer = Conn::connect(d.imap);
    // The oldest is told why and closed; the newcomer is greeted.
    assert_eq!(
        waiting[0].line(),
        "* BYE [UNAVAILABLE] Connection queue full."
    );
    assert!(waiting[0].ended());
    assert!(newcomer.line().starts_with("* OK"), "newcomer greeted");
    // The others stay, and the newcomer can log in.
    for c in &mut waiting[1..] {
        c.imap_ok("n", "NOOP");
    }
    imap_login(&mut newcomer, &user(61));
    // One more: now the second-oldest goes (the logged-in newcomer is not a candidate).
    let _another = Conn::imap_greeted(d.imap);
    assert_eq!(
        waiting[1].line(),
        "* BYE [UNAVAILABLE] Connection queue full."
    );
    newcomer.imap_ok("n", "NOOP");
    // POP3 and ManageSieve have pools of their own (the same size), untouched so far, and
    // say their own BYE.
    let greet_pop3 = || Conn::pop3_greeted(d.pop3);
    let mut pop3: Vec<Conn> = (0..3).map(|_| greet_pop3()).collect();
    let _p = greet_pop3();
    assert_eq!(pop3[0].line(), "-ERR [SYS/TEMP] Connection queue full.");
    assert!(pop3[0].ended());
    assert!(pop3[1].pop3("NOOP").starts_with("+OK"));
    let greet_sieve = || {
        let mut c = Conn::connect(d.sieve);
        while !c.line().starts_with("OK") {}
        c
    };
    let mut sieve: Vec<Conn> = (0..3).map(|_| greet_sieve()).collect();
    let _s = greet_sieve();
    assert_eq!(sieve[0].line(), "BYE \"Connection queue full.\"");
    assert!(sieve[0].ended());
}

#[test]
fn a_listener_full_of_logged_in_sessions_refuses_newcomers_and_keeps_them() {
    let pool = Pool::start(2);
    let base = config_with_limits(&pool, &DirectorOptions::default(), "  max_connections: 3\n");
    // An LMTP listener with its own, larger pool.
    let yaml = with_listener(
        &base,
        "{protocol: lmtp, address: 127.0.0.1:0, max_connections: 5}",
    );
    let d = TestDirector::start_yaml(&yaml);
    let mut sessions: Vec<Conn> = (0..3)
        .map(|i| {
            let mut c = Conn::imap_greeted(d.imap);
            imap_login(&mut c, &user(62 + i));
            c
        })
        .collect();
    let mut refused = Conn::connect(d.imap);
    assert_eq!(
        refused.line(),
        "* BYE Too many connections, try again later."
    );
    assert!(refused.ended());
    for c in &mut sessions {
        c.imap_ok("n", "NOOP");
    }
    // Other listeners have their own pools: POP3 logs in, LMTP greets.
    let mut p = Conn::pop3_greeted(d.pop3);
    p.pop3_ok(&format!("USER {}", user(66)));
    p.pop3_ok(&format!("PASS {PASSWORD}"));
    let mut l = Conn::connect(d.lmtp[0]);
    assert!(l.line().starts_with("220 "));
    // A session that ends frees its slot.
    let mut first = sessions.remove(0);
    first.imap_ok("z", "LOGOUT");
    drop(first);
    let mut next = wait_until("a slot after a logout", Duration::from_secs(5), || {
        let mut c = Conn::connect(d.imap);
        c.line().starts_with("* OK").then_some(c)
    });
    imap_login(&mut next, &user(67));
}

#[test]
fn lmtp_connections_count_against_the_per_address_cap() {
    let pool = Pool::start(1);
    let base = config_with_limits(
        &pool,
        &DirectorOptions::default(),
        "  max_preauth_per_ip: 2\n",
    );
    let yaml = with_listener(&base, "{protocol: lmtp, address: 127.0.0.1:0}");
    let d = TestDirector::start_yaml(&yaml);
    let from = ip("127.0.0.9");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Conn::connect_from(from, d.lmtp[0]);
        assert!(c.line().starts_with("220 "));
        held.push(c);
    }
    let mut third = Conn::connect_from(from, d.lmtp[0]);
    let line = third.line();
    assert!(
        line.starts_with("421 4.3.2 ")
            && line.ends_with(" Too many connections from your address."),
        "{line:?}"
    );
    // IMAP from the same address is over the cap too (one count, all listeners); another
    // address is not.
    let mut imap = Conn::connect_from(from, d.imap);
    assert_eq!(imap.line(), "* BYE Too many connections from your address.");
    let mut other = Conn::connect_from(ip("127.0.0.10"), d.imap);
    assert!(other.line().starts_with("* OK"));
    // An IMAP login frees its address's place: the cap is on connections before login.
    drop(held);
    let mut c = wait_until("a place for 127.0.0.9", Duration::from_secs(5), || {
        let mut c = Conn::connect_from(from, d.imap);
        c.line().starts_with("* OK").then_some(c)
    });
    imap_login(&mut c, &user(68));
    let mut c2 = Conn::connect_from(from, d.imap);
    assert!(c2.line().starts_with("* OK"));
    imap_login(&mut c2, &user(69));
    let mut c3 = Conn::connect_from(from, d.imap);
    assert!(
        c3.line().starts_with("* OK"),
        "logged-in sessions no longer count"
    );
}

// --- PROXY protocol: trusted peers only. ---

/// The address a header claims: in `trusted_networks` and in LMTP `allow_from`.
const CLAIMED: &str = "192.0.2.55";
/// The test's load balancer.
const BALANCER: &str = "127.0.0.5";

fn v1_header(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40001 {port}\r\n").into_bytes()
}

/// Listeners behind [`BALANCER`], and `extra` at the top level.
fn proxy_options(extra: &str) -> DirectorOptions {
    DirectorOptions {
        extra: extra.into(),
        proxy_protocol: true,
        proxy_trusted_networks: vec![BALANCER.into()],
        // Plaintext logins only for the claimed network: the header decides.
        trusted_networks: vec!["192.0.2.0/24".into()],
        ..DirectorOptions::default()
    }
}

/// WARN lines the director logged for refusals of `reason`.
fn refusal_warnings(reason: &str) -> Vec<String> {
    let log = director_log();
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains(&format!("reason=\"{reason}\"")))
        .map(str::to_owned)
        .collect()
}

/// The metrics text of a director with a metrics listener.
fn metrics(d: &TestDirector) -> String {
    let url = format!("http://{}/metrics", d.metrics.expect("metrics listener"));
    let (ok, out, err) = curl(&[&url]);
    assert!(ok, "curl {url}: {err}");
    out
}

/// `n` IMAP connections were refused for `reason`: the metrics count every one, and the log
/// has a few WARN lines about them, not one each. Returns the first of those lines.
fn assert_refusals_counted_and_logged(d: &TestDirector, reason: &str, n: u64) -> String {
    let series =
        format!("director_connections_refused_total{{protocol=\"imap\",reason=\"{reason}\"}}");
    assert_eq!(counter(&metrics(d), &series), n);
    let warnings = refusal_warnings(reason);
    assert!(
        !warnings.is_empty() && warnings.len() <= 3,
        "{} WARN lines: {warnings:#?}",
        warnings.len()
    );
    warnings[0].clone()
}

fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

/// Connects from 127.0.0.1 (not the balancer), sends a header claiming [`CLAIMED`] (the
/// director may already have closed: a failed write is fine), and returns what the director
/// answered before closing; `None` if it kept the connection open for 5 s.
fn untrusted_attempt(addr: std::net::SocketAddr) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(&v1_header(CLAIMED, addr.port()));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    match std::io::Read::read_to_end(&mut s, &mut got) {
        Ok(_) => Some(got),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(got),
        Err(_) => None,
    }
}

#[test]
fn an_untrusted_peer_cannot_claim_an_address() {
    capture_director_log();
    let pool = Pool::start(1);
    // An LMTP listener behind the same load balancer, open to the claimed network only.
    let yaml = with_listener(
        &config_yaml(&pool, &proxy_options("metrics:\n  address: 127.0.0.1:0\n")),
        "{protocol: lmtp, address: 127.0.0.1:0, proxy_protocol: true, allow_from: [192.0.2.0/24]}",
    );
    let d = TestDirector::start_yaml(&yaml);
    // From 127.0.0.1, not the balancer: closed, no greeting, whatever the header says.
    for addr in [d.imap, d.pop3, d.sieve, d.lmtp[0]] {
        let got = untrusted_attempt(addr)
            .unwrap_or_else(|| panic!("{addr}: an untrusted peer's connection stays open"));
        assert!(
            got.is_empty(),
            "{addr}: answered {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // A flood of them: a few WARN lines, every one counted.
    for _ in 0..300 {
        let got = untrusted_attempt(d.imap).expect("closed");
        assert!(got.is_empty());
    }
    let first = assert_refusals_counted_and_logged(&d, "untrusted_proxy_peer", 301);
    assert!(
        first.contains("PROXY header from untrusted peers") && first.contains("127.0.0.1"),
        "{first}"
    );

    // The balancer's header is honoured: LMTP allow_from sees the claimed address.
    let balancer = ip(BALANCER);
    let mut l = Conn::connect_from(balancer, d.lmtp[0]);
    l.send(&v1_header(CLAIMED, 24));
    assert!(l.line().starts_with("220 "));
    let mut l = Conn::connect_from(balancer, d.lmtp[0]);
    l.send(&v1_header("198.51.100.1", 24));
    assert!(l.line().starts_with("554 "), "outside allow_from");
    // IMAP: plaintext login allowed (the claimed client is trusted), and the backend logs
    // the claimed address.
    let mut c = Conn::connect_from(balancer, d.imap);
    c.send(&v1_header(CLAIMED, 143));
    assert!(c.line().starts_with("* OK"));
    let u = user(70);
    imap_login(&mut c, &u);
    let line = wait_login(pool.backend(0), "imap-login", &u);
    assert_eq!(field(&line, "rip").as_deref(), Some(CLAIMED), "{line}");
}

#[test]
fn the_per_address_cap_counts_the_client_a_trusted_header_names() {
    let pool = Pool::start(1);
    let d = TestDirector::start_yaml(&config_with_limits(
        &pool,
        &proxy_options(""),
        "  max_preauth_per_ip: 2\n",
    ));
    let balancer = ip(BALANCER);
    let connect = |client: &str| {
        let mut c = Conn::connect_from(balancer, d.imap);
        c.send(&v1_header(client, 143));
        c
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect(CLAIMED);
        assert!(c.line().starts_with("* OK"));
        held.push(c);
    }
    let mut third = connect(CLAIMED);
    assert_eq!(
        third.line(),
        "* BYE Too many connections from your address."
    );
    // Another client behind the same balancer is not affected.
    let mut other = connect("192.0.2.56");
    assert!(other.line().starts_with("* OK"));
}

#[test]
fn a_flood_of_bad_headers_from_a_trusted_peer_makes_a_few_warn_lines() {
    capture_director_log();
    let (_pool, d) =
        TestDirector::start_with_pool(1, &proxy_options("metrics:\n  address: 127.0.0.1:0\n"));
    let balancer = ip(BALANCER);
    for i in 0..500 {
        let mut c = Conn::connect_from(balancer, d.imap);
        c.send(format!("PROXY TCP4 garbage {i}\r\n").as_bytes());
        assert!(c.ended());
    }
    let first = assert_refusals_counted_and_logged(&d, "bad_proxy_header", 500);
    assert!(
        first.contains("bad PROXY headers from trusted peers (last: 127.0.0.5: "),
        "{first}"
    );
}

/// The listen backlog of the TCP socket listening on `addr`, as the kernel reports it (the
/// Send-Q column of `ss -ltn` for a listening socket).
fn listen_backlog(addr: std::net::SocketAddr) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket on {addr} in {text:?}"))
}

#[test]
fn listeners_take_the_systems_backlog_or_the_configured_one() {
    // Rust's own bind asks for 128, which a reconnect storm after a restart overflows.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pool = Pool::start(1);
    let d = TestDirector::start(&pool, &DirectorOptions::default());
    for addr in [d.imap, d.imaps, d.pop3, d.sieve] {
        assert_eq!(listen_backlog(addr), somaxconn, "{addr}");
    }
    let d = TestDirector::start_yaml(&config_with_limits(
        &pool,
        &DirectorOptions::default(),
        "  listen_backlog: 77\n",
    ));
    assert_eq!(listen_backlog(d.imap), 77);
    assert_eq!(listen_backlog(d.pop3), 77);
}

/// `n` IMAP logins through `addr` started at once (users taken in turn), each held until all
/// are done; how many failed, with the first failure.
fn logins_at_once(addr: std::net::SocketAddr, n: usize) -> (usize, Option<String>) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut c = Conn::connect(addr);
                c.socket()
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let greeting = c.line();
                let u = user(1 + i % 200);
                let reply = c.imap("a", &format!("LOGIN {u} {PASSWORD}"));
                let last = reply.last().cloned().unwrap_or_default();
                let ok = greeting.starts_with("* OK") && last.starts_with("a OK");
                (ok, format!("{greeting} / {last}"))
            })
        })
        .collect();
    let results: Vec<(bool, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed: Vec<&String> = results
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, r)| r)
        .collect();
    (failed.len(), failed.first().map(|s| s.to_string()))
}

#[test]
fn a_login_storm_is_fed_to_a_backend_at_the_pace_of_its_login_processes() {
    // Dovecot's default login service: one process per connection, and here only 6 of them
    // (the default is 100). A burst beyond that is dropped by Dovecot's master; the director
    // lets at most `max_logins_in_flight` logins at a time reach the backend, the rest wait.
    let pool = Pool::start_with(support::dovecot::PoolOptions {
        backends: 1,
        extra_config: "service imap-login {\n  service_count = 1\n  client_limit = 1\n  \
                       process_limit = 6\n}\nauth_failure_delay = 0\n"
            .into(),
        ..support::dovecot::PoolOptions::default()
    });
    let paced = |max: u32| {
        let yaml = config_with_limits(
            &pool,
            &DirectorOptions::default(),
            "  max_preauth_per_ip: 1000\n",
        )
        .replacen(
            "backend_defaults:\n",
            &format!("backend_defaults:\n  max_logins_in_flight: {max}\n"),
            1,
        );
        TestDirector::start_yaml(&yaml)
    };
    let d = paced(3);
    let (failed, first) = logins_at_once(d.imap, 120);
    assert_eq!(failed, 0, "paced logins failed; first: {first:?}");
    // The control: the same burst with more logins in flight than the backend has login
    // processes.
    let d = paced(1000);
    let (failed, first) = logins_at_once(d.imap, 120);
    println!("unpaced: {failed} of 120 failed; first: {first:?}");
    assert!(
        failed > 0,
        "the backend took an unpaced burst: the test proves nothing"
    );
}

/// The value of the series `name{backend="ip",...}` in a metrics text, if present.
fn backend_series(text: &str, name: &str, ip: IpAddr) -> Option<f64> {
    let prefix = format!("{name}{{backend=\"{ip}\"");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn logins_waiting_for_a_turn_are_shown_and_those_that_get_none_are_counted() {
    // One turn (max_logins_in_flight 1) at a backend that hangs: the first login takes the
    // turn and waits for a greeting that never comes (login_timeout); the two others wait
    // for the turn meanwhile, which the metrics show. When the first gives up, the second
    // takes the turn; the third's own login_timeout ends while it still waits: it gets a
    // temporary failure and is counted.
    let pool = Pool::start(1);
    let ip = pool.backends[0].ip;
    let yaml = config_with_limits(
        &pool,
        &DirectorOptions {
            login_timeout: "3s".into(),
            ..DirectorOptions::with_extra("metrics:\n  address: 127.0.0.1:0\n")
        },
        "",
    )
    .replacen(
        "backend_defaults:\n",
        "backend_defaults:\n  max_logins_in_flight: 1\n",
        1,
    );
    let d = TestDirector::start_yaml(&yaml);
    let turns_missed = "director_backend_login_turns_missed_total";
    let waiting = "director_backend_logins_waiting";
    assert_eq!(backend_series(&metrics(&d), turns_missed, ip), Some(0.0));
    assert_eq!(backend_series(&metrics(&d), waiting, ip), Some(0.0));
    pool.backends[0].pause();
    let addr = d.imap;
    let logins: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Conn::connect(addr);
                c.socket()
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                c.line();
                let reply = c.imap("a", &format!("LOGIN {} {PASSWORD}", user(1 + i)));
                reply.last().cloned().unwrap_or_default()
            })
        })
        .collect();
    wait_until(
        "two logins waiting for the turn",
        Duration::from_secs(3),
        || (backend_series(&metrics(&d), waiting, ip) == Some(2.0)).then_some(()),
    );
    let replies: Vec<String> = logins.into_iter().map(|t| t.join().unwrap()).collect();
    pool.backends[0].resume();
    let text = metrics(&d);
    assert_eq!(
        backend_series(&text, turns_missed, ip),
        Some(1.0),
        "{replies:?}"
    );
    assert_eq!(backend_series(&text, waiting, ip), Some(0.0));
    assert!(
        replies.iter().all(|r| r.starts_with("a NO [UNAVAILABLE]")),
        "every login failed temporarily: {replies:?}"
    );
}
