//! The CLI side of the admin API: sends one [`AdminRequest`] to a running director over its
//! unix socket (HTTP/1.1, one request per connection) and prints the reply for people, or as
//! JSON for scripts. Also reads `dump` output (ours, or `doveadm director dump`) back into
//! requests, for `director import`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::admin::{AdminRequest, ChangeReply, DumpReply, MapReply, StatusReply, UserReply};

/// Why a request got no answer, or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The director could not be reached.
    #[error(
        "cannot reach the director at {socket}: {message} (is it running, with this admin.socket?)"
    )]
    Connect { socket: String, message: String },
    /// The director refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends `req` to the director listening on `socket` and returns its JSON reply.
pub fn call(socket: &Path, req: &AdminRequest) -> Result<serde_json::Value, ClientError> {
    let connect_err = |e: std::io::Error| ClientError::Connect {
        socket: socket.display().to_string(),
        message: e.to_string(),
    };
    let mut s = UnixStream::connect(socket).map_err(connect_err)?;
    // Evacuations end sessions one user at a time: allow them time.
    let _ = s.set_read_timeout(Some(Duration::from_secs(3600)));
    let body = serde_json::to_vec(req).expect("requests serialise");
    let head = format!(
        "POST /v1/command HTTP/1.1\r\nHost: director\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(connect_err)?;
    s.write_all(&body).map_err(connect_err)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(connect_err)?;
    let (status, body) = parse_response(&raw).map_err(ClientError::Refused)?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ClientError::Refused(format!("the director's reply is not JSON: {e}")))?;
    if !(200..300).contains(&status) {
        let msg = value
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}: {value}"));
        return Err(ClientError::Refused(msg));
    }
    Ok(value)
}

/// Splits an HTTP/1.1 response into its status and body (content-length or chunked).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the director closed the connection without a complete answer")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("the director's answer has no HTTP status")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| "bad chunk size in the director's answer")?;
            if size == 0 {
                break;
            }
            let start = eol + 2;
            let chunk = rest
                .get(start..start + size)
                .ok_or("truncated chunk in the director's answer")?;
            out.extend_from_slice(chunk);
            rest = rest.get(start + size + 2..).unwrap_or(&[]);
        }
        body = out;
    }
    Ok((status, body))
}

/// Prints the reply to `req` for people (or as indented JSON).
pub fn print(req: &AdminRequest, value: &serde_json::Value, json: bool) -> Result<(), String> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
        return Ok(());
    }
    let bad = |e: serde_json::Error| format!("unexpected reply from the director: {e}");
    match req {
        AdminRequest::Status => {
            let s: StatusReply = serde_json::from_value(value.clone()).map_err(bad)?;
            print_status(&s);
        }
        AdminRequest::UserStatus { .. } => {
            let u: UserReply = serde_json::from_value(value.clone()).map_err(bad)?;
            let show = |ip: Option<std::net::IpAddr>| ip.map_or("-".to_owned(), |i| i.to_string());
            println!("User:          {} (hash {})", u.user, u.hash);
            println!("Current:       {}", show(u.current));
            println!("Hashed:        {}", show(u.hashed));
            if let Some(m) = u.maintenance_backend {
                println!("Maintenance:   allowed onto {m}");
            }
            println!("Sessions:      {}", u.sessions);
            match (u.current, u.expires_in_secs) {
                (None, _) => println!("Record:        none"),
                (Some(_), None) => println!("Record:        kept while sessions are live"),
                (Some(_), Some(s)) => println!("Record:        expires in {s}s"),
            }
        }
        AdminRequest::Map { host, limit, .. } => {
            let m: MapReply = serde_json::from_value(value.clone()).map_err(bad)?;
            print_map_header();
            print_map_rows(&m);
            if let Some(next) = m.next {
                let host = host.as_ref().map(|h| format!(" {h}")).unwrap_or_default();
                let limit = limit.map(|l| format!(" --limit {l}")).unwrap_or_default();
                println!("next page: director map{host}{limit} --after {next} (or --all)");
            }
        }
        AdminRequest::Dump => {
            let d: DumpReply = serde_json::from_value(value.clone()).map_err(bad)?;
            for c in d.commands {
                println!("{c}");
            }
        }
        _ => {
            let c: ChangeReply = serde_json::from_value(value.clone()).map_err(bad)?;
            let who: Vec<String> = c.backends.iter().map(|b| b.to_string()).collect();
            let mut line = if who.is_empty() {
                c.message.clone()
            } else {
                format!("{}: {}", who.join(", "), c.message)
            };
            let counts = [
                ("moved", c.moved),
                ("records dropped", c.dropped),
                ("sessions ended", c.kicked),
                ("stayed", c.stayed),
                ("busy", c.busy),
                ("failed", c.failed),
            ];
            let counts: Vec<String> = counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(what, n)| format!("{n} {what}"))
                .collect();
            if !counts.is_empty() {
                line += &format!(" ({})", counts.join(", "));
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// `director map --all`: asks for page after page of `req` (a [`AdminRequest::Map`]) and
/// prints each as it comes, for people (one table) or as JSON (one object per page and line).
pub fn map_all(socket: &Path, req: &AdminRequest, json: bool) -> Result<(), ClientError> {
    let mut req = req.clone();
    let mut first = true;
    loop {
        let value = call(socket, &req)?;
        let page: MapReply = serde_json::from_value(value.clone()).map_err(|e| {
            ClientError::Refused(format!("unexpected reply from the director: {e}"))
        })?;
        if json {
            println!("{value}");
        } else {
            if first {
                print_map_header();
            }
            print_map_rows(&page);
        }
        first = false;
        match (&mut req, page.next) {
            (AdminRequest::Map { after, .. }, Some(next)) => *after = Some(next),
            _ => return Ok(()),
        }
    }
}

fn print_map_header() {
    println!(
        "{:<32} {:<10} {:<16} {:>8} {:>8}",
        "user", "hash", "backend", "sessions", "expires"
    );
}

fn print_map_rows(m: &MapReply) {
    for e in &m.users {
        println!(
            "{:<32} {:<10} {:<16} {:>8} {:>8}",
            e.user.as_deref().unwrap_or("?"),
            e.hash,
            e.backend.to_string(),
            e.sessions,
            e.expires_in_secs.map_or("-".into(), |s| format!("{s}s"))
        );
    }
}

fn when(unix: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
    let left = t
        .duration_since(SystemTime::now())
        .map(|d| format!(" (in {}s)", d.as_secs()))
        .unwrap_or_default();
    format!("{}{left}", humantime::format_rfc3339_seconds(t))
}

fn print_status(s: &StatusReply) {
    println!(
        "{:<16} {:<20} {:<8} {:>6} {:<12} {:<6} {:<16} {:>9} {:>6} {:>8}",
        "backend",
        "host",
        "tag",
        "weight",
        "admin",
        "health",
        "check",
        "latency",
        "users",
        "sessions"
    );
    for b in &s.backends {
        let (code, latency) = match &b.check {
            Some(c) => (c.code.clone(), format!("{:.1}ms", c.latency_ms)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<16} {:<20} {:<8} {:>6} {:<12} {:<6} {:<16} {:>9} {:>6} {:>8}",
            b.ip.to_string(),
            b.host,
            if b.tag.is_empty() { "-" } else { &b.tag },
            b.weight,
            b.admin.name(),
            b.health.name(),
            code,
            latency,
            b.users,
            b.sessions
        );
    }
    for b in &s.backends {
        if let Some(m) = &b.maintenance {
            let mut line = format!(
                "maintenance {}: since {}, weight {} restored at the end",
                b.ip,
                when(m.since),
                m.previous_weight
            );
            if let Some(u) = m.until {
                line += &format!(", ends {}", when(u));
            }
            if !m.allowed_users.is_empty() {
                line += &format!(", allowed users: {}", m.allowed_users.join(" "));
            }
            println!("{line}");
        }
    }
    match &s.checks_paused {
        Some(p) => match p.until {
            Some(u) => println!("health checks: paused until {}", when(u)),
            None => println!("health checks: paused (until `director checks resume`)"),
        },
        None => println!("health checks: running"),
    }
    println!("records: {}, sessions: {}", s.records, s.sessions);
    match &s.cluster {
        None => println!("mode: single director (state kept here)"),
        Some(c) => {
            println!(
                "mode: cluster, this director {} ({}{})",
                c.director_id,
                if c.serving {
                    "serving"
                } else {
                    "FENCED: no etcd lease, refusing logins"
                },
                if c.checker {
                    ", runs the health checks"
                } else {
                    ""
                }
            );
            println!(
                "{:<20} {:<24} {:<10} {:>10} {:>8} {:<7}",
                "director", "address", "version", "lease age", "sessions", "checker"
            );
            for m in &c.members {
                println!(
                    "{:<20} {:<24} {:<10} {:>9}s {:>8} {:<7}",
                    m.id,
                    m.address,
                    m.version,
                    m.lease_age_secs,
                    m.sessions,
                    if m.checker { "yes" } else { "-" }
                );
            }
        }
    }
}

/// Splits a command line into words: blanks separate, single quotes group (as `dump` quotes),
/// `\` escapes outside quotes.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next().ok_or("a lone \\ at the end")?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// The words of an import line after its program name: `director [-c FILE] VERB ...` as
/// `dump` writes it, or `doveadm [-c FILE] director [-a SOCKET] VERB ...` as
/// `doveadm director dump` does. `None` for blank lines and comments.
pub fn import_words(line: &str) -> Result<Option<Vec<String>>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut words = split_words(line)?;
    let strip_opt = |words: &mut Vec<String>, opt: &str| {
        while let Some(i) = words.iter().position(|w| w == opt) {
            words.drain(i..(i + 2).min(words.len()));
        }
    };
    match words.first().map(String::as_str) {
        Some("doveadm") => {
            words.remove(0);
            strip_opt(&mut words, "-c");
            if words.first().map(String::as_str) != Some("director") {
                return Err(format!("not a `doveadm director` command: {line}"));
            }
            words.remove(0);
            // doveadm's `-a SOCKET` names the old director's admin socket: not ours.
            strip_opt(&mut words, "-a");
            // Its dump writes a tagged host as `add HOST@TAG VHOSTS`.
            if words.first().map(String::as_str) == Some("add") {
                let mut tag = None;
                let mut i = 1;
                while i < words.len() {
                    if words[i] == "-t" || words[i] == "--tag" {
                        i += 2;
                        continue;
                    }
                    if let Some((host, t)) = words[i].split_once('@') {
                        tag = Some(t.to_owned());
                        words[i] = host.to_owned();
                    }
                    break;
                }
                if let Some(t) = tag {
                    words.push("--tag".into());
                    words.push(t);
                }
            }
        }
        Some("director") => {
            words.remove(0);
            strip_opt(&mut words, "-c");
        }
        _ => {
            return Err(format!(
                "neither a `director` nor a `doveadm director` command: {line}"
            ))
        }
    }
    Ok(Some(words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_import_lines() {
        assert_eq!(
            split_words("add 10.0.0.1 100 --tag 'a b' x\\ y").unwrap(),
            ["add", "10.0.0.1", "100", "--tag", "a b", "x y"]
        );
        assert_eq!(
            import_words("doveadm director add -a /run/d -t pool 10.0.0.1 100").unwrap(),
            Some(vec![
                "add".into(),
                "-t".into(),
                "pool".into(),
                "10.0.0.1".into(),
                "100".into()
            ])
        );
        assert_eq!(
            import_words("director -c /etc/x.yaml down 10.0.0.2").unwrap(),
            Some(vec!["down".into(), "10.0.0.2".into()])
        );
        assert_eq!(
            import_words("doveadm director add 10.0.0.3@vip 30").unwrap(),
            Some(vec![
                "add".into(),
                "10.0.0.3".into(),
                "30".into(),
                "--tag".into(),
                "vip".into()
            ])
        );
        assert_eq!(import_words("  # comment").unwrap(), None);
        assert!(import_words("rm -rf /").is_err());
    }

    #[test]
    fn chunked_and_plain_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (404, b"{\"a\":1}".to_vec())
        );
    }
}
