//! The client side of SASL DIGEST-MD5 (RFC 2831), which no Debian mail client here speaks
//! against an IMAP server on demand: the tests compute the response to a server's challenge
//! and check the server's `rspauth`.
//!
//! Only what Dovecot 2.3's server side needs: `qop=auth`, `charset=utf-8`, nonce count 1
//! (Dovecot refuses re-authentication), the first realm offered (Dovecot offers `realm=""`
//! when it has no `auth_realms`; an empty realm is then left out of the user's name).

#![allow(dead_code)]

use std::fmt::Write as _;

use md5::{Digest, Md5};

/// Who logs in, and how the response names the service.
#[derive(Debug, Clone)]
pub struct DigestMd5<'a> {
    /// The authentication identity (`username`).
    pub user: &'a str,
    pub password: &'a str,
    /// The authorisation identity, when the client asks to act as someone else.
    pub authzid: Option<&'a str>,
    /// `serv-type/host`, e.g. `imap/localhost`.
    pub digest_uri: &'a str,
    /// The client's nonce.
    pub cnonce: &'a str,
}

/// A computed response and what the server must answer to prove it knew the password.
#[derive(Debug, Clone)]
pub struct DigestResponse {
    /// The response to send (before base64).
    pub text: Vec<u8>,
    /// The server's expected second challenge, `rspauth=HEX`.
    pub rspauth: String,
}

impl DigestMd5<'_> {
    /// The response to the server's first challenge `challenge` (decoded).
    pub fn respond(&self, challenge: &[u8]) -> DigestResponse {
        let challenge = String::from_utf8(challenge.to_vec()).expect("a UTF-8 challenge");
        let directives = directives(&challenge);
        let get = |name: &str| {
            directives
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let nonce = get("nonce").unwrap_or_else(|| panic!("no nonce in {challenge:?}"));
        let qop = get("qop").unwrap_or("auth");
        assert!(
            qop.split(',').any(|q| q.trim() == "auth"),
            "the server offers no qop=auth: {challenge:?}"
        );
        let realm = get("realm").unwrap_or("");
        let nc = "00000001";

        let mut a1 = Md5::digest(format!("{}:{realm}:{}", self.user, self.password)).to_vec();
        a1.extend_from_slice(format!(":{nonce}:{}", self.cnonce).as_bytes());
        if let Some(authzid) = self.authzid {
            a1.extend_from_slice(format!(":{authzid}").as_bytes());
        }
        let ha1 = hex(&Md5::digest(&a1));
        let kd = |a2: String| {
            let ha2 = hex(&Md5::digest(a2));
            hex(&Md5::digest(format!(
                "{ha1}:{nonce}:{nc}:{}:auth:{ha2}",
                self.cnonce
            )))
        };
        let response = kd(format!("AUTHENTICATE:{}", self.digest_uri));
        let rspauth = format!("rspauth={}", kd(format!(":{}", self.digest_uri)));

        let mut text = format!(
            "username=\"{}\",realm=\"{realm}\",nonce=\"{nonce}\",cnonce=\"{}\",nc={nc},qop=auth,\
             digest-uri=\"{}\",response={response},charset=utf-8",
            quoted(self.user),
            quoted(self.cnonce),
            quoted(self.digest_uri)
        );
        if let Some(authzid) = self.authzid {
            let _ = write!(text, ",authzid=\"{}\"", quoted(authzid));
        }
        DigestResponse {
            text: text.into_bytes(),
            rspauth,
        }
    }
}

/// The `name=value` directives of a challenge, quotes and escapes removed. A directive that
/// comes more than once (`realm`) is kept each time, in order.
fn directives(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let Some((name, after)) = rest.split_once('=') else {
            return out;
        };
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end..])
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_owned(), &after[end..])
            }
        };
        out.push((name.trim().to_owned(), value));
        rest = after;
    }
}

/// `s` for inside a quoted-string (backslash before `"` and `\`).
fn quoted(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
