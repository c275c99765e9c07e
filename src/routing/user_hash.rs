//! The user hash, compatible with Dovecot 2.3's director (`director_username_hash`): the first
//! four bytes, big-endian, of the MD5 of the expanded template; a hash of 0 becomes 1.
//!
//! Templates use Dovecot's variables: `%u`/`%{user}` (whole username), `%n`/`%{username}`
//! (the part before the first `@`), `%d`/`%{domain}` (the part after it), each optionally with
//! the `L` modifier (`%Lu`, `%{L:user}`... written `%L{user}` in Dovecot 2.3) to lower-case it.
//! `%%` is a literal `%`. Anything else is an error at configuration time.

use md5::{Digest, Md5};

use crate::config::{Config, ConfigError};

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var { var: Var, lower: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    User,
    Name,
    Domain,
}

/// A parsed `username_hash` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserHash {
    template: String,
    parts: Vec<Part>,
}

/// A template that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl UserHash {
    /// The configuration's `username_hash` template; a bad one is an error that names the
    /// field. Checked when a configuration is loaded (`server::prepare::load_config`) and
    /// again wherever a router is built from one.
    pub fn from_config(config: &Config) -> Result<UserHash, ConfigError> {
        UserHash::new(&config.username_hash).map_err(|e| ConfigError(format!("username_hash: {e}")))
    }

    /// Parses a template such as `%Lu`, `%Ln` or `%Ld`.
    pub fn new(template: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                literal.push(c);
                continue;
            }
            let mut lower = false;
            let var = loop {
                match chars.next() {
                    None => return Err(TemplateError(format!("template {template:?} ends after '%'"))),
                    Some('%') if !lower => {
                        literal.push('%');
                        break None;
                    }
                    Some('L') if !lower => lower = true,
                    Some('u') => break Some(Var::User),
                    Some('n') => break Some(Var::Name),
                    Some('d') => break Some(Var::Domain),
                    Some('{') => {
                        let mut name = String::new();
                        loop {
                            match chars.next() {
                                Some('}') => break,
                                Some(ch) => name.push(ch),
                                None => return Err(TemplateError(format!("template {template:?} has an unclosed '%{{'"))),
                            }
                        }
                        let name = match name.strip_prefix("L:") {
                            Some(rest) => {
                                lower = true;
                                rest.to_owned()
                            }
                            None => name,
                        };
                        break Some(match name.as_str() {
                            "user" => Var::User,
                            "username" => Var::Name,
                            "domain" => Var::Domain,
                            other => return Err(TemplateError(format!(
                                "template {template:?}: unknown variable %{{{other}}}; use user, username or domain"
                            ))),
                        });
                    }
                    Some(other) => {
                        return Err(TemplateError(format!(
                            "template {template:?}: unknown variable %{other}; use %u, %n or %d, optionally with L (%Lu)"
                        )))
                    }
                }
            };
            if let Some(var) = var {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Var { var, lower });
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Var { .. })) {
            return Err(TemplateError(format!(
                "template {template:?} uses no variable: every user would hash alike"
            )));
        }
        Ok(UserHash {
            template: template.to_owned(),
            parts,
        })
    }

    /// The template as configured.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Calls `f` with the pieces of the string that is hashed for `username`, in order, without
    /// building it.
    fn pieces(&self, username: &str, mut f: impl FnMut(&[u8])) {
        for part in &self.parts {
            match part {
                Part::Literal(s) => f(s.as_bytes()),
                Part::Var { var, lower } => {
                    let value = match var {
                        Var::User => username,
                        Var::Name => username.split_once('@').map_or(username, |(n, _)| n),
                        Var::Domain => username.split_once('@').map_or("", |(_, d)| d),
                    };
                    if *lower {
                        // Dovecot lower-cases ASCII only (i_tolower); a piece at a time on
                        // the stack.
                        let mut buf = [0u8; 64];
                        for chunk in value.as_bytes().chunks(buf.len()) {
                            let buf = &mut buf[..chunk.len()];
                            buf.copy_from_slice(chunk);
                            buf.make_ascii_lowercase();
                            f(buf);
                        }
                    } else {
                        f(value.as_bytes());
                    }
                }
            }
        }
    }

    /// The string that is hashed for `username`.
    pub fn expand(&self, username: &str) -> String {
        let mut out = Vec::with_capacity(username.len());
        self.pieces(username, |p| out.extend_from_slice(p));
        // Only ASCII bytes were changed: still the UTF-8 it was.
        String::from_utf8(out).expect("ASCII lower-casing keeps UTF-8")
    }

    /// The user's hash: never 0.
    pub fn hash(&self, username: &str) -> u32 {
        let mut md5 = Md5::new();
        self.pieces(username, |p| md5.update(p));
        prefix(&md5.finalize()).max(1)
    }
}

impl Default for UserHash {
    fn default() -> Self {
        UserHash::new("%Lu").expect("the default template is valid")
    }
}

/// The first four bytes of MD5(`data`), big-endian. Also used for ring points.
pub fn md5_prefix(data: &[u8]) -> u32 {
    prefix(&Md5::digest(data))
}

/// The first four bytes of a digest, big-endian.
fn prefix(digest: &[u8]) -> u32 {
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_dovecot_variables() {
        let u = "Alice.Smith@Example.COM";
        assert_eq!(
            UserHash::new("%Lu").unwrap().expand(u),
            "alice.smith@example.com"
        );
        assert_eq!(UserHash::new("%u").unwrap().expand(u), u);
        assert_eq!(UserHash::new("%Ln").unwrap().expand(u), "alice.smith");
        assert_eq!(UserHash::new("%Ld").unwrap().expand(u), "example.com");
        assert_eq!(UserHash::new("%Ld").unwrap().expand("bob"), "");
        assert_eq!(
            UserHash::new("%{L:username}").unwrap().expand(u),
            "alice.smith"
        );
        assert_eq!(UserHash::new("x%%%n").unwrap().expand(u), "x%Alice.Smith");
    }

    #[test]
    fn hash_is_md5_prefix() {
        // MD5("user") = ee11cbb19052e40b07aac0ca060c23ee
        assert_eq!(UserHash::default().hash("USER"), 0xee11cbb1);
    }

    #[test]
    fn hash_is_of_the_expanded_string_at_every_length() {
        // Lower-casing goes through a 64-byte buffer: names across its edge hash as a whole.
        for template in ["%Lu", "%u", "x%Ln-%d", "%{L:domain}"] {
            let h = UserHash::new(template).unwrap();
            for len in [0, 1, 63, 64, 65, 128, 200] {
                let user = format!("{}@Ex{}.ORG", "Aé".repeat(len / 3), "B".repeat(len));
                let expanded = h.expand(&user);
                assert_eq!(
                    h.hash(&user),
                    md5_prefix(expanded.as_bytes()).max(1),
                    "{template} {len}"
                );
            }
        }
        assert_eq!(UserHash::new("%Lu").unwrap().expand("ÀÉ.Bob"), "ÀÉ.bob");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["%", "%x", "%{foo}", "plain", "%{user"] {
            assert!(UserHash::new(bad).is_err(), "{bad}");
        }
    }
}
