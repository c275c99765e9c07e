//! [`AuthMaster`] against a scripted auth-master service on a unix socket: what it sends, what
//! it makes of each answer, and what a broken, silent or hostile service can do to it.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::master::MAX_REQUEST_LINE;
use super::test_socket::TestSocket;
use super::*;

/// What Dovecot 2.3 sends on accepting an auth-master connection.
const GREETING: &str = "VERSION\t1\t1\nSPID\t4242\n";

/// A scripted auth-master service.
struct Fake {
    socket: TestSocket,
}

impl Fake {
    fn start() -> Fake {
        Fake {
            socket: TestSocket::bind("auth-master"),
        }
    }

    fn master(&self, request_timeout: Duration) -> AuthMaster {
        AuthMaster::new(AuthMasterOptions {
            request_timeout,
            connect_timeout: Duration::from_secs(2),
            ..AuthMasterOptions::new(self.socket.endpoint())
        })
    }

    async fn accept(&self) -> UnixStream {
        let accept = self.socket.listener.accept();
        let (stream, _) = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .expect("the client connects")
            .unwrap();
        stream
    }

    /// Accepts one connection, sends `script` at once (as Dovecot sends its greeting) and
    /// nothing more, and returns everything the client sent until it closed.
    async fn serve(&self, script: &[u8]) -> String {
        let mut stream = self.accept().await;
        stream.write_all(script).await.unwrap();
        stream.shutdown().await.unwrap();
        received(&mut stream).await
    }

    /// Whether a client connects within 200 ms.
    async fn connected(&self) -> bool {
        let accept = self.socket.listener.accept();
        tokio::time::timeout(Duration::from_millis(200), accept)
            .await
            .is_ok()
    }
}

/// Everything the client sends until it closes (at most 64 KiB, within 5 s).
async fn received(stream: &mut UnixStream) -> String {
    let mut sent = Vec::new();
    let mut limited = stream.take(64 * 1024);
    let read = limited.read_to_end(&mut sent);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the client closes")
        .unwrap();
    String::from_utf8(sent).unwrap()
}

fn lmtp_client() -> LookupInfo {
    LookupInfo {
        session_id: Some("s1".into()),
        local: Some("192.0.2.1:24".parse().unwrap()),
        remote: Some("[::ffff:198.51.100.7]:51000".parse().unwrap()),
        ..LookupInfo::new("lmtp")
    }
}

async fn pass_answer(script: &str) -> Result<Lookup, AuthError> {
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    let info = LookupInfo::new("lmtp");
    let (result, _) = tokio::join!(
        master.pass_lookup("user0001", &info),
        fake.serve(script.as_bytes())
    );
    result
}

#[tokio::test]
async fn a_found_user_comes_with_the_passdb_fields_and_the_request_is_what_lmtp_sends() {
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    let answer = format!(
        "{GREETING}PASS\t1\tuser=user0001\tproxy\thost=127.0.0.2\tport=10024\treason=a\x01tb\n"
    );
    let info = lmtp_client();
    let (result, sent) = tokio::join!(
        master.pass_lookup("User0001", &info),
        fake.serve(answer.as_bytes())
    );
    assert_eq!(
        sent,
        "VERSION\t1\t0\nPASS\t1\tUser0001\tservice=lmtp\tsession=s1\tlip=192.0.2.1\t\
         rip=198.51.100.7\tlport=24\trport=51000\n"
    );
    let Ok(Lookup::Found(fields)) = result else {
        panic!("{result:?}");
    };
    assert_eq!(fields.user(), Some("user0001"));
    assert!(fields.proxy());
    assert_eq!(
        (fields.host(), fields.port()),
        (Some("127.0.0.2"), Some(10024))
    );
    assert_eq!(fields.reason(), Some("a\tb"));
}

#[tokio::test]
async fn a_user_lookup_takes_the_user_from_its_place_in_the_answer() {
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    let answer = format!("{GREETING}USER\t1\tuser0001\tuid=1000\thome=/home/u1\n");
    let info = LookupInfo::new("lmtp");
    let (result, sent) = tokio::join!(
        master.user_lookup("user0001", &info),
        fake.serve(answer.as_bytes())
    );
    assert_eq!(sent, "VERSION\t1\t0\nUSER\t1\tuser0001\tservice=lmtp\n");
    let Ok(Lookup::Found(fields)) = result else {
        panic!("{result:?}");
    };
    assert_eq!(fields.user(), Some("user0001"));
    assert_eq!(fields.get("home"), Some("/home/u1"));
}

#[tokio::test]
async fn notfound_is_an_answer_and_fail_an_error_that_is_temporary() {
    assert_eq!(
        pass_answer(&format!("{GREETING}NOTFOUND\t1\n")).await,
        Ok(Lookup::NotFound)
    );
    let err = pass_answer(&format!(
        "{GREETING}FAIL\t1\treason=Configured passdbs don't support credentials lookups\n"
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&err, AuthError::LookupFailed { reason: Some(r), .. } if r.contains("credentials lookups"))
            && err.is_temporary(),
        "{err}"
    );
    let err = pass_answer(&format!("{GREETING}FAIL\t1\n"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AuthError::LookupFailed { reason: None, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no reason given"), "{err}");
}

#[tokio::test]
async fn broken_answers_are_protocol_errors_that_show_no_secret() {
    for (script, what) in [
        ("PASS\t1\tuser=x\n", "not VERSION"),
        ("VERSION\tone\t1\n", "VERSION"),
        (
            "VERSION\t1\t1\nMECH\tPLAIN\tplaintext\n",
            "auth-client socket",
        ),
        (
            "VERSION\t1\t1\nPASS\t2\tuser=x\tpass=hunter2\n",
            "request 2",
        ),
        ("VERSION\t1\t1\nPASS\n", "without a request id"),
        ("VERSION\t1\t1\nNOTFOUND\tx\n", "without a request id"),
        (
            "VERSION\t1\t1\nUSER\t1\tuser0001\n",
            "USER answer to a PASS",
        ),
        ("VERSION\t1\t1\nOK\t1\tpass=hunter2\n", "unexpected OK"),
        ("VERSION\t1\t1\n\u{7f}\u{1b}[2J\n", "unexpected"),
    ] {
        let err = pass_answer(script).await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, AuthError::Protocol { .. }) && err.is_temporary(),
            "{script:?}: {text}"
        );
        assert!(text.contains(what), "{script:?}: {text}");
        assert!(
            !text.contains("hunter2") && !text.contains('\x1b'),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_user_answer_without_a_user_is_refused() {
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    let answer = format!("{GREETING}USER\t1\t\tuid=1\n");
    let info = LookupInfo::new("lmtp");
    let (result, _) = tokio::join!(
        master.user_lookup("user0001", &info),
        fake.serve(answer.as_bytes())
    );
    assert!(
        matches!(&result, Err(AuthError::Protocol { detail, .. }) if detail.contains("without a user")),
        "{result:?}"
    );
}

#[tokio::test]
async fn another_major_version_is_refused() {
    let err = pass_answer("VERSION\t2\t0\nSPID\t1\n").await.unwrap_err();
    assert!(matches!(err, AuthError::Version { .. }), "{err}");
    assert!(
        err.to_string().contains("speaks auth protocol 2.0"),
        "{err}"
    );
}

#[tokio::test]
async fn a_service_that_closes_before_answering_loses_the_lookup() {
    for (script, what) in [
        ("", "without a greeting"),
        (GREETING, "without answering"),
        ("VERSION\t1\t1\nPASS\t1\tuser=user0001", "without answering"),
    ] {
        let err = pass_answer(script).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::ConnectionLost { reason, .. } if reason.contains(what))
                && err.is_temporary(),
            "{script:?}: {err}"
        );
    }
}

#[tokio::test]
async fn an_overlong_answer_is_cut_and_refused() {
    let mut script = format!("{GREETING}PASS\t1\tuser=").into_bytes();
    script.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    script.push(b'\n');
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(5));
    let info = LookupInfo::new("lmtp");
    let (result, _) = tokio::join!(master.pass_lookup("user0001", &info), async {
        let mut stream = fake.accept().await;
        // The client reads the whole line, keeping only its head; it may close first.
        let _ = stream.write_all(&script).await;
        received(&mut stream).await
    });
    assert!(
        matches!(&result, Err(AuthError::Protocol { detail, .. })
            if detail.contains("PASS line of") && detail.contains("over the 16384 kept")),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_silent_service_times_out_within_the_request_timeout() {
    let fake = Fake::start();
    let timeout = Duration::from_millis(300);
    let master = fake.master(timeout);
    let started = Instant::now();
    let info = LookupInfo::new("lmtp");
    let (result, _held) = tokio::join!(master.pass_lookup("user0001", &info), async {
        // Accepted, greeted, never answered: what a frozen service looks like.
        let mut stream = fake.accept().await;
        stream.write_all(GREETING.as_bytes()).await.unwrap();
        stream
    });
    let elapsed = started.elapsed();
    assert!(
        matches!(&result, Err(e @ AuthError::Timeout { .. }) if e.is_temporary()),
        "{result:?}"
    );
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    let fake = Fake::start();
    let master = AuthMaster::new(AuthMasterOptions::new(Endpoint::Unix(
        fake.socket.dir().join("nothing-here"),
    )));
    let err = master
        .pass_lookup("user0001", &LookupInfo::new("lmtp"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AuthError::Connect { .. }) && err.is_temporary(),
        "{err}"
    );
}

#[tokio::test]
async fn names_with_separators_are_escaped_into_one_parameter_of_one_request() {
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    let name = "nobody\tservice=imap\nPASS\t2\tuser0001\tservice=lmtp\r\x01";
    let info = LookupInfo::new("lmtp\tnopassword");
    let answer = format!("{GREETING}NOTFOUND\t1\n");
    let (result, sent) = tokio::join!(
        master.pass_lookup(name, &info),
        fake.serve(answer.as_bytes())
    );
    assert_eq!(result, Ok(Lookup::NotFound));
    let lines: Vec<&str> = sent.strip_suffix('\n').unwrap().split('\n').collect();
    assert_eq!(lines.len(), 2, "{sent:?}");
    let params: Vec<&str> = lines[1].split('\t').collect();
    assert_eq!(params.len(), 4, "{sent:?}");
    assert_eq!(params[0..2], ["PASS", "1"]);
    assert_eq!(wire::unescape(params[2].as_bytes()), name.as_bytes());
    assert_eq!(params[3], "service=lmtp\x01tnopassword");
}

#[tokio::test]
async fn a_name_with_a_nul_is_not_found_without_asking() {
    // The service would cut it at the NUL and look up "user0001".
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    let result = master
        .pass_lookup("user0001\0@example.org", &LookupInfo::new("lmtp"))
        .await;
    assert_eq!(result, Ok(Lookup::NotFound));
    assert!(!fake.connected().await, "a NUL name reached the service");
}

#[tokio::test]
async fn a_request_over_the_services_line_limit_is_refused_before_sending() {
    let fake = Fake::start();
    let master = fake.master(Duration::from_secs(2));
    // `PASS\t1\t` + name + `\tservice=lmtp\n` is 21 bytes + the name.
    let longest = "u".repeat(MAX_REQUEST_LINE - 21);
    let answer = format!("{GREETING}NOTFOUND\t1\n");
    let info = LookupInfo::new("lmtp");
    let (result, sent) = tokio::join!(
        master.pass_lookup(&longest, &info),
        fake.serve(answer.as_bytes())
    );
    assert_eq!(result, Ok(Lookup::NotFound));
    assert_eq!(sent.len(), "VERSION\t1\t0\n".len() + MAX_REQUEST_LINE);

    let err = master
        .pass_lookup(&format!("{longest}u"), &LookupInfo::new("lmtp"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AuthError::TooLong {
            len: MAX_REQUEST_LINE + 1,
            max: MAX_REQUEST_LINE
        }
    );
    assert!(!err.is_temporary());
    assert!(!fake.connected().await, "an overlong request was sent");
}

#[tokio::test]
async fn lookups_over_the_connection_limit_wait_for_a_free_one() {
    let fake = Fake::start();
    let master = AuthMaster::new(AuthMasterOptions {
        max_connections: 1,
        ..AuthMasterOptions::new(fake.socket.endpoint())
    });
    let lookup = |user: &'static str| {
        let master = master.clone();
        tokio::spawn(async move { master.pass_lookup(user, &LookupInfo::new("lmtp")).await })
    };
    let first = lookup("a");
    let mut first_conn = fake.accept().await;
    let second = lookup("b");
    assert!(!fake.connected().await, "the second lookup did not wait");
    let answer = format!("{GREETING}NOTFOUND\t1\n");
    first_conn.write_all(answer.as_bytes()).await.unwrap();
    assert_eq!(first.await.unwrap(), Ok(Lookup::NotFound));
    let (_, sent) = tokio::join!(
        async { assert_eq!(second.await.unwrap(), Ok(Lookup::NotFound)) },
        fake.serve(answer.as_bytes())
    );
    assert!(sent.contains("PASS\t1\tb\t"), "{sent:?}");
}
