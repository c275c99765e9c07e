//! The protocol checks of the 2.3 suite against the shared 2.4 backends of [`shared_pool`].

use crate::shared_pool;
use crate::support::client::imap_login;
use crate::support::director::{DirectorOptions, TestDirector};
use crate::support::dovecot::{user, DovecotVersion, PASSWORD};

#[test]
fn imap_login_lands_on_the_rings_2_4_backend() {
    let pool = shared_pool();
    let d = TestDirector::start(pool, &DirectorOptions::default());
    for i in 1..=6 {
        let u = user(i);
        let home = d.home(pool, &u);
        assert_eq!(home.version(), DovecotVersion::V2_4);
        let (mut c, _) = imap_login(d.imap, &u, PASSWORD);
        assert_eq!(c.imap_backend(), home.name, "{u}");
    }
}
