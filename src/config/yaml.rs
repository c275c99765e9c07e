//! The one place that parses YAML. `serde_yaml` is unmaintained upstream: swapping it for a
//! maintained fork (e.g. `serde_yml`, `serde_norway`) must stay a change to this file and
//! `Cargo.toml` only.

use serde::de::DeserializeOwned;

/// A YAML document that could not be turned into `T`. `path` names the field (e.g.
/// `backends[2].weight`); `message` says what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct YamlError {
    pub path: String,
    pub message: String,
}

/// Parses `text` into `T`, naming the offending field on error.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let mut message = err.inner().to_string();
        // serde_yaml prefixes nested errors with its own view of the path: drop it.
        if let Some((head, rest)) = message.split_once(": ") {
            if !head.contains(' ') {
                message = rest.to_owned();
            }
        }
        YamlError {
            path: if path == "." {
                "(top level)".into()
            } else {
                path
            },
            message,
        }
    })
}

/// Serialises `value` as YAML (used for the state file).
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, YamlError> {
    serde_yaml::to_string(value).map_err(|e| YamlError {
        path: "(top level)".into(),
        message: e.to_string(),
    })
}
