//! A real OpenLDAP server for tests: Debian's `slapd` with a directory of its own, holding test
//! users for a Dovecot LDAP passdb (the seed memo's director authenticates against LDAP).
//!
//! # The directory
//!
//! - Suffix [`SUFFIX`]; the users are `uid=NAME,`[`PEOPLE`], objectClass `inetOrgPerson` (`cn`
//!   and `sn` are the uid) plus the auxiliary `inetLocalMailRecipient` of Debian's `misc`
//!   schema. So an entry may carry, besides `uid` and `userPassword`, any attribute of those
//!   two classes. For routing fields the tests use `mailHost` (misc schema: "FQDN of the
//!   SMTP/MTA of this recipient", one value) for Dovecot's `host`, and inetOrgPerson's
//!   `employeeType` or `departmentNumber` for fields like `director_tag`.
//! - `userPassword` holds the password in clear text, as Dovecot needs it for CRAM-MD5 and
//!   DIGEST-MD5; the passdb reads it with `default_pass_scheme = PLAIN`. A password starting
//!   with `{` would be read as a `{SCHEME}` prefix, so the fixture refuses one.
//! - Anonymous clients may bind but not read `userPassword`; Dovecot binds as the rootdn
//!   [`ROOT_DN`] (`dn`/`dnpass`), which no ACL limits.
//!
//! # Facts about slapd 2.5 (Debian 12) that this file relies on
//!
//! - A `slapd.conf` works as is (`-f`, no `cn=config` needed); Debian builds the backends as
//!   modules, so the config loads `back_mdb` from `/usr/lib/ldap`.
//! - `slapadd -f CONF -l LDIF` fills the mdb database offline in a few ms, before the server
//!   starts.
//! - `slapd -d LEVEL` stays in the foreground (our child, reaped by us) and logs to stderr;
//!   level `stats` logs each connection and operation (`BIND dn=...`, `SRCH ... filter=...`).
//!   It runs as whoever starts it, root or not: it needs no privilege for a port over 1024.
//! - It answers within about 10 ms of its start; `ldapsearch` takes about 10 ms per call.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::command::{run, Ran};
use super::dovecot::{allocate_block, remove_unless_kept};
use super::wait::wait_until;

/// The directory's suffix.
pub const SUFFIX: &str = "dc=example,dc=test";
/// Where the users are.
pub const PEOPLE: &str = "ou=people,dc=example,dc=test";
/// The rootdn: Dovecot binds as it.
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=test";
/// [`ROOT_DN`]'s password.
pub const ROOT_PASSWORD: &str = "ldap-admin-secret";
/// The LDAP port, on the server's own loopback address.
pub const LDAP_PORT: u16 = 10389;
/// Where Debian's `dovecot-ldap` puts the LDAP passdb driver.
pub const DOVECOT_LDAP_MODULE: &str = "/usr/lib/dovecot/modules/auth/libauthdb_ldap.so";

/// How long slapd may take to answer before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One user entry to load.
#[derive(Debug, Clone)]
pub struct LdapUser {
    /// Its `uid` (and `cn`, `sn`, and the RDN of its DN).
    pub uid: String,
    /// Its `userPassword`, in clear text.
    pub password: String,
    /// More attributes, `(name, value)`: any of `inetOrgPerson` or `inetLocalMailRecipient`
    /// (`mailHost`, `employeeType`, ...). A name may come more than once (multi-valued).
    pub attrs: Vec<(String, String)>,
}

impl LdapUser {
    /// A user with no attribute besides `uid` and `userPassword`.
    pub fn new(uid: &str, password: &str) -> LdapUser {
        assert!(
            !uid.is_empty()
                && uid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b)),
            "uid {uid:?}: the fixture writes DNs unescaped, so letters, digits and ._@- only"
        );
        assert!(
            !password.starts_with('{'),
            "password {password:?}: Dovecot would read a leading {{...}} as a password scheme"
        );
        LdapUser {
            uid: uid.to_owned(),
            password: password.to_owned(),
            attrs: Vec::new(),
        }
    }

    /// Adds the attribute `name: value`.
    pub fn with(mut self, name: &str, value: &str) -> LdapUser {
        self.attrs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Its DN.
    pub fn dn(&self) -> String {
        format!("uid={},{PEOPLE}", self.uid)
    }
}

/// A running slapd with its own config and database in a temporary directory. Dropping it
/// kills it and removes the directory (unless `DIRECTOR_TEST_KEEP=1`).
pub struct Slapd {
    /// Its own loopback address.
    pub ip: IpAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Slapd {
    /// Writes a config, loads `users` and starts slapd on `ldap://127.X.Y.1:`[`LDAP_PORT`]`/`;
    /// returns once it answers a search as [`ROOT_DN`].
    pub fn start(users: &[LdapUser]) -> Slapd {
        let slapd = program("slapd");
        let (ip, dir) = allocate();
        // From here on, a panic drops `server`: the directory goes, and slapd if it runs.
        let mut server = Slapd {
            ip,
            dir,
            child: None,
        };
        let dir = &server.dir;
        let conf = dir.join("slapd.conf");
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::write(&conf, config_text(dir)).unwrap();
        fs::write(dir.join("users.ldif"), ldif(users)).unwrap();
        let loaded = run(
            Command::new(program("slapadd"))
                .arg("-f")
                .arg(&conf)
                .arg("-l")
                .arg(dir.join("users.ldif")),
            None,
        )
        .unwrap_or_else(|e| panic!("run slapadd: {e}: {INSTALL_HINT}"));
        assert!(
            loaded.ok,
            "slapadd refused the users (an attribute outside inetOrgPerson and \
             inetLocalMailRecipient?):\n{}",
            loaded.text()
        );

        let log = fs::File::create(dir.join("slapd.log")).unwrap();
        let child = Command::new(slapd)
            .arg("-f")
            .arg(&conf)
            .arg("-h")
            .arg(server.uri())
            .args(["-d", "stats"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run slapd: {e}: {INSTALL_HINT}"));
        server.child = Some(child);
        server.wait_ready();
        server
    }

    /// `ldap://127.X.Y.1:PORT/`.
    pub fn uri(&self) -> String {
        format!("ldap://{}/", self.addr())
    }

    /// Its address and port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, LDAP_PORT)
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What it logged so far (connections, binds, searches with their filters).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("slapd.log")).unwrap_or_default()
    }

    /// `ldapsearch` as [`ROOT_DN`] under [`SUFFIX`]: the LDIF of the entries matching
    /// `filter`, with `attrs` (all when empty).
    pub fn search(&self, filter: &str, attrs: &[&str]) -> Ran {
        search_as_root(&self.uri(), filter, attrs)
    }

    /// Writes `dir/dovecot-ldap.conf.ext`, the settings of a Dovecot LDAP passdb over this
    /// server: bind as [`ROOT_DN`], `pass_filter = (&(objectClass=inetOrgPerson)(uid=%u))`,
    /// `pass_attrs` as given (e.g. `userPassword=password, mailHost=host, =proxy=y`),
    /// `default_pass_scheme = PLAIN`. Returns the `passdb { driver = ldap ... }` block that
    /// reads it, for the instance's `dovecot.conf`.
    pub fn dovecot_passdb(&self, dir: &Path, pass_attrs: &str) -> String {
        assert!(
            Path::new(DOVECOT_LDAP_MODULE).is_file(),
            "{DOVECOT_LDAP_MODULE} is missing: {INSTALL_HINT}"
        );
        let file = dir.join("dovecot-ldap.conf.ext");
        fs::write(
            &file,
            format!(
                "# written by tests/support/slapd.rs\n\
                 uris = {uri}\n\
                 ldap_version = 3\n\
                 dn = {ROOT_DN}\n\
                 dnpass = {ROOT_PASSWORD}\n\
                 base = {PEOPLE}\n\
                 scope = subtree\n\
                 pass_filter = (&(objectClass=inetOrgPerson)(uid=%u))\n\
                 pass_attrs = {pass_attrs}\n\
                 default_pass_scheme = PLAIN\n",
                uri = self.uri()
            ),
        )
        .unwrap();
        format!(
            "passdb {{\n  driver = ldap\n  args = {}\n}}\n",
            file.display()
        )
    }

    /// Polls with a search as [`ROOT_DN`] until the directory answers; panics if slapd exits
    /// first (with its log) or takes longer than [`START_DEADLINE`].
    fn wait_ready(&mut self) {
        let uri = self.uri();
        let child = self.child.as_mut().expect("slapd was spawned");
        let exited = wait_until(
            &format!("slapd to answer on {uri}"),
            START_DEADLINE,
            || match child.try_wait().unwrap() {
                Some(status) => Some(Some(status)),
                None => search_as_root(&uri, &format!("(dc={SUFFIX_DC})"), &["dc"])
                    .ok
                    .then_some(None),
            },
        );
        if let Some(status) = exited {
            panic!(
                "slapd exited ({status}) during start; config {}:\n{}",
                self.dir.join("slapd.conf").display(),
                self.log()
            );
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_unless_kept(&self.dir);
    }
}

/// Tells what to do when a program of the fixture is missing.
const INSTALL_HINT: &str =
    "install Debian's slapd, ldap-utils and dovecot-ldap (./scripts/install-deps does)";

/// The `dc` of [`SUFFIX`].
const SUFFIX_DC: &str = "example";

/// `name` where Debian puts it: slapd and slapadd are in /usr/sbin, which a non-root user's
/// PATH may lack.
fn program(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: {INSTALL_HINT}"))
}

/// `ldapsearch` as [`ROOT_DN`] on `uri` (see [`Slapd::search`]).
fn search_as_root(uri: &str, filter: &str, attrs: &[&str]) -> Ran {
    run(
        Command::new(program("ldapsearch"))
            .args(["-x", "-LLL", "-o", "nettimeout=5", "-H", uri])
            .args(["-D", ROOT_DN, "-w", ROOT_PASSWORD, "-b", SUFFIX, filter])
            .args(attrs),
        None,
    )
    .unwrap_or_else(|e| panic!("run ldapsearch: {e}: {INSTALL_HINT}"))
}

/// A harness address block whose `127.X.Y.1` has [`LDAP_PORT`] free, and its directory.
fn allocate() -> (IpAddr, PathBuf) {
    for _ in 0..16 {
        let ((x, y), dir) = allocate_block(1);
        let ip = IpAddr::V4(Ipv4Addr::new(127, x, y, 1));
        if TcpListener::bind((ip, LDAP_PORT)).is_ok() {
            return (ip, dir);
        }
        let _ = fs::remove_dir_all(&dir);
    }
    panic!("no 127.X.Y.1 with port {LDAP_PORT} free for slapd");
}

fn config_text(dir: &Path) -> String {
    let d = dir.display();
    let mut out = String::from("# written by tests/support/slapd.rs\n");
    for schema in ["core", "cosine", "inetorgperson", "misc"] {
        let _ = writeln!(out, "include /etc/ldap/schema/{schema}.schema");
    }
    let _ = write!(
        out,
        "pidfile {d}/slapd.pid\n\
         argsfile {d}/slapd.args\n\
         modulepath /usr/lib/ldap\n\
         moduleload back_mdb\n\
         database mdb\n\
         suffix \"{SUFFIX}\"\n\
         rootdn \"{ROOT_DN}\"\n\
         rootpw {ROOT_PASSWORD}\n\
         directory {d}/data\n\
         access to attrs=userPassword by anonymous auth by * none\n\
         access to * by * read\n"
    );
    out
}

/// The LDIF of the suffix, [`PEOPLE`] and `users`.
fn ldif(users: &[LdapUser]) -> String {
    let mut out = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: {SUFFIX_DC}\n\
         o: {SUFFIX_DC}\n\ndn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"
    );
    for user in users {
        let _ = write!(
            out,
            "\ndn: {}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n",
            user.dn()
        );
        for (name, value) in [("uid", &user.uid), ("cn", &user.uid), ("sn", &user.uid)] {
            out.push_str(&ldif_line(name, value));
        }
        out.push_str(&ldif_line("userPassword", &user.password));
        for (name, value) in &user.attrs {
            out.push_str(&ldif_line(name, value));
        }
    }
    out
}

/// `name: value`, or `name:: BASE64` when the value is not an LDIF SAFE-STRING (RFC 2849:
/// leading space, `:` or `<`, a trailing space, anything outside printable ASCII).
fn ldif_line(name: &str, value: &str) -> String {
    let safe = value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !value.starts_with([' ', ':', '<'])
        && !value.ends_with(' ');
    if safe {
        format!("{name}: {value}\n")
    } else {
        format!("{name}:: {}\n", STANDARD.encode(value))
    }
}
