//! Real, throwaway Dovecot instances for integration tests.
//!
//! Every [`Dovecot`] lives in its own temporary directory (config, base_dir,
//! state_dir, log, mail homes, TLS certificate) and listens on free
//! 127.0.0.1 ports. The master process is a child of the test process and is
//! stopped by PID in [`Dovecot::stop`] / `Drop` (also when a test panics).
//! A tiny watchdog shell stops the instance if the test process dies without
//! running destructors (SIGKILL, `std::process::exit`, an instance kept in a
//! `static`).
//!
//! Everything here is blocking std code, fine to call at the start of a
//! `#[tokio::test]`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::tls::{self, TestCert};

/// Master user (SASL PLAIN authzid, or `user*admin` LOGIN) on both backends.
pub const MASTER_USER: &str = "admin";
/// Password of [`MASTER_USER`].
pub const MASTER_PASSWORD: &str = "masterpw";
/// Sample users present on BOTH backends: (login, password).
pub const USERS: &[(&str, &str)] = &[
    ("alice@example.org", "alicepw"),
    ("bob@example.org", "bobpw"),
    ("carol@example.org", "carolpw"),
    ("dave@example.org", "davepw"),
];
/// Special-use mailboxes auto-created and subscribed in every account: (name, flag).
pub const SPECIAL_USE: &[(&str, &str)] = &[
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
];
/// The unprivileged system user created (when running as root) to run mail processes.
pub const SYSTEM_USER: &str = "mfdovecot";

/// How long [`Dovecot::start`] waits for the listeners before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before SIGKILLing what is left.
const TERM_GRACE: Duration = Duration::from_millis(300);

/// The two kinds of backend, differing like real migrations do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `maildir:~/Maildir:LAYOUT=maildir++`, hierarchy separator `.`
    Legacy,
    /// `sdbox:~/sdbox`, hierarchy separator `/`
    New,
}

impl Flavor {
    pub fn separator(self) -> char {
        match self {
            Flavor::Legacy => '.',
            Flavor::New => '/',
        }
    }

    pub fn mail_location(self) -> &'static str {
        match self {
            Flavor::Legacy => "maildir:~/Maildir:LAYOUT=maildir++",
            Flavor::New => "sdbox:~/sdbox",
        }
    }

    /// Subject of the message [`Backends::start`] seeds into every INBOX.
    pub fn marker_subject(self) -> &'static str {
        match self {
            Flavor::Legacy => "legacy marker",
            Flavor::New => "new marker",
        }
    }
}

/// The exact marker message [`Backends::start`] stores in `user`'s INBOX on the
/// backend of `flavor` (CRLF line endings, so IMAP returns it byte for byte).
pub fn marker_message(flavor: Flavor, user: &str) -> Vec<u8> {
    let tag = match flavor {
        Flavor::Legacy => "legacy",
        Flavor::New => "new",
    };
    format!(
        "From: Seeder <seed@example.net>\r\n\
         To: {user}\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\
         Message-ID: <{tag}-marker.{user}@mailferry.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This message was seeded into the {tag} backend for {user}.\r\n",
        subject = flavor.marker_subject(),
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// small OS helpers (std has no kill(2)/geteuid(2); libc is linked anyway)

mod sys {
    extern "C" {
        pub fn kill(pid: i32, sig: i32) -> i32;
        pub fn geteuid() -> u32;
        pub fn getegid() -> u32;
    }
    pub const SIGTERM: i32 = 15;
    pub const SIGKILL: i32 = 9;
}

fn signal(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain syscall on a positive pid we started ourselves.
        unsafe {
            sys::kill(pid as i32, sig);
        }
    }
}

/// The ids the instance's mail, login and internal processes run as.
#[derive(Clone, Debug)]
struct RunAs {
    user: String,
    uid: u32,
    gid: u32,
    root: bool,
}

fn passwd_by<F: Fn(&[&str]) -> bool>(pred: F) -> Option<(String, u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && pred(&f) {
            Some((f[0].to_string(), f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

fn group_exists(name: &str, gid: u32) -> bool {
    fs::read_to_string("/etc/group").is_ok_and(|text| {
        text.lines().any(|line| {
            let f: Vec<&str> = line.split(':').collect();
            f.len() >= 3 && f[0] == name && f[2] == gid.to_string()
        })
    })
}

fn run_as() -> RunAs {
    static RUN_AS: OnceLock<RunAs> = OnceLock::new();
    RUN_AS
        .get_or_init(|| {
            // SAFETY: trivial syscalls without arguments.
            let (euid, egid) = unsafe { (sys::geteuid(), sys::getegid()) };
            if euid != 0 {
                let user = passwd_by(|f| f[2] == euid.to_string())
                    .map(|p| p.0)
                    .or_else(|| std::env::var("USER").ok())
                    .expect("current uid has no /etc/passwd entry and $USER is unset");
                return RunAs {
                    user,
                    uid: euid,
                    gid: egid,
                    root: false,
                };
            }
            let (user, uid, gid) = ensure_system_user(SYSTEM_USER);
            RunAs {
                user,
                uid,
                gid,
                root: true,
            }
        })
        .clone()
}

/// Create the system user once; tolerate parallel test processes racing to create it.
fn ensure_system_user(name: &str) -> (String, u32, u32) {
    let mut last_err = String::new();
    for attempt in 0..100 {
        // useradd commits /etc/passwd before /etc/group: a racing reader can
        // see the user before its group exists (Dovecot's login processes
        // then fail with "chdir(login) failed: Permission denied").
        if let Some(found) = passwd_by(|f| f[0] == name) {
            if group_exists(name, found.2) {
                return found;
            }
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        if attempt % 5 == 0 {
            match Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ])
                .stdin(Stdio::null())
                .output()
            {
                // 9 = name already in use (another process won the race)
                Ok(out) if out.status.success() || out.status.code() == Some(9) => continue,
                Ok(out) => last_err = String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => last_err = format!("cannot run useradd: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("could not create system user {name} (with its group): {last_err}");
}

fn chown_r(path: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(path) {
                for e in entries.flatten() {
                    chown_r(&e.path(), uid, gid);
                }
            }
        }
    }
}

fn bin(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

fn tmp_base() -> PathBuf {
    // Short and traversable by the unprivileged user (unix socket paths are
    // limited to 108 bytes, and $TMPDIR may be a private directory).
    std::env::var_os("MAILFERRY_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Pick a free 127.0.0.1 port for a server to listen on. Never hands out the
/// same port twice within one test process.
///
/// Ports come from below the kernel's ephemeral range: a port the kernel
/// handed to `bind(:0)` can be taken again as the source port of any outgoing
/// connection before the server binds it ("Address already in use"), and
/// clients and backends make many connections while tests start servers.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let used = HANDED_OUT.get_or_init(Default::default);
    let (low, high) = (10_000u32, ephemeral_low().max(12_000));
    let span = high - low;
    // Processes start at different points so test binaries run side by side
    // rarely try the same ports.
    let start = std::process::id().wrapping_mul(7_919) % span;
    let mut set = used.lock().unwrap_or_else(|e| e.into_inner());
    for step in 0..span {
        let port = (low + (start + step * 97) % span) as u16;
        if set.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        set.insert(port);
        return port;
    }
    panic!("no free port in {low}..{high}");
}

/// The first port of the kernel's ephemeral range (32768 by default).
fn ephemeral_low() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// PIDs of all live processes of a Dovecot instance: the master (its command
/// line names `conf`) and every child (process title `dovecot-<instance>/...`).
pub fn instance_processes(instance: &str, conf: &Path) -> Vec<u32> {
    let title = format!("dovecot-{instance}/");
    let conf = conf.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        let is_master = cmd.contains(&conf)
            && cmd
                .split_whitespace()
                .next()
                .is_some_and(|a| a.ends_with("dovecot"));
        if cmd.starts_with(&title) || is_master {
            pids.push(pid);
        }
    }
    pids
}

/// True if something accepts TCP connections on `addr`.
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

// ---------------------------------------------------------------------------

/// One running Dovecot instance.
pub struct Dovecot {
    /// "legacy" / "new" (whatever was passed to `start`)
    pub name: String,
    pub flavor: Flavor,
    /// Plain IMAP, offers STARTTLS, plaintext auth allowed.
    pub imap: SocketAddr,
    /// Implicit TLS IMAP.
    pub imaps: SocketAddr,
    /// LMTP over TCP.
    pub lmtp: SocketAddr,
    /// The server certificate; use `cert.cert_pem` as the CA file to verify it.
    pub cert: TestCert,
    pub separator: char,
    /// The instance's root directory (throwaway).
    pub dir: PathBuf,
    conf: PathBuf,
    instance: String,
    log_path: PathBuf,
    out_path: PathBuf,
    users_file: PathBuf,
    run_as: RunAs,
    master: Option<Child>,
    watchdog: Option<(Child, ChildStdin)>,
    pid: u32,
    // Dropped after `Drop::drop` has stopped the processes.
    _tmp: tempfile::TempDir,
}

enum StartFailure {
    PortInUse(String),
    Other(String),
}

impl Dovecot {
    /// Start an instance; panics with a clear message (including the log tail)
    /// if it cannot start. Returns once imap, imaps and lmtp accept connections.
    pub fn start(name: &str, flavor: Flavor) -> Dovecot {
        Self::start_with(name, flavor, "")
    }

    /// Like [`Dovecot::start`], with `extra_conf` appended to dovecot.conf
    /// (later settings win; a repeated `service imap {` section is merged),
    /// e.g. `"service imap {\n  service_count = 0\n}\n"` for benchmarks.
    pub fn start_with(name: &str, flavor: Flavor, extra_conf: &str) -> Dovecot {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "instance name must be [A-Za-z0-9_-]+: {name:?}"
        );
        let run_as = run_as();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let instance = format!("mf{}x{seq}-{name}", std::process::id());

        let mut tmp = tempfile::Builder::new()
            .prefix(&format!("mfdc-{name}-"))
            .tempdir_in(tmp_base())
            .expect("create instance tempdir");
        if std::env::var_os("MAILFERRY_KEEP_DOVECOT").is_some() {
            tmp.disable_cleanup(true);
        }
        let dir = tmp.path().to_path_buf();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod instance dir");
        for sub in ["home", "state", "run"] {
            fs::create_dir_all(dir.join(sub)).expect("create instance subdir");
        }
        let cert = tls::self_signed(&dir, "server");

        let master_users = dir.join("master-users");
        fs::write(
            &master_users,
            format!("{MASTER_USER}:{{PLAIN}}{MASTER_PASSWORD}\n"),
        )
        .expect("write master-users");
        let users_file = dir.join("users");
        let mut users = String::new();
        for (login, pw) in USERS {
            users.push_str(&user_line(&dir, login, pw));
        }
        fs::write(&users_file, users).expect("write users");
        let log_path = dir.join("dovecot.log");
        fs::write(&log_path, b"").expect("create log");
        let out_path = dir.join("master.out");
        let conf = dir.join("dovecot.conf");

        let mut dc = Dovecot {
            name: name.to_string(),
            flavor,
            imap: SocketAddr::from(([127, 0, 0, 1], 0)),
            imaps: SocketAddr::from(([127, 0, 0, 1], 0)),
            lmtp: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert,
            separator: flavor.separator(),
            dir: dir.clone(),
            conf,
            instance,
            log_path,
            out_path,
            users_file,
            run_as,
            master: None,
            watchdog: None,
            pid: 0,
            _tmp: tmp,
        };

        let mut last = String::new();
        for _attempt in 0..5 {
            dc.imap = SocketAddr::from(([127, 0, 0, 1], free_port()));
            dc.imaps = SocketAddr::from(([127, 0, 0, 1], free_port()));
            dc.lmtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let text = dc.render_conf(&master_users, extra_conf);
            fs::write(&dc.conf, text).expect("write dovecot.conf");
            if dc.run_as.root {
                chown_r(&dir, dc.run_as.uid, dc.run_as.gid);
            }
            match dc.spawn_and_wait() {
                Ok(()) => return dc,
                Err(StartFailure::PortInUse(msg)) => {
                    last = msg;
                    dc.stop();
                    // start over with a clean log and base_dir (stale sockets)
                    let _ = fs::write(&dc.log_path, b"");
                    let _ = fs::remove_dir_all(dir.join("run"));
                    let _ = fs::create_dir_all(dir.join("run"));
                }
                Err(StartFailure::Other(msg)) => {
                    let tail = dc.log_tail(60);
                    dc.stop();
                    panic!(
                        "dovecot instance {name:?} ({}) failed to start: {msg}\n\
                         config: {}\n--- log tail ---\n{tail}",
                        dc.instance,
                        dc.conf.display()
                    );
                }
            }
        }
        panic!("dovecot instance {name:?}: no free ports after 5 attempts: {last}");
    }

    fn render_conf(&self, master_users: &Path, extra_conf: &str) -> String {
        let d = self.dir.display();
        let u = &self.run_as;
        let sep = self.separator;
        let mut c = String::new();
        let _ = write!(
            c,
            "# generated by tests/support/dovecot.rs: instance {inst} ({flavor:?})
instance_name = {inst}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
debug_log_path = {d}/dovecot.log
hostname = {name}.mailferry.test
protocols = imap lmtp
listen = 127.0.0.1
shutdown_clients = yes

default_login_user = {user}
default_internal_user = {user}
default_internal_group = {user}
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}

mail_location = {loc}
mail_plugins =

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
{dh}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
auth_username_format = %Lu
auth_verbose = yes
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
mail_max_userip_connections = 10000
lmtp_save_to_detail_mailbox = no
postmaster_address = postmaster@example.org

default_client_limit = 10000
default_vsz_limit = 1G

passdb {{
  driver = passwd-file
  args = {master_users}
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}

namespace inbox {{
  inbox = yes
  separator = {sep}
  prefix =
",
            inst = self.instance,
            flavor = self.flavor,
            name = self.name,
            user = u.user,
            uid = u.uid,
            gid = u.gid,
            loc = self.flavor.mail_location(),
            cert = self.cert.cert_pem.display(),
            key = self.cert.key_pem.display(),
            dh = if Path::new("/usr/share/dovecot/dh.pem").exists() {
                "ssl_dh = </usr/share/dovecot/dh.pem"
            } else {
                ""
            },
            master_users = master_users.display(),
            users = self.users_file.display(),
        );
        for (mbox, flag) in SPECIAL_USE {
            let _ = write!(
                c,
                "  mailbox {mbox} {{\n    special_use = {flag}\n    auto = subscribe\n  }}\n"
            );
        }
        let _ = write!(
            c,
            "}}

service anvil {{
  chroot =
  # no auth penalty socket: auth then never delays logins from an IP (127.0.0.1)
  # after failed attempts (2, 4, 8... s), which would slow down later tests
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service ipc {{
  chroot =
}}
service imap-login {{
  chroot =
  service_count = 0
  process_min_avail = 2
  client_limit = 5000
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
}}
service imap {{
  process_limit = 5000
}}
service lmtp {{
  process_limit = 200
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
",
            imap = self.imap.port(),
            imaps = self.imaps.port(),
            lmtp = self.lmtp.port(),
        );
        if !extra_conf.is_empty() {
            c.push_str("\n# extra configuration\n");
            c.push_str(extra_conf);
            c.push('\n');
        }
        c
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartFailure> {
        let out = fs::File::create(&self.out_path).expect("create master.out");
        if self.run_as.root {
            let _ = std::os::unix::fs::chown(&self.out_path, Some(self.run_as.uid), None);
        }
        // Raise the open-files limit as far as allowed, then become the master.
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(
                "ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; \
                 exec \"$0\" -F -c \"$1\"",
            )
            .arg(bin("dovecot"))
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup master.out"))
            .stderr(out)
            .spawn()
            .map_err(|e| StartFailure::Other(format!("cannot spawn dovecot: {e}")))?;
        self.pid = child.id();
        self.master = Some(child);
        self.spawn_watchdog();

        let deadline = Instant::now() + START_TIMEOUT;
        let (mut imap_ok, mut imaps_ok, mut lmtp_ok) = (false, false, false);
        loop {
            let exited = self
                .master
                .as_mut()
                .and_then(|m| m.try_wait().ok().flatten());
            if let Some(status) = exited {
                let log = self.log();
                let msg = format!("master exited early ({status})");
                return Err(if log.contains("Address already in use") {
                    StartFailure::PortInUse(msg)
                } else {
                    StartFailure::Other(msg)
                });
            }
            // "starting up" is logged after all listeners are bound: only then
            // can we be sure the ports we probe are ours.
            if self.log_contains("starting up for") {
                imap_ok = imap_ok || probe_greeting(self.imap, b"* OK");
                imaps_ok = imaps_ok || port_open(self.imaps);
                lmtp_ok = lmtp_ok || probe_greeting(self.lmtp, b"220 ");
                if imap_ok && imaps_ok && lmtp_ok {
                    return Ok(());
                }
            }
            // A service that cannot start is throttled for seconds, then longer:
            // fail now with the log rather than after the whole timeout.
            if self.log_contains("command startup failed") {
                return Err(StartFailure::Other(
                    "a Dovecot service could not start (see the log)".to_string(),
                ));
            }
            if Instant::now() > deadline {
                return Err(StartFailure::Other(format!(
                    "listeners not ready after {START_TIMEOUT:?} (imap {} ok={imap_ok}, \
                     imaps {} ok={imaps_ok}, lmtp {} ok={lmtp_ok})",
                    self.imap, self.imaps, self.lmtp
                )));
            }
            thread::sleep(Duration::from_millis(15));
        }
    }

    /// A watchdog that stops the instance (and removes its directory) when the
    /// test process goes away without running `Drop`: it blocks reading a pipe
    /// whose only writer is this process.
    fn spawn_watchdog(&mut self) {
        let script = r#"read _ignored
kill -TERM "$1" 2>/dev/null
i=0
while kill -0 "$1" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
pkill -KILL -P "$1" 2>/dev/null
kill -KILL "$1" 2>/dev/null
[ -n "$2" ] && rm -rf "$2"
"#;
        let keep = std::env::var_os("MAILFERRY_KEEP_DOVECOT").is_some();
        let spawned = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg("mailferry-dovecot-watchdog")
            .arg(self.pid.to_string())
            .arg(if keep {
                String::new()
            } else {
                self.dir.to_string_lossy().into_owned()
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut child) = spawned {
            let stdin = child.stdin.take().expect("watchdog stdin");
            self.watchdog = Some((child, stdin));
        }
    }

    /// Kill the master by PID (SIGTERM, then SIGKILL for whatever of the
    /// instance is left after a short wait). Idempotent, never panics.
    pub fn stop(&mut self) {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
        let Some(mut master) = self.master.take() else {
            return;
        };
        signal(self.pid, sys::SIGTERM);
        let grace = Instant::now() + TERM_GRACE;
        let mut exited = false;
        let log_title = format!("dovecot-{}/log", self.instance);
        while Instant::now() < grace {
            if matches!(master.try_wait(), Ok(Some(_))) {
                exited = true;
                break;
            }
            // Once only the master and its log process are left, everything
            // has been logged and flushed: no point waiting any longer.
            let only_log_left = instance_processes(&self.instance, &self.conf)
                .into_iter()
                .filter(|&p| p != self.pid)
                .all(|p| {
                    fs::read(format!("/proc/{p}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).starts_with(&log_title))
                        .unwrap_or(true)
                });
            if only_log_left {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Dovecot's master lingers ~2 s waiting for its log process after all
        // other children are gone, and imap/stats processes of open sessions
        // linger too: no need to wait for that in tests.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if !exited {
                let _ = master.kill();
                let _ = master.wait();
                exited = true;
            }
            let left = instance_processes(&self.instance, &self.conf);
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                signal(pid, sys::SIGKILL);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a stopped instance again with the same configuration, ports and mail (a backend
    /// coming back); returns once its listeners accept. Panics with the log tail if it cannot.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(StartFailure::PortInUse(msg) | StartFailure::Other(msg)) = self.spawn_and_wait()
        {
            let tail = self.log_tail(60);
            self.stop();
            panic!(
                "dovecot instance {:?} failed to restart: {msg}\n--- log tail ---\n{tail}",
                self.name
            );
        }
    }

    /// PID of the master process (0 once never started).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Dovecot's `instance_name` (unique per instance; process titles are `dovecot-<it>/...`).
    pub fn instance_name(&self) -> &str {
        &self.instance
    }

    /// Path of this instance's dovecot.conf.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// Path of this instance's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// PIDs of all live processes of this instance (master and children).
    pub fn processes(&self) -> Vec<u32> {
        instance_processes(&self.instance, &self.conf)
    }

    /// Home directory of `user` on this instance.
    pub fn home(&self, user: &str) -> PathBuf {
        self.dir.join("home").join(user.to_lowercase())
    }

    /// Add a user on this instance only. Dovecot's passwd-file driver checks
    /// the file at most once per second, so this returns only once the wall
    /// clock has passed into the next second (< 1 s): every later login sees the user.
    pub fn add_user(&self, login: &str, password: &str) {
        self.add_users(&[login.to_owned()], password);
    }

    /// Adds several users (one password for all) on this instance only, in one write and one
    /// wait (see [`add_user`](Self::add_user)).
    pub fn add_users(&self, logins: &[String], password: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&self.users_file)
            .expect("open users file");
        for login in logins {
            f.write_all(user_line(&self.dir, login, password).as_bytes())
                .expect("append user");
        }
        drop(f);
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        };
        let written = now().as_secs();
        while now().as_secs() <= written {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Run `doveadm -c <this conf> ARGS...`.
    pub fn doveadm(&self, args: &[&str]) -> Output {
        self.doveadm_with_input(args, None)
    }

    fn doveadm_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(bin("doveadm"));
        cmd.arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run doveadm: {e}"));
        if let Some(data) = input {
            let mut stdin = child.stdin.take().expect("doveadm stdin");
            let data = data.to_vec();
            // write from a thread so a chatty doveadm cannot deadlock us
            let writer = thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
            let out = child.wait_with_output().expect("wait doveadm");
            let _ = writer.join();
            return out;
        }
        child.wait_with_output().expect("wait doveadm")
    }

    fn doveadm_ok(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let out = self.doveadm_with_input(args, input);
        if !out.status.success() {
            panic!(
                "[{}] doveadm {} failed ({}): {}{}",
                self.name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// Store a raw RFC 5322 message into `user`'s `mailbox` (created if
    /// missing). Mailbox names use this instance's separator.
    pub fn save(&self, user: &str, mailbox: &str, message: &[u8]) {
        let args = ["save", "-u", user, "-m", mailbox];
        let out = self.doveadm_with_input(&args, Some(message));
        if out.status.success() {
            return;
        }
        if String::from_utf8_lossy(&out.stderr).contains("doesn't exist") {
            self.create_mailbox(user, mailbox);
            self.doveadm_ok(&args, Some(message));
            return;
        }
        panic!(
            "[{}] doveadm save -u {user} -m {mailbox} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Create a mailbox (no error if it exists already).
    pub fn create_mailbox(&self, user: &str, mailbox: &str) {
        let out = self.doveadm(&["mailbox", "create", "-u", user, mailbox]);
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("already exists") {
            panic!(
                "[{}] doveadm mailbox create -u {user} {mailbox} failed ({}): {err}",
                self.name, out.status
            );
        }
    }

    /// Number of messages in `user`'s `mailbox` (panics if it does not exist).
    pub fn count(&self, user: &str, mailbox: &str) -> usize {
        let out = self.doveadm_ok(
            &[
                "-f", "flow", "mailbox", "status", "-u", user, "messages", mailbox,
            ],
            None,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .find_map(|t| t.strip_prefix("messages=")?.parse().ok())
            .unwrap_or_else(|| panic!("[{}] unexpected mailbox status output: {text:?}", self.name))
    }

    /// Names of all of `user`'s mailboxes (this instance's separator).
    pub fn mailboxes(&self, user: &str) -> Vec<String> {
        let out = self.doveadm_ok(&["-f", "flow", "mailbox", "list", "-u", user], None);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.strip_prefix("mailbox=").unwrap_or(l).to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Full messages (`BODY[]`) of `user`'s `mailbox` in UID order, fetched over
    /// IMAP with the master user: the exact bytes an IMAP client sees (for
    /// messages stored with CRLF line endings, the bytes given to `save`).
    pub fn messages(&self, user: &str, mailbox: &str) -> Vec<Vec<u8>> {
        let mut c = self.imap_master_login(user);
        let r = c.command(&format!("EXAMINE {}", quote(mailbox)));
        assert!(
            r.is_ok(),
            "[{}] EXAMINE {mailbox} as {user}: {}",
            self.name,
            r.tagged
        );
        let r = c.command("UID FETCH 1:* (UID BODY.PEEK[])");
        assert!(
            r.is_ok(),
            "[{}] UID FETCH in {mailbox}: {}",
            self.name,
            r.tagged
        );
        let mut msgs: Vec<(u32, Vec<u8>)> = r
            .untagged
            .iter()
            .filter_map(|line| {
                let text = line.text();
                if !text.contains(" FETCH ") {
                    return None;
                }
                let uid = text
                    .split([' ', '(', ')'])
                    .skip_while(|t| *t != "UID")
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some((uid, line.literals.first()?.clone()))
            })
            .collect();
        msgs.sort_by_key(|m| m.0);
        c.logout();
        msgs.into_iter().map(|m| m.1).collect()
    }

    /// Plain IMAP connection (greeting read).
    pub fn imap_connect(&self) -> ImapConn {
        ImapConn::connect(self.imap)
    }

    /// Plain IMAP connection logged in as `user` with `password` (panics on failure).
    pub fn imap_login(&self, user: &str, password: &str) -> ImapConn {
        let mut c = self.imap_connect();
        c.login(user, password);
        c
    }

    /// Plain IMAP connection logged in as `user` via the master user (`user*admin`).
    pub fn imap_master_login(&self, user: &str) -> ImapConn {
        self.imap_login(&format!("{user}*{MASTER_USER}"), MASTER_PASSWORD)
    }

    /// Deliver `message` over this instance's LMTP listener.
    pub fn lmtp_deliver(&self, from: &str, rcpts: &[&str], message: &[u8]) -> LmtpOutcome {
        lmtp_deliver(self.lmtp, from, rcpts, message)
    }

    /// Tail of the instance's log (last 256 KiB of dovecot.log, plus anything
    /// the master wrote to stdout/stderr).
    pub fn log(&self) -> String {
        let mut s = read_tail(&self.log_path, 256 * 1024);
        let out = read_tail(&self.out_path, 16 * 1024);
        if !out.trim().is_empty() {
            s.push_str("\n--- master stdout/stderr ---\n");
            s.push_str(&out);
        }
        s
    }

    /// The last `lines` lines of [`Dovecot::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_contains(&self, needle: &str) -> bool {
        read_tail(&self.log_path, 64 * 1024).contains(needle)
    }

    /// Wait until the log contains `needle` (Dovecot logs asynchronously
    /// through its log process); returns whether it appeared within `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dovecot")
            .field("name", &self.name)
            .field("flavor", &self.flavor)
            .field("imap", &self.imap)
            .field("imaps", &self.imaps)
            .field("lmtp", &self.lmtp)
            .field("pid", &self.pid)
            .field("dir", &self.dir)
            .finish()
    }
}

fn user_line(dir: &Path, login: &str, password: &str) -> String {
    let login = login.to_lowercase();
    let home = dir.join("home").join(&login);
    format!("{login}:{{PLAIN}}{password}::::{}::\n", home.display())
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(len - max));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn probe_greeting(addr: SocketAddr, prefix: &[u8]) -> bool {
    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = Vec::new();
    let ok = BufReader::new(&s).read_until(b'\n', &mut line).is_ok() && line.starts_with(prefix);
    if ok && prefix.starts_with(b"220") {
        let _ = (&s).write_all(b"QUIT\r\n");
    } else if ok {
        let _ = (&s).write_all(b"x LOGOUT\r\n");
    }
    ok
}

// ---------------------------------------------------------------------------
// Backends

/// The two independent backends of a migration.
pub struct Backends {
    pub legacy: Dovecot,
    pub new: Dovecot,
}

impl Backends {
    /// Start both in parallel and seed distinct content: every user in
    /// [`USERS`] gets [`marker_message`] in INBOX on each side ("legacy
    /// marker" / "new marker").
    pub fn start() -> Backends {
        Self::start_with("", "")
    }

    /// Like [`Backends::start`], with extra dovecot.conf text for each (see
    /// [`Dovecot::start_with`]), e.g. `"mail_max_userip_connections = 1\n"`.
    pub fn start_with(legacy_conf: &str, new_conf: &str) -> Backends {
        let (legacy, new) = thread::scope(|s| {
            let boot = |name: &'static str, flavor: Flavor, conf: &str| {
                let conf = conf.to_owned();
                move || {
                    let d = Dovecot::start_with(name, flavor, &conf);
                    for (user, _) in USERS {
                        d.save(user, "INBOX", &marker_message(flavor, user));
                    }
                    d
                }
            };
            let a = s.spawn(boot("legacy", Flavor::Legacy, legacy_conf));
            let b = s.spawn(boot("new", Flavor::New, new_conf));
            match (a.join(), b.join()) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(p), _) | (_, Err(p)) => std::panic::resume_unwind(p),
            }
        });
        Backends { legacy, new }
    }

    /// The backend of `flavor`.
    pub fn get(&self, flavor: Flavor) -> &Dovecot {
        match flavor {
            Flavor::Legacy => &self.legacy,
            Flavor::New => &self.new,
        }
    }

    /// Stop both (in parallel). Idempotent.
    pub fn stop(&mut self) {
        let (legacy, new) = (&mut self.legacy, &mut self.new);
        thread::scope(|s| {
            s.spawn(|| legacy.stop());
            new.stop();
        });
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Minimal blocking IMAP client (for assertions; not a general IMAP parser)

/// IMAP quoted string.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One server response (an untagged line, with its literals inline).
#[derive(Clone, Debug, Default)]
pub struct ImapLine {
    /// The complete response as received, literals included, without the final CRLF.
    pub raw: Vec<u8>,
    /// Contents of the `{n}` literals, in order.
    pub literals: Vec<Vec<u8>>,
}

impl ImapLine {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// Everything the server answered to one command.
#[derive(Clone, Debug, Default)]
pub struct ImapResponse {
    /// Untagged (`*`) and continuation (`+`) responses before the tagged one.
    pub untagged: Vec<ImapLine>,
    /// The tagged completion without the tag, e.g. `OK [CAPABILITY ...] Logged in`.
    pub tagged: String,
}

impl ImapResponse {
    pub fn is_ok(&self) -> bool {
        self.tagged.starts_with("OK")
    }

    /// All untagged responses as text, one per line.
    pub fn text(&self) -> String {
        self.untagged
            .iter()
            .map(|l| l.text())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A tiny synchronous IMAP connection over plain TCP.
pub struct ImapConn {
    reader: BufReader<TcpStream>,
    next_tag: u32,
    /// The server greeting line.
    pub greeting: String,
}

impl ImapConn {
    /// Connect and read the greeting (panics if it is not `* OK`).
    pub fn connect(addr: SocketAddr) -> ImapConn {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("IMAP connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        s.set_nodelay(true).ok();
        let mut c = ImapConn {
            reader: BufReader::new(s),
            next_tag: 1,
            greeting: String::new(),
        };
        let g = c.read_line();
        c.greeting = g.text();
        assert!(
            c.greeting.starts_with("* OK"),
            "IMAP greeting from {addr}: {}",
            c.greeting
        );
        c
    }

    /// LOGIN with quoted strings; panics unless OK.
    pub fn login(&mut self, user: &str, password: &str) -> ImapResponse {
        let r = self.try_login(user, password);
        assert!(r.is_ok(), "LOGIN {user} failed: {}", r.tagged);
        r
    }

    /// LOGIN with quoted strings; returns the response whatever it is.
    pub fn try_login(&mut self, user: &str, password: &str) -> ImapResponse {
        self.command(&format!("LOGIN {} {}", quote(user), quote(password)))
    }

    /// Send `TAG cmd` and collect responses up to the tagged completion.
    pub fn command(&mut self, cmd: &str) -> ImapResponse {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        self.send_raw(format!("{tag} {cmd}\r\n").as_bytes());
        let mut resp = ImapResponse::default();
        let prefix = format!("{tag} ");
        loop {
            let line = self.read_line();
            if line.raw.starts_with(prefix.as_bytes()) {
                resp.tagged = String::from_utf8_lossy(&line.raw[prefix.len()..]).into_owned();
                return resp;
            }
            resp.untagged.push(line);
        }
    }

    /// Send bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("IMAP write");
    }

    /// Read one complete response line (following `{n}` literals).
    pub fn read_line(&mut self) -> ImapLine {
        let mut line = ImapLine::default();
        loop {
            let mut chunk = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut chunk)
                .expect("IMAP read");
            assert!(n > 0, "IMAP connection closed by server");
            let body = chunk
                .strip_suffix(b"\r\n")
                .or_else(|| chunk.strip_suffix(b"\n"))
                .unwrap_or(&chunk);
            line.raw.extend_from_slice(body);
            match literal_len(body) {
                Some(len) => {
                    line.raw.extend_from_slice(b"\r\n");
                    let mut lit = vec![0u8; len];
                    self.reader.read_exact(&mut lit).expect("IMAP literal");
                    line.raw.extend_from_slice(&lit);
                    line.literals.push(lit);
                }
                None => return line,
            }
        }
    }

    /// The underlying socket (e.g. for STARTTLS via `tls::wrap`).
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    /// LOGOUT, ignoring errors.
    pub fn logout(mut self) {
        let tag = format!("t{}", self.next_tag);
        let _ = self
            .reader
            .get_mut()
            .write_all(format!("{tag} LOGOUT\r\n").as_bytes());
        let mut sink = Vec::new();
        let _ = self.reader.read_to_end(&mut sink);
    }
}

/// `{123}` / `{123+}` at the end of a line.
fn literal_len(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Minimal blocking LMTP client

/// What an LMTP transaction got.
#[derive(Clone, Debug, Default)]
pub struct LmtpOutcome {
    /// Reply to each RCPT TO, in order.
    pub rcpt_replies: Vec<String>,
    /// One final reply per accepted recipient, after DATA (RFC 2033).
    pub data_replies: Vec<String>,
}

impl LmtpOutcome {
    /// True if every recipient was accepted and got a 2xx after DATA.
    pub fn all_delivered(&self) -> bool {
        !self.rcpt_replies.is_empty()
            && self.rcpt_replies.iter().all(|r| r.starts_with('2'))
            && self.data_replies.len() == self.rcpt_replies.len()
            && self.data_replies.iter().all(|r| r.starts_with('2'))
    }
}

/// Deliver `message` to `rcpts` over LMTP at `addr` (LHLO, MAIL, RCPT..., DATA, QUIT).
pub fn lmtp_deliver(addr: SocketAddr, from: &str, rcpts: &[&str], message: &[u8]) -> LmtpOutcome {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("LMTP connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut w = s.try_clone().expect("clone socket");
    let mut r = BufReader::new(s);
    let reply = |r: &mut BufReader<TcpStream>| -> String {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            let n = r.read_line(&mut l).expect("LMTP read");
            assert!(n > 0, "LMTP connection closed by server; got so far: {all}");
            all.push_str(&l);
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return all.trim_end().to_string();
            }
        }
    };
    let greet = reply(&mut r);
    assert!(greet.starts_with("220"), "LMTP greeting: {greet}");
    w.write_all(b"LHLO mailferry.test\r\n").unwrap();
    let lhlo = reply(&mut r);
    assert!(lhlo.starts_with("250"), "LHLO: {lhlo}");
    w.write_all(format!("MAIL FROM:<{from}>\r\n").as_bytes())
        .unwrap();
    let mail = reply(&mut r);
    assert!(mail.starts_with("250"), "MAIL FROM: {mail}");
    let mut out = LmtpOutcome::default();
    for rcpt in rcpts {
        w.write_all(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
            .unwrap();
        out.rcpt_replies.push(reply(&mut r));
    }
    let accepted = out
        .rcpt_replies
        .iter()
        .filter(|r| r.starts_with('2'))
        .count();
    if accepted > 0 {
        w.write_all(b"DATA\r\n").unwrap();
        let data = reply(&mut r);
        assert!(data.starts_with("354"), "DATA: {data}");
        w.write_all(&dot_stuff(message)).unwrap();
        w.write_all(b".\r\n").unwrap();
        for _ in 0..accepted {
            out.data_replies.push(reply(&mut r));
        }
    }
    let _ = w.write_all(b"QUIT\r\n");
    out
}

/// SMTP/LMTP transparency: double leading dots, end with CRLF.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        if out.ends_with(b"\n") {
            out.pop();
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}
