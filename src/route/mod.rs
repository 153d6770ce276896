//! Where a user's mail lives now: the `Directory` trait, its implementations and the route cache.

pub mod cache;
pub mod embedded;
pub mod identity;
pub mod ldap;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use cache::RouteCache;
pub use identity::Identity;

/// Which backend owns a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// The platform being left.
    #[default]
    Legacy,
    /// The platform being moved to.
    New,
}

impl Route {
    /// Lower-case name, as in config, CLI and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Legacy => "legacy",
            Route::New => "new",
        }
    }

    /// The other backend.
    pub fn other(self) -> Route {
        match self {
            Route::Legacy => Route::New,
            Route::New => Route::Legacy,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Route {
    type Err = DirectoryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "legacy" => Ok(Route::Legacy),
            "new" => Ok(Route::New),
            other => Err(DirectoryError::BadValue(other.to_owned())),
        }
    }
}

/// Failures of a directory lookup or write.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The directory could not be reached or answered with an error.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// The directory holds a value that is not a route.
    #[error("directory holds an unknown route value {0:?}")]
    BadValue(String),
    /// The user does not exist in the directory (writes to LDAP only).
    #[error("user {0} is not in the directory")]
    NoSuchUser(String),
    /// The directory's search names several entries for one user (LDAP): no route can be
    /// chosen without guessing.
    #[error("directory lookup is ambiguous: {0}")]
    Ambiguous(String),
    /// The directory answered a write with an error (LDAP: an ACL, a schema violation).
    #[error("directory refused the write: {0}")]
    Refused(String),
}

/// A route change the directory noticed that mailferry did not make (LDAP: an `ldapmodify`
/// seen through syncrepl or polling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalChange {
    /// Where it was seen (the LDAP entry's DN), for logs.
    pub source: String,
    /// The user's addresses as lookups key them (canonical first, then aliases).
    pub users: Vec<String>,
    /// The route the directory now gives.
    pub route: Route,
}

/// Boxed future returned by directory methods (the trait is used as `dyn Directory`).
pub type DirFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DirectoryError>> + Send + 'a>>;

/// The authority for each user's route. Implementations do no caching; `RouteCache` does.
pub trait Directory: Send + Sync + 'static {
    /// The route stored for `user`, or `None` if the directory does not know the user.
    fn route<'a>(&'a self, user: &'a str) -> DirFuture<'a, Option<Route>>;
    /// Stores a route for `user`.
    fn set_route<'a>(&'a self, user: &'a str, route: Route) -> DirFuture<'a, ()>;
    /// Cheap reachability check for /readyz and check-config.
    fn ping(&self) -> DirFuture<'_, ()>;
    /// Starts watching for route changes made outside mailferry; `None` when every change
    /// goes through mailferry (the embedded directory). The watch ends when the receiver is
    /// dropped.
    fn watch(self: Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<ExternalChange>> {
        None
    }
    /// What the directory holds for `user`, in words (`check-config --user`).
    fn describe<'a>(&'a self, user: &'a str) -> DirFuture<'a, String> {
        Box::pin(async move {
            Ok(match self.route(user).await? {
                Some(route) => format!("{user}: route {route}"),
                None => format!("{user}: not in the directory"),
            })
        })
    }
}

/// Canonical form of a login name used as the key everywhere (directory, store, sessions).
pub fn normalize_user(user: &str) -> String {
    user.trim().to_lowercase()
}
