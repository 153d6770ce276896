//! Registry of live proxied sessions per user, so a route change can kick them.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::route::Route;

/// The signal one session waits on; set once, with the reason sent in the BYE.
#[derive(Default)]
pub struct Kick {
    notify: Notify,
    reason: OnceLock<String>,
    /// The backend the session was routed to (0: not routed yet), so that a route change
    /// noticed in the directory kicks only the sessions on the other backend.
    route: AtomicU8,
}

impl Kick {
    /// Completes when the session has been kicked; returns the reason.
    pub async fn kicked(&self) -> &str {
        loop {
            let notified = self.notify.notified();
            if let Some(r) = self.reason.get() {
                return r;
            }
            notified.await;
        }
    }

    /// Whether a kick was already requested.
    pub fn is_kicked(&self) -> bool {
        self.reason.get().is_some()
    }

    /// Records the backend the session was routed to.
    pub fn routed(&self, route: Route) {
        let v = match route {
            Route::Legacy => 1,
            Route::New => 2,
        };
        self.route.store(v, Ordering::Relaxed);
    }

    /// Whether the session was routed to `route`.
    fn is_on(&self, route: Route) -> bool {
        let v = self.route.load(Ordering::Relaxed);
        matches!((v, route), (1, Route::Legacy) | (2, Route::New))
    }

    fn fire(&self, reason: &str) {
        let _ = self.reason.set(reason.to_owned());
        self.notify.notify_waiters();
    }
}

/// Live sessions, keyed by normalized user.
#[derive(Default)]
pub struct SessionRegistry {
    by_user: DashMap<String, Vec<(u64, Arc<Kick>)>>,
    next_id: AtomicU64,
}

/// Keeps a session registered; unregisters on drop.
pub struct Registration {
    registry: Arc<SessionRegistry>,
    user: String,
    id: u64,
    /// The session's kick signal.
    pub kick: Arc<Kick>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.registry.by_user.entry(self.user.clone()) {
            e.get_mut().retain(|(id, _)| *id != self.id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }
}

impl SessionRegistry {
    /// Registers a session of `user`.
    pub fn register(self: &Arc<Self>, user: &str) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Kick::default());
        self.by_user
            .entry(user.to_owned())
            .or_default()
            .push((id, kick.clone()));
        Registration {
            registry: self.clone(),
            user: user.to_owned(),
            id,
            kick,
        }
    }

    /// Kicks every session of `user`; returns how many.
    pub fn kick_user(&self, user: &str, reason: &str) -> usize {
        self.by_user.get(user).map_or(0, |sessions| {
            for (_, k) in sessions.iter() {
                k.fire(reason);
            }
            sessions.len()
        })
    }

    /// Kicks the sessions of `user` not routed to `route` (those still logging in too: they
    /// route again); returns how many.
    pub fn kick_user_off(&self, user: &str, route: Route, reason: &str) -> usize {
        self.by_user.get(user).map_or(0, |sessions| {
            let mut n = 0;
            for (_, k) in sessions.iter().filter(|(_, k)| !k.is_on(route)) {
                k.fire(reason);
                n += 1;
            }
            n
        })
    }

    /// Number of live sessions of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, |s| s.len())
    }

    /// Number of live sessions in all.
    pub fn total(&self) -> usize {
        self.by_user.iter().map(|e| e.value().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_change_kicks_only_the_sessions_on_the_other_backend() {
        let registry = Arc::new(SessionRegistry::default());
        let on_legacy = registry.register("a@x");
        on_legacy.kick.routed(Route::Legacy);
        let on_new = registry.register("a@x");
        on_new.kick.routed(Route::New);
        let logging_in = registry.register("a@x");
        assert_eq!(registry.kick_user_off("a@x", Route::New, "moved"), 2);
        assert!(on_legacy.kick.is_kicked() && logging_in.kick.is_kicked());
        assert!(!on_new.kick.is_kicked());
        assert_eq!(registry.kick_user_off("b@x", Route::New, "moved"), 0);
    }
}
