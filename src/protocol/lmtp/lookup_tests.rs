//! The session with a scripted [`RecipientLookup`] and scripted backends: each answer of the
//! lookup becomes what the MTA sees, and a recipient routed outside the pool is delivered
//! there without a record.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixStream};

use super::command::RecipientUsername;
use super::lookup::{RecipientLookup, RecipientRoute};
use super::session::Session;
use super::LmtpSettings;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::net::shutdown::Shutdown;
use crate::net::stream::ClientStream;
use crate::protocol::decision::ClientIdentity;
use crate::routing::user_hash::UserHash;
use crate::state::backend::{AdminState, Backend, Health};
use crate::state::local::LocalState;
use crate::state::router::{Route, RouteReason, Router};
use crate::state::State;

/// A backend's LMTP service that accepts every recipient and message; the RCPT addresses it
/// was given are kept.
struct FakeBackend {
    addr: SocketAddr,
    rcpts: Arc<Mutex<Vec<String>>>,
}

impl FakeBackend {
    async fn start(ip: &str) -> FakeBackend {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rcpts = Arc::new(Mutex::new(Vec::new()));
        let seen = rcpts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_backend(tcp, seen.clone()));
            }
        });
        FakeBackend { addr, rcpts }
    }

    fn backend(&self) -> Backend {
        let yaml = format!(
            "listeners: [{{protocol: lmtp, address: 127.0.0.1:0}}]\n\
             backends: [{{host: {}, ports: {{lmtp: {}}}}}]\n",
            self.addr.ip(),
            self.addr.port()
        );
        let config = Config::parse(&yaml).unwrap();
        Backend {
            ip: self.addr.ip(),
            host: self.addr.ip().to_string().into(),
            weight: 100,
            tag: "".into(),
            admin: AdminState::Up,
            health: Health::Up,
            settings: Arc::new(config.backend_settings(0)),
        }
    }

    fn rcpts(&self) -> Vec<String> {
        self.rcpts.lock().unwrap().clone()
    }
}

async fn serve_backend(tcp: tokio::net::TcpStream, rcpts: Arc<Mutex<Vec<String>>>) {
    let (read, mut write) = tcp.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"220 fake LMTP\r\n").await;
    let mut accepted = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match line.get(..4).unwrap_or_default() {
            "LHLO" => "250-fake\r\n250 8BITMIME\r\n".to_owned(),
            "RCPT" => {
                rcpts.lock().unwrap().push(line[8..].to_owned());
                accepted += 1;
                "250 2.1.5 OK\r\n".to_owned()
            }
            "DATA" => {
                let _ = write.write_all(b"354 go\r\n").await;
                while let Ok(Some(l)) = lines.next_line().await {
                    if l == "." {
                        break;
                    }
                }
                "250 2.0.0 Saved\r\n".repeat(accepted)
            }
            "QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            }
            _ => "250 2.0.0 OK\r\n".to_owned(),
        };
        let _ = write.write_all(reply.as_bytes()).await;
    }
}

/// The ring, except for three users: `ghost` does not exist, `flaky`'s lookup fails, and
/// `pinned` goes to `outside`, a backend the pool does not have.
struct Scripted {
    router: Router,
    outside: Backend,
}

impl RecipientLookup for Scripted {
    async fn lookup(&self, username: &str, identity: &ClientIdentity) -> RecipientRoute {
        match username {
            "ghost" => RecipientRoute::Unknown,
            "flaky" => RecipientRoute::LookupFailed,
            "pinned" => RecipientRoute::Deliver {
                user: "pinned".into(),
                route: Route {
                    user_hash: self.router.hash(username),
                    backend: self.outside.clone(),
                    reason: RouteReason::Pinned,
                    fallbacks: Default::default(),
                },
            },
            _ => self.router.lookup(username, identity).await,
        }
    }
}

/// Sends `line` and reads one whole reply; returns its last line.
async fn say(client: &mut BufReader<UnixStream>, line: &str) -> String {
    client
        .get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    last_line(client).await
}

async fn last_line(client: &mut BufReader<UnixStream>) -> String {
    loop {
        let mut l = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_line(&mut l));
        assert!(read.await.unwrap().unwrap() > 0, "the session closed");
        if l.as_bytes().get(3) != Some(&b'-') {
            return l.trim_end().to_owned();
        }
    }
}

fn counted(m: &Metrics, result: &str) -> f64 {
    m.sample("director_lmtp_recipients_total", result)
        .unwrap_or(0.0)
}

#[tokio::test]
async fn each_answer_of_the_lookup_reaches_the_mta() {
    let pool = FakeBackend::start("127.0.0.1").await;
    let outside = FakeBackend::start("127.0.0.3").await;
    let state = Arc::new(LocalState::new(
        vec![pool.backend()],
        Duration::from_secs(60),
    ));
    let router = Router::new(state.clone() as Arc<dyn State>, UserHash::default());
    let lookup = Scripted {
        router: router.clone(),
        outside: outside.backend(),
    };
    let settings = Arc::new(LmtpSettings {
        hostname: "director.test".into(),
        recipient_username: RecipientUsername::LocalPart,
        ..LmtpSettings::default()
    });
    let metrics = Metrics::new();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let unix = "0.0.0.0:0".parse().unwrap();
    let identity = ClientIdentity {
        client: unix,
        local: unix,
        session_id: "unit".into(),
        session_ext_id: None,
    };
    let session = Session::new(
        ClientStream::Unix(theirs),
        identity,
        router.clone(),
        lookup,
        settings,
        metrics.clone(),
        Shutdown::default(),
    );
    let served = tokio::spawn(session.run());
    let mut mta = BufReader::new(ours);
    assert!(last_line(&mut mta).await.starts_with("220 director.test"));
    assert!(say(&mut mta, "LHLO mta.test").await.starts_with("250 "));
    assert!(say(&mut mta, "MAIL FROM:<s@example.org>")
        .await
        .starts_with("250 "));
    assert_eq!(
        say(&mut mta, "RCPT TO:<ghost+box@example.org>").await,
        "550 5.1.1 <ghost+box@example.org> User doesn't exist: ghost"
    );
    assert_eq!(
        say(&mut mta, "RCPT TO:<flaky@example.org>").await,
        "451 4.3.0 <flaky@example.org> Temporary user lookup failure"
    );
    assert!(say(&mut mta, "RCPT TO:<alice@example.org>")
        .await
        .starts_with("250 "));
    assert!(say(&mut mta, "RCPT TO:<pinned@example.org>")
        .await
        .starts_with("250 "));
    assert!(say(&mut mta, "DATA").await.starts_with("354 "));
    let message = "Subject: hi\r\n\r\nhello\r\n.";
    assert!(say(&mut mta, message).await.starts_with("250 "));
    assert!(last_line(&mut mta).await.starts_with("250 "));
    assert!(say(&mut mta, "QUIT").await.starts_with("221 "));
    let mut rest = Vec::new();
    let _ = mta.read_to_end(&mut rest).await;
    served.await.unwrap().unwrap();

    assert_eq!(pool.rcpts(), ["<alice@example.org>"]);
    assert_eq!(outside.rcpts(), ["<pinned@example.org>"]);
    // The pool's user keeps a record; the one outside the pool gets none.
    let now = Instant::now();
    assert!(state.record(router.hash("alice"), now).is_some());
    assert!(state.record(router.hash("pinned"), now).is_none());
    let counts: Vec<f64> = ["delivered", "deferred", "rejected"]
        .iter()
        .map(|r| counted(&metrics, r))
        .collect();
    assert_eq!(counts, [2.0, 1.0, 1.0]);
}
