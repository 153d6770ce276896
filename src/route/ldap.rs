//! The LDAP directory (DESIGN.md §2, §7): a user's route is an attribute of the one entry the
//! configured filter finds for them, read with one search and written through the service
//! account. A directory that cannot answer is an error, never "unknown":
//!
//! | the search | `route()` |
//! |---|---|
//! | not made: the name holds a control character (NUL...) | `Ok(None)`: nobody has such a name |
//! | found no entry | `Ok(None)`: unknown, the default route (or refused with `reject_unknown`) |
//! | found one entry with `legacy_value` / `new_value` | that route |
//! | found one entry without the route attribute | `default_route`: a known user nobody has moved yet |
//! | found one entry with another value, or values that disagree | `Err(BadValue)` |
//! | found several entries | `Err(Ambiguous)`: the filter does not name one user |
//! | failed (no connection, TLS, bind, timeout, an error result) | `Err(Unavailable)` |
//!
//! Route changes made in LDAP by others are noticed by `watch` (syncrepl, else polling).

mod pool;
pub mod settings;
pub mod watch;

use std::collections::HashSet;
use std::sync::Arc;

use ldap3::{Mod, Scope, SearchOptions, SearchResult};
use tracing::{debug, warn};

use super::{DirFuture, Directory, DirectoryError, ExternalChange, Route};
use crate::config::Config;
pub use pool::RECONNECT_BACKOFF;
use pool::{LdapFailure, Pool};
pub use settings::{LdapSettings, LdapSetupError};

/// The attribute list that asks for no attributes (RFC 4511 §4.5.1.8).
const NO_ATTRIBUTES: &str = "1.1";

/// Routes kept in an attribute of each user's LDAP entry.
pub struct LdapDirectory {
    settings: Arc<LdapSettings>,
    pool: Pool,
}

/// An entry the filter found: its DN and the attributes asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Distinguished name.
    pub dn: String,
    /// Attribute names as the server spelled them, with their values.
    pub attrs: Vec<(String, Vec<String>)>,
}

impl Entry {
    /// The values of `attribute` (names compared without case, options such as `;lang-x`
    /// not matched).
    pub fn values(&self, attribute: &str) -> &[String] {
        self.attrs
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(attribute))
            .map_or(&[], |(_, v)| v.as_slice())
    }
}

impl LdapDirectory {
    /// Reads the `[directory]` of `cfg`; connects only when first asked.
    pub fn from_config(cfg: &Config) -> Result<LdapDirectory, LdapSetupError> {
        Ok(LdapDirectory::new(LdapSettings::from_config(cfg)?))
    }

    /// A directory with these settings; connects only when first asked.
    pub fn new(settings: LdapSettings) -> LdapDirectory {
        let settings = Arc::new(settings);
        LdapDirectory {
            pool: Pool::new(settings.clone()),
            settings,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &LdapSettings {
        &self.settings
    }

    /// The one entry `user` names, with the route and canonical attributes; `None` when the
    /// search found none.
    pub async fn entry(&self, user: &str) -> Result<Option<Entry>, DirectoryError> {
        let s = &self.settings;
        let attrs = vec![s.route_attribute.as_str(), s.canonical_attribute.as_str()];
        self.find(user, &attrs).await
    }

    async fn find(&self, user: &str, attrs: &[&str]) -> Result<Option<Entry>, DirectoryError> {
        // No address holds a control character, and escaping is not enough for them: slapd
        // ends an assertion value at an (escaped, RFC 4515 `\00`) NUL, so `alice@x\0` would
        // find alice. Such a name is nobody, without asking.
        if user.chars().any(char::is_control) {
            debug!(user = ?user, "control character in a user name: not searched");
            return Ok(None);
        }
        let filter = self.settings.filter_for(user);
        let (base, filter_ref) = (self.settings.base_dn.as_str(), filter.as_str());
        // Two are enough to tell one entry from several.
        let answer = self
            .pool
            .run(|mut ldap| async move {
                ldap.with_search_options(SearchOptions::new().sizelimit(2))
                    .search(base, Scope::Subtree, filter_ref, attrs)
                    .await
            })
            .await
            .map_err(|e| unavailable("search", &e))?;
        let SearchResult(found, result) = answer;
        match result.rc {
            0 => {}
            4 => return Err(ambiguous(user, &filter)),
            _ => {
                return Err(DirectoryError::Unavailable(format!(
                    "search under {base} for {filter}: {result}"
                )))
            }
        }
        let mut entries = found.into_iter().map(parse_entry);
        match (entries.next(), entries.next()) {
            (None, _) => Ok(None),
            (Some(Some(entry)), None) => Ok(Some(entry)),
            (Some(None), None) => Err(DirectoryError::Unavailable(format!(
                "search for {filter}: malformed entry in the answer"
            ))),
            (Some(_), Some(_)) => Err(ambiguous(user, &filter)),
        }
    }

    /// The route an entry's attribute names; see the module's table.
    pub fn route_of(&self, entry: &Entry) -> Result<Route, DirectoryError> {
        let s = &self.settings;
        let values = entry.values(&s.route_attribute);
        let mut route = None;
        for value in values {
            let Some(r) = s.route_of_value(value) else {
                warn!(dn = %entry.dn, attribute = %s.route_attribute, value = %value,
                      "route attribute holds neither legacy_value nor new_value");
                return Err(DirectoryError::BadValue(value.clone()));
            };
            if route.is_some_and(|seen| seen != r) {
                warn!(dn = %entry.dn, attribute = %s.route_attribute, "route attribute holds both routes");
                return Err(DirectoryError::BadValue(values.join(", ")));
            }
            route = Some(r);
        }
        Ok(route.unwrap_or_else(|| {
            debug!(dn = %entry.dn, route = %s.default_route, "no route attribute: default route");
            s.default_route
        }))
    }

    async fn write_route(&self, dn: &str, route: Route) -> Result<(), DirectoryError> {
        let s = &self.settings;
        let (attr, value) = (s.route_attribute.as_str(), s.value_of_route(route));
        let result = self
            .pool
            .run(|mut ldap| async move {
                let mods = vec![Mod::Replace(attr, HashSet::from([value]))];
                ldap.modify(dn, mods).await
            })
            .await
            .map_err(|e| unavailable("modify", &e))?;
        if result.rc != 0 {
            return Err(DirectoryError::Refused(format!(
                "{attr} of {dn} not written: {result}"
            )));
        }
        Ok(())
    }

    async fn base_exists(&self) -> Result<(), DirectoryError> {
        let base = self.settings.base_dn.as_str();
        let answer = self
            .pool
            .run(|mut ldap| async move {
                ldap.search(base, Scope::Base, "(objectClass=*)", vec![NO_ATTRIBUTES])
                    .await
            })
            .await
            .map_err(|e| unavailable("search", &e))?;
        match answer.1.rc {
            0 => Ok(()),
            _ => Err(DirectoryError::Unavailable(format!(
                "base_dn {base}: {}",
                answer.1
            ))),
        }
    }
}

fn unavailable(what: &str, e: &LdapFailure) -> DirectoryError {
    DirectoryError::Unavailable(format!("LDAP {what}: {e}"))
}

fn ambiguous(user: &str, filter: &str) -> DirectoryError {
    DirectoryError::Ambiguous(format!("{user:?}: {filter} finds more than one entry"))
}

/// An entry of a search answer, without trusting its shape: `None` for anything malformed
/// (ldap3's `SearchEntry::construct` panics on such input).
fn parse_entry(re: ldap3::ResultEntry) -> Option<Entry> {
    let mut parts = re.0.match_id(4)?.expect_constructed()?.into_iter();
    let dn = String::from_utf8(parts.next()?.expect_primitive()?).ok()?;
    let mut attrs = Vec::new();
    for attribute in parts.next()?.expect_constructed()? {
        let mut pair = attribute.expect_constructed()?.into_iter();
        let name = String::from_utf8(pair.next()?.expect_primitive()?).ok()?;
        let values = pair
            .next()?
            .expect_constructed()?
            .into_iter()
            .filter_map(|v| String::from_utf8(v.expect_primitive()?).ok())
            .collect();
        attrs.push((name, values));
    }
    Some(Entry { dn, attrs })
}

impl Directory for LdapDirectory {
    fn route<'a>(&'a self, user: &'a str) -> DirFuture<'a, Option<Route>> {
        Box::pin(async move {
            let result = match self.entry(user).await {
                Ok(Some(entry)) => self.route_of(&entry).map(Some),
                other => other.map(|_| None),
            };
            let label = match &result {
                Ok(Some(_)) => "found",
                Ok(None) => "unknown",
                Err(_) => "error",
            };
            metrics::counter!("mailferry_directory_lookups_total", "directory" => "ldap", "result" => label)
                .increment(1);
            result
        })
    }

    fn set_route<'a>(&'a self, user: &'a str, route: Route) -> DirFuture<'a, ()> {
        Box::pin(async move {
            let entry = self
                .find(user, &[NO_ATTRIBUTES])
                .await?
                .ok_or_else(|| DirectoryError::NoSuchUser(user.to_owned()))?;
            self.write_route(&entry.dn, route).await?;
            debug!(user, dn = %entry.dn, %route, "route written to LDAP");
            Ok(())
        })
    }

    fn ping(&self) -> DirFuture<'_, ()> {
        Box::pin(self.base_exists())
    }

    fn watch(self: Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<ExternalChange>> {
        Some(watch::Watch::spawn(self))
    }

    fn describe<'a>(&'a self, user: &'a str) -> DirFuture<'a, String> {
        Box::pin(async move {
            let s = &self.settings;
            let Some(entry) = self.entry(user).await? else {
                return Ok(format!(
                    "{user}: no entry under {} matches {}",
                    s.base_dn,
                    s.filter_for(user)
                ));
            };
            let route = match self.route_of(&entry) {
                Ok(r) => format!("route {r}"),
                Err(e) => e.to_string(),
            };
            Ok(format!(
                "{user}: {}, {} {:?}, {} {:?}: {route}",
                entry.dn,
                s.canonical_attribute,
                entry.values(&s.canonical_attribute),
                s.route_attribute,
                entry.values(&s.route_attribute),
            ))
        })
    }
}
