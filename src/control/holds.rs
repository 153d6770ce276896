//! Logins held while their user is being moved (DESIGN.md §2): a cutover or rollback holds
//! the user's new logins until it ends, then lets them go on to whichever route is current.
//! A login waits at most `hold_secs`; one still held then is refused `NO [UNAVAILABLE]`.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;

/// Users whose logins are held on this node.
#[derive(Default)]
pub struct Holds {
    /// The sender's drop (the hold's end) wakes every waiting login.
    users: DashMap<String, watch::Sender<()>>,
}

/// A hold; dropping it releases the user's waiting logins (also when the sequence fails or
/// its task is cancelled).
pub struct Hold {
    holds: Arc<Holds>,
    user: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.holds.users.remove(&self.user);
    }
}

/// What became of a login that looked for a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The user was not held.
    NotHeld,
    /// The user was held and is no more: the route may have changed.
    Released,
    /// The user is still held after the longest wait.
    StillHeld,
}

impl Holds {
    /// Holds `user`'s logins until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, user: &str) -> Hold {
        self.users
            .entry(user.to_owned())
            .or_insert_with(|| watch::channel(()).0);
        Hold {
            holds: self.clone(),
            user: user.to_owned(),
        }
    }

    /// Whether `user`'s logins are held.
    pub fn is_held(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Number of users held.
    pub fn held(&self) -> usize {
        self.users.len()
    }

    /// Waits, at most `longest`, until `user` is not held.
    pub async fn wait(&self, user: &str, longest: Duration) -> Waited {
        let Some(mut rx) = self.users.get(user).map(|tx| tx.subscribe()) else {
            return Waited::NotHeld;
        };
        metrics::gauge!("mailferry_held_logins").increment(1.0);
        // `changed` fails once the sender is gone: the hold ended.
        let ended = tokio::time::timeout(longest, async { while rx.changed().await.is_ok() {} })
            .await
            .is_ok();
        metrics::gauge!("mailferry_held_logins").decrement(1.0);
        if ended {
            Waited::Released
        } else {
            Waited::StillHeld
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_login_goes_on_when_the_hold_ends() {
        let holds = Arc::new(Holds::default());
        assert_eq!(
            holds.wait("a@x", Duration::from_secs(5)).await,
            Waited::NotHeld
        );
        let hold = holds.hold("a@x");
        let waiting = {
            let holds = holds.clone();
            tokio::spawn(async move { holds.wait("a@x", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(hold);
        assert_eq!(waiting.await.unwrap(), Waited::Released);
        assert!(!holds.is_held("a@x"));
    }

    #[tokio::test]
    async fn a_login_held_too_long_is_told_so() {
        let holds = Arc::new(Holds::default());
        let _hold = holds.hold("a@x");
        assert_eq!(
            holds.wait("a@x", Duration::from_millis(20)).await,
            Waited::StillHeld
        );
    }
}
