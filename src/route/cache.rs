//! Route lookups with a short TTL in front of the directory, invalidated on every change we make.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::{Directory, DirectoryError, Route};

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
}

impl RouteCache {
    /// Wraps a directory.
    pub fn new(directory: Arc<dyn Directory>, default_route: Route, ttl: Duration) -> Self {
        RouteCache {
            directory,
            default_route,
            ttl,
            entries: DashMap::new(),
        }
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
        let route = self.directory.route(user).await?;
        self.entries
            .insert(user.to_owned(), (route, Instant::now()));
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
        // Invalidate before and after: a lookup racing the write must not re-cache the old value.
        self.entries.remove(user);
        let result = self.directory.set_route(user, route).await;
        self.entries.remove(user);
        result
    }

    /// Forgets one user's cached route.
    pub fn invalidate(&self, user: &str) {
        self.entries.remove(user);
    }

    /// Forgets every cached route (SIGHUP).
    pub fn clear(&self) {
        self.entries.clear();
    }
}
