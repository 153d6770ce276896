//! Why talking to a backend failed; every variant names the backend.

use std::time::Duration;

use tokio::time::timeout;

use crate::route::Route;

/// A failure on a backend connection, from connect through login to any later command.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP connect failed.
    #[error("backend {backend} ({addr}): connect: {source}")]
    Connect {
        /// Which backend.
        backend: Route,
        /// Its address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A phase took longer than its limit.
    #[error("backend {backend}: timeout waiting for {phase}")]
    Timeout {
        /// Which backend.
        backend: Route,
        /// What was awaited.
        phase: &'static str,
    },
    /// Reading or writing failed after connect.
    #[error("backend {backend}: {phase}: {source}")]
    Io {
        /// Which backend.
        backend: Route,
        /// Phase name.
        phase: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The backend said something a well-behaved IMAP server does not.
    #[error("backend {backend}: protocol error: {detail}")]
    Protocol {
        /// Which backend.
        backend: Route,
        /// What was wrong.
        detail: String,
    },
    /// The backend rejected the credentials.
    #[error("backend {backend}: authentication failed")]
    AuthFailed {
        /// Which backend.
        backend: Route,
    },
    /// The backend answered NO, BAD or BYE (to the login: anything but a plain auth failure).
    #[error("backend {backend}: {command} refused: {text}")]
    Refused {
        /// Which backend.
        backend: Route,
        /// The command verb (`LOGIN` for the whole login exchange).
        command: &'static str,
        /// Response code name, upper-cased (`LIMIT`, `INUSE`...), empty if none.
        code: String,
        /// Status and text after the tag, e.g. `NO [UNAVAILABLE] ...`.
        text: String,
    },
}

impl BackendError {
    /// The backend this error is about.
    pub fn backend(&self) -> Route {
        match self {
            BackendError::Connect { backend, .. }
            | BackendError::Timeout { backend, .. }
            | BackendError::Io { backend, .. }
            | BackendError::Protocol { backend, .. }
            | BackendError::AuthFailed { backend }
            | BackendError::Refused { backend, .. } => *backend,
        }
    }

    /// End of stream where `backend` owed more.
    pub fn eof(backend: Route, phase: &'static str) -> BackendError {
        BackendError::Io {
            backend,
            phase,
            source: std::io::ErrorKind::UnexpectedEof.into(),
        }
    }
}

/// Runs one socket operation of `backend`'s connection within `limit`.
pub async fn within<T>(
    backend: Route,
    phase: &'static str,
    limit: Duration,
    op: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, BackendError> {
    match timeout(limit, op).await {
        Err(_) => Err(BackendError::Timeout { backend, phase }),
        Ok(Err(source)) => Err(BackendError::Io {
            backend,
            phase,
            source,
        }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// The response code of a `NO`/`BAD`/`BYE` text (tag stripped, `*` allowed), upper-cased;
/// empty when there is none.
pub fn refusal_code(text: &str) -> String {
    let upper = text
        .trim_start()
        .trim_start_matches('*')
        .trim_start()
        .to_ascii_uppercase();
    let rest = ["NO", "BAD", "BYE"]
        .iter()
        .find_map(|w| upper.strip_prefix(w))
        .unwrap_or("");
    rest.trim_start()
        .strip_prefix('[')
        .and_then(|r| r.split([']', ' ']).next())
        .unwrap_or("")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes() {
        assert_eq!(refusal_code("NO [LIMIT] Maximum number"), "LIMIT");
        assert_eq!(
            refusal_code("* BYE [UNAVAILABLE] Server shutting down"),
            "UNAVAILABLE"
        );
        assert_eq!(refusal_code("no [inuse] mailbox locked"), "INUSE");
        assert_eq!(refusal_code("* BYE Too many connections"), "");
        assert_eq!(refusal_code("OK [LIMIT] odd"), "");
    }
}
