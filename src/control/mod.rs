//! State changes requested by operators: the only place that writes routes and kicks sessions.

pub mod sessions;

use std::sync::Arc;

use serde::Serialize;

use crate::route::{DirectoryError, Route, RouteCache};
use crate::store::{Store, StoreError, UserState};
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
}

/// What an operator sees of a user.
#[derive(Debug, Clone, Serialize)]
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
}

/// The result of a route change.
#[derive(Debug, Clone, Serialize)]
pub struct RouteChange {
    /// Normalized login.
    pub email: String,
    /// The route now in force.
    pub route: Route,
    /// Sessions told to reconnect.
    pub kicked: usize,
}

/// Performs operator actions against directory, store and live sessions.
pub struct Control {
    routes: Arc<RouteCache>,
    store: Store,
    sessions: Arc<SessionRegistry>,
}

/// Reason sent in the BYE of a kicked session.
pub const MOVED: &str = "Mailbox moved, please reconnect.";

impl Control {
    /// Wires the pieces a control action touches.
    pub fn new(routes: Arc<RouteCache>, store: Store, sessions: Arc<SessionRegistry>) -> Self {
        Control {
            routes,
            store,
            sessions,
        }
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
