//! `mailferry check-config`: the configuration and what it names (certificates, secrets, the
//! state store and directory, the backends' addresses) checked in one pass, every problem listed.

use std::path::Path;
use std::time::Duration;

use crate::backend::target::BackendTarget;
use crate::config::{Config, ConfigError};
use crate::route::Route;

/// How long a backend address may take to accept a TCP connection before it counts as
/// unreachable: a backend on the same network answers in milliseconds, and an operator waits.
pub const REACHABILITY_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file cannot be read, parsed or validated.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file is valid but what it names is not; one readable reason each, listed as `- `.
    #[error("{}", .0.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n"))]
    Problems(Vec<String>),
}

/// Loads the configuration at `path` and checks everything it names.
pub async fn check_config(path: &Path) -> Result<Config, CheckError> {
    let cfg = Config::load(path)?;
    let problems = problems(&cfg).await;
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(CheckError::Problems(problems))
    }
}

/// What is wrong with the files, store, directory and backends a valid `cfg` names.
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
    if let Err(e) = crate::server::open_directory(cfg).await {
        problems.push(format!("state/directory: {e}"));
    }
    problems
}
