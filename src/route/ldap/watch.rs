//! Route changes made outside mailferry (an operator's `ldapmodify`, another system): RFC 4533
//! syncrepl refreshAndPersist where the server offers it (OpenLDAP's `syncprov`), else a search
//! every `poll_secs` on `modifyTimestamp`. Both ask for the entries modified since a point in
//! time, so a reconnect, a renewal or a switch to polling misses nothing; an entry seen twice
//! is harmless (the consumer invalidates and kicks only sessions on the other backend).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ldap3::controls::{MakeCritical, RefreshMode, SyncRequest};
use ldap3::{Scope, SearchResult};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::pool::{connect, LdapFailure};
use super::{parse_entry, Entry, LdapDirectory};
use crate::config::ChangeNotification;
use crate::route::{normalize_user, ExternalChange};

/// How far before its start the watch looks back, for clocks that disagree a little and for
/// changes made while mailferry was starting.
pub const LOOK_BACK: Duration = Duration::from_secs(60);
/// A persistent search is replaced by a new one this often: a connection that died without a
/// word (a lost network path) is noticed within this time.
pub const RENEW_EVERY: Duration = Duration::from_secs(300);
/// Wait before trying again after the directory could not be watched.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Result code of a critical control the server does not offer (RFC 4511).
const UNAVAILABLE_CRITICAL_EXTENSION: u32 = 12;

/// Why one round of watching stopped.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// Nobody listens any more: the watch ends.
    #[error("no receiver")]
    Closed,
    /// The server does not offer content synchronization here.
    #[error("syncrepl not offered: {0}")]
    NoSyncrepl(String),
    /// The directory could not be asked or answered with an error.
    #[error(transparent)]
    Ldap(#[from] LdapFailure),
    /// The search ended with an error result.
    #[error("search ended: {0}")]
    Ended(String),
}

/// The watch of one directory, run as a task until its receiver is dropped.
pub struct Watch {
    dir: Arc<LdapDirectory>,
    tx: mpsc::Sender<ExternalChange>,
    /// `modifyTimestamp` (GeneralizedTime) from which entries are asked for.
    since: String,
    /// Entries already reported with a `modifyTimestamp` equal to `since`.
    seen: HashSet<String>,
}

impl Watch {
    /// Starts watching `dir`; changes arrive on the returned receiver.
    pub fn spawn(dir: Arc<LdapDirectory>) -> mpsc::Receiver<ExternalChange> {
        let (tx, rx) = mpsc::channel(256);
        let start = SystemTime::now()
            .checked_sub(LOOK_BACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let watch = Watch {
            dir,
            tx,
            since: generalized_time(start),
            seen: HashSet::new(),
        };
        tokio::spawn(watch.run());
        rx
    }

    async fn run(mut self) {
        let mode = self.dir.settings().notification;
        let mut persist = mode != ChangeNotification::Poll;
        info!(mode = ?mode, "watching LDAP for route changes");
        // Warned once per outage; the retries of the same outage are debug lines.
        let mut failing = false;
        loop {
            let round = if persist {
                self.persist().await
            } else {
                self.poll_round().await
            };
            match round {
                Ok(()) => failing = false,
                Err(WatchError::Closed) => return,
                Err(WatchError::NoSyncrepl(why)) if mode == ChangeNotification::Auto => {
                    info!(reason = %why, "LDAP offers no syncrepl here: polling on modifyTimestamp");
                    persist = false;
                }
                Err(e) => {
                    if failing {
                        debug!(error = %e, "LDAP change notification still interrupted");
                    } else {
                        warn!(error = %e, "LDAP change notification interrupted; retrying");
                    }
                    failing = true;
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// The attributes a change needs: addresses, route, and when it was made.
    fn attributes(&self) -> Vec<String> {
        let s = self.dir.settings();
        let mut attrs = vec![s.route_attribute.clone(), s.canonical_attribute.clone()];
        attrs.extend(s.alias_attributes.iter().cloned());
        attrs.push("modifyTimestamp".into());
        attrs
    }

    /// One persistent search (refreshAndPersist, critical) until it breaks or is renewed.
    async fn persist(&mut self) -> Result<(), WatchError> {
        let s = self.dir.settings();
        let mut ldap = connect(s, u64::MAX).await?;
        let filter = format!("(modifyTimestamp>={})", self.since);
        let attrs = self.attributes();
        let request = SyncRequest {
            mode: RefreshMode::RefreshAndPersist,
            cookie: None,
            reload_hint: false,
        };
        let mut stream = ldap
            .with_controls(request.critical())
            .streaming_search(&s.base_dn, Scope::Subtree, &filter, attrs)
            .await
            .map_err(|e| LdapFailure::Lost(e.to_string()))?;
        debug!(filter = %filter, "persistent search started");
        let renew = tokio::time::sleep(RENEW_EVERY);
        tokio::pin!(renew);
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Ok(Some(re)) => {
                        if let Some(entry) = parse_entry(re) {
                            self.report(entry).await?;
                        }
                    }
                    Ok(None) => {
                        let result = stream.finish().await;
                        return Err(match result.rc {
                            UNAVAILABLE_CRITICAL_EXTENSION => WatchError::NoSyncrepl(result.to_string()),
                            _ => WatchError::Ended(result.to_string()),
                        });
                    }
                    Err(e) => return Err(LdapFailure::Lost(e.to_string()).into()),
                },
                () = &mut renew => return Ok(()),
                () = self.tx.closed() => return Err(WatchError::Closed),
            }
        }
    }

    /// Waits `poll_secs`, then polls once.
    async fn poll_round(&mut self) -> Result<(), WatchError> {
        tokio::select! {
            () = tokio::time::sleep(self.dir.settings().poll) => {}
            () = self.tx.closed() => return Err(WatchError::Closed),
        }
        self.poll_once().await
    }

    async fn poll_once(&mut self) -> Result<(), WatchError> {
        let s = self.dir.settings();
        let filter = format!("(modifyTimestamp>={})", self.since);
        let attrs = self.attributes();
        let (base, filter_ref, attrs_ref) = (s.base_dn.as_str(), filter.as_str(), &attrs);
        let SearchResult(found, result) = self
            .dir
            .pool
            .run(|mut ldap| async move {
                ldap.search(base, Scope::Subtree, filter_ref, attrs_ref)
                    .await
            })
            .await?;
        match result.rc {
            0 => {}
            // Some changes are reported; the rest at the next poll, as `since` moves only to
            // what was seen. A service account without a size limit avoids this.
            4 => warn!(%filter, "more entries changed than the size limit lets one search return"),
            _ => return Err(WatchError::Ended(result.to_string())),
        }
        for entry in found.into_iter().filter_map(parse_entry) {
            self.report(entry).await?;
        }
        Ok(())
    }

    /// Sends the change an entry says, unless it was sent already.
    async fn report(&mut self, entry: Entry) -> Result<(), WatchError> {
        let stamp = entry
            .values("modifyTimestamp")
            .first()
            .cloned()
            .unwrap_or_default();
        if !self.advance(&entry.dn, &stamp) {
            return Ok(());
        }
        let route = match self.dir.route_of(&entry) {
            Ok(r) => r,
            // Logged by `route_of`; lookups answer the same error until it is fixed.
            Err(_) => return Ok(()),
        };
        let s = self.dir.settings();
        let mut users: Vec<String> = Vec::new();
        let names = std::iter::once(&s.canonical_attribute).chain(&s.alias_attributes);
        for value in names.flat_map(|a| entry.values(a)) {
            let user = normalize_user(value);
            if !user.is_empty() && !users.contains(&user) {
                users.push(user);
            }
        }
        if users.is_empty() {
            return Ok(());
        }
        debug!(dn = %entry.dn, %route, "route change noticed in LDAP");
        let change = ExternalChange {
            source: entry.dn,
            users,
            route,
        };
        self.tx.send(change).await.map_err(|_| WatchError::Closed)
    }

    /// Moves `since` to `stamp` when later; whether `dn` at `stamp` is news.
    fn advance(&mut self, dn: &str, stamp: &str) -> bool {
        match stamp.cmp(self.since.as_str()) {
            std::cmp::Ordering::Greater => {
                self.since = stamp.to_owned();
                self.seen.clear();
            }
            std::cmp::Ordering::Less => return true,
            std::cmp::Ordering::Equal => {}
        }
        self.seen.insert(dn.to_owned())
    }
}

/// `t` as LDAP GeneralizedTime in UTC, to the second (`20261206080102Z`).
pub fn generalized_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y%m%d%H%M%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_time_is_utc_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_544_062);
        assert_eq!(generalized_time(t), "20261206080102Z");
        assert_eq!(generalized_time(SystemTime::UNIX_EPOCH), "19700101000000Z");
    }
}
