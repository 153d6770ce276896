//! Group commit of intents on SQLite. Intents are fsynced, and SQLite admits one writer at a
//! time: users starting their copies together would otherwise wait for each other's fsync in
//! turn (the fourth of four waited ~70 ms for its first FETCH). A writer queues its rows here
//! and then waits for the write turn; whoever gets the turn commits everything queued by
//! then in one transaction and tells the others, who return without writing.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::sync::{FolderState, UidRow};

/// One writer's rows (with the state of their folder when it is new), and where it hears
/// whether they were committed.
pub(crate) struct Intent {
    pub(crate) fresh: Option<FolderState>,
    pub(crate) email: String,
    pub(crate) folder: String,
    pub(crate) rows: Vec<UidRow>,
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

/// Rows waiting for the next commit.
#[derive(Default)]
pub(crate) struct IntentQueue(pub(super) Mutex<Vec<Intent>>);

impl IntentQueue {
    /// Queues `rows`; the receiver says when someone committed them (closed: the writer that
    /// took them was cancelled first, so the rows must be written again).
    pub(crate) fn push(
        &self,
        fresh: Option<&FolderState>,
        email: &str,
        folder: &str,
        rows: &[UidRow],
    ) -> oneshot::Receiver<Result<(), String>> {
        let (done, committed) = oneshot::channel();
        let intent = Intent {
            fresh: fresh.cloned(),
            email: email.to_string(),
            folder: folder.to_string(),
            rows: rows.to_vec(),
            done,
        };
        // A panic elsewhere while holding the lock leaves a Vec that is still whole.
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(intent);
        committed
    }

    /// Everything queued so far, for one transaction.
    pub(crate) fn take(&self) -> Vec<Intent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
