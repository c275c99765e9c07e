//! LMTP through the director against real Dovecot lmtp backends: deliveries land in the routed
//! user's Maildir on the shared store, multi-recipient messages fan out to several backends
//! with one reply per recipient, dot-stuffing and 8-bit bytes pass through exactly, SIZE is
//! enforced, and backends that die before or during DATA cost a 4xx, never a lost or doubled
//! message. A scripted fake backend stands in only where real Dovecot cannot misbehave on
//! purpose.
//!
//! The service runs in its own accept loop here (the listener is wired in elsewhere).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use director::config::Config;
use director::net::stream::ClientStream;
use director::protocol::decision::ClientIdentity;
use director::protocol::lmtp::{serve_connection, LmtpSettings, RecipientUsername};
use director::routing::user_hash::UserHash;
use director::state::backend::{AdminState, Backend as DirBackend, Health};
use director::state::local::LocalState;
use director::state::router::Router;
use director::state::State;

use support::client::Conn;
use support::director::{config_yaml, home, ready, DirectorOptions};
use support::dovecot::{user, Pool};
use support::runtime_thread::RuntimeThread;
use support::swaks::{self, Target};
use support::wait::wait_until;

/// The director's LMTP service on an ephemeral port, on its own thread and runtime.
struct TestLmtp {
    addr: SocketAddr,
    state: Arc<LocalState>,
    router: Router,
    /// Runs the service; dropping it stops it.
    _service: RuntimeThread,
}

/// Session ids of this test's LMTP connections start with this, so backend logs show
/// whether XCLIENT SESSION= arrived.
const SESSION_PREFIX: &str = "lmtptest";

impl TestLmtp {
    /// Starts a pool of `backends` and the service with `settings` over it.
    fn with_pool(backends: usize, settings: LmtpSettings) -> (Pool, TestLmtp) {
        let pool = Pool::start(backends);
        let l = Self::start(&pool, settings, &DirectorOptions::default());
        (pool, l)
    }

    fn start(pool: &Pool, settings: LmtpSettings, options: &DirectorOptions) -> TestLmtp {
        Self::start_with_unix(pool, settings, options, None)
    }

    /// Like [`TestLmtp::start`], also serving on a unix socket at `unix` if given.
    fn start_with_unix(
        pool: &Pool,
        settings: LmtpSettings,
        options: &DirectorOptions,
        unix: Option<std::path::PathBuf>,
    ) -> TestLmtp {
        let yaml = config_yaml(pool, options);
        let config = Config::parse(&yaml).unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
        let settings = Arc::new(settings);
        let (service, (addr, state, router)) =
            RuntimeThread::start("LMTP service", |tx, stop| async move {
                let backends = director::server::prepare::resolve_backends(&config)
                    .await
                    .unwrap();
                let state = Arc::new(LocalState::new(backends, config.user_expire.into()));
                let router = Router::new(
                    state.clone() as Arc<dyn State>,
                    UserHash::from_config(&config).unwrap(),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send((listener.local_addr().unwrap(), state, router.clone()))
                    .unwrap();
                let serve = |stream: ClientStream, client, local, session_id: String| {
                    let identity = ClientIdentity {
                        client,
                        local,
                        session_id,
                        session_ext_id: None,
                    };
                    tokio::spawn(serve_connection(
                        stream,
                        identity,
                        router.clone(),
                        settings.clone(),
                        director::metrics::Metrics::new(),
                    ));
                };
                let accept = async {
                    let mut n = 0u32;
                    loop {
                        let Ok((tcp, peer)) = listener.accept().await else {
                            continue;
                        };
                        n += 1;
                        let local = tcp.local_addr().unwrap();
                        let id = format!("{SESSION_PREFIX}{n}");
                        serve(ClientStream::Plain(tcp), peer, local, id);
                    }
                };
                let accept_unix = async {
                    let Some(path) = unix else {
                        return std::future::pending().await;
                    };
                    let listener = tokio::net::UnixListener::bind(path).unwrap();
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        // A local MTA has no address to forward.
                        let none = "0.0.0.0:0".parse().unwrap();
                        let id = format!("{SESSION_PREFIX}unix");
                        serve(ClientStream::Unix(stream), none, none, id);
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = accept_unix => {}
                    _ = stop => {}
                }
            });
        TestLmtp {
            addr,
            state,
            router,
            _service: service,
        }
    }

    /// The pool backend `user` is routed to (as a login of that name would be).
    fn backend_of<'p>(&self, pool: &'p Pool, user: &str) -> &'p support::dovecot::Backend {
        home(pool, &self.router, user)
    }

    /// Adds a backend at `addr` (a fake, or this service itself) and makes it the only one
    /// new users go to.
    fn only_backend(&self, pool: &Pool, addr: SocketAddr) {
        let template = self
            .state
            .backends()
            .backends
            .values()
            .next()
            .unwrap()
            .clone();
        let mut settings = (*template.settings).clone();
        settings.ports.lmtp = Some(addr.port());
        self.state.upsert_backend(DirBackend {
            ip: addr.ip(),
            host: addr.ip().to_string().into(),
            settings: Arc::new(settings),
            ..template
        });
        for b in &pool.backends {
            self.state.set_admin(b.ip, AdminState::Down).unwrap();
        }
    }
}

/// Settings for tests: bare usernames (the pool's logins), short timeouts.
fn settings() -> LmtpSettings {
    LmtpSettings {
        hostname: "director.test".into(),
        recipient_username: RecipientUsername::LocalPart,
        client_timeout: Duration::from_secs(20),
        backend_data_timeout: Duration::from_secs(20),
        ..LmtpSettings::default()
    }
}

/// Reads one whole reply (all its lines).
fn reply(c: &mut Conn) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = c.line();
        assert!(l.len() >= 3, "reply expected, got {l:?} after {lines:?}");
        let last = l.as_bytes().get(3) != Some(&b'-');
        lines.push(l);
        if last {
            return lines;
        }
    }
}

/// Sends a command, returns the last line of its reply.
fn cmd(c: &mut Conn, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes());
    reply(c).pop().unwrap()
}

/// Connects, checks the greeting, says LHLO; returns the connection and the LHLO reply.
fn connect(l: &TestLmtp) -> (Conn, Vec<String>) {
    let mut c = Conn::connect(l.addr);
    assert_eq!(reply(&mut c), vec!["220 director.test Director LMTP ready"]);
    c.send(b"LHLO mta.test\r\n");
    let caps = reply(&mut c);
    (c, caps)
}

/// Users `user(1..)` whose backends are pairwise different, `n` of them.
fn users_on_distinct_backends(l: &TestLmtp, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: Vec<IpAddr> = Vec::new();
    for i in 1..=200 {
        let u = user(i);
        let ip = ready(l.router.route(&u, "")).unwrap().backend.ip;
        if !seen.contains(&ip) {
            seen.push(ip);
            out.push(u);
            if out.len() == n {
                return out;
            }
        }
    }
    panic!("not {n} distinct backends among the users");
}

/// A message with lines that are dot-stuffed on the wire, a line of 8-bit bytes, and `tag`.
/// Returns (the bytes on the wire after DATA, the message as it must be stored).
fn message(tag: &str) -> (Vec<u8>, Vec<u8>) {
    let mut stored = format!(
        "From: sender@example.org\r\nSubject: {tag}\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nHello {tag}.\r\n.one dot\r\n..two dots\r\n.\r\n"
    )
    .into_bytes();
    stored.extend_from_slice(b"8-bit: \xe4\xf6\xfc \xff\x80 caf\xc3\xa9\r\nBye.\r\n");
    let mut wire = Vec::new();
    for line in stored.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    (wire, stored)
}

/// The stored message files of `user`, read as bytes.
fn inbox(pool: &Pool, user: &str) -> Vec<Vec<u8>> {
    pool.inbox_messages(user)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Waits until `user` has `n` messages; returns them.
fn wait_inbox(pool: &Pool, user: &str, n: usize) -> Vec<Vec<u8>> {
    wait_until(
        &format!("{n} message(s) for {user}"),
        Duration::from_secs(10),
        || {
            let m = inbox(pool, user);
            (m.len() == n).then_some(m)
        },
    )
}

/// The headers Dovecot added end where our message starts; the rest must be byte-exact.
fn assert_stored(file: &[u8], stored: &[u8], backend: &str) {
    let text = String::from_utf8_lossy(file);
    assert!(
        text.contains(&format!("by {backend}")),
        "not delivered by {backend}:\n{text}"
    );
    let start = text.find("From: sender@example.org").expect("our headers");
    let got = &file[start..];
    // Dovecot stores LF line ends in Maildir: compare with CRLF restored.
    let mut restored = Vec::new();
    for line in got.split_inclusive(|&b| b == b'\n') {
        match line.strip_suffix(b"\n") {
            Some(l) if !l.ends_with(b"\r") => {
                restored.extend_from_slice(l);
                restored.extend_from_slice(b"\r\n");
            }
            _ => restored.extend_from_slice(line),
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&restored),
        String::from_utf8_lossy(stored)
    );
    assert_eq!(restored, stored, "bytes differ");
}

#[test]
fn swaks_delivers_each_user_to_its_routed_backend() {
    let (pool, l) = TestLmtp::with_pool(3, settings());
    for i in 1..=6 {
        let u = user(i);
        let to = format!("{u}+folder@example.org");
        let (ok, out) = swaks::lmtp(
            Target::Tcp(l.addr),
            &["--to", &to, "--body", &format!("Body {i}")],
        );
        assert!(ok, "swaks failed:\n{out}");
        let backend = &l.backend_of(&pool, &u).name;
        let msgs = wait_inbox(&pool, &u, 1);
        let text = String::from_utf8_lossy(&msgs[0]);
        assert!(text.contains(&format!("by {backend}")), "{u}:\n{text}");
        assert!(text.contains(&format!("Body {i}")), "{text}");
    }
    // XCLIENT reached the backends: Dovecot logs our session ids.
    let logs: String = pool.backends.iter().map(|b| b.log()).collect();
    assert!(
        logs.contains(SESSION_PREFIX),
        "no forwarded session id:\n{logs}"
    );
}

#[test]
fn three_recipients_on_three_backends_pipelined() {
    let (pool, l) = TestLmtp::with_pool(3, settings());
    let users = users_on_distinct_backends(&l, 3);
    let (mut c, caps) = connect(&l);
    for cap in [
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SMTPUTF8",
        "SIZE",
    ] {
        assert!(caps.iter().any(|x| x[4..] == *cap), "{cap} in {caps:?}");
    }
    assert_eq!(caps[0], "250-director.test");
    // MAIL, three RCPTs and DATA in one write.
    let mut group = "MAIL FROM:<sender@example.org> BODY=8BITMIME SIZE=400\r\n".to_string();
    for u in &users {
        group += &format!("RCPT TO:<{u}@example.org>\r\n");
    }
    group += "DATA\r\n";
    c.send(group.as_bytes());
    assert!(reply(&mut c)[0].starts_with("250 "));
    for u in &users {
        let r = reply(&mut c).pop().unwrap();
        assert!(r.starts_with("250 "), "RCPT {u}: {r}");
    }
    assert!(reply(&mut c)[0].starts_with("354 "));
    let (wire, stored) = message("three");
    c.send_split(&wire, 7);
    for u in &users {
        let r = reply(&mut c).pop().unwrap();
        assert!(r.starts_with("250 2.0.0"), "DATA for {u}: {r}");
        assert!(r.contains(u), "the reply is the backend's own for {u}: {r}");
    }
    assert_eq!(cmd(&mut c, "QUIT"), "221 2.0.0 Bye");
    for u in &users {
        let msgs = wait_inbox(&pool, u, 1);
        assert_stored(&msgs[0], &stored, &l.backend_of(&pool, u).name);
    }
    // Nothing arrives later twice.
    std::thread::sleep(Duration::from_millis(300));
    for u in &users {
        assert_eq!(inbox(&pool, u).len(), 1);
    }
}

#[test]
fn whole_address_usernames_and_swaks_with_several_recipients() {
    let (pool, l) = TestLmtp::with_pool(
        3,
        LmtpSettings {
            recipient_username: RecipientUsername::WholeAddress,
            ..settings()
        },
    );
    let to: Vec<String> = (10..14)
        .map(|i| format!("{}@example.org", user(i)))
        .collect();
    let (ok, out) = swaks::lmtp(
        Target::Tcp(l.addr),
        &["--to", &to.join(","), "--body", "For all"],
    );
    assert!(ok, "{out}");
    for (i, addr) in (10..14).zip(&to) {
        // The routed username is the whole address; Dovecot stores under the local part.
        let backend = &l.backend_of(&pool, addr).name;
        let msgs = wait_inbox(&pool, &user(i), 1);
        let text = String::from_utf8_lossy(&msgs[0]);
        assert!(text.contains(&format!("by {backend}")), "{addr}:\n{text}");
    }
}

#[test]
fn protocol_errors_and_refusals() {
    let (_pool, l) = TestLmtp::with_pool(
        1,
        LmtpSettings {
            max_line_length: 512,
            ..settings()
        },
    );
    let mut c = Conn::connect(l.addr);
    reply(&mut c);
    assert!(cmd(&mut c, "MAIL FROM:<a@b>").starts_with("503 5.5.1"));
    assert!(cmd(&mut c, "HELO mta").starts_with("500 "));
    assert!(cmd(&mut c, "EHLO mta").starts_with("500 "));
    assert!(cmd(&mut c, "LHLO mta").starts_with("250 SIZE"));
    assert!(cmd(&mut c, "VRFY user0001").starts_with("252 2.5.2"));
    assert!(cmd(&mut c, "RCPT TO:<user0001@x>").starts_with("503 5.5.1"));
    assert!(cmd(&mut c, "DATA").starts_with("503 5.5.1"));
    assert!(cmd(&mut c, "MAIL FROM:<a@b> AUTH=<>").starts_with("555 5.5.4"));
    assert!(cmd(&mut c, "MAIL FROM:a@b").starts_with("501 5.5.4"));
    assert!(cmd(&mut c, "BOGUS").starts_with("500 5.5.2"));
    let long = format!("RCPT TO:<{}@x>", "y".repeat(600));
    assert_eq!(cmd(&mut c, &long), "500 5.5.2 Line too long");
    assert!(cmd(&mut c, "MAIL FROM:<>").starts_with("250 "));
    assert!(cmd(&mut c, "MAIL FROM:<>").starts_with("503 5.5.1"));
    assert!(cmd(&mut c, "RCPT TO:<nosuchuser@example.org>").starts_with("550 "));
    assert!(cmd(&mut c, "RCPT TO:<user0001@x> NOTIFY=NEVER").starts_with("555 "));
    assert_eq!(cmd(&mut c, "DATA"), "503 5.5.1 No valid recipients");
    assert!(cmd(&mut c, "RSET").starts_with("250 "));
    assert!(cmd(&mut c, "NOOP").starts_with("250 "));
    assert_eq!(cmd(&mut c, "QUIT"), "221 2.0.0 Bye");
    assert!(c.closed());
}

#[test]
fn size_limit_refuses_up_front_and_while_streaming() {
    let (pool, l) = TestLmtp::with_pool(
        3,
        LmtpSettings {
            max_message_size: Some(1000),
            ..settings()
        },
    );
    let users = users_on_distinct_backends(&l, 2);
    let (mut c, caps) = connect(&l);
    assert!(caps.contains(&"250 SIZE 1000".to_string()), "{caps:?}");
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example> SIZE=5000").starts_with("552 5.3.4"));
    // Announced small, sent big: refused while streaming, delivered nowhere.
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example> SIZE=900").starts_with("250 "));
    for u in &users {
        assert!(cmd(&mut c, &format!("RCPT TO:<{u}@example.org>")).starts_with("250 "));
    }
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..100 {
        big.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
    }
    big.extend_from_slice(b".\r\n");
    c.send(&big);
    for _ in &users {
        assert!(reply(&mut c)[0].starts_with("552 5.3.4"));
    }
    // The session goes on: a small one is delivered.
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    assert!(cmd(&mut c, &format!("RCPT TO:<{}@example.org>", users[0])).starts_with("250 "));
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    c.send(b"Subject: small\r\n\r\nsmall\r\n.\r\n");
    assert!(reply(&mut c)[0].starts_with("250 "));
    let msgs = wait_inbox(&pool, &users[0], 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Subject: small"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(inbox(&pool, &users[0]).len(), 1);
    assert!(inbox(&pool, &users[1]).is_empty());
}

#[test]
fn killed_backend_gives_451_at_rcpt_others_delivered() {
    let (pool, l) = TestLmtp::with_pool(3, settings());
    let users = users_on_distinct_backends(&l, 2);
    let dead = l.backend_of(&pool, &users[0]);
    dead.kill();
    let (mut c, _) = connect(&l);
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    assert_eq!(
        cmd(&mut c, &format!("RCPT TO:<{}@example.org>", users[0])),
        "451 4.4.0 Backend unavailable, try again later"
    );
    assert!(cmd(&mut c, &format!("RCPT TO:<{}@example.org>", users[1])).starts_with("250 "));
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    let (wire, stored) = message("partial");
    c.send(&wire);
    // One reply: only one recipient was accepted.
    assert!(reply(&mut c)[0].starts_with("250 "));
    let msgs = wait_inbox(&pool, &users[1], 1);
    assert_stored(&msgs[0], &stored, &l.backend_of(&pool, &users[1]).name);
    assert!(inbox(&pool, &users[0]).is_empty());
}

#[test]
fn backend_killed_mid_data_then_the_retry_delivers_exactly_once() {
    let (pool, l) = TestLmtp::with_pool(3, settings());
    let users = users_on_distinct_backends(&l, 3);
    let (mut c, _) = connect(&l);
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    for u in &users {
        assert!(cmd(&mut c, &format!("RCPT TO:<{u}@example.org>")).starts_with("250 "));
    }
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    let (wire, stored) = message("midway");
    let half = wire.len() / 2;
    c.send(&wire[..half]);
    std::thread::sleep(Duration::from_millis(200));
    let victim = l.backend_of(&pool, &users[1]);
    victim.kill();
    c.send(&wire[half..]);
    let replies: Vec<String> = users.iter().map(|_| reply(&mut c)[0].clone()).collect();
    assert!(replies[0].starts_with("250 "), "{replies:?}");
    assert!(replies[1].starts_with("451 4.4.0"), "{replies:?}");
    assert!(replies[2].starts_with("250 "), "{replies:?}");
    assert_eq!(cmd(&mut c, "QUIT"), "221 2.0.0 Bye");
    // The MTA retries the deferred recipient once its backend is back.
    victim.start();
    let mut c = connect(&l).0;
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    assert!(cmd(&mut c, &format!("RCPT TO:<{}@example.org>", users[1])).starts_with("250 "));
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    c.send(&wire);
    assert!(reply(&mut c)[0].starts_with("250 "));
    for u in &users {
        let msgs = wait_inbox(&pool, u, 1);
        assert_stored(&msgs[0], &stored, &l.backend_of(&pool, u).name);
    }
    std::thread::sleep(Duration::from_millis(300));
    for u in &users {
        assert_eq!(inbox(&pool, u).len(), 1, "{u} has the message once");
    }
}

/// A scripted backend: greets, takes LHLO, MAIL and RCPT, then answers DATA with garbage.
fn garbage_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(b"220 fake ready\r\n").unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let answer: &[u8] = match verb.as_str() {
                "LHLO" => b"250-fake\r\n250 PIPELINING\r\n",
                "MAIL" | "RCPT" => b"250 2.1.0 OK\r\n",
                "DATA" => b"HTTP/1.1 400 What?\r\n",
                _ => b"",
            };
            w.write_all(answer).unwrap();
            line.clear();
        }
    });
    (addr, thread)
}

#[test]
fn garbage_from_a_backend_at_data_gives_451() {
    let (pool, l) = TestLmtp::with_pool(1, settings());
    // user0001 stays on the real backend (its record), user0002 goes to the fake.
    let real = l.backend_of(&pool, &user(1)).name.clone();
    let (fake, thread) = garbage_backend();
    l.only_backend(&pool, fake);
    l.state
        .set_admin(pool.backend(0).ip, AdminState::Up)
        .unwrap();
    l.state.set_weight(pool.backend(0).ip, 0).unwrap();
    assert_eq!(
        ready(l.router.route(&user(2), "")).unwrap().backend.ip,
        fake.ip()
    );
    let (mut c, _) = connect(&l);
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    assert!(cmd(&mut c, "RCPT TO:<user0001@example.org>").starts_with("250 "));
    assert!(cmd(&mut c, "RCPT TO:<user0002@example.org>").starts_with("250 "));
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    let (wire, stored) = message("garbage");
    c.send(&wire);
    assert!(reply(&mut c)[0].starts_with("250 "));
    assert_eq!(
        reply(&mut c)[0],
        "451 4.4.0 Backend unavailable, try again later"
    );
    let msgs = wait_inbox(&pool, &user(1), 1);
    assert_stored(&msgs[0], &stored, &real);
    drop(c);
    drop(l);
    thread.join().unwrap();
}

#[test]
fn delivering_to_this_director_itself_is_refused() {
    let (pool, l) = TestLmtp::with_pool(1, settings());
    l.only_backend(&pool, l.addr);
    let health = l.state.backends().get(l.addr.ip()).unwrap().health;
    assert_eq!(health, Health::Up);
    let (mut c, _) = connect(&l);
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    let started = std::time::Instant::now();
    assert_eq!(
        cmd(&mut c, "RCPT TO:<user0003@example.org>"),
        "451 4.4.0 Backend unavailable, try again later"
    );
    // Refused at our own greeting, not after connections chained into each other timed out.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cmd(&mut c, "DATA"), "503 5.5.1 No valid recipients");
}

#[test]
fn a_unix_socket_client_is_routed_to_the_backends_tcp_port() {
    let pool = Pool::start(2);
    let path = pool.dir().join("director-lmtp.sock");
    let l = TestLmtp::start_with_unix(
        &pool,
        settings(),
        &DirectorOptions::default(),
        Some(path.clone()),
    );
    wait_until("the unix socket", Duration::from_secs(5), || {
        path.exists().then_some(())
    });
    let u = user(7);
    let (ok, out) = swaks::lmtp(
        Target::Socket(&path),
        &["--to", &format!("{u}@example.org"), "--body", "via unix"],
    );
    assert!(ok, "{out}");
    let msgs = wait_inbox(&pool, &u, 1);
    let backend = &l.backend_of(&pool, &u).name;
    assert!(String::from_utf8_lossy(&msgs[0]).contains(&format!("by {backend}")));
}

#[test]
fn silent_clients_and_hung_backends_time_out_with_4xx() {
    let pool = Pool::start(3);
    let s = LmtpSettings {
        client_timeout: Duration::from_secs(1),
        ..settings()
    };
    let options = DirectorOptions {
        login_timeout: "1s".into(),
        ..DirectorOptions::default()
    };
    let l = TestLmtp::start(&pool, s, &options);
    let users = users_on_distinct_backends(&l, 2);
    // A hung backend: its recipient is deferred, the other is delivered.
    let hung = l.backend_of(&pool, &users[0]);
    hung.pause();
    let (mut c, _) = connect(&l);
    assert!(cmd(&mut c, "MAIL FROM:<a@b.example>").starts_with("250 "));
    let started = std::time::Instant::now();
    let r = cmd(&mut c, &format!("RCPT TO:<{}@example.org>", users[0]));
    hung.resume();
    assert_eq!(r, "451 4.4.0 Backend unavailable, try again later");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(cmd(&mut c, &format!("RCPT TO:<{}@example.org>", users[1])).starts_with("250 "));
    assert!(cmd(&mut c, "DATA").starts_with("354 "));
    // The client stops in the middle of the message: nothing is delivered.
    c.send(b"Subject: cut\r\n\r\nhalf a mess");
    let r = reply(&mut c);
    assert!(r[0].starts_with("421 4.4.2"), "{r:?}");
    assert!(c.closed());
    std::thread::sleep(Duration::from_millis(500));
    assert!(inbox(&pool, &users[1]).is_empty());
    // Silent before any command.
    let mut c = Conn::connect(l.addr);
    reply(&mut c);
    assert!(reply(&mut c)[0].starts_with("421 4.4.2"));
    assert!(c.closed());
}
