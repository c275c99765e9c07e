//! ManageSieve (RFC 5804): the pre-authentication front end and the login to a ManageSieve
//! backend.

pub mod backend_login;
pub mod command;
pub mod frontend;
