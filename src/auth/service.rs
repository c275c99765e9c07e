//! The auth service as the front ends use it (`auth.mode: dovecot`): the mechanisms to offer,
//! the SASL steps relayed, and each answer turned into the session's next move. The service's
//! state (reachable or not) is logged once per change and shown in metrics; while it cannot
//! be reached, clients get a temporary failure (the credentials were not judged) and the
//! listeners without an auth service go on as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::dovecot::{
    AuthClient, AuthError, AuthFields, Challenge, Handshake, RequestInfo, Step, Transport,
};
use super::passdb::{clear_password, verdict};
use super::reachability::Reachability;
use crate::metrics::{AuthResult, Metrics};
use crate::protocol::preauth::{LoginFailure, Mechanisms, SaslClient, SaslMechanism, SaslStep};
use crate::untrusted::shown;

/// What clients are told when the auth service cannot answer.
pub const AUTH_UNAVAILABLE_TEXT: &str = "Authentication service is temporarily unavailable.";

/// One auth service, shared by the listeners configured with it; cheap to clone.
#[derive(Clone)]
pub struct AuthService {
    inner: Arc<Inner>,
}

struct Inner {
    client: AuthClient,
    metrics: Metrics,
    /// The mechanisms of the last handshake, offered while the service cannot be reached (its
    /// logins then fail temporarily).
    /// Kept with the handshake they were read from: a connection's handshake is read once,
    /// and each greeting after that gets the same list without copying it.
    last_mechanisms: Mutex<Option<(Arc<Handshake>, Mechanisms)>>,
    /// Whether the last contact worked: the service's state changes are logged once.
    state: Reachability,
    /// A reconnection runs in the background (see [`AuthService::mechanisms`]).
    reconnecting: AtomicBool,
}

/// An exchange under way: the service's challenge, and what the client said so far (for
/// a mechanism that sends the password in clear, the backend login needs it).
pub struct Exchange {
    challenge: Challenge,
    mechanism: String,
    responses: Vec<Vec<u8>>,
}

impl AuthService {
    pub fn new(client: AuthClient, metrics: Metrics) -> Self {
        let state = Reachability::new(
            client.endpoint().to_string(),
            "logins get a temporary failure",
            metrics.clone(),
        );
        AuthService {
            inner: Arc::new(Inner {
                client,
                metrics,
                last_mechanisms: Mutex::new(None),
                state,
                reconnecting: AtomicBool::new(false),
            }),
        }
    }

    pub fn client(&self) -> &AuthClient {
        &self.inner.client
    }

    /// The mechanisms the service offers (connecting if needed). Once they are known, a
    /// greeting never waits for the service: while no connection is open, the last known
    /// ones are offered at once and the connection is made again in the background (a
    /// frozen service cannot hold every greeting for the connect timeout). Before the first
    /// handshake, if the service cannot be reached: PLAIN and LOGIN (their logins then fail
    /// temporarily).
    pub async fn mechanisms(&self) -> Mechanisms {
        if !self.inner.client.is_connected() {
            if let Some((_, last)) = self.lock_last().clone() {
                self.reconnect_in_background();
                return last;
            }
        }
        self.handshake().await
    }

    /// One background reconnection at a time.
    fn reconnect_in_background(&self) {
        if self.inner.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let service = self.clone();
        tokio::spawn(async move {
            service.handshake().await;
            service.inner.reconnecting.store(false, Ordering::Release);
        });
    }

    /// The mechanisms of a (new) handshake, or the fallback.
    async fn handshake(&self) -> Mechanisms {
        match self.inner.client.handshake().await {
            Ok(handshake) => {
                self.inner.state.reached();
                let mut last = self.lock_last();
                if let Some((seen, offered)) = &*last {
                    if Arc::ptr_eq(seen, &handshake) {
                        return offered.clone();
                    }
                }
                let offered: Mechanisms = handshake
                    .mechanisms
                    .iter()
                    .filter(|m| !m.flags.private)
                    .map(|m| SaslMechanism {
                        name: m.name.clone(),
                        plaintext: m.flags.plaintext,
                    })
                    .collect();
                *last = Some((handshake, offered.clone()));
                offered
            }
            Err(error) => {
                self.inner.state.failed(&error);
                match &*self.lock_last() {
                    Some((_, offered)) => offered.clone(),
                    None => ["PLAIN", "LOGIN"]
                        .map(|name| SaslMechanism {
                            name: name.into(),
                            plaintext: true,
                        })
                        .into(),
                }
            }
        }
    }

    /// Starts an authentication (see [`crate::protocol::preauth::Authenticator::sasl_start`]).
    pub async fn start(
        &self,
        mechanism: &str,
        initial: Option<&[u8]>,
        client: &SaslClient<'_>,
    ) -> SaslStep<Exchange> {
        let info = request_info(client);
        let responses = initial.map(|r| vec![r.to_vec()]).unwrap_or_default();
        let answer = self.inner.client.start(mechanism, initial, &info).await;
        self.step(answer, mechanism.to_owned(), responses)
    }

    /// Sends the client's answer to the last challenge.
    pub async fn next(&self, exchange: Exchange, response: &[u8]) -> SaslStep<Exchange> {
        let Exchange {
            challenge,
            mechanism,
            mut responses,
        } = exchange;
        responses.push(response.to_vec());
        let answer = challenge.respond(response).await;
        self.step(answer, mechanism, responses)
    }

    fn step(
        &self,
        answer: Result<Step, AuthError>,
        mechanism: String,
        responses: Vec<Vec<u8>>,
    ) -> SaslStep<Exchange> {
        let metrics = &self.inner.metrics;
        match answer {
            Ok(Step::Continue(challenge)) => {
                self.inner.state.reached();
                SaslStep::Challenge(
                    challenge.data().to_vec(),
                    Exchange {
                        challenge,
                        mechanism,
                        responses,
                    },
                )
            }
            Ok(Step::Ok(fields)) => {
                self.inner.state.reached();
                let password = clear_password(&mechanism, &responses);
                match verdict(&fields, password) {
                    Ok((credentials, verified)) => {
                        metrics.auth(AuthResult::Ok);
                        SaslStep::Verified {
                            credentials,
                            verified,
                        }
                    }
                    Err(refusal) => {
                        metrics.auth(match refusal {
                            LoginFailure::Unavailable { .. } => AuthResult::TempFail,
                            _ => AuthResult::Refused,
                        });
                        log_refusal(&fields, &refusal);
                        SaslStep::Failed(refusal)
                    }
                }
            }
            Ok(Step::Fail(fields)) => {
                self.inner.state.reached();
                let message = fields.reason().unwrap_or_default().to_owned();
                if fields.temp() {
                    metrics.auth(AuthResult::TempFail);
                    tracing::info!(user = %shown(fields.user().unwrap_or_default()),
                                   reason = %shown(&message), "auth service: temporary failure");
                    let message = if message.is_empty() {
                        AUTH_UNAVAILABLE_TEXT.to_owned()
                    } else {
                        message
                    };
                    SaslStep::Failed(LoginFailure::Unavailable { message })
                } else {
                    metrics.auth(AuthResult::Failed);
                    SaslStep::Failed(LoginFailure::AuthFailed { message })
                }
            }
            Err(AuthError::UnsupportedMechanism(_)) => SaslStep::Unsupported,
            Err(error @ AuthError::TooLong { .. }) => {
                metrics.auth(AuthResult::Failed);
                tracing::info!(%error, "auth request refused");
                SaslStep::Failed(LoginFailure::AuthFailed {
                    message: String::new(),
                })
            }
            Err(error) => {
                metrics.auth(AuthResult::Error);
                self.inner.state.failed(&error);
                SaslStep::Failed(LoginFailure::Unavailable {
                    message: AUTH_UNAVAILABLE_TEXT.into(),
                })
            }
        }
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, Option<(Arc<Handshake>, Mechanisms)>> {
        self.inner
            .last_mechanisms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Logs why a user the service accepted is still turned away.
fn log_refusal(fields: &AuthFields, refusal: &LoginFailure) {
    let user = shown(fields.user().unwrap_or_default());
    match refusal {
        LoginFailure::Referral { host, .. } => {
            tracing::info!(user = %user, host = %shown(host), "auth service: nologin, referred elsewhere");
        }
        LoginFailure::AuthFailed { .. } => {
            tracing::info!(user = %user, "auth service: nologin");
        }
        // Logged where it was found (a passdb without what a proxy needs).
        LoginFailure::Unavailable { .. } => {}
    }
}

/// The `AUTH` line's description of the client, as Dovecot's login processes give it.
fn request_info(client: &SaslClient<'_>) -> RequestInfo {
    let mut info = RequestInfo::new(client.protocol.name());
    info.session_id = Some(client.identity.session_id.clone());
    info.local = Some(client.identity.local);
    info.remote = Some(client.identity.client);
    info.transport = if client.tls {
        Transport::Tls
    } else if client.trusted {
        Transport::Trusted
    } else {
        Transport::Insecure
    };
    info
}
