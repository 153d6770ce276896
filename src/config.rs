//! The TOML configuration contract (DESIGN.md §7): types, defaults and `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::route::Route;

/// Errors found while loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path of the configuration file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// Path of the configuration file.
        path: PathBuf,
        /// Underlying error.
        source: Box<toml::de::Error>,
    },
    /// The values parse but are inconsistent; each entry is one readable reason.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listening addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Server-side TLS.
    #[serde(default)]
    pub tls: Tls,
    /// Admin API settings.
    #[serde(default)]
    pub admin: Admin,
    /// The two mail platforms.
    pub backends: Backends,
    /// Where the per-user route lives.
    #[serde(default)]
    pub directory: DirectoryConfig,
    /// Where migration state lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Sync engine limits.
    #[serde(default)]
    pub sync: SyncConfig,
    /// IMAP proxy behaviour beyond the listeners.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// LMTP proxy behaviour.
    #[serde(default)]
    pub lmtp: LmtpConfig,
    /// Limits and timeouts; defaults come from `Limits::default()`.
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Directory the relative paths in this file are resolved against (not in TOML).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[listen]`: each listener is optional; an absent key disables it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Plain IMAP with STARTTLS.
    pub imap: Option<SocketAddr>,
    /// Implicit-TLS IMAP.
    pub imaps: Option<SocketAddr>,
    /// LMTP.
    pub lmtp: Option<SocketAddr>,
    /// HTTP admin API and /metrics.
    pub admin: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            imap: Some(([127, 0, 0, 1], 1143).into()),
            imaps: Some(([127, 0, 0, 1], 1993).into()),
            lmtp: Some(([127, 0, 0, 1], 1024).into()),
            admin: Some(([127, 0, 0, 1], 8143).into()),
        }
    }
}

/// `[tls]`: the proxy's own certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Accept LOGIN/AUTHENTICATE before TLS (tests, trusted networks only).
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: "certs/server.pem".into(),
            key: "certs/server.key".into(),
            allow_plaintext_auth: false,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// File holding the bearer token of the admin API.
    pub token_file: PathBuf,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            token_file: "config/admin.token".into(),
        }
    }
}

/// `[backends]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    /// The platform users are leaving.
    pub legacy: BackendConfig,
    /// The platform users are moving to.
    pub new: BackendConfig,
}

impl Backends {
    /// The backend serving `route`.
    pub fn get(&self, route: Route) -> &BackendConfig {
        match route {
            Route::Legacy => &self.legacy,
            Route::New => &self.new,
        }
    }
}

/// How the proxy reaches a backend's IMAP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendTls {
    /// Plain TCP (loopback or a trusted network only).
    #[default]
    None,
    /// Plain connect, then STARTTLS before any credential is sent.
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

/// How the proxy logs in to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendAuth {
    /// Forward the client's own credentials.
    #[default]
    Passthrough,
    /// SASL PLAIN as the master user with authzid = the user.
    Master,
}

/// One `[backends.X]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// IMAP address (host:port); a host name is resolved at connect time.
    pub imap: String,
    /// TLS mode towards the backend.
    #[serde(default)]
    pub imap_tls: BackendTls,
    /// Name the backend certificate must carry (defaults to the host of `imap`).
    pub tls_server_name: Option<String>,
    /// Extra CA certificates (PEM) trusted for this backend, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// LMTP address (host:port).
    pub lmtp: Option<String>,
    /// Login mode.
    #[serde(default)]
    pub auth: BackendAuth,
    /// Master user name for `auth = "master"` and the sync engine.
    pub master_user: Option<String>,
    /// File holding the master password.
    pub master_password_file: Option<PathBuf>,
}

impl BackendConfig {
    /// Host part of `imap`, for SNI and certificate checks.
    pub fn imap_host(&self) -> &str {
        split_host(&self.imap)
    }
}

fn split_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Which directory implementation holds routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DirectoryKind {
    /// Table in the state database.
    #[default]
    Embedded,
    /// An attribute in LDAP.
    Ldap,
}

/// `[directory]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Implementation.
    #[serde(default)]
    pub kind: DirectoryKind,
    /// Route of a user the directory does not know.
    #[serde(default)]
    pub default_route: Route,
    /// Reject unknown users instead of routing them to `default_route`.
    #[serde(default)]
    pub reject_unknown: bool,
    /// Seconds a looked-up route stays cached.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_secs: u64,
    /// LDAP URL (kind = ldap).
    pub url: Option<String>,
    /// LDAP bind DN.
    pub bind_dn: Option<String>,
    /// File holding the LDAP bind password.
    pub bind_password_file: Option<PathBuf>,
    /// LDAP search base.
    pub base_dn: Option<String>,
    /// LDAP filter; `{user}` is replaced by the escaped address.
    pub filter: Option<String>,
    /// LDAP attribute holding the route.
    pub route_attribute: Option<String>,
    /// Attribute value meaning legacy.
    pub legacy_value: Option<String>,
    /// Attribute value meaning new.
    pub new_value: Option<String>,
}

fn default_cache_ttl() -> u64 {
    30
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            kind: DirectoryKind::Embedded,
            default_route: Route::Legacy,
            reject_unknown: false,
            cache_ttl_secs: default_cache_ttl(),
            url: None,
            bind_dn: None,
            bind_password_file: None,
            base_dn: None,
            filter: None,
            route_attribute: None,
            legacy_value: None,
            new_value: None,
        }
    }
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `sqlite://path` (relative to the config's base directory) or `postgres://...`.
    pub url: String,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            url: "sqlite://var/mailferry.db".into(),
        }
    }
}

/// `[sync]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Users synced at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Connections per backend.
    #[serde(default = "default_per_backend")]
    pub per_backend: usize,
    /// Copy budget; 0 = unlimited.
    #[serde(default)]
    pub bytes_per_second: u64,
    /// Seconds between incremental passes of a `syncing` user.
    #[serde(default = "default_sync_interval")]
    pub interval_secs: u64,
    /// Regexes on the decoded, `/`-separated legacy folder path; matching folders are not synced.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Rename rules applied in order (first match wins), like imapsync's `--regextrans2`.
    #[serde(default)]
    pub rename: Vec<RenameRule>,
    /// Round trip per 256 KiB at or below which a backend never counts as slowing down (the
    /// adaptive backoff only acts above it and above 3× the backend's own recent best).
    #[serde(default = "default_latency_floor_ms")]
    pub latency_floor_ms: u64,
    /// Keep users' own passwords from proxy logins in memory to sync backends that have no
    /// master user (DESIGN.md §5: "credentials captured at login only if configured").
    #[serde(default)]
    pub capture_credentials: bool,
    /// How long a captured password is used after the login that brought it.
    #[serde(default = "default_credentials_ttl")]
    pub credentials_ttl_secs: u64,
    /// Longest silence of a backend while the engine awaits a reply, before the pass fails with
    /// a timeout (and backs off, then retries). Unset: `[limits] backend_reply_secs`, at least 60.
    #[serde(default)]
    pub reply_timeout_secs: Option<u64>,
}

fn default_credentials_ttl() -> u64 {
    // A day: passes run every few minutes, and a user who uses mail logs in daily.
    86_400
}

fn default_latency_floor_ms() -> u64 {
    crate::sync::pace::DEFAULT_FLOOR_MS
}

/// One `[[sync.rename]]` rule: `from` is a regex on the decoded `/`-separated path, `to` its
/// replacement (`$1` refers to groups); the result's `/` separates hierarchy levels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRule {
    /// Pattern.
    pub from: String,
    /// Replacement.
    pub to: String,
}

fn default_sync_interval() -> u64 {
    300
}

fn default_concurrency() -> usize {
    20
}
fn default_per_backend() -> usize {
    10
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            concurrency: default_concurrency(),
            per_backend: default_per_backend(),
            bytes_per_second: 0,
            interval_secs: default_sync_interval(),
            exclude: Vec::new(),
            rename: Vec::new(),
            latency_floor_ms: default_latency_floor_ms(),
            capture_credentials: false,
            credentials_ttl_secs: default_credentials_ttl(),
            reply_timeout_secs: None,
        }
    }
}

/// `[proxy]`: IMAP proxy behaviour (an extension of the DESIGN.md contract).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Separator of `user*master` logins, as Dovecot's `auth_master_user_separator`.
    #[serde(default = "default_master_separator")]
    pub master_user_separator: String,
    /// Backend that verifies a user's password when the routed backend uses `auth = "master"`.
    #[serde(default)]
    pub password_backend: Route,
    /// Capabilities removed from the backend's post-login CAPABILITY (the splice cannot honour them).
    #[serde(default = "default_strip_caps")]
    pub strip_capabilities: Vec<String>,
}

fn default_master_separator() -> String {
    "*".into()
}
fn default_strip_caps() -> Vec<String> {
    vec![
        "COMPRESS=DEFLATE".into(),
        "STARTTLS".into(),
        "LOGINDISABLED".into(),
    ]
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            master_user_separator: default_master_separator(),
            password_backend: Route::Legacy,
            strip_capabilities: default_strip_caps(),
        }
    }
}

/// `[lmtp]`: LMTP proxy behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmtpConfig {
    /// Largest message accepted (SIZE), in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_size: u64,
    /// Name announced in the greeting and LHLO reply.
    #[serde(default = "default_hostname")]
    pub hostname: String,
}

fn default_max_message() -> u64 {
    50 * 1024 * 1024
}
fn default_hostname() -> String {
    "mailferry".into()
}

impl Default for LmtpConfig {
    fn default() -> Self {
        LmtpConfig {
            max_message_size: default_max_message(),
            hostname: default_hostname(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Relative paths in the file are relative to the working directory, as the
        // example layout (certs/, config/, var/) and the systemd unit's WorkingDirectory assume.
        Self::parse(&text, path, Path::new("."))
    }

    /// Parses configuration text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        cfg.base_dir = base_dir.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Resolves a path from the file against the config's base directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Checks consistency that serde cannot express; lists every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for (name, b) in [
            ("legacy", &self.backends.legacy),
            ("new", &self.backends.new),
        ] {
            if !b.imap.contains(':') {
                problems.push(format!("backends.{name}.imap must be host:port"));
            }
            if b.auth == BackendAuth::Master
                && (b.master_user.is_none() || b.master_password_file.is_none())
            {
                problems.push(format!(
                    "backends.{name}.auth = \"master\" needs master_user and master_password_file"
                ));
            }
        }
        if self.directory.kind == DirectoryKind::Ldap {
            for (key, v) in [
                ("url", &self.directory.url),
                ("base_dn", &self.directory.base_dn),
                ("route_attribute", &self.directory.route_attribute),
            ] {
                if v.is_none() {
                    problems.push(format!("directory.kind = \"ldap\" needs directory.{key}"));
                }
            }
        }
        if !(self.state.url.starts_with("sqlite:") || self.state.url.starts_with("postgres")) {
            problems.push("state.url must start with sqlite:// or postgres://".into());
        }
        if self.sync.concurrency == 0 || self.sync.per_backend == 0 {
            problems.push("sync.concurrency and sync.per_backend must be at least 1".into());
        }
        for p in self
            .sync
            .exclude
            .iter()
            .chain(self.sync.rename.iter().map(|r| &r.from))
        {
            if let Err(e) = regex::Regex::new(p) {
                problems.push(format!("sync rule {p:?}: {e}"));
            }
        }
        if self.proxy.master_user_separator.is_empty() {
            problems.push("proxy.master_user_separator must not be empty".into());
        }
        problems.extend(self.limits.problems());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Reads a secret file, trimming the trailing newline editors add.
pub fn read_secret(path: &Path) -> std::io::Result<crate::secret::Secret<String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(crate::secret::Secret::new(
        text.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let cfg = Config::load(&path).expect("config/example.toml is valid");
        assert_eq!(cfg.listen.imap, Some("127.0.0.1:1143".parse().unwrap()));
        assert_eq!(cfg.backends.legacy.imap_host(), "127.0.0.1");
        assert_eq!(cfg.sync.concurrency, 20);
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
            [backends.legacy]
            imap = "nohost"
            auth = "master"
            [backends.new]
            imap = "127.0.0.1:1"
            [state]
            url = "mysql://x"
        "#;
        let err = Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("host:port"), "{msg}");
        assert!(msg.contains("master_user"), "{msg}");
        assert!(msg.contains("state.url"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = "[backends.legacy]\nimap=\"a:1\"\ncolour=1\n[backends.new]\nimap=\"b:1\"\n";
        assert!(Config::parse(text, Path::new("t.toml"), Path::new(".")).is_err());
    }
}
