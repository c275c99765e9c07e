//! One shard of the sticky table: its users' slots in a hash table of their own, and their
//! usernames in one byte arena.
//!
//! A slot is 24 bytes: the record (backend index, sessions, last touch) and where the user's
//! last username is in the arena, with a 16-bit sum of it. A username costs its bytes and
//! nothing else (no `String` header, no allocation of its own). Every login notes its
//! username; the sum tells a name already held without reading the arena, which at millions
//! of users is one more miss of the CPU's caches per login. (Two names of one user hash that
//! differ, say in case, have the same length and sum once in 65,536 changes: the old spelling
//! stays shown until the next change. It is shown to people, never used to route.) A changed or dropped name leaves its old bytes behind;
//! when they are half of the arena, the arena is rewritten with only the live names, which
//! costs one pass over this shard only.
//!
//! A slot may hold a username and no record ([`NO_BACKEND`]): the router notes the name
//! before the user is bound, and a cluster member keeps names of records that live in etcd.

use hashbrown::HashTable;

use crate::routing::sticky::backends::NO_BACKEND;

/// Names longer than this are not remembered (the length is stored in 2 bytes).
const MAX_NAME: usize = u16::MAX as usize;

/// Garbage below this many bytes is not worth a rewrite of the arena.
const MIN_COMPACTION: usize = 4096;

/// One user: its record, if any, and its last username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub hash: u32,
    /// Live sessions of the user on this director.
    pub sessions: u32,
    /// Where the username starts in the shard's arena.
    name_at: u32,
    /// When the record was made or a session of the user started or ended; in a slot without
    /// record, when the name was last noted. A tick of the table's clock, in 48 bits (8,900
    /// years of milliseconds), kept in two fields so that the slot needs no 8-byte alignment.
    touched_low: u32,
    touched_high: u16,
    /// Index into the table's backends; [`NO_BACKEND`]: no record, only a username.
    pub backend: u16,
    /// The username's length; 0: none remembered.
    name_len: u16,
    /// [`name_sum`] of the username.
    name_sum: u16,
}

/// A 16-bit sum of a username (FNV-1a, folded).
fn name_sum(name: &[u8]) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) as u16
}

impl Slot {
    /// A slot of `hash` without record or name.
    pub fn unbound(hash: u32, touched: u64) -> Slot {
        let mut slot = Slot {
            hash,
            sessions: 0,
            name_at: 0,
            touched_low: 0,
            touched_high: 0,
            backend: NO_BACKEND,
            name_len: 0,
            name_sum: 0,
        };
        slot.touch(touched);
        slot
    }

    /// The tick of the last touch.
    pub fn touched(&self) -> u64 {
        u64::from(self.touched_high) << 32 | u64::from(self.touched_low)
    }

    /// Touched at tick `now` (past 48 bits, the last tick that fits).
    pub fn touch(&mut self, now: u64) {
        let now = now.min((1 << 48) - 1);
        self.touched_low = now as u32;
        self.touched_high = (now >> 32) as u16;
    }

    /// Whether the slot holds a record (not only a username).
    pub fn is_record(&self) -> bool {
        self.backend != NO_BACKEND
    }

    /// Whether the slot is still of use at tick `now`: sessions are live, or it was touched
    /// less than `expire` ticks ago.
    pub fn alive(&self, now: u64, expire: u64) -> bool {
        self.sessions > 0 || now.saturating_sub(self.touched()) < expire
    }
}

/// The slots of the users whose hash falls in this shard.
#[derive(Debug, Default)]
pub struct Shard {
    slots: HashTable<Slot>,
    /// Every remembered username, back to back.
    names: Vec<u8>,
    /// Bytes of `names` that no slot points to any more.
    dead: usize,
}

impl Shard {
    /// The slot of `hash` (whose keyed hash is `keyed`).
    pub fn get(&self, keyed: u64, hash: u32) -> Option<&Slot> {
        self.slots.find(keyed, |s| s.hash == hash)
    }

    /// The slot of `hash`, to change it (not its name).
    pub fn get_mut(&mut self, keyed: u64, hash: u32) -> Option<&mut Slot> {
        self.slots.find_mut(keyed, |s| s.hash == hash)
    }

    /// The slot of `hash`, made unbound at tick `now` if missing. `rehash` gives a slot's
    /// keyed hash when the table grows.
    pub fn slot(
        &mut self,
        keyed: u64,
        hash: u32,
        now: u64,
        rehash: impl Fn(&Slot) -> u64,
    ) -> &mut Slot {
        self.slots
            .entry(keyed, |s| s.hash == hash, rehash)
            .or_insert_with(|| Slot::unbound(hash, now))
            .into_mut()
    }

    /// Drops the slot of `hash`, its name with it.
    pub fn remove(&mut self, keyed: u64, hash: u32) -> Option<Slot> {
        let (slot, _) = self
            .slots
            .find_entry(keyed, |s| s.hash == hash)
            .ok()?
            .remove();
        self.dead += usize::from(slot.name_len);
        Some(slot)
    }

    /// The username remembered in `slot`.
    pub fn name(&self, slot: &Slot) -> Option<&str> {
        if slot.name_len == 0 {
            return None;
        }
        let at = slot.name_at as usize;
        std::str::from_utf8(&self.names[at..at + usize::from(slot.name_len)]).ok()
    }

    /// Remembers `name` as the username of `hash`, making a slot without record at tick
    /// `now` if there is none. A slot without record lives on from `now`. Returns the slot
    /// (a copy: its record, for the caller to read under the same lock).
    pub fn note(
        &mut self,
        keyed: u64,
        hash: u32,
        name: &str,
        now: u64,
        rehash: impl Fn(&Slot) -> u64,
    ) -> Slot {
        let Shard { slots, names, dead } = self;
        let slot = slots
            .entry(keyed, |s| s.hash == hash, rehash)
            .or_insert_with(|| Slot::unbound(hash, now))
            .into_mut();
        if !slot.is_record() {
            slot.touch(now);
        }
        let (at, len) = (slot.name_at as usize, usize::from(slot.name_len));
        let sum = name_sum(name.as_bytes());
        if len == name.len() && slot.name_sum == sum {
            return *slot;
        }
        slot.name_sum = sum;
        if len == name.len() {
            // Same length (a change of case): written over the old one.
            names[at..at + len].copy_from_slice(name.as_bytes());
            return *slot;
        }
        *dead += len;
        slot.name_len = 0;
        if name.len() > MAX_NAME || names.len() + name.len() > u32::MAX as usize {
            return *slot;
        }
        if names.capacity() - names.len() < name.len() {
            // Grown by a quarter, not doubled: the arena is most of a shard's memory.
            names.reserve_exact(name.len().max(names.len() / 4).max(256));
        }
        slot.name_at = names.len() as u32;
        slot.name_len = name.len() as u16;
        names.extend_from_slice(name.as_bytes());
        let noted = *slot;
        if *dead >= MIN_COMPACTION && *dead * 2 > names.len() {
            self.compact();
        }
        noted
    }

    /// Keeps only the slots `keep` accepts; returns the dropped ones' count. The arena is
    /// rewritten if half of it is garbage then, and the table shrunk if mostly empty.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&Slot) -> bool,
        rehash: impl Fn(&Slot) -> u64,
    ) -> usize {
        let before = self.slots.len();
        let mut dead = 0;
        self.slots.retain(|s| {
            let kept = keep(s);
            if !kept {
                dead += usize::from(s.name_len);
            }
            kept
        });
        self.dead += dead;
        if self.dead > 0 && self.dead * 2 > self.names.len() {
            self.compact();
        }
        if self.slots.len() * 4 < self.slots.capacity() {
            self.slots.shrink_to(self.slots.len() * 2, rehash);
        }
        before - self.slots.len()
    }

    /// Every slot, in no order.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter()
    }

    /// Whether the shard has no slot (records, expired ones not yet purged, names alone).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes the arena holds (live and dead), for tests.
    #[cfg(test)]
    pub fn arena(&self) -> (usize, usize) {
        (self.names.len(), self.dead)
    }

    /// Moves the names slots point to down over the dead bytes, in place: a purge compacts
    /// thousands of shards in one pass, and a fresh arena for each (new memory, faulted in
    /// under the shard's lock, the old one kept by the allocator) made the pass's longest lock
    /// hold milliseconds long and left RSS higher after it than before.
    fn compact(&mut self) {
        // The live names in arena order: each moves down to the end of the one before it, so
        // a copy never overwrites a name still to be moved. Then `moved` holds (old place,
        // new place) pairs, still in arena order, for the slots to look theirs up.
        let mut moved: Vec<(u32, u32)> = self
            .slots
            .iter()
            .filter(|s| s.name_len > 0)
            .map(|s| (s.name_at, u32::from(s.name_len)))
            .collect();
        moved.sort_unstable();
        let mut end = 0usize;
        for (at, len) in moved.iter_mut() {
            let (from, n) = (*at as usize, *len as usize);
            self.names.copy_within(from..from + n, end);
            // `end` stays below the old arena's length, which fits in a u32.
            *len = end as u32;
            end += n;
        }
        for s in self.slots.iter_mut().filter(|s| s.name_len > 0) {
            let i = moved
                .binary_search_by_key(&s.name_at, |(at, _)| *at)
                .expect("every live name was moved");
            s.name_at = moved[i].1;
        }
        self.names.truncate(end);
        self.dead = 0;
        // Shrunk by the rule the slots' table follows: only when mostly empty.
        if self.names.len() * 4 < self.names.capacity() {
            self.names.shrink_to(self.names.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the table's keyed hash (good enough for one shard in a test).
    fn keyed(hash: u32) -> u64 {
        u64::from(hash).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn rehash(s: &Slot) -> u64 {
        keyed(s.hash)
    }

    fn note(sh: &mut Shard, hash: u32, name: &str) {
        sh.note(keyed(hash), hash, name, 0, rehash);
    }

    fn name_of(sh: &Shard, hash: u32) -> Option<String> {
        sh.get(keyed(hash), hash)
            .and_then(|s| sh.name(s))
            .map(str::to_owned)
    }

    #[test]
    fn names_survive_changes_drops_and_compaction() {
        let mut sh = Shard::default();
        for h in 1..=10_000u32 {
            note(&mut sh, h, &format!("user{h}@example.org"));
        }
        // A change of case is written in place; a longer name is appended.
        note(&mut sh, 7, "USER7@example.org");
        assert_eq!(sh.arena().1, 0);
        note(&mut sh, 8, "somebody.else@example.org");
        assert_eq!(name_of(&sh, 7).as_deref(), Some("USER7@example.org"));
        assert_eq!(
            name_of(&sh, 8).as_deref(),
            Some("somebody.else@example.org")
        );
        // Dropping two thirds leaves their bytes dead: the retain rewrites the arena.
        let (before, _) = sh.arena();
        let dropped = sh.retain(|s| s.hash % 3 == 0, rehash);
        assert_eq!(dropped, 10_000 - 3_333);
        let (after, dead) = sh.arena();
        assert_eq!(dead, 0);
        assert!(after < before / 2, "{after} of {before}");
        for h in 1..=10_000u32 {
            let want = (h % 3 == 0).then(|| format!("user{h}@example.org"));
            assert_eq!(name_of(&sh, h), want, "{h}");
        }
        // Renaming everyone twice over compacts along the way and keeps the last names.
        for round in 0..2 {
            for h in (3..=10_000u32).step_by(3) {
                note(&mut sh, h, &format!("renamed{round}-{h}@example.org"));
            }
        }
        let (len, dead) = sh.arena();
        assert!(dead * 2 <= len, "{dead} of {len}");
        for h in (3..=10_000u32).step_by(3) {
            assert_eq!(name_of(&sh, h), Some(format!("renamed1-{h}@example.org")));
        }
    }

    #[test]
    fn a_name_too_long_is_not_remembered() {
        let mut sh = Shard::default();
        note(&mut sh, 1, "alice");
        note(&mut sh, 1, &"a".repeat(MAX_NAME + 1));
        assert_eq!(name_of(&sh, 1), None);
        note(&mut sh, 1, "alice");
        assert_eq!(name_of(&sh, 1).as_deref(), Some("alice"));
        assert!(sh.remove(keyed(1), 1).is_some());
        assert_eq!(sh.arena().1, sh.arena().0);
        assert!(sh.is_empty());
    }

    #[test]
    fn slots_are_24_bytes_and_keep_48_bits_of_ticks() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
        // Five thousand years of milliseconds.
        let years = 5_000 * 365 * 24 * 3_600_000u64;
        let mut s = Slot::unbound(1, years);
        assert_eq!(s.touched(), years);
        s.touch(u64::MAX);
        assert_eq!(s.touched(), (1 << 48) - 1);
    }
}
