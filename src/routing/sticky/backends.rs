//! The backend addresses records point to, each stored once: a record holds a 2-byte index
//! into this list instead of a 17-byte [`IpAddr`].
//!
//! Every index counts the records that hold it; an index no record holds is free for the next
//! new address. So the list stays as long as the number of backends records point to at once,
//! however many addresses come and go over the years (containers that get a new address at
//! every restart). The count of an index can only reach 0 when no record holds it, so a
//! reader that holds a record (under its shard's lock) always reads the address it was given.
//!
//! Reads (every lookup) load the list without locking; a new address, rare, copies it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

/// The index of "no backend": a slot that only remembers a username.
pub const NO_BACKEND: u16 = u16::MAX;

/// The interned addresses and how many records hold each.
#[derive(Debug)]
pub struct Backends {
    /// Address by index; an entry whose count is 0 is stale and may be reused.
    ips: ArcSwap<Vec<IpAddr>>,
    counts: Mutex<Counts>,
    /// How many indices there may be: [`NO_BACKEND`] (smaller in tests).
    limit: usize,
}

impl Default for Backends {
    fn default() -> Self {
        Backends::with_limit(NO_BACKEND as usize)
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// The index of every address that some record holds.
    index: HashMap<IpAddr, u16>,
    /// Records holding each index.
    held: Vec<u32>,
    /// Indices no record holds.
    free: Vec<u16>,
}

impl Backends {
    fn with_limit(limit: usize) -> Self {
        Backends {
            ips: ArcSwap::default(),
            counts: Mutex::default(),
            limit: limit.min(NO_BACKEND as usize),
        }
    }

    /// The index of `ip`, counted as held once more; `None` when 65,535 different addresses
    /// are held at once (the caller keeps no record then: no director has that many
    /// backends).
    pub fn hold(&self, ip: IpAddr) -> Option<u16> {
        let mut c = self.counts.lock().unwrap();
        if let Some(&i) = c.index.get(&ip) {
            c.held[i as usize] += 1;
            return Some(i);
        }
        let i = match c.free.pop() {
            Some(i) => i,
            None if c.held.len() < self.limit => {
                c.held.push(0);
                (c.held.len() - 1) as u16
            }
            None => return None,
        };
        c.held[i as usize] = 1;
        c.index.insert(ip, i);
        let mut ips = (**self.ips.load()).clone();
        if ips.len() <= i as usize {
            ips.resize(i as usize + 1, ip);
        }
        ips[i as usize] = ip;
        self.ips.store(Arc::new(ips));
        Some(i)
    }

    /// `n` records no longer hold index `i`.
    pub fn release(&self, i: u16, n: u32) {
        if i == NO_BACKEND || n == 0 {
            return;
        }
        let mut c = self.counts.lock().unwrap();
        let held = &mut c.held[i as usize];
        *held = held.saturating_sub(n);
        if *held == 0 {
            let ip = self.ips.load()[i as usize];
            c.index.remove(&ip);
            c.free.push(i);
        }
    }

    /// The address of index `i`, which the caller's record holds.
    pub fn ip(&self, i: u16) -> IpAddr {
        self.ips.load()[i as usize]
    }

    /// Every address by index (stale entries included), for reading many records at once.
    pub fn all(&self) -> Arc<Vec<IpAddr>> {
        self.ips.load_full()
    }

    /// How many different addresses records hold.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.counts.lock().unwrap().index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn an_address_is_stored_once_and_its_index_reused_when_free() {
        let b = Backends::default();
        let a = b.hold(ip(1)).unwrap();
        assert_eq!(b.hold(ip(1)), Some(a));
        let c = b.hold(ip(2)).unwrap();
        assert_ne!(a, c);
        assert_eq!((b.ip(a), b.ip(c), b.in_use()), (ip(1), ip(2), 2));
        b.release(a, 1);
        // Still held once.
        assert_eq!(b.ip(a), ip(1));
        assert_eq!(b.in_use(), 2);
        b.release(a, 1);
        assert_eq!(b.in_use(), 1);
        // The free index goes to the next new address.
        assert_eq!(b.hold(ip(3)), Some(a));
        assert_eq!(b.ip(a), ip(3));
        assert_eq!(b.hold(ip(1)).map(|i| b.ip(i)), Some(ip(1)));
    }

    #[test]
    fn many_addresses_over_time_keep_the_list_short() {
        let b = Backends::default();
        // 200,000 addresses, 100 held at a time: a container platform over the years.
        let mut held = std::collections::VecDeque::new();
        for n in 0..200_000 {
            let i = b.hold(ip(n)).unwrap();
            assert_eq!(b.ip(i), ip(n));
            held.push_back(i);
            if held.len() > 100 {
                b.release(held.pop_front().unwrap(), 1);
            }
        }
        assert_eq!(b.in_use(), 100);
        assert!(b.all().len() <= 101, "{}", b.all().len());
    }

    #[test]
    fn no_index_past_the_last() {
        // 100 stands for 65,535 (each new address copies the list: 65,535 would be slow).
        let b = Backends::with_limit(100);
        for n in 0..100 {
            assert!(b.hold(ip(n)).is_some());
        }
        assert_eq!(b.hold(ip(1_000_000)), None);
        // An address already held still is.
        assert!(b.hold(ip(7)).is_some());
    }
}
