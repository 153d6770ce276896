//! Route lookups with a short TTL in front of the directory, invalidated on every change we make.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::{Directory, DirectoryError, Identity, Route};

/// The answer a lookup gives a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// Where to send the user.
    pub route: Route,
    /// Whether the directory knows the user (false: `route` is the default route).
    pub known: bool,
}

/// Caches `Directory::route` answers (including "unknown") for `ttl`.
pub struct RouteCache {
    directory: Arc<dyn Directory>,
    default_route: Route,
    ttl: Duration,
    entries: DashMap<String, (Option<Route>, Instant)>,
    /// Bumped by every change and invalidation, before the entry is dropped. A lookup caches
    /// what it read only if this did not move during its read: otherwise a read answered
    /// before a route change could be cached after the change dropped the entry, and send the
    /// user to the old backend for a whole TTL.
    generation: AtomicU64,
    /// How logins and recipients become the keys of `entries`.
    identity: Identity,
}

impl RouteCache {
    /// Wraps a directory.
    pub fn new(directory: Arc<dyn Directory>, default_route: Route, ttl: Duration) -> Self {
        RouteCache {
            directory,
            default_route,
            ttl,
            entries: DashMap::new(),
            generation: AtomicU64::new(0),
            identity: Identity::default(),
        }
    }

    /// Keys users by `identity` (`[directory] default_domain`, `recipient_delimiter`).
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// The user key of a login or recipient: what lookups, sessions, counters, the sync
    /// engine and the store use.
    pub fn key(&self, login: &str) -> String {
        self.identity.key(login)
    }

    /// The directory behind the cache (for writes and health checks).
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.directory
    }

    /// The route of `user` (already normalized), from cache when fresh.
    pub async fn lookup(&self, user: &str) -> Result<Lookup, DirectoryError> {
        if let Some(entry) = self.entries.get(user) {
            let (route, at) = *entry;
            if at.elapsed() < self.ttl {
                return Ok(self.answer(route));
            }
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let route = self.directory.route(user).await?;
        // Checked under the entry's lock: an invalidation bumps the generation before it
        // takes that lock to remove the entry, so either it removes what is inserted here, or
        // this sees its bump and inserts nothing.
        let entry = self.entries.entry(user.to_owned());
        if self.generation.load(Ordering::SeqCst) == generation {
            entry.insert((route, Instant::now()));
        }
        Ok(self.answer(route))
    }

    fn answer(&self, route: Option<Route>) -> Lookup {
        Lookup {
            route: route.unwrap_or(self.default_route),
            known: route.is_some(),
        }
    }

    /// Writes a route through to the directory and drops the cached entry.
    pub async fn set_route(&self, user: &str, route: Route) -> Result<(), DirectoryError> {
        // Invalidated before and after: lookups during the write go to the directory, and
        // none that read it before the write caches what it read.
        self.invalidate(user);
        let result = self.directory.set_route(user, route).await;
        self.invalidate(user);
        result
    }

    /// Forgets one user's cached route; lookups under way when this is called do not cache.
    pub fn invalidate(&self, user: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.entries.remove(user);
    }

    /// Forgets every cached route (SIGHUP).
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use tokio::sync::Notify;

    use super::*;
    use crate::route::DirFuture;

    /// A directory whose first read takes the value, then waits to be released before it
    /// answers: a read that was in flight while a route changed.
    #[derive(Default)]
    struct SlowFirstRead {
        route: Mutex<Option<Route>>,
        slowed: AtomicBool,
        read: Notify,
        release: Notify,
    }

    impl Directory for SlowFirstRead {
        fn route<'a>(&'a self, _user: &'a str) -> DirFuture<'a, Option<Route>> {
            Box::pin(async move {
                let route = *self.route.lock().unwrap();
                if !self.slowed.swap(true, Ordering::SeqCst) {
                    self.read.notify_one();
                    self.release.notified().await;
                }
                Ok(route)
            })
        }
        fn set_route<'a>(&'a self, _user: &'a str, route: Route) -> DirFuture<'a, ()> {
            *self.route.lock().unwrap() = Some(route);
            Box::pin(async { Ok(()) })
        }
        fn ping(&self) -> DirFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_read_from_before_a_route_change_is_not_cached_after_it() {
        let dir = Arc::new(SlowFirstRead::default());
        *dir.route.lock().unwrap() = Some(Route::Legacy);
        let cache = Arc::new(RouteCache::new(
            dir.clone(),
            Route::Legacy,
            Duration::from_secs(3600),
        ));
        let racing = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.lookup("a@x").await.unwrap() })
        };
        dir.read.notified().await;
        cache.set_route("a@x", Route::New).await.unwrap();
        dir.release.notify_one();
        // The lookup that overlapped the change may answer either; it must not be remembered.
        racing.await.unwrap();
        assert_eq!(cache.lookup("a@x").await.unwrap().route, Route::New);
    }

    #[tokio::test]
    async fn answers_are_cached_until_invalidated() {
        let dir = Arc::new(SlowFirstRead::default());
        dir.slowed.store(true, Ordering::SeqCst);
        let cache = RouteCache::new(dir.clone(), Route::Legacy, Duration::from_secs(3600));
        let unknown = cache.lookup("a@x").await.unwrap();
        assert_eq!((unknown.route, unknown.known), (Route::Legacy, false));
        // Written behind the cache's back: still the cached answer until invalidated.
        *dir.route.lock().unwrap() = Some(Route::New);
        assert!(!cache.lookup("a@x").await.unwrap().known);
        cache.invalidate("a@x");
        let known = cache.lookup("a@x").await.unwrap();
        assert_eq!((known.route, known.known), (Route::New, true));
    }
}
