//! Users' own passwords captured at proxy login, for syncing without master users.
//!
//! Off unless `[sync] capture_credentials = true`. Memory only: never written to the state
//! store, the log or the admin API, forgotten after `credentials_ttl_secs` or as soon as a
//! backend rejects them, and bounded in number so a flood of logins cannot grow it.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::secret::Secret;

/// Most passwords held at once; a login beyond it is not captured (the user's next pass waits
/// for a later login or a master user) rather than evicting someone mid-migration.
pub const MAX_CAPTURED: usize = 100_000;

/// Captured passwords by user (lower-cased login).
pub struct Captured {
    enabled: bool,
    ttl: Duration,
    max: usize,
    map: DashMap<String, (Secret<Vec<u8>>, Instant)>,
}

impl Captured {
    /// A cache that captures only when `enabled`, keeping each password for `ttl`.
    pub fn new(enabled: bool, ttl: Duration) -> Captured {
        Captured {
            enabled,
            ttl,
            max: MAX_CAPTURED,
            map: DashMap::new(),
        }
    }

    /// Whether logins are captured at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Remembers the password `user` just logged in with (a backend accepted it).
    pub fn put(&self, user: &str, password: &[u8]) {
        if !self.enabled {
            return;
        }
        let key = user.to_ascii_lowercase();
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            let now = Instant::now();
            self.map
                .retain(|_, (_, at)| now.duration_since(*at) < self.ttl);
            if self.map.len() >= self.max {
                return;
            }
        }
        self.map
            .insert(key, (Secret::new(password.to_vec()), Instant::now()));
    }

    /// The password captured for `user`, if still fresh.
    pub fn get(&self, user: &str) -> Option<Secret<Vec<u8>>> {
        let key = user.to_ascii_lowercase();
        let fresh = {
            let entry = self.map.get(&key)?;
            (entry.1.elapsed() < self.ttl).then(|| entry.0.clone())
        };
        if fresh.is_none() {
            self.map.remove(&key);
        }
        fresh
    }

    /// Drops what was captured for `user` (a backend refused it: the password changed).
    pub fn forget(&self, user: &str) {
        self.map.remove(&user.to_ascii_lowercase());
    }

    /// How many passwords are held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_captures_nothing() {
        let c = Captured::new(false, Duration::from_secs(60));
        c.put("a@x", b"pw");
        assert!(c.get("a@x").is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn captured_until_forgotten_or_expired() {
        let c = Captured::new(true, Duration::from_secs(60));
        c.put("Alice@X", b"pw");
        assert_eq!(
            c.get("alice@x").map(|s| s.expose().clone()),
            Some(b"pw".to_vec())
        );
        c.forget("ALICE@x");
        assert!(c.get("alice@x").is_none());
        let c = Captured::new(true, Duration::ZERO);
        c.put("a@x", b"pw");
        assert!(c.get("a@x").is_none());
        assert!(c.is_empty(), "an expired entry is dropped when read");
    }

    #[test]
    fn bounded() {
        let mut c = Captured::new(true, Duration::from_secs(60));
        c.max = 2;
        c.put("a@x", b"1");
        c.put("b@x", b"2");
        c.put("c@x", b"3");
        assert_eq!(c.len(), 2);
        assert!(c.get("c@x").is_none());
        // Refreshing someone already held is always allowed.
        c.put("a@x", b"new");
        assert_eq!(
            c.get("a@x").map(|s| s.expose().clone()),
            Some(b"new".to_vec())
        );
    }
}
