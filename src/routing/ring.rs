//! The consistent-hash ring, compatible with Dovecot 2.3's director (`mail-host.c`).
//!
//! A backend with weight N owns N points; point i is the first four bytes (big-endian) of
//! MD5(`"<ip>-<i>"`), the IP written as Dovecot writes it. Points are sorted by hash, ties by
//! the IP's bytes. A user goes to the point found by the same binary search Dovecot uses
//! (the first point at or after the user's hash, wrapping round). Same backends and weights
//! give the same answer as a Dovecot director, so users stay put when one replaces the other.
//!
//! A ring is immutable: a change of backends builds a new one, swapped in atomically.

use std::cmp::Ordering;
use std::net::IpAddr;

use crate::routing::user_hash::md5_prefix;

/// One point on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    hash: u32,
    ip: IpAddr,
    /// The index of `ip` among the ring's backends, to tell backends apart cheaply.
    backend: u32,
}

/// An immutable ring over the usable backends of one tag.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    points: Vec<Point>,
    /// How many backends have points: [`Ring::candidates`] stops once it has them all
    /// rather than walking every point (100 per backend by default) on every login.
    backends: usize,
}

/// Dovecot's `net_ip_cmp`: family first (IPv4 before IPv6), then the address bytes.
fn ip_cmp(a: &IpAddr, b: &IpAddr) -> Ordering {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets().cmp(&b.octets()),
        (IpAddr::V6(a), IpAddr::V6(b)) => a.octets().cmp(&b.octets()),
        (IpAddr::V4(_), IpAddr::V6(_)) => Ordering::Less,
        (IpAddr::V6(_), IpAddr::V4(_)) => Ordering::Greater,
    }
}

impl Ring {
    /// Builds the ring from `(ip, weight)` pairs of the backends that may take new users
    /// (up, not drained). Weight 0 adds no points.
    pub fn build(backends: impl IntoIterator<Item = (IpAddr, u32)>) -> Ring {
        let mut points = Vec::new();
        let mut with_points: std::collections::HashMap<IpAddr, u32> = Default::default();
        for (ip, weight) in backends {
            if weight == 0 {
                continue;
            }
            // Each backend has at least one point: their count fits in a u32.
            let next = with_points.len() as u32;
            let backend = *with_points.entry(ip).or_insert(next);
            let prefix = ip.to_string();
            for i in 0..weight {
                let key = format!("{prefix}-{i}");
                points.push(Point {
                    hash: md5_prefix(key.as_bytes()),
                    ip,
                    backend,
                });
            }
        }
        points.sort_by(|a, b| a.hash.cmp(&b.hash).then_with(|| ip_cmp(&a.ip, &b.ip)));
        Ring {
            points,
            backends: with_points.len(),
        }
    }

    /// Whether no backend can take users.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Index of the point that owns `hash`: Dovecot's `bsearch_insert_pos`, wrapped.
    fn index(&self, hash: u32) -> Option<usize> {
        let count = self.points.len();
        if count == 0 {
            return None;
        }
        let (mut left, mut right, mut idx) = (0usize, count, 0usize);
        let mut last = Ordering::Equal;
        while left < right {
            idx = (left + right) / 2;
            last = hash.cmp(&self.points[idx].hash);
            match last {
                Ordering::Greater => left = idx + 1,
                Ordering::Less => right = idx,
                Ordering::Equal => return Some(idx),
            }
        }
        if last == Ordering::Greater {
            idx += 1;
        }
        Some(if idx == count { 0 } else { idx })
    }

    /// The backend a user with this hash goes to.
    pub fn lookup(&self, hash: u32) -> Option<IpAddr> {
        self.index(hash).map(|i| self.points[i].ip)
    }

    /// Every backend in ring order starting at the user's point, each once: the first is
    /// [`Ring::lookup`]'s answer, the rest are where to go if it cannot be reached.
    pub fn candidates(&self, hash: u32) -> Vec<IpAddr> {
        let Some(start) = self.index(hash) else {
            return Vec::new();
        };
        let mut out: Vec<IpAddr> = Vec::with_capacity(self.backends);
        let mut seen = vec![false; self.backends];
        let n = self.points.len();
        for k in 0..n {
            let p = &self.points[(start + k) % n];
            if !std::mem::replace(&mut seen[p.backend as usize], true) {
                out.push(p.ip);
                if out.len() == self.backends {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::user_hash::UserHash;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_ring_routes_nowhere() {
        assert_eq!(Ring::build([]).lookup(5), None);
        assert_eq!(Ring::build([(ip("10.0.0.1"), 0)]).lookup(5), None);
    }

    #[test]
    fn weights_share_users_in_proportion() {
        let ring = Ring::build([(ip("10.0.0.1"), 100), (ip("10.0.0.2"), 300)]);
        let h = UserHash::default();
        let on_second = (0..20_000)
            .filter(|i| ring.lookup(h.hash(&format!("user{i}"))) == Some(ip("10.0.0.2")))
            .count();
        let share = on_second as f64 / 20_000.0;
        assert!((0.68..0.82).contains(&share), "share {share}");
    }

    #[test]
    fn candidates_start_with_lookup_and_cover_all() {
        let ring = Ring::build([
            (ip("10.0.0.1"), 10),
            (ip("10.0.0.2"), 10),
            (ip("10.0.0.3"), 10),
        ]);
        for hash in [1, 77, u32::MAX, 0x8000_0000] {
            let c = ring.candidates(hash);
            assert_eq!(c.len(), 3);
            assert_eq!(Some(c[0]), ring.lookup(hash));
        }
    }

    #[test]
    fn candidates_stop_early_with_the_same_answer_as_a_full_walk() {
        let ring = Ring::build([
            (ip("10.0.0.1"), 100),
            (ip("10.0.0.2"), 1),
            (ip("10.0.0.3"), 0),
            (ip("10.0.0.4"), 300),
        ]);
        for hash in (0..2000u32).map(|i| i.wrapping_mul(2_654_435_761)) {
            let start = ring.index(hash).unwrap();
            let mut full: Vec<IpAddr> = Vec::new();
            for k in 0..ring.points.len() {
                let ip = ring.points[(start + k) % ring.points.len()].ip;
                if !full.contains(&ip) {
                    full.push(ip);
                }
            }
            assert_eq!(ring.candidates(hash), full, "{hash}");
        }
    }

    #[test]
    fn wraps_past_the_last_point() {
        let ring = Ring::build([(ip("10.0.0.1"), 3), (ip("10.0.0.2"), 3)]);
        let first = ring.points[0].ip;
        assert_eq!(ring.lookup(u32::MAX), Some(first));
        assert_eq!(ring.lookup(ring.points[0].hash), Some(first));
    }
}
