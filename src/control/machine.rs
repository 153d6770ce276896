//! A user's migration states and the transitions between them (DESIGN.md §2), in one place:
//! which states each step may start from, where it leads, and who may ask for it. Every
//! transition is written with its audit event in one store transaction that also checks the
//! state it starts from, so two operators, processes or nodes cannot both start one.

use std::fmt;

use crate::route::Route;
use crate::store::UserState;

/// Who asked for a change (the audit log's "who").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// `mailferry` on the command line (through the admin API).
    Cli,
    /// Another client of the admin API.
    Api,
    /// `wave cutover` / `wave migrate` of the named wave.
    Wave(String),
    /// `serve` on its own: the end of a sequence it runs, or start-up recovery.
    Server,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Cli => f.write_str("cli"),
            Actor::Api => f.write_str("api"),
            Actor::Wave(name) => write!(f, "wave:{name}"),
            Actor::Server => f.write_str("server"),
        }
    }
}

impl Actor {
    /// The actor named by the admin API's `X-Mailferry-Actor` header (`cli` from our CLI).
    pub fn from_header(value: Option<&str>) -> Actor {
        match value {
            Some("cli") => Actor::Cli,
            _ => Actor::Api,
        }
    }
}

/// The steps of a user's life; each names the states it may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `user migrate`: background sync starts.
    Migrate,
    /// The first step of a cutover: logins held, LMTP deferred.
    BeginCutover,
    /// The gate was clean and the route is `new`.
    FinishCutover,
    /// A cutover step failed; the route stayed `legacy`.
    FailCutover,
    /// The first step of a rollback.
    BeginRollback,
    /// The reverse delta is done and the route is `legacy`.
    FinishRollback,
    /// A rollback step failed; the route stayed `new`.
    FailRollback,
    /// `user route`: the operator's forced flip.
    Force(Route),
    /// `serve` found a sequence that a stopped server left unfinished.
    Recover(UserState),
}

/// States from which a user may start a cutover (the route must also be `legacy`).
const CUTOVER_FROM: &[UserState] = &[UserState::Legacy, UserState::Syncing, UserState::Failed];
/// States from which a user may be rolled back (the route must also be `new`).
const ROLLBACK_FROM: &[UserState] = &[UserState::New, UserState::Failed];
/// States a forced flip may start from: never in the middle of a sequence, which owns the
/// route until it ends.
const FORCE_FROM: &[UserState] = &[
    UserState::Legacy,
    UserState::Syncing,
    UserState::New,
    UserState::Failed,
];

impl Step {
    /// The states the step may start from.
    pub fn from(self) -> &'static [UserState] {
        match self {
            Step::Migrate => &[UserState::Legacy, UserState::Failed, UserState::Syncing],
            Step::BeginCutover => CUTOVER_FROM,
            Step::FinishCutover | Step::FailCutover => &[UserState::Cutover],
            Step::BeginRollback => ROLLBACK_FROM,
            Step::FinishRollback | Step::FailRollback => &[UserState::Rollback],
            Step::Force(_) => FORCE_FROM,
            Step::Recover(UserState::Cutover) => &[UserState::Cutover],
            Step::Recover(_) => &[UserState::Rollback],
        }
    }

    /// Where the step leads from `current` when the route is (or becomes) `route`.
    pub fn to(self, current: UserState, route: Route) -> UserState {
        match (self, route) {
            (Step::Migrate, _) => UserState::Syncing,
            (Step::BeginCutover, _) => UserState::Cutover,
            (Step::FinishCutover, _) => UserState::New,
            (Step::FailCutover | Step::FailRollback, _) => UserState::Failed,
            (Step::BeginRollback, _) => UserState::Rollback,
            (Step::FinishRollback, _) => UserState::Legacy,
            (Step::Force(Route::New), _) => UserState::New,
            // A syncing user forced to legacy keeps syncing: the route did not change.
            (Step::Force(Route::Legacy), _) if current == UserState::Syncing => current,
            (Step::Force(Route::Legacy), _) => UserState::Legacy,
            // Interrupted: the route says how far it got. It is written last, after the
            // gate (cutover) or the reverse delta (rollback), so it is never ahead of the copy.
            (Step::Recover(UserState::Cutover), Route::New) => UserState::New,
            (Step::Recover(_), Route::Legacy) if current == UserState::Rollback => {
                UserState::Legacy
            }
            (Step::Recover(_), _) => UserState::Failed,
        }
    }

    /// The route the step needs before it may start, if any.
    pub fn needs_route(self) -> Option<Route> {
        match self {
            Step::BeginCutover => Some(Route::Legacy),
            Step::BeginRollback => Some(Route::New),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cutover_and_a_rollback_go_round() {
        let s = UserState::Syncing;
        assert!(Step::BeginCutover.from().contains(&s));
        let s = Step::BeginCutover.to(s, Route::Legacy);
        assert_eq!(s, UserState::Cutover);
        assert!(!Step::Migrate.from().contains(&s), "no migrate mid-cutover");
        assert!(
            !Step::Force(Route::New).from().contains(&s),
            "no flip mid-cutover"
        );
        let s = Step::FinishCutover.to(s, Route::New);
        assert_eq!(s, UserState::New);
        assert!(!Step::BeginCutover.from().contains(&s));
        let s = Step::BeginRollback.to(s, Route::New);
        assert_eq!(s, UserState::Rollback);
        assert_eq!(Step::FinishRollback.to(s, Route::Legacy), UserState::Legacy);
        assert_eq!(Step::FailRollback.to(s, Route::New), UserState::Failed);
    }

    #[test]
    fn recovery_follows_the_route_written_last() {
        let rec = |s| Step::Recover(s);
        assert_eq!(
            rec(UserState::Cutover).to(UserState::Cutover, Route::New),
            UserState::New
        );
        assert_eq!(
            rec(UserState::Cutover).to(UserState::Cutover, Route::Legacy),
            UserState::Failed
        );
        assert_eq!(
            rec(UserState::Rollback).to(UserState::Rollback, Route::Legacy),
            UserState::Legacy
        );
        assert_eq!(
            rec(UserState::Rollback).to(UserState::Rollback, Route::New),
            UserState::Failed
        );
    }

    #[test]
    fn a_forced_flip_moves_the_state_with_the_route() {
        let f = |r, s| Step::Force(r).to(s, r);
        assert_eq!(f(Route::New, UserState::Syncing), UserState::New);
        assert_eq!(f(Route::Legacy, UserState::New), UserState::Legacy);
        assert_eq!(f(Route::Legacy, UserState::Syncing), UserState::Syncing);
        assert_eq!(f(Route::Legacy, UserState::Failed), UserState::Legacy);
    }
}
