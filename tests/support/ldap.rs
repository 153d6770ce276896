//! A throwaway OpenLDAP `slapd` for tests: a generated `slapd.conf` (mdb, the `syncprov`
//! overlay, a small schema for the migration attribute, TLS with a test certificate) in a
//! temporary directory, listening on 127.0.0.1 with `ldap://` (StartTLS) and `ldaps://`,
//! unprivileged, stopped by PID on drop (and by a watchdog if the test process dies).
//!
//! The tree: `dc=example,dc=org` with `ou=people` (users added by [`Slapd::add_user`]), the
//! root DN, mailferry's bind account [`BIND_DN`] (may write the route attribute) and a
//! read-only account [`READER_DN`] (for refused writes). `ldapadd`/`ldapmodify`/`ldapsearch`
//! run as the root DN over plain LDAP on loopback. Missing packages are installed with
//! `apt-get install slapd ldap-utils` when running as root (see scripts/deps.sh).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::dovecot::{free_port, port_open};
use super::tls::{self_signed, TestCert};

/// Suffix of the test tree.
pub const SUFFIX: &str = "dc=example,dc=org";
/// Where users live (`[directory] base_dn`).
pub const PEOPLE_DN: &str = "ou=people,dc=example,dc=org";
/// The root DN (used by the helpers, never by mailferry).
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=org";
/// Its password.
pub const ROOT_PW: &str = "rootpw";
/// mailferry's service account: reads entries, writes the route attribute.
pub const BIND_DN: &str = "cn=mailferry,dc=example,dc=org";
/// Its password.
pub const BIND_PW: &str = "ferrypw";
/// An account that reads everything and writes nothing.
pub const READER_DN: &str = "cn=reader,dc=example,dc=org";
/// Its password.
pub const READER_PW: &str = "readerpw";
/// The route attribute of the test schema.
pub const ROUTE_ATTR: &str = "mailMigrationRoute";
/// The unprivileged system user slapd runs as when the tests run as root.
pub const SYSTEM_USER: &str = "mfldap";

/// How long `start` waits for the listeners.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The migration attribute, and `mailAlternateAddress` (not in Debian's schemas), under the
/// documentation enterprise number 32473 (RFC 5612).
const SCHEMA: &str = "\
attributetype ( 1.3.6.1.4.1.32473.1.1.1 NAME 'mailMigrationRoute'
  DESC 'mailferry: the backend holding the mailbox, legacy or new'
  EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{32} SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.32473.1.1.2 NAME 'mailAlternateAddress'
  DESC 'another address delivered to the same mailbox'
  EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 1.3.6.1.4.1.32473.1.2.1 NAME 'mailMigrationUser'
  DESC 'mailferry: a user whose mailbox is being migrated'
  SUP top AUXILIARY
  MAY ( mailMigrationRoute $ mailAlternateAddress ) )
";

/// A running slapd with the test tree loaded.
pub struct Slapd {
    /// StartTLS (and plain) listener.
    pub ldap: SocketAddr,
    /// Implicit-TLS listener.
    pub ldaps: SocketAddr,
    /// The server certificate; its PEM is the CA file that trusts it.
    pub cert: TestCert,
    /// Whether the `syncprov` overlay (syncrepl) is configured.
    pub syncprov: bool,
    dir: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    watchdog: Option<(Child, ChildStdin)>,
    _tmp: tempfile::TempDir,
}

impl Slapd {
    /// Starts slapd and loads the base tree; panics with the log if it does not come up.
    pub fn start() -> Slapd {
        Self::start_with(true)
    }

    /// Like [`Slapd::start`], without the `syncprov` overlay: a server that offers no
    /// syncrepl, as many deployments run.
    pub fn start_without_syncprov() -> Slapd {
        Self::start_with(false)
    }

    fn start_with(syncprov: bool) -> Slapd {
        ensure_installed();
        let tmp = tempfile::Builder::new()
            .prefix("mfldap")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let dir = tmp.path().to_owned();
        let cert = self_signed(&dir, "slapd");
        std::fs::create_dir(dir.join("db")).expect("db dir");
        std::fs::write(dir.join("mailferry.schema"), SCHEMA).expect("schema");
        std::fs::write(dir.join("bind.secret"), format!("{BIND_PW}\n")).expect("secret");
        std::fs::write(dir.join("reader.secret"), format!("{READER_PW}\n")).expect("secret");
        if let Some((uid, gid)) = owner() {
            chown_all(&dir, uid, gid);
        }
        let mut s = Slapd {
            ldap: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ldaps: SocketAddr::from(([127, 0, 0, 1], free_port())),
            conf: dir.join("slapd.conf"),
            log: dir.join("slapd.log"),
            cert,
            syncprov,
            dir,
            child: None,
            watchdog: None,
            _tmp: tmp,
        };
        std::fs::write(&s.conf, s.render_conf()).expect("slapd.conf");
        s.spawn_and_wait();
        s.ldapadd(&base_ldif());
        s
    }

    /// `ldap://127.0.0.1:PORT` (StartTLS, or plain with `starttls = false`).
    pub fn url(&self) -> String {
        format!("ldap://{}", self.ldap)
    }

    /// `ldaps://127.0.0.1:PORT`.
    pub fn url_ldaps(&self) -> String {
        format!("ldaps://{}", self.ldaps)
    }

    /// The password file of [`BIND_DN`].
    pub fn bind_secret(&self) -> PathBuf {
        self.dir.join("bind.secret")
    }

    /// The password file of [`READER_DN`].
    pub fn reader_secret(&self) -> PathBuf {
        self.dir.join("reader.secret")
    }

    /// A `[directory]` section for mailferry: `url`, bound as [`BIND_DN`], trusting this
    /// server's certificate; `extra` is appended inside the section (e.g. `reject_unknown`).
    pub fn directory_toml(&self, url: &str, extra: &str) -> String {
        self.directory_toml_as(
            url,
            BIND_DN,
            &self.bind_secret(),
            &self.cert.cert_pem,
            extra,
        )
    }

    /// Like [`Slapd::directory_toml`], with another bind account and CA file.
    pub fn directory_toml_as(
        &self,
        url: &str,
        bind_dn: &str,
        secret: &Path,
        ca_file: &Path,
        extra: &str,
    ) -> String {
        format!(
            "\n[directory]\nkind = \"ldap\"\nurl = \"{url}\"\nca_file = \"{}\"\n\
             bind_dn = \"{bind_dn}\"\nbind_password_file = \"{}\"\nbase_dn = \"{PEOPLE_DN}\"\n\
             route_attribute = \"{ROUTE_ATTR}\"\n{extra}\n",
            ca_file.display(),
            secret.display(),
        )
    }

    /// Adds a user entry `uid=UID,ou=people,...` with `mail`, its aliases and, if given, the
    /// route attribute's value.
    pub fn add_user(&self, uid: &str, mail: &str, aliases: &[&str], route: Option<&str>) {
        let mut ldif = format!(
            "dn: uid={uid},{PEOPLE_DN}\nobjectClass: inetOrgPerson\nobjectClass: mailMigrationUser\n\
             uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {mail}\n"
        );
        for a in aliases {
            let _ = writeln!(ldif, "mailAlternateAddress: {a}");
        }
        if let Some(r) = route {
            let _ = writeln!(ldif, "{ROUTE_ATTR}: {r}");
        }
        self.ldapadd(&ldif);
    }

    /// Sets (or, with `None`, removes) the route attribute of `uid` with `ldapmodify`.
    pub fn set_route(&self, uid: &str, route: Option<&str>) {
        self.replace(uid, ROUTE_ATTR, route);
    }

    /// Replaces (or, with `None`, removes) an attribute of `uid` with `ldapmodify`.
    pub fn replace(&self, uid: &str, attr: &str, value: Option<&str>) {
        let change = match value {
            Some(v) => format!("replace: {attr}\n{attr}: {v}\n"),
            None => format!("delete: {attr}\n"),
        };
        let ldif = format!("dn: uid={uid},{PEOPLE_DN}\nchangetype: modify\n{change}");
        let out = self.tool("ldapmodify", &[], Some(&ldif));
        check("ldapmodify", &out);
    }

    /// The route attribute of `uid` as `ldapsearch` reads it (`None` when absent).
    pub fn route_of(&self, uid: &str) -> Option<String> {
        let base = format!("uid={uid},{PEOPLE_DN}");
        let out = self.tool(
            "ldapsearch",
            &[
                "-LLL",
                "-s",
                "base",
                "-b",
                &base,
                "(objectClass=*)",
                ROUTE_ATTR,
            ],
            None,
        );
        check("ldapsearch", &out);
        let prefix = format!("{ROUTE_ATTR}: ");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    /// Whether slapd runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops slapd by PID (SIGTERM, then SIGKILL); the data stays. Idempotent.
    pub fn stop(&mut self) {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts a stopped slapd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// The server log (`-d stats`: one line per connection and operation).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn render_conf(&self) -> String {
        let d = self.dir.display();
        format!(
            "include /etc/ldap/schema/core.schema\n\
             include /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/nis.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\n\
             include {d}/mailferry.schema\n\
             pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\n\
             modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload syncprov\n\
             TLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\n\
             sizelimit 500\n\
             database mdb\nmaxsize 67108864\nsuffix \"{SUFFIX}\"\n\
             rootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\ndirectory {d}/db\n\
             index objectClass eq\nindex mail,mailAlternateAddress,uid eq\n\
             index entryCSN,entryUUID eq\n\
             access to attrs=userPassword\n  by anonymous auth\n  by * none\n\
             access to attrs={ROUTE_ATTR}\n  by dn.exact=\"{BIND_DN}\" write\n  by users read\n  by * none\n\
             access to *\n  by users read\n  by * none\n\
             {overlay}",
            cert = self.cert.cert_pem.display(),
            key = self.cert.key_pem.display(),
            overlay = if self.syncprov {
                "overlay syncprov\nsyncprov-checkpoint 100 10\n"
            } else {
                ""
            },
        )
    }

    fn spawn_and_wait(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("slapd log");
        let urls = format!("ldap://{}/ ldaps://{}/", self.ldap, self.ldaps);
        let mut cmd = Command::new("/usr/sbin/slapd");
        cmd.arg("-f")
            .arg(&self.conf)
            .args(["-h", &urls, "-d", "stats"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some((uid, gid)) = owner() {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("spawn slapd");
        self.watchdog = watchdog(child.id());
        let deadline = Instant::now() + START_TIMEOUT;
        while !(port_open(self.ldap) && port_open(self.ldaps)) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("slapd exited early ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("slapd did not listen in time:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn ldapadd(&self, ldif: &str) {
        let out = self.tool("ldapadd", &[], Some(ldif));
        check("ldapadd", &out);
    }

    /// Runs an ldap-utils tool as the root DN over plain LDAP, ignoring any ldap.conf.
    fn tool(&self, name: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(name)
            .args(["-x", "-H", &self.url(), "-D", ROOT_DN, "-w", ROOT_PW])
            .args(["-o", "nettimeout=5"])
            .args(args)
            .env("LDAPNOINIT", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
        }
        child.wait_with_output().expect("ldap tool output")
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn base_ldif() -> String {
    format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: example\n\n\
         dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: {BIND_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n\
         cn: mailferry\nuserPassword: {BIND_PW}\n\n\
         dn: {READER_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n\
         cn: reader\nuserPassword: {READER_PW}\n"
    )
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops slapd if the test process goes away without `Drop` (it blocks reading a pipe whose
/// only writer is this process).
fn watchdog(pid: u32) -> Option<(Child, ChildStdin)> {
    let script =
        "read _ignored\nkill -TERM \"$1\" 2>/dev/null\nsleep 1\nkill -KILL \"$1\" 2>/dev/null\n";
    let mut child = Command::new("/bin/sh")
        .args(["-c", script, "mailferry-slapd-watchdog", &pid.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdin = child.stdin.take()?;
    Some((child, stdin))
}

fn chown_all(dir: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            chown_all(&p, uid, gid);
        } else {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown");
        }
    }
}

/// Installs slapd and ldap-utils when missing and running as root.
fn ensure_installed() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let have = |p: &str| Path::new(p).exists();
        if have("/usr/sbin/slapd") && have("/usr/bin/ldapmodify") {
            return;
        }
        assert!(
            is_root(),
            "slapd/ldap-utils are not installed and the tests are not root: run scripts/deps.sh"
        );
        // No system instance: the tests run their own.
        let mut debconf = Command::new("debconf-set-selections")
            .stdin(Stdio::piped())
            .spawn()
            .expect("debconf-set-selections");
        if let Some(mut input) = debconf.stdin.take() {
            let _ = input.write_all(b"slapd slapd/no_configuration boolean true\n");
        }
        let _ = debconf.wait();
        let out = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "slapd",
                "ldap-utils",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .expect("run apt-get");
        check("apt-get install slapd ldap-utils", &out);
    });
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// `(uid, gid)` to run slapd as when we are root; `None` to run as ourselves.
fn owner() -> Option<(u32, u32)> {
    static OWNER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *OWNER.get_or_init(|| {
        if !is_root() {
            return None;
        }
        for attempt in 0..50 {
            if let Some(ids) = lookup(SYSTEM_USER) {
                return Some(ids);
            }
            if attempt % 5 == 0 {
                // Exit code 9 (name in use) means a parallel test process won the race.
                let _ = Command::new("useradd")
                    .args(["--system", "--user-group", "--no-create-home"])
                    .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
                    .arg(SYSTEM_USER)
                    .stdin(Stdio::null())
                    .output();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("could not create the system user {SYSTEM_USER}");
    })
}

/// Uid and gid of `name`, once both its passwd and group entries exist.
fn lookup(name: &str) -> Option<(u32, u32)> {
    let field = |file: &str, idx: usize| -> Option<u32> {
        std::fs::read_to_string(file)
            .ok()?
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > idx && f[0] == name)?[idx]
            .parse()
            .ok()
    };
    let uid = field("/etc/passwd", 2)?;
    let gid = field("/etc/passwd", 3)?;
    (field("/etc/group", 2)? == gid).then_some((uid, gid))
}
