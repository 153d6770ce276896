//! Registry of live proxied sessions per user, so a route change can kick them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tokio::sync::Notify;

/// The signal one session waits on; set once, with the reason sent in the BYE.
#[derive(Default)]
pub struct Kick {
    notify: Notify,
    reason: OnceLock<String>,
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

    /// Number of live sessions of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, |s| s.len())
    }

    /// Number of live sessions in all.
    pub fn total(&self) -> usize {
        self.by_user.iter().map(|e| e.value().len()).sum()
    }
}
