//! Per-user in-flight LMTP deliveries and the node-local cutover flag (DESIGN.md §2, steps 1
//! and 2).
//!
//! The cutover sequence sets the flag, then waits for the count to reach zero. The LMTP path
//! takes a delivery slot (`begin`) before it forwards a message to a backend, and `begin`
//! checks the flag and counts under the same lock. So either a delivery started before the
//! flag was set, and the cutover waits for it, or it sees the flag and defers with 4xx; no
//! delivery to the old backend can slip in after the wait has returned.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::Notify;

/// What is tracked for one user; the entry exists while anything about the user is non-zero.
#[derive(Default)]
struct Entry {
    /// Deliveries forwarded to a backend and not yet answered.
    in_flight: usize,
    /// The user is being cut over: new deliveries must be deferred.
    cutover: bool,
    /// Tasks in `wait_idle`; keeps the entry (and its `idle` signal) alive for them.
    waiters: usize,
    /// Woken whenever `in_flight` drops to zero.
    idle: Arc<Notify>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.in_flight == 0 && !self.cutover && self.waiters == 0
    }
}

/// The registry, shared by the LMTP sessions and control.
#[derive(Default)]
pub struct Deliveries {
    users: DashMap<String, Entry>,
}

/// One delivery slot; dropping it ends the delivery (also on error or cancellation).
pub struct InFlight {
    deliveries: Arc<Deliveries>,
    user: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.deliveries.users.entry(self.user.clone()) {
            let entry = e.get_mut();
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if entry.in_flight == 0 {
                entry.idle.notify_waiters();
            }
            if entry.is_empty() {
                e.remove();
            }
        }
    }
}

impl InFlight {
    /// The (normalized) user this slot is for.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl Deliveries {
    /// Starts a delivery for `user` (normalized), unless the user is being cut over.
    pub fn begin(self: &Arc<Self>, user: &str) -> Option<InFlight> {
        let mut entry = self.users.entry(user.to_owned()).or_default();
        if entry.cutover {
            return None;
        }
        entry.in_flight += 1;
        Some(InFlight {
            deliveries: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Sets or clears the cutover flag of `user`; takes effect for the next `begin`.
    pub fn set_cutover(&self, user: &str, on: bool) {
        if on {
            self.users.entry(user.to_owned()).or_default().cutover = true;
        } else if let dashmap::Entry::Occupied(mut e) = self.users.entry(user.to_owned()) {
            e.get_mut().cutover = false;
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    /// Whether `user` is flagged as being cut over on this node.
    pub fn is_cutover(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|e| e.cutover)
    }

    /// Deliveries of `user` in progress.
    pub fn in_flight(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |e| e.in_flight)
    }

    /// Completes once `user` has no delivery in progress. Call after `set_cutover(user, true)`,
    /// or new deliveries may keep the count above zero. Put a timeout around it.
    pub async fn wait_idle(&self, user: &str) {
        let idle = {
            let mut entry = self.users.entry(user.to_owned()).or_default();
            entry.waiters += 1;
            entry.idle.clone()
        };
        // Unregisters this waiter however the wait ends (also when the future is dropped).
        struct Waiter<'a>(&'a Deliveries, &'a str);
        impl Drop for Waiter<'_> {
            fn drop(&mut self) {
                if let dashmap::Entry::Occupied(mut e) = self.0.users.entry(self.1.to_owned()) {
                    e.get_mut().waiters -= 1;
                    if e.get().is_empty() {
                        e.remove();
                    }
                }
            }
        }
        let _waiter = Waiter(self, user);
        loop {
            let notified = idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a drop to zero in between is not missed.
            notified.as_mut().enable();
            if self.in_flight(user) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn cutover_defers_new_deliveries_and_waits_for_running_ones() {
        let d = Arc::new(Deliveries::default());
        let running = d.begin("alice").expect("not cut over yet");
        assert_eq!(d.in_flight("alice"), 1);
        d.set_cutover("alice", true);
        assert!(d.begin("alice").is_none(), "deferred once flagged");
        assert!(d.begin("bob").is_some(), "other users unaffected");

        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.wait_idle("alice").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(running);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait_idle returns once the delivery ended")
            .unwrap();

        d.set_cutover("alice", false);
        assert!(!d.is_cutover("alice"));
        let again = d.begin("alice");
        assert!(again.is_some());
        drop(again);
        assert!(
            d.users.is_empty(),
            "entries are dropped when nothing is left"
        );
    }

    #[tokio::test]
    async fn wait_idle_returns_at_once_without_deliveries() {
        let d = Arc::new(Deliveries::default());
        tokio::time::timeout(Duration::from_secs(5), d.wait_idle("carol"))
            .await
            .unwrap();
        assert!(d.users.is_empty());
    }
}
