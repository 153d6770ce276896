//! The LMTP proxy (DESIGN.md §4): one endpoint for the MTA; each recipient is routed at RCPT
//! time, deferred with 4xx while its user is being cut over, and delivered after DATA to the
//! backend that owns it, with one reply per accepted recipient in RCPT order.
//!
//! Pure parts: `server` (session state machine and command parser), `data` (DATA
//! transparency), `reply` (replies and their parser), `fanout::Plan` (grouping and zipping).
//! I/O parts: `session` (one client connection), `client` (backend connections and pool),
//! `fanout::deliver`.

pub mod client;
pub mod data;
pub mod fanout;
pub mod reply;
pub mod server;
pub mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::Config;
use crate::control::inflight::Deliveries;
use crate::route::{Route, RouteCache};
use crate::shutdown::Shutdown;
use crate::store::{StateStore, StoreError};
use client::{BackendPool, ClientTimeouts};
use server::ServerLimits;

/// Per-phase timeouts of the LMTP proxy, with where each default comes from.
#[derive(Debug, Clone)]
pub struct LmtpTimeouts {
    /// Waiting for the MTA's next command: RFC 5321 §4.5.3.2.7, at least 5 minutes.
    pub command_idle: Duration,
    /// Waiting for the next chunk of message data: RFC 5321 §4.5.3.2.5 data block, 3 minutes.
    pub data_idle: Duration,
    /// From connect to the first `MAIL FROM`, however busy the client keeps the session
    /// (`[limits] preauth_deadline_secs`): an MTA sends it at once, a client trickling bytes
    /// to hold a connection does not.
    pub first_mail: Duration,
    /// Towards the backends.
    pub client: ClientTimeouts,
}

impl LmtpTimeouts {
    /// The defaults, taking connect and reply timeouts from the shared `[limits]`.
    pub fn from_limits(limits: &crate::limits::Limits) -> Self {
        LmtpTimeouts {
            command_idle: Duration::from_secs(300),
            data_idle: Duration::from_secs(180),
            first_mail: limits.preauth_deadline(),
            client: ClientTimeouts {
                connect: limits.backend_connect(),
                reply: limits.backend_reply(),
                // RFC 5321 §4.5.3.2.6: 10 minutes for the reply to the end of data.
                data: Duration::from_secs(600),
            },
        }
    }
}

/// Idle LMTP connections kept per backend.
pub const POOL_MAX_IDLE: usize = 16;
/// How long a pooled connection may sit idle; well below Dovecot's LMTP idle timeout (5 min).
pub const POOL_IDLE_TTL: Duration = Duration::from_secs(30);

/// How long "this user is not being cut over" from the state store is trusted.
pub const STATE_CACHE_TTL: Duration = Duration::from_secs(1);

/// Remembers for a short time the users the state store said are not being cut over, so a
/// busy MTA does not cost a store query per recipient. Only that answer is kept: a cutover
/// flagged on this node is seen at once (the in-memory flag of `Deliveries`, checked
/// first), one started on another node within the TTL (the route cache bounds route changes
/// the same way), and the end of a cutover at once, since "in cutover" is never cached.
pub struct StateCache {
    ttl: Duration,
    clear_until: DashMap<String, Instant>,
}

/// Entries kept before expired ones are swept.
const STATE_CACHE_SWEEP: usize = 65_536;

impl StateCache {
    /// An empty cache trusting answers for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        StateCache {
            ttl,
            clear_until: DashMap::new(),
        }
    }

    /// Whether the store has `user` (normalized) in state `cutover`.
    pub async fn is_cutover(&self, store: &dyn StateStore, user: &str) -> Result<bool, StoreError> {
        if self
            .clear_until
            .get(user)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Ok(false);
        }
        if store.user_state(user).await?.is_moving() {
            self.clear_until.remove(user);
            return Ok(true);
        }
        let now = Instant::now();
        if self.clear_until.len() >= STATE_CACHE_SWEEP {
            self.clear_until.retain(|_, until| *until > now);
        }
        self.clear_until.insert(user.to_owned(), now + self.ttl);
        Ok(false)
    }
}

/// Everything LMTP sessions share; built once by `serve` (or by a test).
pub struct LmtpContext {
    /// Protocol limits and the host name.
    pub server: ServerLimits,
    /// Per-phase timeouts.
    pub timeouts: LmtpTimeouts,
    /// Route lookups (the same cache as IMAP).
    pub routes: Arc<RouteCache>,
    /// User states (`cutover` defers).
    pub store: Arc<dyn StateStore>,
    /// Recent "not in cutover" answers of the store.
    pub states: StateCache,
    /// In-flight counters and the node-local cutover flag.
    pub deliveries: Arc<Deliveries>,
    /// `[directory] reject_unknown`: unknown recipients get 550 instead of the default route.
    pub reject_unknown: bool,
    /// Legacy backend's LMTP, if configured.
    pub legacy: Option<Arc<BackendPool>>,
    /// New backend's LMTP, if configured.
    pub new: Option<Arc<BackendPool>>,
    /// Server shutdown.
    pub shutdown: Shutdown,
}

impl LmtpContext {
    /// Builds the context from the configuration and the shared pieces.
    pub fn from_config(
        cfg: &Config,
        routes: Arc<RouteCache>,
        store: Arc<dyn StateStore>,
        deliveries: Arc<Deliveries>,
        shutdown: Shutdown,
    ) -> Self {
        let server = ServerLimits::from_config(&cfg.lmtp);
        let pool = |route: Route| {
            cfg.backends.get(route).lmtp.as_ref().map(|addr| {
                Arc::new(BackendPool::new(
                    route,
                    addr.clone(),
                    cfg.lmtp.hostname.clone(),
                    POOL_MAX_IDLE,
                    POOL_IDLE_TTL,
                ))
            })
        };
        LmtpContext {
            timeouts: LmtpTimeouts::from_limits(&cfg.limits),
            legacy: pool(Route::Legacy),
            new: pool(Route::New),
            server,
            routes,
            store,
            states: StateCache::new(STATE_CACHE_TTL),
            deliveries,
            reject_unknown: cfg.directory.reject_unknown,
            shutdown,
        }
    }

    /// The LMTP pool of `route`'s backend, if it has an LMTP address.
    pub fn pool(&self, route: Route) -> Option<&Arc<BackendPool>> {
        match route {
            Route::Legacy => self.legacy.as_ref(),
            Route::New => self.new.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Change, UserState};

    #[tokio::test]
    async fn state_cache_keeps_only_not_in_cutover() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(
            &format!("sqlite://{}", dir.path().join("s.db").display()),
            crate::store::Open::CreateIfMissing,
        )
        .await
        .unwrap();
        let cache = StateCache::new(Duration::from_secs(3600));
        store
            .change_state("a@x", &Change::forced(UserState::Syncing, "test"))
            .await
            .unwrap();
        assert!(!cache.is_cutover(&*store, "a@x").await.unwrap());
        // Within the TTL the store is not asked again (another node's cutover waits for it).
        store
            .change_state("a@x", &Change::forced(UserState::Cutover, "test"))
            .await
            .unwrap();
        assert!(!cache.is_cutover(&*store, "a@x").await.unwrap());
        // "In cutover" is never cached: its end is seen at once.
        store
            .change_state("b@x", &Change::forced(UserState::Cutover, "test"))
            .await
            .unwrap();
        assert!(cache.is_cutover(&*store, "b@x").await.unwrap());
        store
            .change_state("b@x", &Change::forced(UserState::New, "test"))
            .await
            .unwrap();
        assert!(!cache.is_cutover(&*store, "b@x").await.unwrap());
        // With no TTL every answer comes from the store.
        let fresh = StateCache::new(Duration::ZERO);
        assert!(fresh.is_cutover(&*store, "a@x").await.unwrap());
    }
}
