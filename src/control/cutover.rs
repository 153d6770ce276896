//! The cutover and rollback sequences of one user (DESIGN.md §2), in the order that loses
//! nothing:
//!
//! 1. state `cutover`: LMTP defers the user (`451 4.2.0`), new logins are held;
//! 2. wait for the user's LMTP deliveries in flight to the old backend;
//! 3. kick the user's IMAP sessions (between responses);
//! 4. the final delta sync (a rollback: the reverse delta new → legacy);
//! 5. the verification gate, its evidence kept with the user (cutover only);
//! 6. route, then state; held logins go on to the new route.
//!
//! A failure in 2–5 leaves the route where it was and the state `failed` with the reason.
//! The route is written last, so a server killed at any point is finished by
//! `Control::recover` from the route alone: never routed to new with an incomplete copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::holds::Hold;
use super::machine::{Actor, Step};
use super::{Control, ControlError, Note, StateChange, MOVED};
use crate::route::Route;
use crate::store::UserState;
use crate::sync::gate::Evidence;
use crate::sync::{Engine, SyncError};

/// Which way a user is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Legacy → new.
    Cutover,
    /// New → legacy.
    Rollback,
}

impl Direction {
    fn begin(self) -> Step {
        match self {
            Direction::Cutover => Step::BeginCutover,
            Direction::Rollback => Step::BeginRollback,
        }
    }
    fn finish(self) -> Step {
        match self {
            Direction::Cutover => Step::FinishCutover,
            Direction::Rollback => Step::FinishRollback,
        }
    }
    fn fail(self) -> Step {
        match self {
            Direction::Cutover => Step::FailCutover,
            Direction::Rollback => Step::FailRollback,
        }
    }
    /// The route the user leaves.
    fn from(self) -> Route {
        match self {
            Direction::Cutover => Route::Legacy,
            Direction::Rollback => Route::New,
        }
    }
    /// The route the user ends on.
    fn to(self) -> Route {
        match self {
            Direction::Cutover => Route::New,
            Direction::Rollback => Route::Legacy,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Direction::Cutover => "user cutover",
            Direction::Rollback => "user rollback",
        }
    }
}

/// A sequence that has begun: the user is `cutover`/`rollback`, LMTP deferred, logins held.
pub struct Begun {
    email: String,
    direction: Direction,
    actor: Actor,
    /// Released when the sequence ends, whichever way.
    _hold: Hold,
    /// This node's record that the sequence runs; dropped last.
    _claim: Claim,
    started: Instant,
}

/// A user being moved by this node; at most one sequence per user holds one.
struct Claim {
    moving: Arc<dashmap::DashSet<String>>,
    email: String,
}

impl Claim {
    fn take(control: &Control, email: &str) -> Option<Claim> {
        control.moving.insert(email.to_owned()).then(|| Claim {
            moving: control.moving.clone(),
            email: email.to_owned(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.moving.remove(&self.email);
    }
}

/// Why a step of a sequence failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("{0} LMTP deliveries still in flight after {1} s")]
    Draining(usize, u64),
    #[error("final delta sync: {0}")]
    Delta(SyncError),
    #[error("reverse delta sync: {0}")]
    Reverse(SyncError),
    #[error("final delta sync did not finish within {0} s")]
    DeltaTimeout(u64),
    #[error("verification gate: {0}")]
    GateError(SyncError),
    #[error("verification gate found {} difference(s): {}", .0.differences.len(), .0.differences.first().map_or("", String::as_str))]
    Gate(Box<Evidence>),
    #[error("route change: {0}")]
    Route(crate::route::DirectoryError),
    #[error("state store: {0}")]
    Store(crate::store::StoreError),
}

/// How often a final delta that found another pass holding the user's lease looks again.
const LEASE_POLL: Duration = Duration::from_millis(200);

impl Control {
    /// `user cutover` / `user rollback`: step 1 now, the rest in the background; the
    /// returned state is the one step 1 wrote.
    pub async fn start(
        self: &Arc<Self>,
        email: &str,
        direction: Direction,
        actor: Actor,
    ) -> Result<StateChange, ControlError> {
        let begun = self.begin(email, direction, actor).await?;
        let change = StateChange {
            email: begun.email.clone(),
            state: direction.begin().to(UserState::Legacy, direction.from()),
            in_flight: self.deliveries.in_flight(&begun.email),
        };
        let me = self.clone();
        tokio::spawn(async move { me.run(begun).await });
        Ok(change)
    }

    /// Runs a whole sequence and returns the state it ended in (`wave cutover`).
    pub async fn move_user(
        self: &Arc<Self>,
        email: &str,
        direction: Direction,
        actor: Actor,
    ) -> Result<UserState, ControlError> {
        let begun = self.begin(email, direction, actor).await?;
        Ok(self.run(begun).await)
    }

    /// Step 1: defer LMTP, hold logins, then the state (checked against concurrent requests).
    async fn begin(
        &self,
        email: &str,
        direction: Direction,
        actor: Actor,
    ) -> Result<Begun, ControlError> {
        let email = self.routes.key(email);
        if self.engine.is_none() {
            return Err(ControlError::Unavailable(format!(
                "{} needs the sync engine: master users (or captured passwords) on both backends",
                direction.name()
            )));
        }
        self.routes.invalidate(&email);
        let route = self.routes.lookup(&email).await?.route;
        if route != direction.from() {
            return Err(ControlError::Conflict(format!(
                "{email} is routed to {route}; {} needs {}",
                direction.name(),
                direction.from()
            )));
        }
        // Only the sequence that owns the user's flag and hold may lower them: a second request
        // while one runs is refused before it touches either.
        let Some(claim) = Claim::take(self, &email) else {
            return Err(ControlError::Conflict(format!(
                "{email} is being moved already (state cutover or rollback); wait for it to end"
            )));
        };
        // Before the state: a delivery or login that looks between the two must already wait.
        self.deliveries.set_cutover(&email, true);
        let hold = self.holds.hold(&email);
        let reason = format!("{} requested", direction.name());
        let note = Note::new(&actor, direction.name(), &reason);
        if let Err(e) = self
            .transition(&email, direction.begin(), route, note)
            .await
        {
            self.deliveries.set_cutover(&email, false);
            return Err(e);
        }
        Ok(Begun {
            email,
            direction,
            actor,
            _hold: hold,
            _claim: claim,
            started: Instant::now(),
        })
    }

    /// Steps 2–6, or the failure; returns the state the user ends in.
    async fn run(&self, begun: Begun) -> UserState {
        let outcome = self.steps(&begun).await;
        let ended = match outcome {
            Ok(reason) => self.finish(&begun, &reason).await,
            Err(e) => Err(e),
        };
        let state = match ended {
            Ok(()) => begun
                .direction
                .finish()
                .to(UserState::Cutover, begun.direction.to()),
            Err(e) => self.fail(&begun, &e).await,
        };
        self.deliveries.set_cutover(&begun.email, false);
        let secs = begun.started.elapsed().as_secs_f64();
        let outcome = if state == UserState::Failed {
            "failed"
        } else {
            "ok"
        };
        let kind = match begun.direction {
            Direction::Cutover => "cutover",
            Direction::Rollback => "rollback",
        };
        metrics::counter!("mailferry_cutovers_total", "kind" => kind, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("mailferry_cutover_seconds", "kind" => kind).record(secs);
        info!(user = %begun.email, kind, outcome, ms = (secs * 1000.0) as u64, "sequence ended");
        state
        // `begun` drops here: held logins go on, to the route now in force.
    }

    /// Steps 2–5; returns the reason written with the final transition.
    async fn steps(&self, begun: &Begun) -> Result<String, StepError> {
        let email = &begun.email;
        let drain = self.cutover.drain_secs;
        let idle = self.deliveries.wait_idle(email);
        if tokio::time::timeout(Duration::from_secs(drain), idle)
            .await
            .is_err()
        {
            return Err(StepError::Draining(self.deliveries.in_flight(email), drain));
        }
        let kicked = self.sessions.kick_user(email, MOVED);
        let Some(engine) = self.engine.as_deref() else {
            return Err(StepError::Delta(SyncError::Config("no sync engine".into())));
        };
        let secs = self.cutover.delta_secs;
        let delta = async {
            match begun.direction {
                Direction::Cutover => self.final_delta(engine, email).await,
                Direction::Rollback => reverse_delta(engine, email).await,
            }
        };
        match tokio::time::timeout(Duration::from_secs(secs), delta).await {
            Ok(Ok(done)) => Ok(format!("{kicked} session(s) kicked; {done}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StepError::DeltaTimeout(secs)),
        }
    }

    /// Step 4 and 5 of a cutover: the last pass (waiting for one already running to end),
    /// then the gate, whose evidence is kept whatever it found.
    async fn final_delta(&self, engine: &Engine, email: &str) -> Result<String, StepError> {
        let report = loop {
            match crate::sync::pass_with_retry(engine, email, None, false, 3).await {
                Err(SyncError::PassInProgress { .. }) => tokio::time::sleep(LEASE_POLL).await,
                Err(e) => return Err(StepError::Delta(e)),
                Ok(r) => break r,
            }
        };
        let evidence = engine
            .gate(email, self.cutover.verify)
            .await
            .map_err(StepError::GateError)?;
        let json = serde_json::to_string(&evidence).unwrap_or_default();
        self.store
            .put_evidence(email, evidence.clean(), &json)
            .await
            .map_err(StepError::Store)?;
        if !evidence.clean() {
            return Err(StepError::Gate(Box::new(evidence)));
        }
        Ok(format!(
            "final delta: {} appended; gate ({}) clean: {} folders, {} messages on each side",
            report.appended,
            evidence.mode,
            evidence.folders.len(),
            evidence.legacy_messages
        ))
    }

    /// Step 6: the route, then the state.
    async fn finish(&self, begun: &Begun, reason: &str) -> Result<(), StepError> {
        let to = begun.direction.to();
        self.routes
            .set_route(&begun.email, to)
            .await
            .map_err(StepError::Route)?;
        let note = Note::new(&begun.actor, begun.direction.name(), reason);
        let step = begun.direction.finish();
        if let Err(e) = self.transition(&begun.email, step, to, note).await {
            // The route is in force; the state follows it at the next start (`recover`).
            warn!(user = %begun.email, error = %e, "state not written after the route change");
        }
        Ok(())
    }

    /// A step failed: the route stays, the state says why.
    async fn fail(&self, begun: &Begun, e: &StepError) -> UserState {
        let error = e.to_string();
        warn!(user = %begun.email, error = %error, "{} failed", begun.direction.name());
        let note = Note {
            actor: &begun.actor,
            what: begun.direction.name(),
            reason: &error,
            error: Some(&error),
        };
        let step = begun.direction.fail();
        let route = begun.direction.from();
        match self.transition(&begun.email, step, route, note).await {
            Ok(s) => s,
            Err(e) => {
                warn!(user = %begun.email, error = %e, "failure not recorded; the next start will");
                UserState::Failed
            }
        }
    }
}

/// Step 4 of a rollback: what happened on new since the cutover goes back to legacy.
async fn reverse_delta(engine: &Engine, email: &str) -> Result<String, StepError> {
    loop {
        match engine.reverse_pass(email).await {
            Err(SyncError::PassInProgress { .. }) => tokio::time::sleep(LEASE_POLL).await,
            Err(e) => return Err(StepError::Reverse(e)),
            Ok(r) => return Ok(format!("reverse delta: {r}")),
        }
    }
}
