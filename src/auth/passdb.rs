//! What a passdb's answer means for the session, with Dovecot's meanings of its fields: the
//! auth service said `OK` with fields, and this turns them into the backend login's
//! credentials and the route ([`Verified`]), or into the refusal the client gets. A lookup
//! without a password (an LMTP recipient, over the auth-master socket) reads only the route
//! ([`route`]).
//!
//! - `user`: the user as the passdb names it; routing hashes it.
//! - `destuser`: log in to the backend as this user instead.
//! - `master` + `pass`: log in to the backend as that master user for the user (SASL PLAIN
//!   with the user as authorization identity); else `pass` (a login socket returns the
//!   client's own password on a `proxy` login) or the password the client sent in clear.
//! - `host`, `hostip`, `port`: the backend, outside the ring. `ssl=yes|any-cert`,
//!   `starttls=yes|any-cert`: TLS to it. `proxy_timeout`: seconds for its login.
//! - `nologin` + `reason`: refused with that text; with `host`, a referral there.
//! - `forward_NAME`: sent on to the backend; `director_tag`: the pool of backends.
//! - Anything else is ignored (logged at debug).

use std::net::IpAddr;
use std::time::Duration;

use super::dovecot::AuthFields;
use crate::config::BackendTls;
use crate::protocol::decision::{Credentials, Secret, UserTls, Verified};
use crate::protocol::preauth::LoginFailure;
use crate::protocol::sasl;
use crate::untrusted::shown;

/// Fields the director acts on or knowingly passes over; others are logged at debug.
const KNOWN: &[&str] = &[
    "user",
    "original_user",
    "destuser",
    "master",
    "pass",
    "host",
    "hostip",
    "port",
    "ssl",
    "starttls",
    "proxy",
    "proxy_maybe",
    "proxy_timeout",
    "nologin",
    "reason",
    "director_tag",
    "nopassword",
    "temp",
    "code",
    "resp",
];

/// What the passdb's `OK` means: the backend login's credentials and the route, or why the
/// client is turned away. `client_password` is what the client sent in clear (PLAIN, LOGIN,
/// IMAP `LOGIN`), if it did.
pub fn verdict(
    fields: &AuthFields,
    client_password: Option<Secret>,
) -> Result<(Credentials, Verified), LoginFailure> {
    let user = user_of(fields)?;
    let reason = fields.reason().unwrap_or_default().to_owned();
    if fields.nologin() {
        if fields.temp() {
            return Err(LoginFailure::Unavailable { message: reason });
        }
        return Err(match fields.host() {
            Some(host) => LoginFailure::Referral {
                user: user.to_owned(),
                host: host.to_owned(),
                message: reason,
            },
            None => LoginFailure::AuthFailed { message: reason },
        });
    }
    let login_user = fields.destuser().unwrap_or(user);
    let credentials = match fields.master() {
        Some(master) => {
            let Some(pass) = fields.pass() else {
                return Err(misconfigured(&format!(
                    "user {}: master={} without pass",
                    shown(user),
                    shown(master)
                )));
            };
            Credentials {
                username: login_user.to_owned(),
                auth_username: master.to_owned(),
                password: pass,
            }
        }
        None => {
            let Some(password) = fields.pass().or(client_password) else {
                return Err(misconfigured(&format!(
                    "user {}: no password for the backend login (the mechanism sends none in clear: \
                     use a login socket, a listener named *-login, with proxy=y, or return pass or master)",
                    shown(user)
                )));
            };
            Credentials {
                username: login_user.to_owned(),
                auth_username: login_user.to_owned(),
                password,
            }
        }
    };
    Ok((credentials, route(fields)?))
}

/// The route a passdb's answer gives its user (`user`, `host`, `hostip`, `port`, TLS,
/// `proxy_timeout`, `forward_*`, `director_tag`), without credentials: what a lookup without
/// a password (an LMTP recipient) needs. `nologin` is not read here: it refuses logins, not
/// mail. A value that cannot be used is the passdb's fault: logged, and a temporary failure.
pub fn route(fields: &AuthFields) -> Result<Verified, LoginFailure> {
    let user = user_of(fields)?;
    let hostip = match fields.hostip() {
        None | Some("") => None,
        Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| {
            misconfigured(&format!(
                "user {}: hostip={} is not an address",
                shown(user),
                shown(ip)
            ))
        })?),
    };
    let port = match fields.get("port") {
        None | Some("") => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            misconfigured(&format!(
                "user {}: port={} is not a port",
                shown(user),
                shown(p)
            ))
        })?),
    };
    let tls = if fields.ssl() {
        Some(BackendTls::Implicit)
    } else if fields.starttls() {
        Some(BackendTls::Starttls)
    } else {
        None
    }
    .map(|mode| UserTls {
        mode,
        verify: !fields.any_cert(),
    });
    let proxy_timeout = match fields.get("proxy_timeout") {
        None | Some("") => None,
        Some(t) => Some(parse_timeout(t).ok_or_else(|| {
            misconfigured(&format!(
                "user {}: proxy_timeout={} is not a number of seconds",
                shown(user),
                shown(t)
            ))
        })?),
    };
    let mut forward = Vec::new();
    for (key, value) in fields.iter() {
        if let Some(name) = key.strip_prefix("forward_") {
            let value = String::from_utf8_lossy(value.unwrap_or_default()).into_owned();
            forward.push((name.to_owned(), value));
        } else if !KNOWN.contains(&key) {
            tracing::debug!(user = %shown(user), field = %shown(key), "auth service: field ignored");
        }
    }
    Ok(Verified {
        user: user.to_owned(),
        host: fields.host().filter(|h| !h.is_empty()).map(str::to_owned),
        hostip,
        port,
        tls,
        proxy_timeout,
        forward,
        tag: fields
            .get("director_tag")
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    })
}

/// The answer's `user`, which every answer that says yes must carry.
fn user_of(fields: &AuthFields) -> Result<&str, LoginFailure> {
    fields
        .user()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| misconfigured("OK without a user"))
}

/// A passdb answer the director cannot act on: logged as the operator's to fix, and a
/// temporary failure for the client (a login, or an LMTP recipient).
fn misconfigured(what: &str) -> LoginFailure {
    tracing::error!("auth service: {what}: turned away for now (check the passdb)");
    LoginFailure::Unavailable {
        message: String::new(),
    }
}

/// Dovecot's `proxy_timeout`: seconds, or milliseconds with `ms` (`500ms`); also any duration
/// humantime reads (`1m`).
fn parse_timeout(text: &str) -> Option<Duration> {
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs)).filter(|d| !d.is_zero());
    }
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
}

/// The password in a client's responses of a mechanism that sends it in clear (PLAIN's one
/// response, LOGIN's second), for a backend login when the service returns none.
pub fn clear_password(mechanism: &str, responses: &[Vec<u8>]) -> Option<Secret> {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok().map(Secret::new);
    if mechanism.eq_ignore_ascii_case("PLAIN") {
        return sasl::parse_plain(responses.first()?)
            .ok()
            .map(|c| c.password);
    }
    if mechanism.eq_ignore_ascii_case("LOGIN") {
        return text(responses.get(1)?);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> AuthFields {
        AuthFields::new(
            text.split('\t')
                .map(|f| match f.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.as_bytes().to_vec())),
                    None => (f.to_owned(), None),
                })
                .collect(),
        )
    }

    fn ok(text: &str, client: Option<&str>) -> (Credentials, Verified) {
        verdict(&fields(text), client.map(Secret::new)).unwrap()
    }

    #[test]
    fn routing_fields_are_read() {
        let (c, v) = ok(
            "user=alice@example.com\tproxy\thost=mail2\thostip=10.0.0.2\tport=1143\t\
             starttls=any-cert\tproxy_timeout=7\tforward_x=1\tdirector_tag=vip\tdestuser=al",
            Some("pw"),
        );
        assert_eq!(v.user, "alice@example.com");
        assert_eq!(v.host.as_deref(), Some("mail2"));
        assert_eq!(v.hostip, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(v.port, Some(1143));
        assert_eq!(
            v.tls,
            Some(UserTls {
                mode: BackendTls::Starttls,
                verify: false
            })
        );
        assert_eq!(v.proxy_timeout, Some(Duration::from_secs(7)));
        assert_eq!(v.forward, vec![("x".to_owned(), "1".to_owned())]);
        assert_eq!(v.tag.as_deref(), Some("vip"));
        assert_eq!(
            (c.username.as_str(), c.auth_username.as_str()),
            ("al", "al")
        );
        assert_eq!(c.password.expose(), "pw");
        let (_, v) = ok("user=a\tssl=yes", Some("pw"));
        assert_eq!(
            v.tls,
            Some(UserTls {
                mode: BackendTls::Implicit,
                verify: true
            })
        );
    }

    #[test]
    fn the_password_comes_from_pass_or_the_client_or_a_master() {
        let (c, _) = ok("user=a\tpass=frompassdb", Some("client"));
        assert_eq!(c.password.expose(), "frompassdb");
        let (c, _) = ok("user=a\tmaster=admin\tpass=mpw", Some("client"));
        assert_eq!(
            (
                c.username.as_str(),
                c.auth_username.as_str(),
                c.password.expose()
            ),
            ("a", "admin", "mpw")
        );
        // CRAM-MD5 without pass: nothing to log in with, a temporary failure.
        let e = verdict(&fields("user=a\tproxy"), None).unwrap_err();
        assert!(matches!(e, LoginFailure::Unavailable { .. }), "{e:?}");
        let e = verdict(&fields("user=a\tmaster=admin"), Some(Secret::new("x"))).unwrap_err();
        assert!(matches!(e, LoginFailure::Unavailable { .. }), "{e:?}");
    }

    #[test]
    fn nologin_refuses_or_refers() {
        let e = verdict(&fields("user=a\tnologin\treason=Moved"), None).unwrap_err();
        assert_eq!(
            e,
            LoginFailure::AuthFailed {
                message: "Moved".into()
            }
        );
        let e = verdict(
            &fields("user=a\tnologin\thost=new.example\treason=Go"),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e,
            LoginFailure::Referral {
                user: "a".into(),
                host: "new.example".into(),
                message: "Go".into()
            }
        );
        let e = verdict(&fields("user=a\tnologin\ttemp"), None).unwrap_err();
        assert!(matches!(e, LoginFailure::Unavailable { .. }));
    }

    #[test]
    fn bad_values_are_the_passdbs_fault_not_the_clients() {
        for bad in [
            "port=99999",
            "port=x",
            "hostip=mail",
            "proxy_timeout=soon",
            "",
        ] {
            let text = if bad.is_empty() {
                "proxy".to_owned()
            } else {
                format!("user=a\t{bad}")
            };
            let e = verdict(&fields(&text), Some(Secret::new("pw"))).unwrap_err();
            assert!(
                matches!(e, LoginFailure::Unavailable { .. }),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn clear_passwords_of_plain_and_login() {
        let p = clear_password("plain", &[b"\0alice\0secret".to_vec()]).unwrap();
        assert_eq!(p.expose(), "secret");
        let p = clear_password("LOGIN", &[b"alice".to_vec(), b"pw".to_vec()]).unwrap();
        assert_eq!(p.expose(), "pw");
        assert!(clear_password("CRAM-MD5", &[b"alice 0123".to_vec()]).is_none());
    }
}
