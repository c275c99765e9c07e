//! This director's copy of the cluster's state: every key under the prefix, loaded once and
//! then kept current by one watch, so that routing reads it without a round trip. Only the
//! watch task changes it, in etcd's revision order; writers wait until it has applied their
//! write ([`Replica::wait_for`]) so that what they read next includes it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{EventType, KeyValue};
use tokio::sync::{watch, Notify};
use tracing::warn;

use crate::state::backend::Health;
use crate::state::cluster::keys::{
    decode, BackendValue, HealthValue, Key, Keys, MemberValue, PauseValue, UserValue,
};

/// A value with the revision that last wrote it (compared in every transaction).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_rev: i64,
}

/// What a change did that the state must act on beyond storing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The backends, their health or their maintenance changed: rebuild the rings.
    Backends,
    /// The checks pause changed.
    Pause(Option<PauseValue>),
    /// Another director started moving this user: end our sessions, then acknowledge.
    MoveStarted { hash: u32, move_id: String },
    /// The checker's seat is free: campaign.
    CheckerGone,
    /// A director found a backend unresponsive (for the checker).
    Suspect(IpAddr),
    /// The set of live directors changed.
    Members,
}

/// The replica's contents.
#[derive(Debug, Default)]
pub struct Contents {
    pub backends: BTreeMap<IpAddr, Versioned<BackendValue>>,
    pub health: BTreeMap<IpAddr, Health>,
    pub users: HashMap<u32, Versioned<UserValue>>,
    pub members: BTreeMap<String, Versioned<MemberValue>>,
    pub checker: Option<String>,
    /// Acknowledgements by move id.
    pub acks: HashMap<String, HashSet<String>>,
}

/// A full read under way.
pub struct Loading {
    fresh: Contents,
    moves: Vec<Effect>,
    pause: Option<PauseValue>,
}

/// The replica and the revision it has applied.
pub struct Replica {
    keys: Keys,
    me: String,
    pub contents: Mutex<Contents>,
    applied: watch::Sender<i64>,
    /// Woken after every applied batch (movers wait on acknowledgements with it).
    pub changed: Notify,
}

impl Replica {
    pub fn new(keys: Keys, me: &str) -> Self {
        Replica {
            keys,
            me: me.to_owned(),
            contents: Mutex::new(Contents::default()),
            applied: watch::channel(0).0,
            changed: Notify::new(),
        }
    }

    /// The revision applied so far.
    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Marks `revision` as applied.
    pub fn set_applied(&self, revision: i64) {
        self.applied.send_if_modified(|r| {
            if revision > *r {
                *r = revision;
                true
            } else {
                false
            }
        });
        self.changed.notify_waiters();
    }

    /// Waits until the replica has applied `revision` (at most `limit`). False on timeout:
    /// the watch is behind or broken.
    pub async fn wait_for(&self, revision: i64, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Starts a full read of the prefix (at start and after the watch broke), page by page
    /// ([`Replica::load_page`]) into fresh contents that [`Replica::finish_load`] swaps in.
    pub fn start_load(&self) -> Loading {
        Loading {
            fresh: Contents::default(),
            moves: Vec::new(),
            pause: None,
        }
    }

    /// Adds one page of a full read.
    pub fn load_page(&self, loading: &mut Loading, kvs: &[KeyValue]) {
        for kv in kvs {
            match self.put(&mut loading.fresh, kv) {
                Some(Effect::Pause(p)) => loading.pause = p,
                Some(e @ Effect::MoveStarted { .. }) => loading.moves.push(e),
                _ => {}
            }
        }
    }

    /// Replaces everything with what was read, as of `revision`. Returns the effects to act
    /// on: the backends and members to rebuild, the pause, every move under way by another
    /// director, and an election if the checker's seat is free.
    pub fn finish_load(&self, loading: Loading, revision: i64) -> Vec<Effect> {
        let Loading {
            fresh,
            mut moves,
            pause,
        } = loading;
        let mut effects = vec![Effect::Backends, Effect::Members, Effect::Pause(pause)];
        if fresh.checker.is_none() {
            effects.push(Effect::CheckerGone);
        }
        effects.append(&mut moves);
        *self.contents.lock().unwrap() = fresh;
        self.set_applied(revision);
        effects
    }

    /// Applies one watched event; returns what it calls for.
    pub fn apply(&self, kind: EventType, kv: &KeyValue) -> Option<Effect> {
        let mut c = self.contents.lock().unwrap();
        match kind {
            EventType::Put => self.put(&mut c, kv),
            EventType::Delete => self.delete(&mut c, kv),
        }
    }

    fn put(&self, c: &mut Contents, kv: &KeyValue) -> Option<Effect> {
        let key = self.keys.parse(kv.key())?;
        let rev = kv.mod_revision();
        let bad = || {
            warn!(key = %String::from_utf8_lossy(kv.key()), "cluster: a value this director cannot read: ignored");
        };
        match key {
            Key::Backend(ip) => {
                let Some(value) = decode::<BackendValue>(kv.value()) else {
                    bad();
                    return None;
                };
                c.backends.insert(
                    ip,
                    Versioned {
                        value,
                        mod_rev: rev,
                    },
                );
                Some(Effect::Backends)
            }
            Key::Health(ip) => {
                let Some(value) = decode::<HealthValue>(kv.value()) else {
                    bad();
                    return None;
                };
                c.health.insert(ip, value.health);
                Some(Effect::Backends)
            }
            Key::ChecksPause => match decode::<PauseValue>(kv.value()) {
                Some(p) => Some(Effect::Pause(Some(p))),
                None => {
                    bad();
                    None
                }
            },
            Key::User(hash) => {
                let Some(value) = decode::<UserValue>(kv.value()) else {
                    bad();
                    return None;
                };
                let effect = value.moving.as_ref().filter(|m| m.by != self.me).map(|m| {
                    Effect::MoveStarted {
                        hash,
                        move_id: m.id.clone(),
                    }
                });
                c.users.insert(
                    hash,
                    Versioned {
                        value,
                        mod_rev: rev,
                    },
                );
                effect
            }
            Key::Member(id) => {
                let Some(value) = decode::<MemberValue>(kv.value()) else {
                    bad();
                    return None;
                };
                c.members.insert(
                    id,
                    Versioned {
                        value,
                        mod_rev: rev,
                    },
                );
                Some(Effect::Members)
            }
            Key::Checker => {
                c.checker = Some(String::from_utf8_lossy(kv.value()).into_owned());
                Some(Effect::Members)
            }
            Key::Ack { move_id, director } => {
                c.acks.entry(move_id).or_default().insert(director);
                None
            }
            Key::Suspect { ip, .. } => Some(Effect::Suspect(ip)),
        }
    }

    fn delete(&self, c: &mut Contents, kv: &KeyValue) -> Option<Effect> {
        match self.keys.parse(kv.key())? {
            Key::Backend(ip) => {
                c.backends.remove(&ip);
                Some(Effect::Backends)
            }
            Key::Health(ip) => {
                c.health.remove(&ip);
                Some(Effect::Backends)
            }
            Key::ChecksPause => Some(Effect::Pause(None)),
            Key::User(hash) => {
                c.users.remove(&hash);
                None
            }
            Key::Member(id) => {
                c.members.remove(&id);
                Some(Effect::Members)
            }
            Key::Checker => {
                c.checker = None;
                Some(Effect::CheckerGone)
            }
            Key::Ack { move_id, director } => {
                if let Some(set) = c.acks.get_mut(&move_id) {
                    set.remove(&director);
                    if set.is_empty() {
                        c.acks.remove(&move_id);
                    }
                }
                None
            }
            Key::Suspect { .. } => None,
        }
    }
}
