//! `mailferry check-config`: the configuration and what it names (certificates, secrets, the
//! state store and directory, the backends' addresses) checked in one pass, every problem listed.

use std::path::Path;
use std::time::Duration;

use crate::backend::target::BackendTarget;
use crate::config::{Config, ConfigError};
use crate::route::Route;
use crate::server::ServeError;
use crate::store::{redacted, Open, SqlStore, StoreError, StoreSummary};

/// How long a backend address may take to accept a TCP connection before it counts as
/// unreachable: a backend on the same network answers in milliseconds, and an operator waits.
pub const REACHABILITY_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file cannot be read, parsed or validated.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What `check-config` found.
pub struct Report {
    /// Problems with the files, directory and backends, one readable reason each.
    pub problems: Vec<String>,
    /// The state store (redacted URL) and what it holds, or why it cannot be used.
    pub store: (String, Result<StoreSummary, StoreError>),
    /// What the directory holds for the `--user` asked about (not a problem when absent).
    pub found: Option<String>,
}

impl Report {
    /// Whether everything checked is usable.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.store.1.is_ok()
    }
}

/// Loads the configuration at `path` and checks everything it names; with `user`, also
/// says what the directory holds for that user.
pub async fn check_config(path: &Path, user: Option<&str>) -> Result<Report, CheckError> {
    let cfg = Config::load(path)?;
    let mut problems = problems(&cfg).await;
    let url = cfg.state_url();
    let mut found = None;
    let store = match crate::server::open_directory(&cfg, Open::Existing).await {
        Ok((store, routes)) => {
            // The LDAP directory connects, binds and finds its base here; the embedded one
            // asks the store, which is checked below.
            let directory = routes.directory();
            if let Err(e) = directory.ping().await {
                problems.push(format!("directory: {e}"));
            } else if let Some(user) = user {
                match directory
                    .describe(&cfg.directory.identity().key(user))
                    .await
                {
                    Ok(text) => found = Some(text),
                    Err(e) => problems.push(format!("directory lookup of {user}: {e}")),
                }
            }
            store.summary().await
        }
        Err(ServeError::Store(e)) => Err(e),
        Err(e) => {
            problems.push(format!("directory: {e}"));
            let store = SqlStore::open(&url, Open::Existing).await;
            match store {
                Ok(s) => s.summary().await,
                Err(e) => Err(e),
            }
        }
    };
    Ok(Report {
        problems,
        store: (redacted(&url), store),
        found,
    })
}

/// What is wrong with the files and backends a valid `cfg` names.
pub async fn problems(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) =
        crate::net::tls::server_config(&cfg.resolve(&cfg.tls.cert), &cfg.resolve(&cfg.tls.key))
    {
        problems.push(format!("tls: {e}"));
    }
    // The rule `serve` applies before it binds anything (empty or short tokens refused).
    if let Err(e) = crate::server::admin_token(cfg) {
        problems.push(e.to_string());
    }
    for route in [Route::Legacy, Route::New] {
        let b = cfg.backends.get(route);
        // The CA file and the master password, read as the proxy and the sync engine read them.
        if let Err(e) = BackendTarget::from_config(cfg, route) {
            problems.push(e.to_string());
        }
        let addrs = [("imap", Some(&b.imap)), ("lmtp", b.lmtp.as_ref())];
        for (what, addr) in addrs {
            let Some(addr) = addr else { continue };
            let probe = tokio::time::timeout(
                REACHABILITY_TIMEOUT,
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                problems.push(format!("backends.{route}.{what} {addr} is unreachable"));
            }
        }
    }
    problems
}
