//! POP3: the pre-authentication front end and the login to a POP3 backend.

pub mod backend_login;
pub mod command;
pub mod frontend;
