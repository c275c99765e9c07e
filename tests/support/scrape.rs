//! Reading the director's metrics listener as Prometheus would: a GET of `/metrics` (or
//! `/healthz`, `/readyz`) with curl, and the value of one metric in the text it returns.

#![allow(dead_code)]

use std::net::SocketAddr;

use super::client::curl;

/// GET `path` on the metrics listener: (status, body).
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    let (ok, out, err) = curl(&["-w", "\n%{http_code}", &url]);
    assert!(ok, "curl {url}: {err}");
    let (body, code) = out.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status code"), body.to_owned())
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().expect("value");
        }
    }
    found
}
