//! State changes requested by operators: the only place that writes routes and states and
//! kicks sessions. `machine.rs` says which transitions exist, `cutover.rs` runs the cutover
//! and rollback sequences, `holds.rs` holds logins while they run.

pub mod cutover;
pub mod holds;
pub mod inflight;
pub mod machine;
pub mod sessions;
pub mod waves;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::CutoverConfig;
use crate::route::{DirectoryError, Route, RouteCache};
use crate::store::sync::SyncProgress;
use crate::store::{Change, StateStore, StoreError, UserState};
use crate::sync::gate::Evidence;
use crate::sync::scheduler::SyncQueue;
use crate::sync::Engine;
use machine::{Actor, Step};
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
    /// What was asked needs something this server does not have (the sync engine).
    #[error("{0}")]
    Unavailable(String),
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
    /// Seconds since the epoch of the last state change.
    pub updated_at: Option<i64>,
    /// The wave the user was imported into.
    pub wave: Option<String>,
    /// What the last cutover's verification gate compared and found.
    pub evidence: Option<Evidence>,
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
    /// Logins held while their user is being moved, shared with the IMAP proxy.
    holds: Arc<holds::Holds>,
    /// The sync scheduler's queue (absent when the sync engine is not configured).
    sync: Option<Arc<SyncQueue>>,
    /// The sync engine, for the final delta, the gate and the reverse delta.
    engine: Option<Arc<Engine>>,
    /// `[cutover]`.
    cutover: CutoverConfig,
    /// The last `wave cutover` of each wave run by this server.
    wave_jobs: dashmap::DashMap<String, Arc<std::sync::Mutex<waves::WaveJob>>>,
    /// Users a cutover or rollback of this node is moving (`cutover::Claim`).
    moving: Arc<dashmap::DashSet<String>>,
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
            holds: Arc::new(holds::Holds::default()),
            sync: None,
            engine: None,
            cutover: CutoverConfig::default(),
            wave_jobs: dashmap::DashMap::new(),
            moving: Arc::default(),
        }
    }

    /// Connects the sync scheduler, so `migrate` starts syncing at once.
    pub fn with_sync_queue(mut self, queue: Arc<SyncQueue>) -> Self {
        self.sync = Some(queue);
        self
    }

    /// Connects the sync engine, which cutovers and rollbacks need, and their settings.
    pub fn with_engine(mut self, engine: Option<Arc<Engine>>, cutover: CutoverConfig) -> Self {
        self.engine = engine;
        self.cutover = cutover;
        self
    }

    /// The LMTP in-flight registry and cutover flags (the LMTP proxy checks them per recipient).
    pub fn deliveries(&self) -> &Arc<inflight::Deliveries> {
        &self.deliveries
    }

    /// The logins held while users are moved (the IMAP proxy waits on them).
    pub fn holds(&self) -> &Arc<holds::Holds> {
        &self.holds
    }

    /// Applies `step` to `email`'s state with its audit event; the store checks the state it
    /// starts from. Returns the state now in force.
    async fn transition(
        &self,
        email: &str,
        step: Step,
        route: Route,
        note: Note<'_>,
    ) -> Result<UserState, ControlError> {
        let current = self.store.user_state(email).await?;
        let to = step.to(current, route);
        let actor = note.actor.to_string();
        let change = Change {
            from: Some(step.from()),
            to,
            last_error: note.error,
            actor: &actor,
            reason: note.reason,
            outcome: if note.error.is_some() { "failed" } else { "ok" },
        };
        match self.store.change_state(email, &change).await {
            Ok(()) => {
                tracing::info!(user = %email, from = %current, to = %to, actor = %actor, reason = note.reason, "state changed");
                // The scheduler syncs exactly the users in `syncing`: it looks again now.
                if let Some(q) = &self.sync {
                    q.wake();
                }
                Ok(to)
            }
            Err(StoreError::Conflict { found }) => Err(ControlError::Conflict(format!(
                "{email} is in state {found}; {} needs {}",
                note.what,
                names(step.from())
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// `user migrate`: puts `email` in `syncing` (from `legacy` or `failed`; idempotent), so the
    /// scheduler runs its initial and then incremental passes.
    pub async fn migrate(&self, email: &str, actor: &Actor) -> Result<StateChange, ControlError> {
        let email = self.routes.key(email);
        let route = self.routes.lookup(&email).await?.route;
        if route == Route::New {
            return Err(ControlError::Conflict(format!(
                "{email} is routed to new; migrate copies legacy to new"
            )));
        }
        if self.store.user_state(&email).await? != UserState::Syncing {
            let note = Note::new(actor, "migrate", "migration started");
            self.transition(&email, Step::Migrate, route, note).await?;
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

    /// Sets `email`'s migration state directly (operators and tests), audited. Entering
    /// `cutover` or `rollback` raises this node's flag before the store write, so LMTP defers
    /// at once; leaving it lowers the flag after the write, so no delivery sees neither.
    pub async fn set_state(
        &self,
        email: &str,
        state: UserState,
        actor: &Actor,
    ) -> Result<StateChange, ControlError> {
        let email = self.routes.key(email);
        if self.moving.contains(&email) {
            return Err(ControlError::Conflict(format!(
                "{email} is being moved (state cutover or rollback); wait for it to end"
            )));
        }
        let entering = state.is_moving();
        if entering {
            self.deliveries.set_cutover(&email, true);
        }
        let actor_name = actor.to_string();
        let change = Change {
            from: None,
            to: state,
            last_error: None,
            actor: &actor_name,
            reason: "state set by an operator",
            outcome: "ok",
        };
        let written = self.store.change_state(&email, &change).await;
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
        let email = self.routes.key(email);
        self.routes.invalidate(&email);
        let lookup = self.routes.lookup(&email).await?;
        let record = self.store.user(&email).await?;
        let evidence = self
            .store
            .evidence(&email)
            .await?
            .and_then(|j| serde_json::from_str(&j).ok());
        Ok(UserView {
            route: lookup.route,
            known: lookup.known,
            state: record.as_ref().map_or(UserState::Legacy, |r| r.state),
            updated_at: record.as_ref().map(|r| r.updated_at),
            wave: record.as_ref().and_then(|r| r.wave.clone()),
            last_error: record.and_then(|r| r.last_error),
            sessions: self.sessions.count(&email),
            sync: self.store.sync_progress(&email).await?,
            evidence,
            email,
        })
    }

    /// `email`'s audit log.
    pub async fn events(&self, email: &str) -> Result<Vec<crate::store::Event>, ControlError> {
        let email = self.routes.key(email);
        Ok(self.store.events(&email).await?)
    }

    /// `user route`: forces `email` onto `route` now (directory write, cache invalidation,
    /// kick), and the state follows (a user forced to new is `new`). Refused while a cutover
    /// or rollback runs: that sequence owns the route until it ends.
    pub async fn set_route(
        &self,
        email: &str,
        route: Route,
        actor: &Actor,
    ) -> Result<RouteChange, ControlError> {
        let email = self.routes.key(email);
        let current = self.store.user_state(&email).await?;
        if current.is_moving() {
            return Err(ControlError::Conflict(format!(
                "{email} is in state {current}; wait for it to end before forcing the route"
            )));
        }
        self.routes.set_route(&email, route).await?;
        let kicked = self.sessions.kick_user(&email, MOVED);
        let reason = format!("route forced to {route}");
        let note = Note::new(actor, "user route", &reason);
        self.transition(&email, Step::Force(route), route, note)
            .await?;
        tracing::info!(user = %email, %route, kicked, "route changed");
        Ok(RouteChange {
            email,
            route,
            kicked,
        })
    }

    /// A route change made in the directory by someone else (`Directory::watch`): the cache
    /// forgets the user's addresses, and their sessions on the other backend are kicked, as
    /// for `user route`. The state store is not touched: the directory is the authority for
    /// the route, and `user show` reports both.
    pub fn directory_changed(&self, change: &crate::route::ExternalChange) -> usize {
        let mut kicked = 0;
        for user in &change.users {
            self.routes.invalidate(user);
            kicked += self.sessions.kick_user_off(user, change.route, MOVED);
        }
        if kicked > 0 {
            tracing::info!(source = %change.source, route = %change.route, kicked, "route changed in the directory");
        }
        metrics::counter!("mailferry_directory_changes_total").increment(1);
        kicked
    }

    /// Finishes what a stopped server left in `cutover` or `rollback` (run before the
    /// listeners open): the route, written last, says how far it got.
    pub async fn recover(&self) -> Result<usize, ControlError> {
        let mut n = 0;
        for state in [UserState::Cutover, UserState::Rollback] {
            for email in self.store.users_in(state).await? {
                let route = self.routes.lookup(&email).await?.route;
                let what = format!("interrupted {state} (the server stopped); route is {route}");
                let error = (Step::Recover(state).to(state, route) == UserState::Failed)
                    .then(|| format!("{what}: run it again"));
                let note = Note {
                    actor: &Actor::Server,
                    what: "recovery",
                    reason: &what,
                    error: error.as_deref(),
                };
                self.transition(&email, Step::Recover(state), route, note)
                    .await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Why a transition is made, for its audit event and its refusal.
#[derive(Clone, Copy)]
struct Note<'a> {
    actor: &'a Actor,
    /// The request, as an operator names it (`user cutover`).
    what: &'a str,
    reason: &'a str,
    /// Set when the transition records a failure: becomes `last_error`.
    error: Option<&'a str>,
}

impl<'a> Note<'a> {
    fn new(actor: &'a Actor, what: &'a str, reason: &'a str) -> Self {
        Note {
            actor,
            what,
            reason,
            error: None,
        }
    }
}

/// `legacy, syncing or failed`.
fn names(states: &[UserState]) -> String {
    let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}
