//! IMAP: the pre-authentication front end and the login to an IMAP backend.

pub mod backend_login;
pub mod command;
pub mod frontend;
