//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory, `pg_ctl start`
//! on 127.0.0.1 and a free port, trust authentication, one database; stopped by PID on drop.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to an
//! unprivileged system user (`mfpostgres`, created on first use). Missing binaries are installed
//! with `apt-get install postgresql` when running as root (Debian; see scripts/deps.sh).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::dovecot::free_port;

/// The system user owning test clusters when the tests run as root.
pub const SYSTEM_USER: &str = "mfpostgres";

/// A running PostgreSQL cluster with one database.
pub struct Postgres {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The database created for the test.
    pub database: String,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    owner: Option<(u32, u32)>,
    pid: Option<u32>,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Initialises and starts a cluster; panics with the server log if it does not come up.
    pub fn start() -> Postgres {
        let bin = binaries();
        let owner = owner();
        let dir = tempfile::Builder::new()
            .prefix("mfpg")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).expect("socket dir");
        let log = dir.path().join("postgres.log");
        if let Some((uid, gid)) = owner {
            for p in [dir.path(), sock.as_path()] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown test dir");
            }
        }
        let pg = |name: &str| {
            let mut c = Command::new(bin.join(name));
            // The unprivileged owner must be able to resolve its working directory.
            c.stdin(Stdio::null())
                .current_dir(dir.path())
                .env_remove("PGDATA");
            if let Some((uid, gid)) = owner {
                c.uid(uid).gid(gid).env("HOME", "/tmp");
            }
            c
        };
        let out = pg("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
            // Throwaway data: no need to wait for the disk.
            .arg("--no-sync")
            .output()
            .expect("run initdb");
        check("initdb", &out);
        let port = free_port();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=100",
            sock.display()
        );
        let out = pg("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &opts, "-w", "-t", "30", "start"])
            // pg_ctl's server inherits stdout/stderr: do not let it hold the test's pipes open.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        let mut pgsrv = Postgres {
            port,
            database: "mailferry".into(),
            bin,
            data,
            log,
            owner,
            pid: None,
            _dir: dir,
        };
        pgsrv.pid = pgsrv.read_pid();
        assert!(
            out.success() && pgsrv.pid.is_some(),
            "pg_ctl start failed ({out}):\n{}",
            pgsrv.log()
        );
        pgsrv.psql("postgres", "CREATE DATABASE mailferry");
        pgsrv
    }

    /// `postgres://` URL of the test database.
    pub fn url(&self) -> String {
        self.url_of(&self.database)
    }

    /// `postgres://` URL of another database on this server.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates another database (for tests sharing one server) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url_of(name)
    }

    /// Runs SQL through `psql` over TCP, asserting success; returns stdout (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        check(&format!("psql {sql:?}"), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        let mut c = Command::new(self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        let _ = c.status();
        // Whatever pg_ctl managed, the postmaster must not outlive the test (by PID, never by name).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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

/// The newest `/usr/lib/postgresql/*/bin` with `initdb`, installing the package if needed.
fn binaries() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = find_binaries() {
            return b;
        }
        assert!(
            is_root(),
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and the tests \
             are not root: run scripts/deps.sh"
        );
        let out = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "postgresql",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .expect("run apt-get");
        check("apt-get install postgresql", &out);
        find_binaries().expect("postgresql installed but no initdb found")
    })
    .clone()
}

fn find_binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    // /proc/self is owned by the effective uid of this process.
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// `(uid, gid)` to run the server as when we are root; `None` to run as ourselves.
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
    // useradd writes /etc/passwd before /etc/group: wait for the group as well.
    (field("/etc/group", 2)? == gid).then_some((uid, gid))
}
