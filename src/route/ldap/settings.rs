//! The LDAP directory's settings, read once from `[directory]` (DESIGN.md §7): the URL and its
//! TLS, the bind account, the search, and the route attribute's values. Pure, apart from
//! reading the password and CA files; every problem is reported before anything connects.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;

use crate::config::{ChangeNotification, Config, DirectoryKind, LdapConfig};
use crate::route::Route;
use crate::secret::Secret;

/// The filter used when `[directory] filter` is absent (DESIGN.md §7).
pub const DEFAULT_FILTER: &str = "(|(mail={user})(mailAlternateAddress={user})(uid={user}))";
/// The attribute holding an entry's canonical address when `canonical_attribute` is absent.
pub const DEFAULT_CANONICAL_ATTRIBUTE: &str = "mail";
/// The route attribute's value meaning legacy when `legacy_value` is absent.
pub const DEFAULT_LEGACY_VALUE: &str = "legacy";
/// The route attribute's value meaning new when `new_value` is absent.
pub const DEFAULT_NEW_VALUE: &str = "new";
/// The placeholder in the filter that the escaped user name replaces.
pub const USER_PLACEHOLDER: &str = "{user}";

/// Why the `[directory]` of `kind = "ldap"` cannot be used; each names the key.
#[derive(Debug, thiserror::Error)]
pub enum LdapSetupError {
    /// The `[directory]` is not of `kind = "ldap"`.
    #[error("directory.kind is not \"ldap\"")]
    NotLdap,
    /// A required key is absent.
    #[error("directory.kind = \"ldap\" needs directory.{0}")]
    Missing(&'static str),
    /// A key has a value the directory cannot use.
    #[error("directory.{key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A file named by a key cannot be used.
    #[error("directory.{key} {path}: {reason}")]
    File {
        /// The key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> LdapSetupError {
    LdapSetupError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// How the connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `ldap://` with StartTLS before the bind.
    StartTls,
    /// `ldaps://`: TLS from the first byte.
    Ldaps,
    /// `ldap://` without TLS (`starttls = false`, loopback only).
    Plain,
}

/// The simple bind of the service account.
#[derive(Clone, Debug)]
pub struct Bind {
    /// Bind DN.
    pub dn: String,
    /// Its password, first line of `bind_password_file`.
    pub password: Secret<String>,
}

/// Everything the LDAP directory needs, checked.
#[derive(Clone)]
pub struct LdapSettings {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// StartTLS, implicit TLS or plain.
    pub transport: Transport,
    /// Trust for the server certificate: the system roots and `ca_file`.
    pub tls: Option<Arc<ClientConfig>>,
    /// The service account; `None` binds anonymously.
    pub bind: Option<Bind>,
    /// Search base.
    pub base_dn: String,
    /// The filter, `{user}` not yet replaced.
    pub filter: String,
    /// Attribute holding the canonical address.
    pub canonical_attribute: String,
    /// Attributes holding the other addresses.
    pub alias_attributes: Vec<String>,
    /// Attribute holding the route.
    pub route_attribute: String,
    /// Value of the route attribute meaning legacy.
    pub legacy_value: String,
    /// Value of the route attribute meaning new.
    pub new_value: String,
    /// Route of an entry without the route attribute (`[directory] default_route`).
    pub default_route: Route,
    /// Connect, StartTLS and TLS handshake together (`[limits] directory_connect_secs`).
    pub connect_timeout: Duration,
    /// One operation: bind, search or modify (`[limits] directory_reply_secs`).
    pub reply_timeout: Duration,
    /// Connections kept open (`[limits] directory_connections`).
    pub connections: usize,
    /// How changes made outside mailferry are noticed.
    pub notification: ChangeNotification,
    /// Between two polls, when polling.
    pub poll: Duration,
}

impl std::fmt::Debug for LdapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapSettings")
            .field("url", &self.url)
            .field("transport", &self.transport)
            .field("bind", &self.bind)
            .field("base_dn", &self.base_dn)
            .field("filter", &self.filter)
            .field("route_attribute", &self.route_attribute)
            .finish_non_exhaustive()
    }
}

impl LdapSettings {
    /// Reads and checks the `[directory]` of `cfg` (files resolved as every other path).
    pub fn from_config(cfg: &Config) -> Result<LdapSettings, LdapSetupError> {
        let DirectoryKind::Ldap(ldap) = &cfg.directory.kind else {
            return Err(LdapSetupError::NotLdap);
        };
        let url = ldap.url.as_deref().ok_or(LdapSetupError::Missing("url"))?;
        let (url, transport) = parse_url(url, ldap.starttls)?;
        let tls = match transport {
            Transport::Plain => None,
            _ => Some(tls_config(ldap.ca_file.as_ref().map(|p| cfg.resolve(p)))?),
        };
        let base_dn = required(&ldap.base_dn, "base_dn")?;
        let route_attribute = required(&ldap.route_attribute, "route_attribute")?;
        let filter = ldap.filter.as_deref().unwrap_or(DEFAULT_FILTER).to_owned();
        check_filter(&filter)?;
        let (legacy_value, new_value) = values(ldap)?;
        let limits = &cfg.limits;
        Ok(LdapSettings {
            url,
            transport,
            tls,
            bind: bind(cfg, ldap)?,
            base_dn,
            filter,
            canonical_attribute: ldap
                .canonical_attribute
                .clone()
                .unwrap_or_else(|| DEFAULT_CANONICAL_ATTRIBUTE.to_owned()),
            alias_attributes: ldap.alias_attributes.clone(),
            route_attribute,
            legacy_value,
            new_value,
            default_route: cfg.directory.default_route,
            connect_timeout: Duration::from_secs(limits.directory_connect_secs),
            reply_timeout: Duration::from_secs(limits.directory_reply_secs),
            connections: limits.directory_connections,
            notification: ldap.change_notification,
            poll: Duration::from_secs(ldap.poll_secs.max(1)),
        })
    }

    /// The filter for `user`, every character RFC 4515 reserves escaped (`*`, `(`, `)`, `\`,
    /// NUL), so that no login name can widen or reshape the search.
    pub fn filter_for(&self, user: &str) -> String {
        filter_for(&self.filter, user)
    }

    /// The route a value of the route attribute names (compared without regard to ASCII
    /// case and surrounding spaces), or `None` for any other value.
    pub fn route_of_value(&self, value: &str) -> Option<Route> {
        let v = value.trim();
        if v.eq_ignore_ascii_case(&self.new_value) {
            Some(Route::New)
        } else if v.eq_ignore_ascii_case(&self.legacy_value) {
            Some(Route::Legacy)
        } else {
            None
        }
    }

    /// The value of the route attribute that names `route`.
    pub fn value_of_route(&self, route: Route) -> &str {
        match route {
            Route::Legacy => &self.legacy_value,
            Route::New => &self.new_value,
        }
    }
}

/// `template` with every `{user}` replaced by `user`, escaped.
pub fn filter_for(template: &str, user: &str) -> String {
    template.replace(USER_PLACEHOLDER, &ldap3::ldap_escape(user))
}

fn required(v: &Option<String>, key: &'static str) -> Result<String, LdapSetupError> {
    match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(LdapSetupError::Missing(key)),
    }
}

/// Checks the URL (scheme, host, no path beyond `/`) and picks the transport. Plain LDAP,
/// which would send the bind password in clear, is refused except to a loopback address.
fn parse_url(url: &str, starttls: bool) -> Result<(String, Transport), LdapSetupError> {
    let parsed = url::Url::parse(url).map_err(|e| invalid("url", e.to_string()))?;
    let host = match parsed.host_str() {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => return Err(invalid("url", format!("{url:?} names no host"))),
    };
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err(invalid(
            "url",
            "only ldap://host:port or ldaps://host:port (base and filter have their own keys)",
        ));
    }
    let transport = match (parsed.scheme(), starttls) {
        ("ldaps", _) => Transport::Ldaps,
        ("ldap", true) => Transport::StartTls,
        ("ldap", false) if is_loopback(&host) => Transport::Plain,
        ("ldap", false) => {
            return Err(invalid(
                "starttls",
                format!(
                "false sends the bind password in clear: only to a loopback address, not {host}"
            ),
            ))
        }
        (other, _) => {
            return Err(invalid(
                "url",
                format!("scheme {other}:// is not ldap:// or ldaps://"),
            ))
        }
    };
    let port = parsed.port().map_or(String::new(), |p| format!(":{p}"));
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    Ok((format!("{}://{host}{port}", parsed.scheme()), transport))
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn tls_config(ca_file: Option<PathBuf>) -> Result<Arc<ClientConfig>, LdapSetupError> {
    crate::net::tls::client_config(ca_file.as_deref()).map_err(|e| LdapSetupError::File {
        key: "ca_file",
        path: ca_file.unwrap_or_default(),
        reason: e.to_string(),
    })
}

/// A filter must name `{user}` and parse once it is replaced.
fn check_filter(filter: &str) -> Result<(), LdapSetupError> {
    if !filter.contains(USER_PLACEHOLDER) {
        return Err(invalid(
            "filter",
            format!("{filter:?} does not contain {{user}}"),
        ));
    }
    if ldap3::parse_filter(filter_for(filter, "probe@example.org")).is_err() {
        return Err(invalid(
            "filter",
            format!("{filter:?} is not an LDAP filter (RFC 4515)"),
        ));
    }
    Ok(())
}

fn values(ldap: &LdapConfig) -> Result<(String, String), LdapSetupError> {
    let legacy = ldap
        .legacy_value
        .as_deref()
        .unwrap_or(DEFAULT_LEGACY_VALUE)
        .trim();
    let new = ldap
        .new_value
        .as_deref()
        .unwrap_or(DEFAULT_NEW_VALUE)
        .trim();
    if legacy.is_empty() || new.is_empty() || legacy.eq_ignore_ascii_case(new) {
        return Err(invalid(
            "new_value",
            format!("legacy_value {legacy:?} and new_value {new:?} must be two different words"),
        ));
    }
    Ok((legacy.to_owned(), new.to_owned()))
}

fn bind(cfg: &Config, ldap: &LdapConfig) -> Result<Option<Bind>, LdapSetupError> {
    let Some(dn) = ldap
        .bind_dn
        .as_deref()
        .map(str::trim)
        .filter(|d| !d.is_empty())
    else {
        return match ldap.bind_password_file {
            Some(_) => Err(LdapSetupError::Missing("bind_dn")),
            None => Ok(None),
        };
    };
    let file = ldap
        .bind_password_file
        .as_ref()
        .ok_or(LdapSetupError::Missing("bind_password_file"))?;
    let password = read_password(&cfg.resolve(file))?;
    Ok(Some(Bind {
        dn: dn.to_owned(),
        password,
    }))
}

/// The first line of the file, which must not be empty (an empty simple bind is anonymous).
fn read_password(path: &Path) -> Result<Secret<String>, LdapSetupError> {
    let file_err = |reason: String| LdapSetupError::File {
        key: "bind_password_file",
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let line = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    if line.is_empty() {
        return Err(file_err("is empty".into()));
    }
    Ok(Secret::new(line.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_escaped_into_one_assertion_value() {
        let f = filter_for(DEFAULT_FILTER, "*)(uid=*");
        assert_eq!(
            f,
            "(|(mail=\\2a\\29\\28uid=\\2a)(mailAlternateAddress=\\2a\\29\\28uid=\\2a)\
             (uid=\\2a\\29\\28uid=\\2a))"
        );
        for hostile in ["*", ")(", "\\", "a\0b", "*)(|(objectClass=*", "é*"] {
            let f = filter_for("(mail={user})", hostile);
            assert!(ldap3::parse_filter(&f).is_ok(), "{f:?} does not parse");
            // One equality assertion, whatever the name held.
            assert_eq!(f.matches('(').count(), 1, "{f:?}");
            assert!(!f[6..f.len() - 1].contains(['*', '(', ')', '\0']), "{f:?}");
        }
        assert_eq!(filter_for("(uid={user})", "a\\b"), "(uid=a\\5cb)");
        assert_eq!(filter_for("(uid={user})", "a\0"), "(uid=a\\00)");
    }

    #[test]
    fn urls_pick_the_transport_and_plain_ldap_stays_on_loopback() {
        let t = parse_url;
        assert_eq!(
            t("ldap://127.0.0.1:389", true).unwrap(),
            ("ldap://127.0.0.1:389".into(), Transport::StartTls)
        );
        assert_eq!(
            t("ldaps://ldap.example.org/", true).unwrap(),
            ("ldaps://ldap.example.org".into(), Transport::Ldaps)
        );
        assert_eq!(t("ldap://[::1]:10389", false).unwrap().1, Transport::Plain);
        assert_eq!(t("ldap://localhost", false).unwrap().1, Transport::Plain);
        assert!(t("ldap://ldap.example.org", false).is_err());
        assert!(t("ldap://10.0.0.1", false).is_err());
        assert!(t("http://127.0.0.1", true).is_err());
        assert!(t("ldap:///", true).is_err());
        assert!(t("ldap://h/dc=x??sub", true).is_err());
        assert!(t("not a url", true).is_err());
    }

    #[test]
    fn filters_must_name_the_user_and_parse() {
        assert!(check_filter(DEFAULT_FILTER).is_ok());
        assert!(check_filter("(mail=alice@example.org)").is_err());
        assert!(check_filter("(mail={user}").is_err());
        assert!(check_filter("(&(objectClass=inetOrgPerson)(mail={user}))").is_ok());
    }

    #[test]
    fn route_values_match_without_case_and_others_are_not_routes() {
        let mut cfg = LdapConfig::default();
        let (legacy, new) = values(&cfg).unwrap();
        assert_eq!((legacy.as_str(), new.as_str()), ("legacy", "new"));
        cfg.new_value = Some("LEGACY".into());
        assert!(values(&cfg).is_err());
    }
}
