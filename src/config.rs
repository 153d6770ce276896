//! The TOML configuration contract (DESIGN.md §7): types, defaults and `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

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
    /// Cutover and rollback.
    #[serde(default)]
    pub cutover: CutoverConfig,
    /// Limits and timeouts; defaults come from `Limits::default()`.
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Directory the relative paths in this file are resolved against (not in TOML).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Directory of the file itself, which a relative SQLite `[state] url` is relative to.
    #[serde(skip)]
    pub config_dir: PathBuf,
}

/// `[listen]`: each listener is optional; an absent key disables it. So the defaults below
/// apply only when the whole section is absent (no container-level `serde(default)`).
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

/// `[tls]`: the proxy's own certificate. A present section names `cert` and `key`; the
/// defaults below apply only when the whole section is absent.
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

/// `[admin]`: a present section names `token_file`; the default applies when it is absent.
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

/// `[directory]`: the keys every kind understands, and the kind with its own keys.
///
/// Deserialized by hand (below): the common keys, `kind` and the kind's own keys share one flat
/// table, and serde's derives cannot check such a table whole. `#[serde(tag = "kind")]` needs
/// the tag (no default kind) and buffers the table, so TOML errors lose their line; with
/// `#[serde(flatten)]` beside the common keys, `deny_unknown_fields` rejects `kind` itself, and
/// without it any misspelt key passes (serde 1.0.229, toml 1.2). The visitor reads every key
/// typed where it stands, so an unknown key or a bad value is reported at its line, as in every
/// other section.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryConfig {
    /// Implementation, with its own settings.
    pub kind: DirectoryKind,
    /// Route of a user the directory does not know.
    pub default_route: Route,
    /// Reject unknown users instead of routing them to `default_route`.
    pub reject_unknown: bool,
    /// Seconds a looked-up route stays cached.
    pub cache_ttl_secs: u64,
    /// Completes a bare login: `alice` → `alice@default_domain` (empty: none).
    pub default_domain: String,
    /// Routes `alice+news@` as `alice@` (empty: none; one character).
    pub recipient_delimiter: String,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            kind: DirectoryKind::Embedded,
            default_route: Route::Legacy,
            reject_unknown: false,
            cache_ttl_secs: 30,
            default_domain: String::new(),
            recipient_delimiter: String::new(),
        }
    }
}

impl DirectoryConfig {
    /// What is wrong with `default_domain` and `recipient_delimiter`.
    fn identity_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let d = self.recipient_delimiter.as_str();
        if d.chars().count() > 1 || d.contains(['@', ' ', '"']) {
            problems.push(format!(
                "directory.recipient_delimiter {d:?}: one character (such as \"+\" or \"-\"), not '@'"
            ));
        }
        let domain = self.default_domain.trim_start_matches('@');
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
        if !domain.is_empty() && (!domain.chars().all(valid) || !domain.contains('.')) {
            problems.push(format!(
                "directory.default_domain {:?}: a domain name such as \"example.org\"",
                self.default_domain
            ));
        }
        problems
    }

    /// How logins and recipients become user keys.
    pub fn identity(&self) -> crate::route::Identity {
        crate::route::Identity::new(&self.default_domain, &self.recipient_delimiter)
    }
}

/// Which directory implementation holds routes (`kind`), with that implementation's keys.
#[derive(Debug, Clone, PartialEq)]
pub enum DirectoryKind {
    /// `kind = "embedded"`, the default: a table in the state database.
    Embedded,
    /// `kind = "ldap"`: an attribute in LDAP (`route::ldap`).
    Ldap(Box<LdapConfig>),
}

/// The keys `kind = "ldap"` adds to `[directory]` (DESIGN.md §7). A `None` is left for the LDAP
/// directory to default or require; `validate()` requires `url`, `base_dn` and `route_attribute`.
#[derive(Debug, Clone, PartialEq)]
pub struct LdapConfig {
    /// `ldap://` or `ldaps://` URL.
    pub url: Option<String>,
    /// STARTTLS on an `ldap://` URL; false only on a trusted loopback.
    pub starttls: bool,
    /// Extra CA certificates (PEM) trusted for the LDAP server.
    pub ca_file: Option<PathBuf>,
    /// Bind DN.
    pub bind_dn: Option<String>,
    /// File holding the bind password.
    pub bind_password_file: Option<PathBuf>,
    /// Search base.
    pub base_dn: Option<String>,
    /// Search filter; `{user}` is replaced by the escaped address.
    pub filter: Option<String>,
    /// Attribute holding the entry's canonical address.
    pub canonical_attribute: Option<String>,
    /// Attributes holding the entry's other addresses.
    pub alias_attributes: Vec<String>,
    /// Attribute holding the route.
    pub route_attribute: Option<String>,
    /// Attribute value meaning legacy.
    pub legacy_value: Option<String>,
    /// Attribute value meaning new.
    pub new_value: Option<String>,
    /// How changes made outside mailferry are noticed.
    pub change_notification: ChangeNotification,
    /// Seconds between polls, when polling.
    pub poll_secs: u64,
}

impl Default for LdapConfig {
    fn default() -> Self {
        LdapConfig {
            url: None,
            starttls: true,
            ca_file: None,
            bind_dn: None,
            bind_password_file: None,
            base_dn: None,
            filter: None,
            canonical_attribute: None,
            alias_attributes: Vec::new(),
            route_attribute: None,
            legacy_value: None,
            new_value: None,
            change_notification: ChangeNotification::Auto,
            poll_secs: 2,
        }
    }
}

/// `[directory] change_notification` (kind = "ldap").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeNotification {
    /// syncrepl where the server offers it, else polling.
    Auto,
    /// RFC 4533 content synchronization only.
    Syncrepl,
    /// A search every `poll_secs`.
    Poll,
}

/// `kind` as written.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindName {
    Embedded,
    Ldap,
}

/// Every key of `[directory]`; any other is refused at its line.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DirectoryKey {
    Kind,
    DefaultRoute,
    RejectUnknown,
    CacheTtlSecs,
    DefaultDomain,
    RecipientDelimiter,
    Url,
    Starttls,
    CaFile,
    BindDn,
    BindPasswordFile,
    BaseDn,
    Filter,
    CanonicalAttribute,
    AliasAttributes,
    RouteAttribute,
    LegacyValue,
    NewValue,
    ChangeNotification,
    PollSecs,
}

impl<'de> Deserialize<'de> for DirectoryConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DirectoryVisitor)
    }
}

struct DirectoryVisitor;

impl<'de> Visitor<'de> for DirectoryVisitor {
    type Value = DirectoryConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a [directory] table")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DirectoryConfig, A::Error> {
        use DirectoryKey as K;
        let mut t = DirectoryTable {
            map,
            first_ldap: None,
        };
        let mut cfg = DirectoryConfig::default();
        let mut kind = KindName::Embedded;
        let mut ldap = LdapConfig::default();
        while let Some(key) = t.map.next_key()? {
            match key {
                K::Kind => kind = t.value()?,
                K::DefaultRoute => cfg.default_route = t.value()?,
                K::RejectUnknown => cfg.reject_unknown = t.value()?,
                K::CacheTtlSecs => cfg.cache_ttl_secs = t.value()?,
                K::DefaultDomain => cfg.default_domain = t.value()?,
                K::RecipientDelimiter => cfg.recipient_delimiter = t.value()?,
                K::Url => ldap.url = t.ldap("url")?,
                K::Starttls => ldap.starttls = t.ldap("starttls")?,
                K::CaFile => ldap.ca_file = t.ldap("ca_file")?,
                K::BindDn => ldap.bind_dn = t.ldap("bind_dn")?,
                K::BindPasswordFile => ldap.bind_password_file = t.ldap("bind_password_file")?,
                K::BaseDn => ldap.base_dn = t.ldap("base_dn")?,
                K::Filter => ldap.filter = t.ldap("filter")?,
                K::CanonicalAttribute => {
                    ldap.canonical_attribute = t.ldap("canonical_attribute")?
                }
                K::AliasAttributes => ldap.alias_attributes = t.ldap("alias_attributes")?,
                K::RouteAttribute => ldap.route_attribute = t.ldap("route_attribute")?,
                K::LegacyValue => ldap.legacy_value = t.ldap("legacy_value")?,
                K::NewValue => ldap.new_value = t.ldap("new_value")?,
                K::ChangeNotification => {
                    ldap.change_notification = t.ldap("change_notification")?
                }
                K::PollSecs => ldap.poll_secs = t.ldap("poll_secs")?,
            }
        }
        cfg.kind = match (kind, t.first_ldap) {
            (KindName::Ldap, _) => DirectoryKind::Ldap(Box::new(ldap)),
            (KindName::Embedded, None) => DirectoryKind::Embedded,
            (KindName::Embedded, Some(key)) => {
                return Err(de::Error::custom(format!(
                    "directory.{key} is a key of kind = \"ldap\", not of kind = \"embedded\""
                )))
            }
        };
        Ok(cfg)
    }
}

/// The `[directory]` table being read, and the first LDAP key met (named if the kind is not LDAP).
struct DirectoryTable<A> {
    map: A,
    first_ldap: Option<&'static str>,
}

impl<'de, A: MapAccess<'de>> DirectoryTable<A> {
    fn value<T: Deserialize<'de>>(&mut self) -> Result<T, A::Error> {
        self.map.next_value()
    }

    fn ldap<T: Deserialize<'de>>(&mut self, key: &'static str) -> Result<T, A::Error> {
        self.first_ldap.get_or_insert(key);
        self.map.next_value()
    }
}

/// `[state]`: a present section names `url`; the default applies when it is absent.
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

/// `[cutover]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CutoverConfig {
    /// How long a login waits while its user is being cut over or rolled back.
    pub hold_secs: u64,
    /// What the verification gate compares.
    pub verify: GateMode,
    /// Users cut over at once by `wave cutover`.
    pub wave_concurrency: usize,
    /// How long a cutover waits for the user's LMTP deliveries in flight to end.
    pub drain_secs: u64,
    /// How long the final delta sync and the gate (or a rollback's reverse delta) may take;
    /// past it the sequence fails and the user stays where they were.
    pub delta_secs: u64,
}

impl Default for CutoverConfig {
    fn default() -> Self {
        CutoverConfig {
            hold_secs: 10,
            verify: GateMode::Counts,
            wave_concurrency: 10,
            drain_secs: 30,
            delta_secs: 300,
        }
    }
}

impl CutoverConfig {
    /// `hold_secs` as a duration.
    pub fn hold(&self) -> Duration {
        Duration::from_secs(self.hold_secs)
    }
}

/// `[cutover] verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    /// Per-folder message counts and a complete UID map.
    Counts,
    /// Counts, and every message's content hash, flags and date compared on both sides.
    Full,
}

/// `[sync]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Users synced at once.
    pub concurrency: usize,
    /// Connections per backend.
    pub per_backend: usize,
    /// Copy budget; 0 = unlimited.
    pub bytes_per_second: u64,
    /// Seconds between incremental passes of a `syncing` user.
    pub interval_secs: u64,
    /// Regexes on the decoded, `/`-separated legacy folder path; matching folders are not synced.
    pub exclude: Vec<String>,
    /// Rename rules applied in order (first match wins), like imapsync's `--regextrans2`.
    pub rename: Vec<RenameRule>,
    /// Round trip per 256 KiB at or below which a backend never counts as slowing down (the
    /// adaptive backoff only acts above it and above 3× the backend's own recent best).
    pub latency_floor_ms: u64,
    /// Keep users' own passwords from proxy logins in memory to sync backends that have no
    /// master user (DESIGN.md §5: "credentials captured at login only if configured").
    pub capture_credentials: bool,
    /// How long a captured password is used after the login that brought it.
    pub credentials_ttl_secs: u64,
    /// Longest silence of a backend while the engine awaits a reply, before the pass fails with
    /// a timeout (and backs off, then retries). Unset: `[limits] backend_reply_secs`, at least 60.
    pub reply_timeout_secs: Option<u64>,
    /// One budget, in MiB, for the message bodies all passes hold at once (fetched from legacy,
    /// not yet acknowledged by new); a message larger than it is copied alone.
    pub memory_mb: u64,
    /// How long a pass's lease on its user lasts unless renewed (renewed every third of it):
    /// after a killed process, the user's next pass can start this long later at the latest.
    pub lease_secs: u64,
}

/// Default of `[sync] latency_floor_ms`, also the pacer's floor until a config sets one: a local
/// IMAP server writes 256 KiB in a few to tens of milliseconds even when busy; a quarter of a
/// second per unit means users notice too.
pub const DEFAULT_LATENCY_FLOOR_MS: u64 = 250;

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            concurrency: 20,
            per_backend: 10,
            bytes_per_second: 0,
            interval_secs: 300,
            exclude: Vec::new(),
            rename: Vec::new(),
            latency_floor_ms: DEFAULT_LATENCY_FLOOR_MS,
            capture_credentials: false,
            // A day: passes run every few minutes, and a user who uses mail logs in daily.
            credentials_ttl_secs: 86_400,
            reply_timeout_secs: None,
            lease_secs: 60,
            memory_mb: 256,
        }
    }
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

/// `[proxy]`: IMAP proxy behaviour (an extension of the DESIGN.md contract).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Separator of `user*master` logins, as Dovecot's `auth_master_user_separator`.
    pub master_user_separator: String,
    /// Backend that verifies a user's password when the routed backend uses `auth = "master"`.
    pub password_backend: Route,
    /// Capabilities removed from the backend's post-login CAPABILITY (the splice cannot honour them).
    pub strip_capabilities: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            master_user_separator: "*".into(),
            password_backend: Route::Legacy,
            strip_capabilities: vec![
                "COMPRESS=DEFLATE".into(),
                "STARTTLS".into(),
                "LOGINDISABLED".into(),
            ],
        }
    }
}

/// `[lmtp]`: LMTP proxy behaviour. `lmtp::server::ServerLimits` takes its defaults from here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpConfig {
    /// Largest message accepted (SIZE), in bytes.
    pub max_message_size: u64,
    /// Name announced in the greeting and LHLO reply.
    pub hostname: String,
}

impl Default for LmtpConfig {
    fn default() -> Self {
        LmtpConfig {
            max_message_size: 50 * 1024 * 1024,
            hostname: "mailferry".into(),
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
        cfg.config_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
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

    /// `[state] url` with a relative SQLite path resolved against this file's directory: run
    /// from another working directory, a binary must find the same store, never start an
    /// empty one (every other relative path stays relative to the working directory, where a
    /// wrong one fails loudly).
    pub fn state_url(&self) -> String {
        let url = &self.state.url;
        let Some(rest) = url.strip_prefix("sqlite://") else {
            return url.clone();
        };
        let (path, query) = rest
            .split_once('?')
            .map_or((rest, None), |(p, q)| (p, Some(q)));
        if path.is_empty() || path == ":memory:" || Path::new(path).is_absolute() {
            return url.clone();
        }
        let mut out = format!("sqlite://{}", self.config_dir.join(path).display());
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
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
        if let DirectoryKind::Ldap(ldap) = &self.directory.kind {
            for (key, v) in [
                ("url", &ldap.url),
                ("base_dn", &ldap.base_dn),
                ("route_attribute", &ldap.route_attribute),
            ] {
                if v.is_none() {
                    problems.push(format!("directory.kind = \"ldap\" needs directory.{key}"));
                }
            }
        }
        problems.extend(self.directory.identity_problems());
        if !(self.state.url.starts_with("sqlite:") || self.state.url.starts_with("postgres")) {
            problems.push("state.url must start with sqlite:// or postgres://".into());
        }
        if self.sync.memory_mb < 8 {
            problems.push("sync.memory_mb must be at least 8".into());
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

    /// Parses `extra` after two minimal backends.
    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let text =
            format!("[backends.legacy]\nimap = \"a:1\"\n[backends.new]\nimap = \"b:1\"\n{extra}");
        Config::parse(&text, Path::new("t.toml"), Path::new("."))
    }

    #[test]
    fn a_partial_section_keeps_the_other_defaults() {
        let cfg = parse(
            "[sync]\nconcurrency = 3\n[proxy]\nmaster_user_separator = \"%\"\n\
             [lmtp]\nhostname = \"h\"\n[directory]\nreject_unknown = true\n",
        )
        .unwrap();
        assert_eq!(cfg.sync.concurrency, 3);
        assert_eq!(cfg.sync.per_backend, 10);
        assert_eq!(cfg.sync.interval_secs, 300);
        assert_eq!(cfg.sync.latency_floor_ms, DEFAULT_LATENCY_FLOOR_MS);
        assert_eq!(cfg.sync.credentials_ttl_secs, 86_400);
        assert_eq!(cfg.proxy.master_user_separator, "%");
        assert_eq!(
            cfg.proxy.strip_capabilities,
            ProxyConfig::default().strip_capabilities
        );
        assert_eq!(cfg.lmtp.hostname, "h");
        assert_eq!(cfg.lmtp.max_message_size, 50 * 1024 * 1024);
        assert_eq!(
            cfg.directory,
            DirectoryConfig {
                reject_unknown: true,
                ..DirectoryConfig::default()
            }
        );
        // A present [listen] enables only the listeners it names.
        let cfg = parse("[listen]\nimap = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(cfg.listen.imap, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(
            (cfg.listen.imaps, cfg.listen.lmtp, cfg.listen.admin),
            (None, None, None)
        );
    }

    #[test]
    fn the_directory_is_embedded_unless_told_otherwise() {
        assert_eq!(parse("").unwrap().directory, DirectoryConfig::default());
        let cfg = parse("[directory]\ndefault_route = \"new\"\ncache_ttl_secs = 5\n").unwrap();
        assert_eq!(cfg.directory.kind, DirectoryKind::Embedded);
        assert_eq!(cfg.directory.default_route, Route::New);
        assert_eq!(cfg.directory.cache_ttl_secs, 5);
        let cfg = parse("[directory]\nkind = \"embedded\"\n").unwrap();
        assert_eq!(cfg.directory, DirectoryConfig::default());
    }

    #[test]
    fn an_ldap_directory_parses_into_its_variant() {
        let cfg = parse(
            r#"
            [directory]
            url = "ldap://127.0.0.1:389"
            default_route = "new"
            kind = "ldap"
            reject_unknown = true
            starttls = false
            ca_file = "certs/ldap-ca.pem"
            bind_dn = "cn=mailferry,dc=example,dc=org"
            bind_password_file = "config/ldap.secret"
            base_dn = "ou=people,dc=example,dc=org"
            filter = "(mail={user})"
            canonical_attribute = "mail"
            alias_attributes = ["mailAlternateAddress"]
            route_attribute = "mailMigrationRoute"
            legacy_value = "L"
            new_value = "N"
            change_notification = "poll"
            poll_secs = 7
            "#,
        )
        .unwrap();
        assert_eq!(cfg.directory.default_route, Route::New);
        assert!(cfg.directory.reject_unknown);
        assert_eq!(cfg.directory.cache_ttl_secs, 30);
        let DirectoryKind::Ldap(ldap) = &cfg.directory.kind else {
            panic!("not ldap: {:?}", cfg.directory.kind)
        };
        let want = LdapConfig {
            url: Some("ldap://127.0.0.1:389".into()),
            starttls: false,
            ca_file: Some("certs/ldap-ca.pem".into()),
            bind_dn: Some("cn=mailferry,dc=example,dc=org".into()),
            bind_password_file: Some("config/ldap.secret".into()),
            base_dn: Some("ou=people,dc=example,dc=org".into()),
            filter: Some("(mail={user})".into()),
            canonical_attribute: Some("mail".into()),
            alias_attributes: vec!["mailAlternateAddress".into()],
            route_attribute: Some("mailMigrationRoute".into()),
            legacy_value: Some("L".into()),
            new_value: Some("N".into()),
            change_notification: ChangeNotification::Poll,
            poll_secs: 7,
        };
        assert_eq!(**ldap, want);
        // Only the keys the LDAP directory cannot do without are required.
        let cfg = parse("[directory]\nkind = \"ldap\"\nurl = \"ldap://h\"\nbase_dn = \"o=x\"\nroute_attribute = \"r\"\n")
            .unwrap();
        let DirectoryKind::Ldap(ldap) = cfg.directory.kind else {
            panic!("not ldap")
        };
        assert!(ldap.starttls);
        assert_eq!(ldap.change_notification, ChangeNotification::Auto);
        assert_eq!(ldap.poll_secs, 2);
    }

    #[test]
    fn an_ldap_directory_without_its_required_keys_is_invalid() {
        let msg = parse("[directory]\nkind = \"ldap\"\n")
            .unwrap_err()
            .to_string();
        for key in ["url", "base_dn", "route_attribute"] {
            assert!(
                msg.contains(&format!("directory.kind = \"ldap\" needs directory.{key}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn unknown_directory_keys_are_rejected_at_their_line() {
        for kind in ["embedded", "ldap"] {
            let err = parse(&format!("[directory]\nkind = \"{kind}\"\ncolour = 1\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("unknown field `colour`"), "{err}");
            assert!(err.contains("line 7"), "{err}");
        }
        let err = parse("[directory]\nkind = \"ldapx\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `ldapx`"), "{err}");
        let err = parse("[directory]\ncache_ttl_secs = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 6") && err.contains("expected u64"),
            "{err}"
        );
    }

    #[test]
    fn ldap_keys_need_kind_ldap() {
        for text in [
            "[directory]\nbase_dn = \"o=x\"\n",
            "[directory]\nkind = \"embedded\"\nbase_dn = \"o=x\"\n",
            "[directory]\nbase_dn = \"o=x\"\nkind = \"embedded\"\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains("directory.base_dn is a key of kind = \"ldap\""),
                "{err}"
            );
        }
    }
}
