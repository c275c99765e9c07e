//! Settings a run takes from the environment (benchmark sizes, the ports of the local pool),
//! each with its default. Std only: the examples include it.

#![allow(dead_code)]

use std::str::FromStr;

/// The value of `var` parsed as a `T`; `default` when it is unset or does not parse.
pub fn env_or<T: FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
