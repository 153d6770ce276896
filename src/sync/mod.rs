//! The sync engine: copies a user's mailboxes from legacy to new and keeps the copy current.
//!
//! A pass (`Engine::pass`) logs in to both backends as the user (master user), maps folders,
//! skips folders whose STATUS did not change since the last pass, and for the others: recovers
//! unacknowledged APPENDs, re-matches after a UIDVALIDITY change, propagates expunges and flag
//! changes, then copies new messages in UID order. All state lives in the state store, written
//! before new can hold an APPEND batch whole (pending) and after its acknowledgement (UID map),
//! so a pass killed anywhere is resumed by the next one without duplicates.

pub mod bodies;
pub mod client;
pub mod copy;
pub mod credentials;
pub mod engine;
mod folder;
pub mod gate;
pub mod incremental;
mod lease;
pub mod mailboxes;
pub mod pace;
mod pass;
pub mod proto;
mod recover;
pub mod reverse;
pub mod scheduler;
pub mod throttle;
pub mod verify;

pub use engine::{pass_with_retry, Engine};
pub use lease::free_dead_local;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::backend::error::BackendError;
use crate::route::{DirectoryError, Route};
use crate::store::StoreError;

/// Why a pass (or part of it) failed; each variant names the backend where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Connecting or logging in failed.
    #[error(transparent)]
    Login(BackendError),
    /// A backend failed after login (or refused the login as overloaded).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration does not allow syncing.
    #[error("sync configuration: {0}")]
    Config(String),
    /// Neither a master user nor a captured password lets the engine log in as the user.
    #[error(
        "backend {backend}: no credentials for this user: set master_user and \
         master_password_file, or [sync] capture_credentials = true and wait for the user's \
         next login through the proxy"
    )]
    NoCredentials {
        /// Which backend.
        backend: Route,
    },
    /// The user is routed to new: copying legacy → new again could only bring back what the
    /// user has since deleted or moved there.
    #[error("the user is routed to new: not synced from legacy again (--force to sync anyway)")]
    RoutedToNew,
    /// The directory could not say where the user is routed.
    #[error("directory: {0}")]
    Directory(#[from] DirectoryError),
    /// Another process or node runs a pass of this user.
    #[error(
        "pass in progress: {holder} holds the user's sync lease (for up to {} s more)",
        (.expires_at - crate::store::now()).max(0)
    )]
    PassInProgress {
        /// The lease's holder.
        holder: String,
        /// When it lapses unless renewed (seconds since the epoch).
        expires_at: i64,
    },
    /// This pass's lease lapsed and another pass may have taken over: it stopped.
    #[error("sync lease lost: the pass stopped (another pass may have taken over)")]
    LeaseLost,
}

impl SyncError {
    /// The backend and reason when the error says that backend is overloaded (`NO [LIMIT]`,
    /// `[INUSE]`, `[UNAVAILABLE]`, or a reply timeout): the pace of that backend backs off.
    pub fn overload(&self) -> Option<(Route, &str)> {
        match self {
            SyncError::Backend(BackendError::Timeout { backend, .. }) => {
                Some((*backend, "TIMEOUT"))
            }
            SyncError::Backend(BackendError::Refused { backend, code, .. })
                if client::is_overload(code) =>
            {
                Some((*backend, code.as_str()))
            }
            _ => None,
        }
    }

    /// Whether a backend or the configuration could not be used at all (the CLI's exit 2),
    /// rather than the pass failing on the way.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            SyncError::Login(_)
                | SyncError::Config(_)
                | SyncError::Backend(BackendError::Io { .. } | BackendError::Timeout { .. })
        )
    }

    /// Whether retrying later may succeed (overload, lock contention, network trouble).
    pub fn retryable(&self) -> bool {
        match self {
            SyncError::Backend(e) => match e {
                BackendError::Connect { .. }
                | BackendError::Io { .. }
                | BackendError::Timeout { .. } => true,
                BackendError::Refused { code, .. } => {
                    client::is_overload(code) || code == "SERVERBUG"
                }
                BackendError::Protocol { .. } | BackendError::AuthFailed { .. } => false,
            },
            SyncError::Login(e) => matches!(
                e,
                BackendError::Connect { .. }
                    | BackendError::Timeout { .. }
                    | BackendError::Io { .. }
                    | BackendError::Refused { .. }
            ),
            SyncError::Store(_) | SyncError::Directory(_) => true,
            SyncError::Config(_)
            | SyncError::NoCredentials { .. }
            | SyncError::RoutedToNew
            | SyncError::PassInProgress { .. }
            | SyncError::LeaseLost => false,
        }
    }
}

/// Live counters of a running pass, read by the CLI's progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages to copy in this pass (grows as folders are examined).
    pub messages_total: AtomicU64,
    /// Messages copied in this pass.
    pub messages_done: AtomicU64,
    /// Bytes to copy in this pass.
    pub bytes_total: AtomicU64,
    /// Bytes copied in this pass.
    pub bytes_done: AtomicU64,
    /// The folder being worked on.
    pub folder: Mutex<String>,
}

impl Progress {
    fn set_folder(&self, name: &str) {
        if let Ok(mut f) = self.folder.lock() {
            name.clone_into(&mut f);
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    /// Folders mapped.
    pub folders: usize,
    /// Folders examined because something changed.
    pub folders_changed: usize,
    /// Messages appended to the target.
    pub appended: u64,
    /// Bytes appended.
    pub appended_bytes: u64,
    /// Appends found in the target after a crash and recorded instead of repeated.
    pub recovered: u64,
    /// Messages matched by content after a UIDVALIDITY change.
    pub rematched: u64,
    /// Target messages whose flags were updated.
    pub flag_updates: u64,
    /// Target messages expunged because they were expunged on legacy.
    pub expunged: u64,
    /// Messages that could not be copied (too large, refused by the target).
    pub failed: u64,
    /// Target folders created.
    pub created: usize,
    /// Target folders renamed.
    pub renamed: usize,
    /// Target folders deleted.
    pub deleted: usize,
    /// Target folders gone from legacy but kept on new, holding mail the sync did not put
    /// there (also shown by `user show`).
    pub kept: Vec<String>,
    /// Subscription changes on the target.
    pub subscriptions: usize,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Prefix of the content hashes recorded in the state store (BLAKE3). Rows written before it
/// carry a bare hex SHA-256, which `recover` still matches.
pub const HASH_PREFIX: &str = "b3:";

/// The content hash recorded with each copied message, by which a crashed pass finds its
/// unacknowledged APPENDs and a UIDVALIDITY change is re-matched. BLAKE3, not SHA-256: it is
/// as collision-resistant (senders choose message content) and much cheaper on large
/// messages, where hashing dominated the engine's own CPU.
pub fn content_hash(body: &[u8]) -> String {
    hash_text(&blake3::hash(body))
}

/// How a content hash (of a body taken whole or in pieces) is stored.
pub fn hash_text(hash: &blake3::Hash) -> String {
    let mut s = String::with_capacity(HASH_PREFIX.len() + 64);
    s.push_str(HASH_PREFIX);
    s.push_str(hash.to_hex().as_str());
    s
}

/// Hex SHA-256 of a message: what `verify` compares (and what the store held before BLAKE3).
pub fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    s
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
