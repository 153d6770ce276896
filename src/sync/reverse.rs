//! Rollback's reverse delta new → legacy (being written: see issue 16).

use std::fmt;

use serde::Serialize;

use super::engine::Engine;
use super::SyncError;

/// What a reverse pass carried back to legacy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReverseReport {
    /// Messages that arrived on new, appended to legacy.
    pub appended: u64,
}

impl fmt::Display for ReverseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} appended to legacy", self.appended)
    }
}

impl Engine {
    /// Carries what happened on new since the cutover back to legacy.
    pub async fn reverse_pass(&self, _email: &str) -> Result<ReverseReport, SyncError> {
        Err(SyncError::Config(
            "the reverse delta is not written yet".into(),
        ))
    }
}
