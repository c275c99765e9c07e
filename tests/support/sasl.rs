//! The client side of the SASL mechanisms that never send the password in clear, CRAM-MD5
//! (RFC 2195) and SCRAM-SHA-256 (RFC 5802, RFC 7677), for tests that authenticate against
//! Dovecot's auth service, directly or through the director. Pure computations: the tests
//! carry the messages over whatever protocol they speak.

#![allow(dead_code)]

use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use md5::{Digest, Md5};

/// HMAC (RFC 2104) over `hash`, whose block is `BLOCK` bytes.
pub fn hmac<const BLOCK: usize>(
    hash: impl Fn(&[u8]) -> Vec<u8>,
    key: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let mut k = if key.len() > BLOCK {
        hash(key)
    } else {
        key.to_vec()
    };
    k.resize(BLOCK, 0);
    let pad = |byte: u8| k.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = hash(&[pad(0x36), data.to_vec()].concat());
    hash(&[pad(0x5c), inner].concat())
}

/// Lower-case hex, as CRAM-MD5 writes its digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The CRAM-MD5 response to `challenge` (decoded): `user HEX(HMAC-MD5(password, challenge))`.
pub fn cram_md5(user: &str, password: &str, challenge: &[u8]) -> Vec<u8> {
    let md5 = |data: &[u8]| Md5::digest(data).to_vec();
    let digest = hmac::<64>(md5, password.as_bytes(), challenge);
    format!("{user} {}", hex(&digest)).into_bytes()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// One SCRAM-SHA-256 exchange (no channel binding, no authorization identity) from the
/// client's side: [`ScramSha256::client_first`], then [`ScramSha256::client_final`] for the
/// server's first message, then the server's last message must equal
/// [`ScramSha256::server_final`].
pub struct ScramSha256 {
    password: String,
    client_first_bare: String,
    client_nonce: String,
    /// `v=...`: what the server proves itself with, known once the client's proof is made.
    server_final: Option<Vec<u8>>,
}

impl ScramSha256 {
    pub fn new(user: &str, password: &str) -> Self {
        // A fixed nonce: the server's part makes every exchange different all the same.
        let client_nonce = "rOprNGfwEbeRWgbNEkqO".to_owned();
        // RFC 5802 5.1: `=` and `,` in the name are written `=3D` and `=2C`.
        let name = user.replace('=', "=3D").replace(',', "=2C");
        ScramSha256 {
            password: password.to_owned(),
            client_first_bare: format!("n={name},r={client_nonce}"),
            client_nonce,
            server_final: None,
        }
    }

    /// The client-first-message (the initial response).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The client-final-message with the proof, for the server-first-message (decoded);
    /// panics if that is not one, or if its nonce does not extend ours.
    pub fn client_final(&mut self, server_first: &[u8]) -> Vec<u8> {
        let server_first = String::from_utf8(server_first.to_vec()).expect("UTF-8 server-first");
        let attr = |name: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in the server-first {server_first:?}"))
                .to_owned()
        };
        let (nonce, salt, iterations) = (attr("r="), attr("s="), attr("i="));
        assert!(
            nonce.starts_with(&self.client_nonce),
            "the server's nonce {nonce:?} does not extend ours"
        );
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations.parse().expect("an iteration count"),
            &STANDARD.decode(salt).expect("a base64 salt"),
            self.password.as_bytes(),
            &mut salted,
        );
        let mac = |key: &[u8], data: &[u8]| hmac::<64>(sha256, key, data);
        let client_key = mac(&salted, b"Client Key");
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = mac(&sha256(&client_key), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_signature = mac(&mac(&salted, b"Server Key"), auth_message.as_bytes());
        self.server_final = Some(format!("v={}", STANDARD.encode(server_signature)).into_bytes());
        format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes()
    }

    /// The server-final-message a server that knows the password sends.
    pub fn server_final(&self) -> &[u8] {
        self.server_final
            .as_deref()
            .expect("client_final comes before server_final")
    }
}
