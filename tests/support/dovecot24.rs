//! Dovecot 2.4 backends (Debian 13's 2.4.1) on this Debian 12 machine: a child module of
//! `dovecot.rs`, which picks per backend which Dovecot runs.
//!
//! # How a 2.4 backend runs here
//!
//! - `scripts/install-deps` makes a Debian 13 root once with `debootstrap --variant=minbase
//!   --include=dovecot-imapd,...` (about 35 s, 300 MB) at [`ROOT_DEFAULT`] (or
//!   `$DIRECTOR_DOVECOT24_ROOT`), outside the source tree, and marks it complete with
//!   [`MARKER`]. A missing root fails the test with that hint; nothing skips.
//! - Every 2.4 program (`dovecot`, `doveadm`) runs as `unshare -m sh -c 'mount --bind TMP
//!   ROOT/TMP; exec chroot ROOT PROGRAM ...'`: a private mount namespace (gone with the
//!   process) in which the test's temporary directory appears at the same path inside the
//!   root. So a 2.4 backend reads the same passwd files and TLS files and writes the same
//!   Maildir store as the 2.3 backends, and every path in its config is the host's path.
//!   `exec` keeps one pid from `unshare` to `dovecot`: the [`std::process::Child`] is the
//!   master. A chroot shares the network, so a 2.4 backend listens on its 127.x address like
//!   a 2.3 one. chroot needs root (the tests run as root: nftables needs it too).
//! - `doveadm` of 2.3 cannot read a 2.4 config (`Unknown setting: dovecot_config_version`), so
//!   a 2.4 backend's `doveadm who` runs the root's `doveadm` the same way. `doveadm -f tab who
//!   -1` prints `username service pid ip dest_ip` (2.3 has no `dest_ip`): the first three
//!   columns are read alike.
//!
//! # The 2.4 config (what changed from the 2.3 one in `dovecot.rs`)
//!
//! - `dovecot_config_version = 2.4.1` must be the first setting. `dovecot_storage_version =
//!   2.3.0`: the oldest Dovecot that must read what this one writes. The store is shared with
//!   2.3 backends during a rolling upgrade, so it stays at 2.3.0 until none is left (Dovecot's
//!   upgrade notes say the same).
//! - `auth_allow_cleartext = yes` (was `disable_plaintext_auth = no`); `ssl_server_cert_file`
//!   / `ssl_server_key_file` take paths (were `ssl_cert = <path`); `mail_driver = maildir` +
//!   `mail_path = ~/Maildir` (was `mail_location`); `restart_request_count = unlimited` (was
//!   `service_count = 0`).
//! - Named passdb/userdb blocks with `driver`, `passwd_file_path`, `default_password_scheme`
//!   and `auth_username_format = %{user | username | lower}` (was `args = scheme=PLAIN
//!   username_format=%Ln FILE`); the userdb's `default_fields` became a `fields { }` block.
//! - `imap_id_send { x-backend = backendN }` is a block, and 2.4 adds `name = Dovecot` to it by
//!   default: a post-login `ID NIL` answers `* ID ("name" "Dovecot" "x-backend" "backendN")`.
//! - Sieve: `protocol lmtp { mail_plugins { sieve = yes } }` and a `sieve_script personal {
//!   driver = file; path = ~/sieve; active_path = ~/.dovecot.sieve }` (was `plugin { sieve =
//!   file:~/sieve;active=~/.dovecot.sieve }`).
//! - Unchanged: `login_trusted_networks` (IMAP ID `x-originating-ip`, POP3 `XCLIENT` and LMTP
//!   `XCLIENT` from the director are honoured from there), `haproxy_trusted_networks` and
//!   `haproxy = yes` on an `inet_listener`, `auth_master_user_separator`, `login_greeting`,
//!   `mail_max_userip_connections`, `auth_failure_delay`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use super::{current_uid, login_service_with, BackendConfig, SIEVE_PORT};
use super::{IMAPS_PORT, IMAP_HAPROXY_PORT, IMAP_PORT, POP3S_PORT, POP3_HAPROXY_PORT, POP3_PORT};

/// Where `scripts/install-deps` makes the Debian 13 root unless `$DIRECTOR_DOVECOT24_ROOT`
/// says otherwise.
pub const ROOT_DEFAULT: &str = "/var/cache/director-tests/debian13-dovecot";
/// The environment variable that moves the root.
pub const ROOT_ENV: &str = "DIRECTOR_DOVECOT24_ROOT";
/// The file `scripts/install-deps` writes into the root once debootstrap has finished.
pub const MARKER: &str = ".director-tests-complete";

/// The Debian 13 root; panics with the way to make it when it is missing or incomplete.
pub fn root() -> PathBuf {
    let root = std::env::var_os(ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ROOT_DEFAULT));
    assert!(
        root.join(MARKER).is_file(),
        "the Debian 13 root with Dovecot 2.4 is missing or incomplete at {} (no {MARKER}): \
         run ./scripts/install-deps (./scripts/test does), which makes it with debootstrap",
        root.display()
    );
    assert!(
        current_uid() == 0,
        "Dovecot 2.4 backends run in a chroot of {}: run the tests as root",
        root.display()
    );
    root
}

/// Runs `program` of the 2.4 root (`dovecot`, `doveadm`...) with the host's temporary
/// directory at the same path inside the root. Add the program's arguments to the result.
pub fn command(program: &str) -> Command {
    let root = root();
    let tmp = std::env::temp_dir();
    let inside = root.join(tmp.strip_prefix("/").unwrap_or(&tmp));
    std::fs::create_dir_all(&inside)
        .unwrap_or_else(|e| panic!("make {} in the 2.4 root: {e}", inside.display()));
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        r#"t="$1"; i="$2"; r="$3"; shift 3
mount --bind "$t" "$i" && mount --rbind /dev "$r/dev" && exec chroot "$r" "$@""#,
        "dovecot-2.4",
    ])
    .arg(&tmp)
    .arg(&inside)
    .arg(&root)
    .arg(program);
    cmd
}

/// Settings a 2.4 instance needs to live beside others: those of 2.3 with the version lines
/// first (`dovecot_config_version` must be the first setting) and a base_dir of its own.
fn instance_settings(c: &BackendConfig) -> String {
    let common = super::instance_settings(c.name, c.ip, c.dir, c.ids);
    let d = c.dir.display();
    format!(
        "dovecot_config_version = 2.4.1\n\
         dovecot_storage_version = 2.3.0\n\
         {}",
        common
            .replace(
                &format!("base_dir = {d}/run\n"),
                &format!("base_dir = {d}/run24\n")
            )
            .replace(
                &format!("state_dir = {d}/state\n"),
                &format!("state_dir = {d}/state24\n")
            )
    )
}

/// A 2.4 backend's `dovecot.conf`: the same users, store, ports, greeting and `x-backend` as
/// the 2.3 config of the same backend.
pub(super) fn backend_config(c: &BackendConfig) -> String {
    let pool = c.pool_dir.display();
    let name = c.name;
    let (uid, gid) = c.ids.vmail.unwrap_or((0, 0));
    std::fs::create_dir_all(c.dir.join("state24")).unwrap();
    let mut out = instance_settings(c);
    let user = "%{user | username | lower}";
    let _ = write!(
        out,
        r#"protocols = imap pop3 lmtp sieve
hostname = {name}
login_greeting = {name} ready.
imap_id_send {{
  x-backend = {name}
}}
login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
auth_mechanisms = plain login
auth_allow_cleartext = yes
auth_verbose = yes
verbose_proctitle = yes
ssl = yes
ssl_server_cert_file = {cert}
ssl_server_key_file = {key}
mail_driver = maildir
mail_path = ~/Maildir
mmap_disable = yes
mail_fsync = always
mail_max_userip_connections = 100000
first_valid_uid = 1
passdb users {{
  driver = passwd-file
  default_password_scheme = PLAIN
  auth_username_format = {user}
  passwd_file_path = {pool}/passwd
}}
auth_master_user_separator = *
passdb masters {{
  driver = passwd-file
  default_password_scheme = PLAIN
  passwd_file_path = {pool}/passwd.masters
  master = yes
  result_success = continue
}}
userdb users {{
  driver = passwd-file
  auth_username_format = {user}
  passwd_file_path = {pool}/passwd
  fields {{
    uid = {uid}
    gid = {gid}
    home = {pool}/home/{user}
  }}
}}
{imap_login}{pop3_login}service managesieve-login {{
  inet_listener sieve {{
    port = {SIEVE_PORT}
  }}
{limits}}}
{services}protocol lmtp {{
  mail_plugins {{
    sieve = yes
  }}
}}
sieve_script personal {{
  driver = file
  path = ~/sieve
  active_path = ~/.dovecot.sieve
}}
"#,
        cert = c.tls.cert.display(),
        key = c.tls.key.display(),
        imap_login = login_service_with(
            "imap",
            [IMAP_PORT, IMAPS_PORT, IMAP_HAPROXY_PORT],
            LOGIN_LIMITS
        ),
        pop3_login = login_service_with(
            "pop3",
            [POP3_PORT, POP3S_PORT, POP3_HAPROXY_PORT],
            LOGIN_LIMITS
        ),
        limits = LOGIN_LIMITS,
        services = super::mail_services(),
    );
    out.push_str(c.extra);
    out.push('\n');
    out
}

/// What every login service of a 2.4 backend may take (`service_count = 0` of 2.3 is
/// `restart_request_count = unlimited`).
const LOGIN_LIMITS: &str =
    "  restart_request_count = unlimited\n  client_limit = 1000\n  process_limit = 64\n";
