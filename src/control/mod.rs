//! State changes requested by operators: the only place that writes routes and kicks sessions.

pub mod inflight;
pub mod sessions;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::route::{DirectoryError, Route, RouteCache};
use crate::store::sync::SyncProgress;
use crate::store::{StateStore, StoreError, UserState};
use crate::sync::scheduler::SyncQueue;
use sessions::SessionRegistry;

/// Failures of a control operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The directory refused or could not be reached.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The requested transition is not allowed from the user's current state.
    #[error("{0}")]
    Conflict(String),
}

/// What an operator sees of a user (the admin API writes it, the CLI reads it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    /// Normalized login.
    pub email: String,
    /// Current route.
    pub route: Route,
    /// Whether the directory knows the user (else `route` is the default).
    pub known: bool,
    /// Migration state.
    pub state: UserState,
    /// Why the last transition failed.
    pub last_error: Option<String>,
    /// Live proxied IMAP sessions on this node.
    pub sessions: usize,
    /// Sync progress: messages and bytes copied of total, folders, last pass, last error.
    pub sync: SyncProgress,
}

/// The result of a route change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteChange {
    /// Normalized login.
    pub email: String,
    /// The route now in force.
    pub route: Route,
    /// Sessions told to reconnect.
    pub kicked: usize,
}

/// The result of a state change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateChange {
    /// Normalized login.
    pub email: String,
    /// The state now in force.
    pub state: UserState,
    /// LMTP deliveries to the user still in progress on this node.
    pub in_flight: usize,
}

/// Performs operator actions against directory, store and live sessions.
pub struct Control {
    routes: Arc<RouteCache>,
    store: Arc<dyn StateStore>,
    sessions: Arc<SessionRegistry>,
    /// LMTP deliveries in flight and the node-local cutover flag, shared with the LMTP proxy.
    deliveries: Arc<inflight::Deliveries>,
    /// The sync scheduler's queue (absent when the sync engine is not configured).
    sync: Option<Arc<SyncQueue>>,
}

/// Reason sent in the BYE of a kicked session.
pub const MOVED: &str = "Mailbox moved, please reconnect.";

impl Control {
    /// Wires the pieces a control action touches.
    pub fn new(
        routes: Arc<RouteCache>,
        store: Arc<dyn StateStore>,
        sessions: Arc<SessionRegistry>,
    ) -> Self {
        Control {
            routes,
            store,
            sessions,
            deliveries: Arc::new(inflight::Deliveries::default()),
            sync: None,
        }
    }

    /// Connects the sync scheduler, so `migrate` starts syncing at once.
    pub fn with_sync_queue(mut self, queue: Arc<SyncQueue>) -> Self {
        self.sync = Some(queue);
        self
    }

    /// `user migrate`: puts `email` in `syncing` (from `legacy` or `failed`; idempotent), so the
    /// scheduler runs its initial and then incremental passes.
    pub async fn migrate(&self, email: &str) -> Result<StateChange, ControlError> {
        let email = crate::route::normalize_user(email);
        let current = self.store.user_state(&email).await?;
        match current {
            UserState::Legacy | UserState::Failed => {
                self.store
                    .set_user_state(&email, UserState::Syncing, None)
                    .await?;
                tracing::info!(user = %email, from = %current, "migration started: syncing");
            }
            UserState::Syncing => {}
            other => {
                return Err(ControlError::Conflict(format!(
                    "{email} is in state {other}; migrate needs legacy or failed"
                )))
            }
        }
        if let Some(q) = &self.sync {
            q.wake();
        }
        Ok(StateChange {
            in_flight: self.deliveries.in_flight(&email),
            email,
            state: UserState::Syncing,
        })
    }

    /// The LMTP in-flight registry and cutover flags (the LMTP proxy checks them per recipient).
    pub fn deliveries(&self) -> &Arc<inflight::Deliveries> {
        &self.deliveries
    }

    /// Sets `email`'s migration state. Entering `cutover` raises this node's flag before the
    /// store write, so LMTP defers at once; leaving it lowers the flag after the write, so no
    /// delivery sees neither. Other nodes see the store state.
    pub async fn set_state(
        &self,
        email: &str,
        state: UserState,
    ) -> Result<StateChange, ControlError> {
        let email = crate::route::normalize_user(email);
        let entering = state == UserState::Cutover;
        if entering {
            self.deliveries.set_cutover(&email, true);
        }
        let written = self.store.set_user_state(&email, state, None).await;
        if let Err(e) = written {
            if entering {
                self.deliveries.set_cutover(&email, false);
            }
            return Err(e.into());
        }
        if !entering {
            self.deliveries.set_cutover(&email, false);
        }
        tracing::info!(user = %email, %state, "state set");
        Ok(StateChange {
            in_flight: self.deliveries.in_flight(&email),
            email,
            state,
        })
    }

    /// Current view of `email`, read from the directory (not the cache).
    pub async fn show(&self, email: &str) -> Result<UserView, ControlError> {
        let email = crate::route::normalize_user(email);
        self.routes.invalidate(&email);
        let lookup = self.routes.lookup(&email).await?;
        let record = self.store.user(&email).await?;
        Ok(UserView {
            route: lookup.route,
            known: lookup.known,
            state: record.as_ref().map_or(UserState::Legacy, |r| r.state),
            last_error: record.and_then(|r| r.last_error),
            sessions: self.sessions.count(&email),
            sync: self.store.sync_progress(&email).await?,
            email,
        })
    }

    /// Forces `email` onto `route` now: directory write, cache invalidation, kick.
    pub async fn set_route(&self, email: &str, route: Route) -> Result<RouteChange, ControlError> {
        let email = crate::route::normalize_user(email);
        self.routes.set_route(&email, route).await?;
        let kicked = self.sessions.kick_user(&email, MOVED);
        tracing::info!(user = %email, %route, kicked, "route changed");
        Ok(RouteChange {
            email,
            route,
            kicked,
        })
    }
}
