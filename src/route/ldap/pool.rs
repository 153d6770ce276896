//! A few bound LDAP connections, opened on demand, reused by every lookup, and replaced when
//! they break: a connection the server closed (restart, idle timeout) is noticed before use or
//! by the failed operation, which is then tried once more on a new connection.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult};
use tokio::sync::Mutex;
use tracing::{debug, info};

use super::settings::{LdapSettings, Transport};

/// After a failed connect, lookups on that slot fail at once for this long instead of each
/// waiting out its own connect: a directory that is down answers `NO [UNAVAILABLE]` quickly,
/// and one that is back is used again within this time (at once, when another slot has
/// connected since).
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// Why an LDAP operation got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum LdapFailure {
    /// No connection (TCP, StartTLS, TLS certificate).
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The directory's URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The service account's bind was refused.
    #[error("bind as {dn} refused: {reason}")]
    Bind {
        /// The bind DN.
        dn: String,
        /// The server's result.
        reason: String,
    },
    /// The server did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke during the operation.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The server answered the operation with an error result.
    #[error("{0}")]
    Refused(LdapResult),
}

impl LdapFailure {
    /// Whether the connection it happened on is unusable from now on.
    fn breaks_connection(&self) -> bool {
        matches!(self, LdapFailure::Timeout(_) | LdapFailure::Lost(_))
    }
}

/// One open, bound connection; `id` tells a replaced connection from its successor.
#[derive(Clone)]
struct Conn {
    id: u64,
    ldap: Ldap,
}

impl Conn {
    /// False once the server ended the connection (restart, idle timeout): its driver is gone.
    fn alive(&self) -> bool {
        // `is_closed` wants `&mut`; a clone shares the connection.
        !self.ldap.clone().is_closed()
    }
}

/// What a slot holds.
enum Slot {
    Empty,
    Open(Conn),
    /// The last connect failed at `at`, for `reason` (repeated to the lookups of the
    /// backoff window).
    Failed {
        at: Instant,
        reason: String,
    },
}

/// The connections of one directory.
pub struct Pool {
    settings: Arc<LdapSettings>,
    /// Each slot is opened by the first lookup that needs it, under its lock, so a burst of
    /// lookups opens one connection per slot, not one each.
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    opened: AtomicU64,
    /// When the pool was made: `last_open` counts from here.
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last successful connect: a slot that failed before it
    /// tries again at once instead of waiting out its backoff.
    last_open: AtomicU64,
}

impl Pool {
    /// A pool of `settings.connections` slots; nothing connects until the first operation.
    pub fn new(settings: Arc<LdapSettings>) -> Pool {
        let n = settings.connections.max(1);
        Pool {
            settings,
            slots: (0..n).map(|_| Mutex::new(Slot::Empty)).collect(),
            next: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            epoch: Instant::now(),
            last_open: AtomicU64::new(0),
        }
    }

    /// Runs `op` on a bound connection under the reply timeout. A pooled connection that
    /// turns out broken is replaced and `op` tried once more on the new one; a failure on a
    /// new connection is the answer.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, LdapFailure>
    where
        F: Fn(Ldap) -> Fut,
        Fut: Future<Output = ldap3::result::Result<T>>,
    {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let (conn, fresh) = self.checkout(slot).await?;
        let result = self.attempt(&op, &conn).await;
        match &result {
            Err(e) if e.breaks_connection() => {
                self.discard(slot, conn.id).await;
                if fresh {
                    return result;
                }
                debug!(error = %e, "pooled LDAP connection broken; reconnecting");
            }
            _ => return result,
        }
        let (conn, _) = self.checkout(slot).await?;
        let again = self.attempt(&op, &conn).await;
        if matches!(&again, Err(e) if e.breaks_connection()) {
            self.discard(slot, conn.id).await;
        }
        again
    }

    async fn attempt<T, F, Fut>(&self, op: &F, conn: &Conn) -> Result<T, LdapFailure>
    where
        F: Fn(Ldap) -> Fut,
        Fut: Future<Output = ldap3::result::Result<T>>,
    {
        let wait = self.settings.reply_timeout;
        match tokio::time::timeout(wait, op(conn.ldap.clone())).await {
            Err(_) => Err(LdapFailure::Timeout(wait)),
            Ok(Ok(t)) => Ok(t),
            Ok(Err(LdapError::LdapResult { result })) => Err(LdapFailure::Refused(result)),
            Ok(Err(e)) => Err(LdapFailure::Lost(e.to_string())),
        }
    }

    /// Drops the connection a failure broke (a late answer on it must not be read as the
    /// answer to a later operation), unless the slot already holds a newer one.
    async fn discard(&self, slot: usize, id: u64) {
        let mut s = self.slots[slot].lock().await;
        if matches!(&*s, Slot::Open(c) if c.id == id) {
            *s = Slot::Empty;
        }
    }

    /// The slot's connection if it is still open, else a new one; `true` when new.
    async fn checkout(&self, slot: usize) -> Result<(Conn, bool), LdapFailure> {
        let mut s = self.slots[slot].lock().await;
        match &*s {
            Slot::Open(c) if c.alive() => return Ok((c.clone(), false)),
            Slot::Failed { at, reason }
                if at.elapsed() < RECONNECT_BACKOFF && !self.opened_since(*at) =>
            {
                return Err(LdapFailure::Connect {
                    url: self.settings.url.clone(),
                    reason: reason.clone(),
                });
            }
            _ => {}
        }
        match self.open().await {
            Ok(c) => {
                let now = self.epoch.elapsed().as_nanos();
                self.last_open
                    .fetch_max(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
                *s = Slot::Open(c.clone());
                Ok((c, true))
            }
            Err(e) => {
                let reason = match &e {
                    LdapFailure::Connect { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                *s = Slot::Failed {
                    at: Instant::now(),
                    reason,
                };
                Err(e)
            }
        }
    }

    /// Whether any slot connected after `at`.
    fn opened_since(&self, at: Instant) -> bool {
        let at = at.saturating_duration_since(self.epoch).as_nanos();
        u128::from(self.last_open.load(Ordering::Relaxed)) > at
    }

    async fn open(&self) -> Result<Conn, LdapFailure> {
        let id = self.opened.fetch_add(1, Ordering::Relaxed);
        let ldap = connect(&self.settings, id).await?;
        info!(connection = id, url = %self.settings.url, "LDAP connection open");
        Ok(Conn { id, ldap })
    }
}

/// A new connection (with StartTLS or implicit TLS as configured), bound as the service
/// account; `id` names it in logs. Its driver runs until the last handle is dropped.
pub async fn connect(s: &LdapSettings, id: u64) -> Result<Ldap, LdapFailure> {
    let mut cs = LdapConnSettings::new()
        .set_conn_timeout(s.connect_timeout)
        .set_starttls(s.transport == Transport::StartTls);
    if let Some(tls) = &s.tls {
        cs = cs.set_config(tls.clone());
    }
    let connect_err = |reason: String| LdapFailure::Connect {
        url: s.url.clone(),
        reason,
    };
    let (conn, mut ldap) = LdapConnAsync::with_settings(cs, &s.url)
        .await
        .map_err(|e| connect_err(describe(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            debug!(connection = id, error = %e, "LDAP connection ended");
        }
    });
    if let Some(bind) = &s.bind {
        let sent = ldap.simple_bind(&bind.dn, bind.password.expose());
        let refused = |reason: String| LdapFailure::Bind {
            dn: bind.dn.clone(),
            reason,
        };
        match tokio::time::timeout(s.reply_timeout, sent).await {
            Err(_) => return Err(LdapFailure::Timeout(s.reply_timeout)),
            Ok(Err(e)) => return Err(connect_err(describe(&e))),
            Ok(Ok(r)) if r.rc != 0 => return Err(refused(r.to_string())),
            Ok(Ok(_)) => {}
        }
    }
    Ok(ldap)
}

/// An ldap3 error in words an operator can act on (the TLS reason included).
fn describe(e: &LdapError) -> String {
    match e {
        LdapError::Timeout { .. } => "no connection within the connect timeout".into(),
        other => other.to_string(),
    }
}
