//! [`AuthClient`] against a scripted auth service on a unix socket: the multiplexing, the
//! failures, and what a hostile or broken service can and cannot do to it.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::test_socket::TestSocket;
use super::*;

const HANDSHAKE: &str = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n\
    MECH\tAPOP\tprivate\nSPID\t77\nCUID\t3\nCOOKIE\tc0ffee\nDONE\n";

/// A scripted auth service: the test plays its side of each connection.
struct Service {
    socket: TestSocket,
}

struct ServiceConn {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    out: OwnedWriteHalf,
}

impl Service {
    fn start() -> Service {
        Service {
            socket: TestSocket::bind("auth-client"),
        }
    }

    /// A service and a client of it with this request timeout.
    fn with_client(request_timeout: Duration) -> (Service, AuthClient) {
        let service = Service::start();
        let client = service.client(request_timeout);
        (service, client)
    }

    fn client(&self, request_timeout: Duration) -> AuthClient {
        AuthClient::new(AuthClientOptions {
            request_timeout,
            connect_timeout: Duration::from_secs(2),
            ..AuthClientOptions::new(self.socket.endpoint())
        })
    }

    /// Accepts a connection, checks the client's handshake and sends `handshake`.
    async fn accept_with(&self, handshake: &str) -> ServiceConn {
        let (stream, _) = self.socket.listener.accept().await.unwrap();
        let (r, out) = stream.into_split();
        let mut conn = ServiceConn {
            lines: BufReader::new(r).lines(),
            out,
        };
        assert_eq!(conn.line().await, "VERSION\t1\t2");
        assert_eq!(conn.line().await, format!("CPID\t{}", std::process::id()));
        conn.send(handshake).await;
        conn
    }

    async fn accept(&self) -> ServiceConn {
        self.accept_with(HANDSHAKE).await
    }

    /// Accepts a connection and reads its first request, whose rest after the id must be
    /// `tail`; returns the connection and the request's id.
    async fn accept_auth(&self, tail: &str) -> (ServiceConn, u32) {
        let mut conn = self.accept().await;
        let (id, got) = conn.auth().await;
        assert_eq!(got, tail);
        (conn, id)
    }

    /// A service, a client of it with this request timeout, and the connection of the
    /// client's handshake.
    async fn connected(request_timeout: Duration) -> (Service, AuthClient, ServiceConn) {
        let (service, client) = Service::with_client(request_timeout);
        let (_, conn) = tokio::join!(client.handshake(), service.accept());
        (service, client, conn)
    }
}

impl ServiceConn {
    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
            .await
            .expect("a line from the client")
            .unwrap()
            .expect("the client closed")
    }

    async fn send(&mut self, text: &str) {
        self.out.write_all(text.as_bytes()).await.unwrap();
    }

    /// Reads an `AUTH` line and returns its id and the rest.
    async fn auth(&mut self) -> (u32, String) {
        let line = self.line().await;
        let rest = line.strip_prefix("AUTH\t").expect(&line);
        let (id, tail) = rest.split_once('\t').unwrap();
        (id.parse().unwrap(), tail.to_owned())
    }
}

fn plain(user: &str) -> Vec<u8> {
    format!("\0{user}\0pw").into_bytes()
}

#[tokio::test]
async fn a_plain_login_is_one_request_and_one_answer() {
    let (service, client) = Service::with_client(Duration::from_secs(5));
    let server = async {
        let (mut conn, id) = service
            .accept_auth("PLAIN\tservice=imap\tresp=AHVzZXIxAHB3")
            .await;
        conn.send(&format!(
            "OK\t{id}\tuser=user1\tproxy\thost=127.0.0.2\tport=10143\tpass=pw\n"
        ))
        .await;
        conn
    };
    let (info, resp) = (RequestInfo::new("imap"), plain("user1"));
    let (step, _conn) = tokio::join!(client.start("plain", Some(&resp), &info), server);
    let Step::Ok(fields) = step.unwrap() else {
        panic!("not OK")
    };
    assert_eq!(fields.user(), Some("user1"));
    assert!(fields.proxy());
    assert_eq!(
        (fields.host(), fields.port()),
        (Some("127.0.0.2"), Some(10143))
    );
    assert_eq!(fields.pass().unwrap().expose(), "pw");
    assert!(!format!("{fields:?}").contains("pw\""), "{fields:?}");
    let handshake = client.handshake().await.unwrap();
    assert_eq!(handshake.server_pid, 77);
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn unknown_mechanisms_private_ones_and_oversized_requests_never_reach_the_service() {
    let (_service, client, mut conn) = Service::connected(Duration::from_secs(5)).await;
    let info = RequestInfo::new("imap");
    for mech in ["GSSAPI", "APOP", "PLAIN\tservice=x"] {
        let err = client.start(mech, None, &info).await.unwrap_err();
        assert!(matches!(err, AuthError::UnsupportedMechanism(_)), "{err}");
        assert!(!err.is_temporary());
    }
    let huge = vec![b'a'; 13_000];
    let err = client.start("PLAIN", Some(&huge), &info).await.unwrap_err();
    assert!(matches!(err, AuthError::TooLong { .. }), "{err}");
    assert!(!err.is_temporary());
    assert_eq!(client.in_flight(), 0);
    // The next line the service sees is a good request on the same connection.
    let (request, (id, tail)) = tokio::join!(client.start("LOGIN", None, &info), async {
        let got = conn.auth().await;
        conn.send(&format!("FAIL\t{}\tuser=x\n", got.0)).await;
        got
    });
    assert_eq!(id, 1, "refused requests took no id");
    assert_eq!(tail, "LOGIN\tservice=imap");
    assert!(matches!(request.unwrap(), Step::Fail(f) if !f.temp()));
}

#[tokio::test]
async fn multi_step_exchanges_relay_challenges_and_responses() {
    let (service, client) = Service::with_client(Duration::from_secs(5));
    let server = async {
        let (mut conn, id) = service.accept_auth("LOGIN\tservice=pop3").await;
        conn.send(&format!("CONT\t{id}\tVXNlcm5hbWU6\n")).await;
        assert_eq!(conn.line().await, format!("CONT\t{id}\tdXNlcjE="));
        conn.send(&format!("CONT\t{id}\tUGFzc3dvcmQ6\n")).await;
        assert_eq!(conn.line().await, format!("CONT\t{id}\tcHc="));
        conn.send(&format!("OK\t{id}\tuser=user1\n")).await;
        conn
    };
    let login = async {
        let info = RequestInfo::new("pop3");
        let Step::Continue(c) = client.start("LOGIN", None, &info).await.unwrap() else {
            panic!("no challenge")
        };
        assert_eq!(c.data(), b"Username:");
        let Step::Continue(c) = c.respond(b"user1").await.unwrap() else {
            panic!("no second challenge")
        };
        assert_eq!(c.data(), b"Password:");
        c.respond(b"pw").await.unwrap()
    };
    let (step, _conn) = tokio::join!(login, server);
    assert!(matches!(step, Step::Ok(f) if f.user() == Some("user1")));
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn a_dropped_challenge_is_cancelled_and_an_ended_one_answers_the_response() {
    let (service, client) = Service::with_client(Duration::from_secs(5));
    let info = RequestInfo::new("imap");
    let (first, mut conn) = tokio::join!(client.start("LOGIN", None, &info), async {
        let mut conn = service.accept().await;
        let (id, _) = conn.auth().await;
        conn.send(&format!("CONT\t{id}\t\n")).await;
        conn
    });
    let Step::Continue(challenge) = first.unwrap() else {
        panic!()
    };
    assert_eq!(challenge.data(), b"");
    let id = challenge.id();
    drop(challenge);
    assert_eq!(conn.line().await, format!("CANCEL\t{id}"));
    assert_eq!(client.in_flight(), 0);

    // The service ends a request while it waits for the client: the response gets that end.
    let (second, ()) = tokio::join!(client.start("LOGIN", None, &info), async {
        let (id, _) = conn.auth().await;
        conn.send(&format!(
            "CONT\t{id}\tAA==\nFAIL\t{id}\treason=Authentication request timed out\n"
        ))
        .await;
    });
    let Step::Continue(challenge) = second.unwrap() else {
        panic!()
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let step = challenge.respond(b"late").await.unwrap();
    assert!(
        matches!(step, Step::Fail(f) if f.reason() == Some("Authentication request timed out"))
    );
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn many_requests_share_one_connection_and_get_their_own_answers() {
    let (service, client) = Service::with_client(Duration::from_secs(10));
    let server = async {
        let mut conn = service.accept().await;
        let mut seen = Vec::new();
        for _ in 0..100 {
            let (id, tail) = conn.auth().await;
            seen.push((id, tail));
        }
        // Answer in reverse order, each with the user its request named.
        let mut answers = String::new();
        for (id, tail) in seen.iter().rev() {
            let resp = tail.rsplit_once("resp=").unwrap().1;
            answers.push_str(&format!("OK\t{id}\tuser={resp}\n"));
        }
        conn.send(&answers).await;
        let ids: std::collections::HashSet<u32> = seen.iter().map(|s| s.0).collect();
        assert_eq!(ids.len(), 100, "every request in flight has its own id");
        conn
    };
    let requests = (0..100).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let info = RequestInfo::new("imap");
            let resp = format!("user{i}");
            let step = client.start("PLAIN", Some(resp.as_bytes()), &info).await;
            (resp, step)
        })
    });
    let (results, _conn) = tokio::join!(futures_all(requests.collect()), server);
    for (resp, step) in results {
        let expected = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &resp);
        assert!(
            matches!(step, Ok(Step::Ok(ref f)) if f.user() == Some(expected.as_str())),
            "{resp}: {step:?}"
        );
    }
    assert_eq!(client.in_flight(), 0);
}

async fn futures_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn hostile_lines_fail_at_most_their_own_request() {
    let (_service, client, mut conn) = Service::connected(Duration::from_secs(5)).await;
    let info = RequestInfo::new("imap");
    let a = client.start("PLAIN", Some(b"a"), &info);
    let b = client.start("PLAIN", Some(b"b"), &info);
    let c = client.start("PLAIN", Some(b"c"), &info);
    let server = async {
        let ids = [
            conn.auth().await.0,
            conn.auth().await.0,
            conn.auth().await.0,
        ];
        let mut junk = String::new();
        junk.push_str("NOTIFY\tsomething new\n"); // unknown command
        junk.push_str("OK\t999\tuser=nobody\n"); // not in flight
        junk.push_str("OK\tnot-a-number\n");
        junk.push_str("MECH\tLATE\n"); // handshake line after DONE
        junk.push('\n');
        // An answer far over the cap fails its request only.
        junk.push_str(&format!("OK\t{}\tuser={}\n", ids[0], "x".repeat(200_000)));
        // A challenge that is not base64 fails its request only.
        junk.push_str(&format!("CONT\t{}\t%%%\n", ids[1]));
        junk.push_str(&format!("OK\t{}\tuser=c\n", ids[2]));
        conn.send(&junk).await;
        ids
    };
    let (a, b, c, ids) = tokio::join!(a, b, c, server);
    let a = a.unwrap_err();
    assert!(
        matches!(&a, AuthError::Protocol { detail, .. } if detail.contains("200")),
        "{a}"
    );
    assert!(
        a.to_string().len() < 300,
        "the line is shown truncated: {a}"
    );
    assert!(matches!(b.unwrap_err(), AuthError::Protocol { detail, .. } if detail.contains("%%%")));
    assert!(matches!(c.unwrap(), Step::Ok(f) if f.user() == Some("c")));
    // Both unusable answers are cancelled at the service (it may still hold the challenged
    // request); nothing else was sent.
    assert_eq!(conn.line().await, format!("CANCEL\t{}", ids[0]));
    assert_eq!(conn.line().await, format!("CANCEL\t{}", ids[1]));
    assert_eq!(client.in_flight(), 0);
    let (ok, ()) = tokio::join!(client.start("PLAIN", Some(b"d"), &info), async {
        let (id, _) = conn.auth().await;
        conn.send(&format!("OK\t{id}\tuser=d\n")).await;
    });
    assert!(matches!(ok.unwrap(), Step::Ok(_)), "the connection goes on");
}

#[tokio::test]
async fn a_request_without_an_answer_times_out_and_its_late_answer_is_ignored() {
    let (_service, client, mut conn) = Service::connected(Duration::from_millis(200)).await;
    let info = RequestInfo::new("imap");
    let started = Instant::now();
    let (step, (id, _)) = tokio::join!(client.start("PLAIN", Some(b"x"), &info), conn.auth());
    let err = step.unwrap_err();
    assert!(
        matches!(err, AuthError::Timeout { .. }) && err.is_temporary(),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(conn.line().await, format!("CANCEL\t{id}"));
    assert_eq!(client.in_flight(), 0);
    conn.send(&format!("OK\t{id}\tuser=late\n")).await;
    let (step, ()) = tokio::join!(client.start("PLAIN", Some(b"y"), &info), async {
        let (next, _) = conn.auth().await;
        assert_ne!(next, 0);
        conn.send(&format!("FAIL\t{next}\tuser=y\n")).await;
    });
    assert!(matches!(step.unwrap(), Step::Fail(f) if f.user() == Some("y")));
}

#[tokio::test]
async fn a_lost_connection_fails_requests_in_flight_and_the_next_request_reconnects() {
    let (service, client, mut conn) = Service::connected(Duration::from_secs(10)).await;
    let info = RequestInfo::new("imap");
    let started = Instant::now();
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let (client, info) = (client.clone(), info.clone());
            tokio::spawn(async move { client.start("PLAIN", Some(b"x"), &info).await })
        })
        .collect();
    for _ in 0..5 {
        conn.auth().await;
    }
    drop(conn);
    for r in futures_all(requests).await {
        let err = r.unwrap_err();
        assert!(
            matches!(err, AuthError::ConnectionLost { .. }) && err.is_temporary(),
            "{err}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let (step, ()) = tokio::join!(client.start("PLAIN", Some(b"z"), &info), async {
        let mut conn = service.accept().await;
        let (id, _) = conn.auth().await;
        assert_eq!(id, 1, "a new connection");
        conn.send(&format!("OK\t{id}\tuser=z\n")).await;
    });
    assert!(matches!(step.unwrap(), Step::Ok(_)));
}

#[tokio::test]
async fn a_service_of_another_major_version_or_none_at_all_is_refused_clearly() {
    let (service, client) = Service::with_client(Duration::from_secs(5));
    let (result, _conn) = tokio::join!(
        client.handshake(),
        service.accept_with("VERSION\t2\t0\nDONE\n")
    );
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            AuthError::Version {
                major: 2,
                minor: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2.0"), "{err}");

    // Within the back-off after a failure, callers get that failure without a new attempt.
    let again = tokio::time::timeout(Duration::from_millis(50), client.handshake()).await;
    assert!(
        matches!(again, Ok(Err(AuthError::Version { major: 2, .. }))),
        "{again:?}"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (result, _conn) = tokio::join!(
        client.handshake(),
        service.accept_with("VERSION\t1\t2\nMECH\tPLAIN\nSPID\tx\n")
    );
    let err = result.unwrap_err();
    assert!(
        matches!(&err, AuthError::Protocol { detail, .. } if detail.contains("SPID")),
        "{err}"
    );

    let missing = AuthClient::new(AuthClientOptions::new(Endpoint::Unix(
        service.socket.dir().join("nothing-here"),
    )));
    let err = missing.handshake().await.unwrap_err();
    assert!(
        matches!(err, AuthError::Connect { .. }) && err.is_temporary(),
        "{err}"
    );
}

#[tokio::test]
async fn a_silent_service_fails_the_connection_within_the_connect_timeout() {
    let service = Service::start();
    let client = AuthClient::new(AuthClientOptions {
        connect_timeout: Duration::from_millis(200),
        ..AuthClientOptions::new(service.socket.endpoint())
    });
    let started = Instant::now();
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.handshake().await })
        })
        .collect();
    let _accepted = service.socket.listener.accept().await.unwrap();
    for r in futures_all(callers).await {
        assert!(
            matches!(r.unwrap_err(), AuthError::Connect { reason, .. } if reason.contains("no handshake"))
        );
    }
    // The three callers shared one attempt.
    assert!(started.elapsed() < Duration::from_secs(2));
    let another =
        tokio::time::timeout(Duration::from_millis(100), service.socket.listener.accept());
    assert!(
        another.await.is_err(),
        "a second connection attempt was made"
    );
}

#[test]
fn endpoints_are_sockets_unless_host_and_port() {
    for tcp in ["127.0.0.1:9999", "[::1]:9999", "auth.example.org:12345"] {
        assert_eq!(Endpoint::parse(tcp), Endpoint::Tcp(tcp.into()));
    }
    for unix in [
        "/run/dovecot/auth-client",
        "auth-client",
        "./a:1",
        "host:notaport",
    ] {
        assert_eq!(Endpoint::parse(unix), Endpoint::Unix(unix.into()));
    }
}
