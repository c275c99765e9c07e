//! The fields of an `OK` or `FAIL` answer: the user the service settled on, and the passdb's
//! extra fields (`proxy`, `host`, `port`, `destuser`, `nologin`, `reason`...), with accessors
//! for the ones the director acts on.
//!
//! A field is a flag (`proxy`) or `key=value`. Dovecot's login processes treat a flag as set
//! whatever its value, and so does [`AuthFields::flag`]. Values are bytes as sent (unescaped);
//! the text accessors read a value that is not UTF-8 as absent. `pass` is a secret: `Debug`
//! hides it (and every field whose name holds `pass`, as Dovecot's own logging does).

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::wire::Field;
use crate::protocol::decision::Secret;

/// The fields of one answer, in the order sent. A key sent twice reads as its first value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthFields {
    fields: Vec<Field>,
}

impl AuthFields {
    pub fn new(fields: Vec<Field>) -> Self {
        AuthFields { fields }
    }

    /// Whether the field is there, as a flag or with any value.
    pub fn flag(&self, key: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == key)
    }

    /// The value of `key`, as bytes (a flag's value is empty).
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref().unwrap_or_default())
    }

    /// The value of `key` as text; `None` if absent or not UTF-8.
    pub fn get(&self, key: &str) -> Option<&str> {
        std::str::from_utf8(self.bytes(key)?).ok()
    }

    /// Every field, in order: key, and value if not a flag.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// The user the service authenticated (possibly renamed by the passdb).
    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }

    /// The user name the client gave, when the passdb changed it.
    pub fn original_user(&self) -> Option<&str> {
        self.get("original_user")
    }

    /// The user to log in as at the backend (defaults to [`AuthFields::user`] there).
    pub fn destuser(&self) -> Option<&str> {
        self.get("destuser")
    }

    /// The backend to proxy to (a name or address).
    pub fn host(&self) -> Option<&str> {
        self.get("host")
    }

    /// The backend's address, when `host` is a name.
    pub fn hostip(&self) -> Option<&str> {
        self.get("hostip")
    }

    /// The backend port; `None` if absent or not a port number.
    pub fn port(&self) -> Option<u16> {
        self.get("port")?.parse().ok()
    }

    /// Whether to connect to the backend with TLS (`ssl`, `ssl=any-cert`).
    pub fn ssl(&self) -> bool {
        self.flag("ssl")
    }

    /// Whether to use STARTTLS towards the backend.
    pub fn starttls(&self) -> bool {
        self.flag("starttls")
    }

    /// Whether the backend's certificate is accepted unchecked (`ssl=any-cert`,
    /// `starttls=any-cert`).
    pub fn any_cert(&self) -> bool {
        self.get("ssl") == Some("any-cert") || self.get("starttls") == Some("any-cert")
    }

    /// Whether the login is to be proxied (`proxy`).
    pub fn proxy(&self) -> bool {
        self.flag("proxy")
    }

    /// `proxy_maybe`: proxy unless the host is this server.
    pub fn proxy_maybe(&self) -> bool {
        self.flag("proxy_maybe")
    }

    /// Whether the user may not log in although the password was right (`nologin`).
    pub fn nologin(&self) -> bool {
        self.flag("nologin")
    }

    /// The text to show the client (with `nologin`, or on failure).
    pub fn reason(&self) -> Option<&str> {
        self.get("reason")
    }

    /// The failure code (`temp_fail`, `authz_fail`, `user_disabled`, `pass_expired`...).
    pub fn code(&self) -> Option<&str> {
        self.get("code")
    }

    /// Whether a failure is temporary (`temp`, or `code=temp_fail`): try again later, the
    /// credentials were not judged.
    pub fn temp(&self) -> bool {
        self.flag("temp") || self.code() == Some("temp_fail")
    }

    /// Whether the credentials were right but do not allow logging in as the requested user
    /// (`authz`, or `code=authz_fail`: a master user not allowed for that user).
    pub fn authz(&self) -> bool {
        self.flag("authz") || self.code() == Some("authz_fail")
    }

    /// The master user to log in as at the backend (`master`; empty means none).
    pub fn master(&self) -> Option<&str> {
        self.get("master").filter(|m| !m.is_empty())
    }

    /// The password to log in to the backend with: the client's own, which a login socket
    /// returns on a `proxy` login, or the passdb's `pass`.
    pub fn pass(&self) -> Option<Secret> {
        self.get("pass").map(Secret::new)
    }

    /// The mechanism's final server data (`resp=`, sent when the request said
    /// `final-resp-ok`), decoded; `None` if absent or not base64.
    pub fn final_response(&self) -> Option<Vec<u8>> {
        STANDARD.decode(self.bytes("resp")?).ok()
    }
}

impl fmt::Debug for AuthFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_map();
        for (key, value) in &self.fields {
            let shown_key = crate::untrusted::shown(key);
            match value {
                None => list.entry(&shown_key, &true),
                Some(_) if key.contains("pass") => list.entry(&shown_key, &"<hidden>"),
                Some(v) => list.entry(&shown_key, &crate::untrusted::shown_bytes(v)),
            };
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, Option<&str>)]) -> AuthFields {
        AuthFields::new(
            list.iter()
                .map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
        )
    }

    #[test]
    fn a_proxy_answer_reads_through_its_accessors() {
        let f = fields(&[
            ("user", Some("user0001")),
            ("proxy", None),
            ("host", Some("127.0.0.2")),
            ("hostip", Some("127.0.0.3")),
            ("port", Some("10143")),
            ("destuser", Some("u1@backend")),
            ("starttls", Some("any-cert")),
            ("master", Some("")),
            ("pass", Some("secret")),
        ]);
        assert_eq!(f.user(), Some("user0001"));
        assert!(f.proxy() && !f.proxy_maybe() && !f.nologin());
        assert_eq!(
            (f.host(), f.hostip(), f.port()),
            (Some("127.0.0.2"), Some("127.0.0.3"), Some(10143))
        );
        assert_eq!(f.destuser(), Some("u1@backend"));
        assert!(f.starttls() && f.any_cert() && !f.ssl());
        assert_eq!(f.master(), None, "an empty master is none");
        assert_eq!(f.pass().unwrap().expose(), "secret");
        assert_eq!(f.original_user(), None);
    }

    #[test]
    fn failures_say_whether_they_are_temporary_or_about_authorization() {
        assert!(fields(&[("temp", None)]).temp());
        assert!(fields(&[("code", Some("temp_fail"))]).temp());
        assert!(!fields(&[("user", Some("u"))]).temp());
        assert!(fields(&[("code", Some("authz_fail"))]).authz());
        let f = fields(&[("user", Some("u")), ("reason", Some("Moved away"))]);
        assert_eq!((f.reason(), f.code()), (Some("Moved away"), None));
    }

    #[test]
    fn flags_count_whatever_their_value_as_dovecot_does() {
        assert!(fields(&[("proxy", Some("n"))]).proxy());
        assert!(fields(&[("nologin", Some("y"))]).nologin());
        assert!(fields(&[("ssl", Some("yes"))]).ssl());
    }

    #[test]
    fn unusable_values_read_as_absent() {
        let f = AuthFields::new(vec![
            ("user".into(), Some(b"\xffbad".to_vec())),
            ("port".into(), Some(b"99999".to_vec())),
            ("resp".into(), Some(b"!!".to_vec())),
        ]);
        assert_eq!(f.user(), None);
        assert_eq!(f.bytes("user"), Some(&b"\xffbad"[..]));
        assert_eq!(f.port(), None);
        assert_eq!(f.final_response(), None);
        assert_eq!(f.bytes("absent"), None);
    }

    #[test]
    fn debug_hides_passwords_and_escapes_values() {
        let f = fields(&[
            ("user", Some("u\n1")),
            ("pass", Some("hunter2")),
            ("proxy_pass", Some("hunter3")),
            ("proxy", None),
        ]);
        let shown = format!("{f:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(
            shown.contains("<hidden>") && shown.contains("u\\n1"),
            "{shown}"
        );
    }
}
