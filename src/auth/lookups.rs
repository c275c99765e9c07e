//! User lookups without a password (`auth.mode: dovecot`, LMTP recipients): a passdb lookup
//! over the auth service's auth-master socket, as Dovecot's LMTP proxy makes one, its answer
//! read for the route as a login's would be ([`super::passdb::route`]). Every lookup is
//! counted in `director_auth_lookups_total`; the socket's state is logged once per change and
//! shown in `director_auth_service_up`, so a service that is down costs one log line however
//! many recipients wait.

use std::net::SocketAddr;
use std::sync::Arc;

use super::dovecot::{AuthError, AuthMaster, Endpoint, Lookup, LookupInfo};
use super::passdb::route;
use super::reachability::Reachability;
use crate::metrics::{LookupResult, Metrics};
use crate::protocol::decision::{ClientIdentity, Protocol, Verified};
use crate::untrusted::shown;

/// The lookups of one auth-master socket, shared by the listeners that name it; cheap to
/// clone.
#[derive(Clone)]
pub struct UserLookups {
    inner: Arc<Inner>,
}

struct Inner {
    master: AuthMaster,
    metrics: Metrics,
    state: Reachability,
}

/// What the user database says of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserLookup {
    /// The user exists: its name as the database spells it, and its route.
    Found(Verified),
    /// No such user.
    NotFound,
    /// The service could not tell: unreachable, silent, its passdb failed, or its answer
    /// cannot be used (logged). Ask again later.
    Unavailable,
}

impl UserLookups {
    pub fn new(master: AuthMaster, metrics: Metrics) -> Self {
        let state = Reachability::new(
            master.endpoint().to_string(),
            "LMTP recipients get a temporary failure",
            metrics.clone(),
        );
        UserLookups {
            inner: Arc::new(Inner {
                master,
                metrics,
                state,
            }),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.inner.master.endpoint()
    }

    /// Looks `user` up in the passdbs for a client of `protocol` (the passdb's `%s`, `%{rip}`
    /// and the service's log see who asks).
    pub async fn lookup(
        &self,
        user: &str,
        protocol: Protocol,
        identity: &ClientIdentity,
    ) -> UserLookup {
        let Inner {
            master,
            metrics,
            state,
        } = &*self.inner;
        let (answer, result) = match master.pass_lookup(user, &info(protocol, identity)).await {
            Ok(Lookup::Found(fields)) => {
                state.reached();
                match route(&fields) {
                    Ok(verified) => (UserLookup::Found(verified), LookupResult::Found),
                    // Logged where it was found.
                    Err(_) => (UserLookup::Unavailable, LookupResult::TempFail),
                }
            }
            Ok(Lookup::NotFound) => {
                state.reached();
                (UserLookup::NotFound, LookupResult::NotFound)
            }
            // A name no request line can carry is no user the database can have.
            Err(error @ AuthError::TooLong { .. }) => {
                tracing::info!(user = %shown(user), %error, "user lookup refused: name too long");
                (UserLookup::NotFound, LookupResult::NotFound)
            }
            Err(error) => {
                state.failed(&error);
                (UserLookup::Unavailable, LookupResult::Error)
            }
        };
        metrics.auth_lookup(result);
        answer
    }
}

/// Who asks, as the lookup tells the service. A unix-socket client has no addresses
/// (`0.0.0.0:0`), and none are sent then.
fn info(protocol: Protocol, identity: &ClientIdentity) -> LookupInfo {
    let known = |a: SocketAddr| Some(a).filter(|a| !a.ip().is_unspecified());
    LookupInfo {
        session_id: Some(identity.session_id.clone()),
        local: known(identity.local),
        remote: known(identity.client),
        ..LookupInfo::new(protocol.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::dovecot::test_socket::TestSocket;
    use crate::auth::dovecot::AuthMasterOptions;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn identity() -> ClientIdentity {
        ClientIdentity {
            client: "192.0.2.7:4567".parse().unwrap(),
            local: "127.0.0.1:24".parse().unwrap(),
            session_id: "s1".into(),
            session_ext_id: None,
        }
    }

    fn lookups(endpoint: Endpoint, metrics: &Metrics) -> UserLookups {
        let options = AuthMasterOptions {
            request_timeout: std::time::Duration::from_secs(5),
            ..AuthMasterOptions::new(endpoint)
        };
        UserLookups::new(AuthMaster::new(options), metrics.clone())
    }

    fn counted(m: &Metrics, result: &str) -> f64 {
        m.sample("director_auth_lookups_total", result)
            .unwrap_or(0.0)
    }

    /// Answers one lookup with `answer` after Dovecot's greeting.
    async fn answer_once(socket: &TestSocket, answer: &str) {
        let (mut stream, _) = socket.listener.accept().await.unwrap();
        let script = format!("VERSION\t1\t1\nSPID\t42\n{answer}\n");
        stream.write_all(script.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn answers_become_routes_and_are_counted() {
        let socket = TestSocket::bind("auth-master");
        let m = Metrics::new();
        let l = lookups(socket.endpoint(), &m);
        let who = identity();
        // `nologin` refuses logins, not mail: the route is read all the same.
        let (found, _) = tokio::join!(
            l.lookup("Alice", Protocol::Lmtp, &who),
            answer_once(
                &socket,
                "PASS\t1\tuser=alice\thost=10.0.0.9\tport=2424\tdirector_tag=vip\tnologin"
            )
        );
        let UserLookup::Found(v) = found else {
            panic!("{found:?}")
        };
        assert_eq!(
            (v.user.as_str(), v.host.as_deref(), v.port, v.tag.as_deref()),
            ("alice", Some("10.0.0.9"), Some(2424), Some("vip"))
        );
        let (unknown, _) = tokio::join!(
            l.lookup("nobody", Protocol::Lmtp, &who),
            answer_once(&socket, "NOTFOUND\t1")
        );
        assert_eq!(unknown, UserLookup::NotFound);
        let (unusable, _) = tokio::join!(
            l.lookup("bob", Protocol::Lmtp, &who),
            answer_once(&socket, "PASS\t1\tuser=bob\tport=none")
        );
        assert_eq!(unusable, UserLookup::Unavailable);
        let (failed, _) = tokio::join!(
            l.lookup("carol", Protocol::Lmtp, &who),
            answer_once(&socket, "FAIL\t1\treason=ldap down")
        );
        assert_eq!(failed, UserLookup::Unavailable);
        let counts: Vec<f64> = ["found", "not_found", "tempfail", "error"]
            .iter()
            .map(|r| counted(&m, r))
            .collect();
        assert_eq!(counts, [1.0, 1.0, 1.0, 1.0]);
    }

    #[tokio::test]
    async fn a_service_that_is_down_is_a_temporary_failure() {
        let socket = TestSocket::bind("auth-master");
        let m = Metrics::new();
        let l = lookups(Endpoint::Unix(socket.dir().join("gone")), &m);
        for _ in 0..3 {
            assert_eq!(
                l.lookup("alice", Protocol::Lmtp, &identity()).await,
                UserLookup::Unavailable
            );
        }
        assert_eq!(counted(&m, "error"), 3.0);
    }

    #[test]
    fn a_unix_socket_client_sends_no_addresses() {
        let unix = ClientIdentity {
            client: "0.0.0.0:0".parse().unwrap(),
            local: "0.0.0.0:0".parse().unwrap(),
            session_id: "s1".into(),
            session_ext_id: None,
        };
        let i = info(Protocol::Lmtp, &unix);
        assert_eq!(
            (i.service.as_str(), i.local, i.remote),
            ("lmtp", None, None)
        );
        let tcp = ClientIdentity {
            client: "192.0.2.7:4567".parse().unwrap(),
            local: "127.0.0.1:24".parse().unwrap(),
            ..unix
        };
        let i = info(Protocol::Lmtp, &tcp);
        assert_eq!(i.remote, Some(tcp.client));
        assert_eq!(i.session_id.as_deref(), Some("s1"));
    }
}
