//! A real, throwaway Postfix instance (Debian's `postfix` package) for integration tests: an
//! MTA that delivers over LMTP, written by someone else.
//!
//! Each instance has its own `config_directory`, `queue_directory` and `data_directory` in a
//! temporary directory, an SMTP listener on a free 127.0.0.1 port, and
//! `virtual_transport = lmtp:inet:HOST:PORT` for the given domain. The system Postfix
//! (`/etc/postfix`, `/var/spool/postfix`) is never read or touched: the `master` daemon is
//! started directly with `-c DIR` (not through `postfix start`, whose `post-install` check
//! would want to manage files listed in the system's `postfix-files`).
//!
//! Privileges: Postfix's `master` must start as root (it refuses otherwise: "the master
//! command is reserved for the superuser"), then runs its daemons as `mail_owner`
//! (the package's `postfix` user). So these tests need root, as the Dovecot ones do to create
//! their mail user; the instance itself still only listens on loopback and writes only below
//! its temporary directory.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::dovecot::{free_port, port_open};

const MASTER: &str = "/usr/lib/postfix/sbin/master";

/// One running Postfix.
pub struct Postfix {
    /// SMTP listener (smtpd) on loopback.
    pub smtp: SocketAddr,
    /// The instance's root directory (config, queue, data).
    pub dir: PathBuf,
    log_path: PathBuf,
    master: Option<Child>,
    watchdog: Option<(Child, ChildStdin)>,
    _tmp: tempfile::TempDir,
}

fn ids(name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 3 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

fn group_id(name: &str) -> Option<u32> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 2 && f[0] == name {
            f[2].parse().ok()
        } else {
            None
        }
    })
}

fn mkdir(path: &Path, uid: u32, gid: u32, mode: u32) {
    fs::create_dir_all(path).expect("create postfix directory");
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown postfix directory");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod postfix directory");
}

impl Postfix {
    /// Starts an instance that accepts mail for `recipients` (all in one domain) over SMTP and
    /// delivers it over LMTP to `lmtp`. Returns once smtpd accepts connections.
    pub fn start(lmtp: SocketAddr, recipients: &[&str]) -> Postfix {
        assert!(
            Path::new(MASTER).exists(),
            "Postfix is not installed: apt-get install postfix (scripts/deps.sh)"
        );
        let euid = fs::read_to_string("/proc/self/status").ok().and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        });
        assert_eq!(
            euid.as_deref(),
            Some("0"),
            "Postfix's master must start as root (it exits with 'the master command is reserved \
             for the superuser' otherwise); run this test as root, as CI does"
        );
        let (uid, _gid) = ids("postfix").expect("the postfix package's 'postfix' user is missing");
        let postdrop = group_id("postdrop").expect("the 'postdrop' group is missing");
        let tmp = tempfile::Builder::new()
            .prefix("mfpf-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let etc = dir.join("etc");
        let spool = dir.join("spool");
        let data = dir.join("data");
        fs::create_dir_all(&etc).unwrap();
        // The queue layout `postfix set-permissions` would make (postfix-files).
        mkdir(&spool, 0, 0, 0o755);
        for d in [
            "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
            "private", "saved", "trace",
        ] {
            mkdir(&spool.join(d), uid, 0, 0o700);
        }
        mkdir(&spool.join("maildrop"), uid, postdrop, 0o730);
        mkdir(&spool.join("public"), uid, postdrop, 0o710);
        mkdir(&spool.join("pid"), 0, 0, 0o755);
        mkdir(&data, uid, 0, 0o700);

        let domain = recipients
            .first()
            .and_then(|r| r.split_once('@'))
            .map(|(_, d)| d.to_string())
            .expect("at least one recipient user@domain");
        let map = recipients
            .iter()
            .map(|r| format!("{r}=ok"))
            .collect::<Vec<_>>()
            .join(", ");
        let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let main_cf = format!(
            "# generated by tests/support/postfix.rs
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
meta_directory = {etc}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-mftest
maillog_file = /dev/stdout
myhostname = mta.mailferry.test
mydomain = mailferry.test
myorigin = mailferry.test
mydestination =
local_recipient_maps =
relay_domains =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtputf8_enable = no
biff = no
smtp_tls_security_level = none
lmtp_tls_security_level = none
virtual_mailbox_domains = {domain}
virtual_mailbox_maps = inline:{{ {map} }}
virtual_transport = lmtp:inet:{lmtp}
",
            spool = spool.display(),
            data = data.display(),
            etc = etc.display(),
        );
        fs::write(etc.join("main.cf"), main_cf).unwrap();
        // No chroot (column 5 = n): nothing to copy into the queue directory.
        let master_cf = format!(
            "{smtp} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
lmtp      unix - - n - - lmtp
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"
        );
        fs::write(etc.join("master.cf"), master_cf).unwrap();

        let log_path = dir.join("postfix.log");
        let log = fs::File::create(&log_path).unwrap();
        let err = log.try_clone().unwrap();
        // -d: stay in the foreground as our child; -s: keep stdout, where maillog_file points.
        let master = Command::new(MASTER)
            .arg("-c")
            .arg(&etc)
            .args(["-d", "-s"])
            .env("MAIL_CONFIG", &etc)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn postfix master");
        // Stops the instance if the test process dies without running destructors.
        let watchdog = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read _; kill -TERM {} 2>/dev/null", master.id()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .and_then(|mut c| c.stdin.take().map(|s| (c, s)));
        let mut pf = Postfix {
            smtp,
            dir,
            log_path,
            master: Some(master),
            watchdog,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_open(smtp) {
            if let Some(Ok(Some(status))) = pf.master.as_mut().map(|m| m.try_wait()) {
                panic!("postfix master exited ({status}):\n{}", pf.log());
            }
            assert!(
                Instant::now() < deadline,
                "postfix did not listen in time:\n{}",
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        pf
    }

    /// Postfix's log so far (maillog_file = /dev/stdout of the master).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns whether it did within `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGTERM to the master (which passes it to its children), SIGKILL if it lingers.
    pub fn stop(&mut self) {
        if let Some((mut w, mut stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            let _ = stdin.flush();
        }
        let Some(mut master) = self.master.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(master.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = master.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = master.kill();
        let _ = master.wait();
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}
