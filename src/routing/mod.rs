//! Routing's arithmetic, compatible with Dovecot 2.3's director and free of any state: the
//! user hash (`user_hash`), the consistent-hash ring it is looked up on (`ring`) and the
//! sticky records that keep a user where it is (`sticky`). The state holds the rings and the
//! records; the router that reads them to send a user somewhere is `crate::state::router`.

pub mod ring;
pub mod sticky;
pub mod user_hash;
