//! Our user hash and ring give the same backend as a real Dovecot 2.3 director, for the same
//! hosts, weights and `director_username_hash` template: what lets an operator swap one for the
//! other without moving users.

mod support;

use std::net::IpAddr;
use std::time::Instant;

use director::routing::ring::Ring;
use director::routing::user_hash::UserHash;
use support::dovecot::RefDirector;

/// How many usernames each comparison uses.
const USERS: usize = 4000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Four hosts with weights 100, 50, 200 and 1, one of them IPv6, plus one at weight 0.
fn hosts() -> Vec<(IpAddr, u32)> {
    vec![
        (ip("10.20.0.1"), 100),
        (ip("10.20.0.2"), 50),
        (ip("192.168.7.30"), 200),
        (ip("2001:db8::1:5"), 1),
        (ip("10.20.0.9"), 0),
    ]
}

/// A small deterministic generator (xorshift), so a failure names the same users every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Usernames in mixed case, with and without domains (several, some repeated), with odd
/// characters, non-ASCII letters (Dovecot lower-cases ASCII only), several `@`, an empty
/// local part or domain. None is all digits: the director's admin socket takes those as hashes.
fn usernames(n: usize) -> Vec<String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let domains = [
        "example.com",
        "Example.COM",
        "mail.example.org",
        "xn--bcher-kva.example",
        "sub.DOMAIN.net",
        "a",
        "",
    ];
    let stems = [
        "user",
        "Alice",
        "bob.smith",
        "CHARLIE",
        "d_e-f",
        "x+tag",
        "o'neil",
        "Jürgen",
        "ÉLISE",
        "name with space",
        "per%cent",
        "a=b",
        "quote\"d",
        "back\\slash",
        "{3}",
        "~tilde#!",
        "ü",
        "İ",
    ];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let stem = rng.pick(&stems);
        let mut name = match rng.next() % 4 {
            0 => format!("{stem}{i}"),
            1 => format!("{}{i:04}", stem.to_uppercase()),
            2 => format!("{i}{stem}"),
            _ => format!("{stem}.{:x}", rng.next() % 100_000),
        };
        match rng.next() % 10 {
            0..=4 => {}
            5..=7 => {
                name.push('@');
                name.push_str(rng.pick(&domains));
            }
            8 => name = format!("{name}@{}@{}", rng.pick(&domains), rng.pick(&domains)),
            _ => name = format!("@{name}"),
        }
        out.push(name);
    }
    // Usernames that differ only in case, or only in the domain, and tricky shapes.
    out.extend(
        [
            "user0001",
            "USER0001",
            "user0001@example.com",
            "user0001@Example.Com",
            "User0001@other.example",
            "@",
            "@@",
            "x@",
            "@example.com",
            "a@b@c",
            "0x",
            "12345x",
        ]
        .map(String::from),
    );
    out
}

/// Asserts that our ring over `hosts` agrees with `reference` for every user.
fn assert_parity(reference: &RefDirector, hosts: &[(IpAddr, u32)], users: &[String], what: &str) {
    let hash = UserHash::new(&reference.username_hash).unwrap();
    let ring = Ring::build(hosts.iter().copied());
    let started = Instant::now();
    let theirs = reference.hashed(users);
    eprintln!(
        "{what}: {} reference lookups in {:?}",
        users.len(),
        started.elapsed()
    );
    let mut differ = Vec::new();
    for (user, theirs) in users.iter().zip(&theirs) {
        let ours = ring.lookup(hash.hash(user));
        if ours != *theirs {
            differ.push(format!(
                "  {user:?} (hashed {:?} = {}): ours {ours:?}, Dovecot {theirs:?}",
                hash.expand(user),
                hash.hash(user)
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{what}, template {}: {} of {} users differ; first ones:\n{}",
        reference.username_hash,
        differ.len(),
        users.len(),
        differ[..differ.len().min(10)].join("\n")
    );
}

fn same_as_dovecot(template: &str) {
    let hosts = hosts();
    let started = Instant::now();
    let reference = RefDirector::start(&hosts, template);
    eprintln!(
        "{template}: reference director started in {:?}",
        started.elapsed()
    );
    // Our socket client against the doveadm command, for a few users.
    let users = usernames(USERS);
    let few: Vec<String> = users.iter().step_by(USERS / 8).cloned().collect();
    for (user, by_socket) in few.iter().zip(reference.hashed(&few)) {
        assert_eq!(
            reference.hashed_by_doveadm(user),
            by_socket,
            "doveadm and the admin socket disagree for {user:?}"
        );
    }
    assert_parity(&reference, &hosts, &users, template);

    // The comparison means something only if every host with points gets users.
    let answers = reference.hashed(&users);
    for (host, weight) in &hosts {
        let count = answers.iter().filter(|a| **a == Some(*host)).count();
        assert_eq!(
            count > 0,
            *weight > 0,
            "{template}: {host} (weight {weight}) has {count} users"
        );
    }

    // Dovecot's "Initial config" ring: every configured host at 100 vhosts.
    let hash = UserHash::new(template).unwrap();
    let initial = Ring::build(hosts.iter().map(|(h, _)| (*h, 100)));
    for (user, status) in users.iter().zip(reference.status(&users)) {
        assert_eq!(
            initial.lookup(hash.hash(user)),
            status.initial,
            "{template}: initial-config host of {user:?}"
        );
    }
}

#[test]
fn lowercased_user_matches_dovecot() {
    same_as_dovecot("%Lu");
}

#[test]
fn lowercased_name_matches_dovecot() {
    same_as_dovecot("%Ln");
}

#[test]
fn lowercased_domain_matches_dovecot() {
    same_as_dovecot("%Ld");
}

#[test]
fn case_kept_user_matches_dovecot() {
    same_as_dovecot("%u");
}

#[test]
fn rings_agree_after_changes() {
    let mut hosts = hosts();
    let reference = RefDirector::start(&hosts, "%Ln");
    let users = usernames(USERS);
    assert_parity(&reference, &hosts, &users, "initial");

    // A host added after the start.
    let added = ip("10.20.0.77");
    reference.set_host(added, 120);
    hosts.push((added, 120));
    assert_parity(&reference, &hosts, &users, "host added");

    // Weights changed: down, up, to 0 (no new users) and back.
    for (host, weight) in [
        (ip("10.20.0.2"), 7),
        (ip("192.168.7.30"), 1000),
        (ip("10.20.0.1"), 0),
        (ip("10.20.0.9"), 33),
    ] {
        reference.set_host(host, weight);
        hosts.iter_mut().find(|(h, _)| *h == host).unwrap().1 = weight;
        assert_parity(
            &reference,
            &hosts,
            &users,
            &format!("{host} weight {weight}"),
        );
    }

    // A host marked down leaves the ring (the caller passes only usable hosts); back up, it
    // returns with its weight.
    let down = ip("192.168.7.30");
    reference.set_down(down, true);
    let usable: Vec<_> = hosts.iter().copied().filter(|(h, _)| *h != down).collect();
    assert_parity(&reference, &usable, &users, "host down");
    reference.set_down(down, false);
    assert_parity(&reference, &hosts, &users, "host up again");

    // A host removed.
    reference.remove_host(added);
    hosts.retain(|(h, _)| *h != added);
    assert_parity(&reference, &hosts, &users, "host removed");
}
