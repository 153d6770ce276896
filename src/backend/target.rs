//! Where and how to reach one backend, built once from the config for the proxy and the sync
//! engine alike: address and TLS mode, the TLS client configuration, the master user.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::config::{read_secret, BackendConfig, Config};
use crate::net::tls::{self, TlsError};
use crate::route::Route;
use crate::secret::Secret;

/// Why a backend's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The TLS client configuration (its `ca_file`) is unusable.
    #[error("backends.{route}.ca_file: {source}")]
    Tls {
        /// Which backend.
        route: Route,
        /// Why.
        source: TlsError,
    },
    /// The master password file cannot be read.
    #[error("backends.{route}.master_password_file {path}: {source}")]
    MasterPassword {
        /// Which backend.
        route: Route,
        /// The file, as resolved.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A master user: logs in as any user (SASL PLAIN with authzid = the user).
#[derive(Clone)]
pub struct Master {
    /// The master user's name.
    pub user: String,
    /// Its password.
    pub password: Secret<String>,
}

/// Where and how to reach one backend.
#[derive(Clone)]
pub struct BackendTarget {
    /// Which backend this is.
    pub route: Route,
    /// Its configuration.
    pub cfg: BackendConfig,
    /// TLS client configuration (used for starttls and implicit).
    pub tls: Arc<ClientConfig>,
    /// The master user, when `master_user` and `master_password_file` are both set.
    pub master: Option<Master>,
}

impl BackendTarget {
    /// Reads `[backends.<route>]`: its CA file into a TLS client configuration, and its master
    /// password file.
    pub fn from_config(cfg: &Config, route: Route) -> Result<BackendTarget, TargetError> {
        let b = cfg.backends.get(route);
        let ca = b.ca_file.as_ref().map(|p| cfg.resolve(p));
        let tls = tls::client_config(ca.as_deref())
            .map_err(|source| TargetError::Tls { route, source })?;
        let master = match (&b.master_user, &b.master_password_file) {
            (Some(user), Some(file)) => {
                let path = cfg.resolve(file);
                let password =
                    read_secret(&path).map_err(|source| TargetError::MasterPassword {
                        route,
                        path: path.display().to_string(),
                        source,
                    })?;
                Some(Master {
                    user: user.clone(),
                    password,
                })
            }
            _ => None,
        };
        Ok(BackendTarget {
            route,
            cfg: b.clone(),
            tls,
            master,
        })
    }
}
