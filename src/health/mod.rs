//! Backend health: the `checker` keeps one verdict per backend (rise/fall, suspects from
//! failed logins, users moved off a backend that goes down); `probe` runs the checks defined
//! in `checks/*.yaml`.

pub mod checker;
pub mod probe;
