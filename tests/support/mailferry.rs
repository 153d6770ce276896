//! Spawns the real `mailferry serve` binary in front of a `Backends` pair, with its own
//! config, certificate, token and state database in a throwaway directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::dovecot::{free_port, port_open, Backends, Dovecot, MASTER_PASSWORD, MASTER_USER};
use super::tls::{self_signed, TestCert};

/// How to configure the proxy under test.
#[derive(Clone, Debug)]
pub struct Options {
    /// `[tls] allow_plaintext_auth`.
    pub allow_plaintext: bool,
    /// `auth` of the legacy backend: "passthrough" or "master".
    pub legacy_auth: &'static str,
    /// `auth` of the new backend.
    pub new_auth: &'static str,
    /// `imap_tls` towards both backends: "none", "starttls" or "implicit".
    pub backend_tls: &'static str,
    /// Raw TOML appended to the generated config (extra sections).
    pub extra: String,
    /// Leave `master_user`/`master_password_file` out of both backends (passthrough only).
    pub no_master: bool,
    /// Backends whose IMAP address is replaced, e.g. by a scripted fake (`fake.rs`):
    /// (`"legacy"` or `"new"`, address).
    pub imap_at: Vec<(&'static str, SocketAddr)>,
    /// `--log-format` of `serve`: "human" or "json".
    pub log_format: &'static str,
    /// Backends whose LMTP address is replaced (e.g. by a `relay.rs` relay).
    pub lmtp_at: Vec<(&'static str, SocketAddr)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_plaintext: true,
            legacy_auth: "passthrough",
            new_auth: "passthrough",
            backend_tls: "none",
            extra: String::new(),
            no_master: false,
            imap_at: Vec::new(),
            log_format: "human",
            lmtp_at: Vec::new(),
        }
    }
}

/// A running `mailferry serve`.
pub struct Mailferry {
    /// Plain/STARTTLS IMAP listener.
    pub imap: SocketAddr,
    /// Implicit-TLS IMAP listener.
    pub imaps: SocketAddr,
    /// LMTP listener.
    pub lmtp: SocketAddr,
    /// Admin API listener.
    pub admin: SocketAddr,
    /// The proxy's certificate (use as CA to verify it).
    pub cert: TestCert,
    /// Generated config file.
    pub config: PathBuf,
    /// Admin bearer token.
    pub token: String,
    /// Where stderr (the log) goes.
    pub log_path: PathBuf,
    child: Option<Child>,
    log_format: &'static str,
    _dir: tempfile::TempDir,
}

/// Starts `serve` on `config`, appending its log to `log_path`.
fn spawn_serve(config: &std::path::Path, log_path: &std::path::Path, format: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    command(config, &["--log-format", format, "serve"])
        .env("MAILFERRY_LOG", "info,mailferry=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mailferry")
}

/// Path of the binary under test: Cargo names it for integration tests; examples and
/// benches run from target/<profile>/examples/ next to it.
pub fn binary() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_mailferry") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/examples/<name>");
    profile_dir.join("mailferry")
}

fn backend_toml(
    name: &str,
    d: &Dovecot,
    opts: &Options,
    auth: &str,
    secret: Option<&std::path::Path>,
) -> String {
    let tls = opts.backend_tls;
    let imap = opts
        .imap_at
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, a)| *a)
        .unwrap_or(if tls == "implicit" { d.imaps } else { d.imap });
    let lmtp = opts
        .lmtp_at
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(d.lmtp, |(_, a)| *a);
    let master = secret.map_or(String::new(), |s| {
        format!(
            "master_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n",
            s.display()
        )
    });
    format!(
        "[backends.{name}]\nimap = \"{imap}\"\nimap_tls = \"{tls}\"\nca_file = \"{ca}\"\nlmtp = \"{lmtp}\"\nauth = \"{auth}\"\n{master}\n",
        ca = d.cert.cert_pem.display(),
    )
}

/// The generated config of `m` with both backends' master users added (for CLI commands such
/// as `verify` that need them when the server itself runs without).
pub fn with_master_users(m: &Mailferry) -> PathBuf {
    let text = std::fs::read_to_string(&m.config).expect("config");
    let secret = m.config.with_file_name("verify-master.secret");
    std::fs::write(&secret, format!("{MASTER_PASSWORD}\n")).expect("secret");
    let master = format!(
        "master_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n",
        secret.display()
    );
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("auth = ") && !text.contains("master_user") {
            out.push_str(&master);
        }
    }
    let path = m.config.with_file_name("with-master.toml");
    std::fs::write(&path, out).expect("write config");
    path
}

impl Mailferry {
    /// Writes a config for `backends` and starts the server; returns once all listeners accept.
    pub fn start(backends: &Backends, opts: Options) -> Mailferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = self_signed(dir.path(), "proxy");
        // At least 16 bytes: `serve` refuses shorter admin tokens.
        let token = format!("test-admin-token-{}-{}", std::process::id(), free_port());
        let token_file = dir.path().join("admin.token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, format!("{MASTER_PASSWORD}\n")).unwrap();
        let [imap, imaps, lmtp, admin] =
            [0; 4].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let mut text = format!(
            "[listen]\nimap = \"{imap}\"\nimaps = \"{imaps}\"\nlmtp = \"{lmtp}\"\nadmin = \"{admin}\"\n\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\nallow_plaintext_auth = {}\n\n\
             [admin]\ntoken_file = \"{}\"\n\n\
             [state]\nurl = \"sqlite://{}\"\n\n",
            cert.cert_pem.display(),
            cert.key_pem.display(),
            opts.allow_plaintext,
            token_file.display(),
            dir.path().join("state.db").display(),
        );
        text.push_str(&backend_toml(
            "legacy",
            &backends.legacy,
            &opts,
            opts.legacy_auth,
            (!opts.no_master).then_some(secret.as_path()),
        ));
        text.push_str(&backend_toml(
            "new",
            &backends.new,
            &opts,
            opts.new_auth,
            (!opts.no_master).then_some(secret.as_path()),
        ));
        text.push_str(&opts.extra);
        let config = dir.path().join("mailferry.toml");
        std::fs::write(&config, text).unwrap();
        let log_path = dir.path().join("mailferry.log");
        let child = spawn_serve(&config, &log_path, opts.log_format);
        let mut m = Mailferry {
            imap,
            imaps,
            lmtp,
            admin,
            cert,
            config,
            token,
            log_path,
            child: Some(child),
            log_format: opts.log_format,
            _dir: dir,
        };
        m.wait_listening(&[imap, imaps, admin]);
        m
    }

    fn wait_listening(&mut self, addrs: &[SocketAddr]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addrs.iter().all(|a| port_open(*a)) {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("mailferry exited early ({status}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "mailferry did not listen in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Runs the CLI against this server's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        command(&self.config, args)
            .output()
            .expect("run mailferry CLI")
    }

    /// `mailferry user show USER --json`, asserting success.
    pub fn show(&self, user: &str) -> serde_json::Value {
        let out = self.cli(&["user", "show", user, "--json"]);
        assert!(
            out.status.success(),
            "user show {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("user show --json")
    }

    /// Polls `user show` until `pred` holds (the server works in the background), at most
    /// 60 s; `what` names the wait in the failure.
    pub fn wait_for(
        &self,
        user: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.show(user);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: last view {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request to the admin API with the server's token; returns the status and the body.
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let (status, out) = super::client::http(self.admin, method, path, Some(&self.token), body);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    /// `mailferry user route USER ROUTE`, asserting success.
    pub fn route(&self, user: &str, route: &str) {
        let out = self.cli(&["user", "route", user, route]);
        assert!(
            out.status.success(),
            "user route failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Kills the server with SIGKILL, as a crash or an OOM killer would, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same config, store and ports (after `kill9` or
    /// `terminate`); returns once it listens.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "the server still runs");
        self.child = Some(spawn_serve(&self.config, &self.log_path, self.log_format));
        self.wait_listening(&[self.imap, self.imaps, self.admin]);
    }

    /// Sends SIGTERM and waits for exit (up to `wait`); returns whether it exited.
    pub fn terminate(&mut self, wait: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Mailferry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Creates the state store at `url` (with its schema) as `serve` does on its first start:
/// the CLI's `sync --once` and `verify` refuse a store that does not exist.
pub fn create_store(url: &str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(mailferry::store::open(
            url,
            mailferry::store::Open::CreateIfMissing,
        ))
        .expect("create the state store");
}

/// `mailferry -c CONFIG ARGS...`, to be given its log filter and standard streams.
pub fn command(config: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.arg("-c").arg(config).args(args);
    c
}

/// Runs the CLI with `config` and fails the test if it takes longer than `secs`.
pub fn run_cli(config: &std::path::Path, args: &[&str], secs: u64) -> Output {
    let mut child = command(config, args)
        .env("MAILFERRY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailferry");
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mailferry {args:?} did not finish in {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `--json` report of a `sync EMAIL --once --json` run, asserting it succeeded.
pub fn sync_report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "sync failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}
