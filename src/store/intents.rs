//! How our own writers share a SQLite file. SQLite admits one writer at a time and makes the
//! others poll with growing sleeps; here they take turns instead, and the next starts the
//! moment the previous commit ends. Intents, which are fsynced, also share commits: users
//! starting their copies together would otherwise wait for each other's fsync in turn. A writer queues its rows,
//! then waits for the turn; whoever gets the turn commits everything queued by then in one
//! transaction and tells the others, who return without writing.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::sync::{FolderState, UidRow};

/// The write turn and the intents waiting for a commit, of one SQLite store.
#[derive(Default)]
pub(crate) struct Writers {
    /// Held for the length of a write transaction.
    pub(crate) turn: tokio::sync::Mutex<()>,
    /// Intents waiting for the next commit.
    pub(crate) intents: IntentQueue,
}

/// One writer's rows (with the state of their folder when it is new), and where it hears
/// whether they were committed.
pub(crate) struct Intent {
    id: u64,
    pub(crate) fresh: Option<FolderState>,
    pub(crate) email: String,
    pub(crate) folder: String,
    pub(crate) rows: Vec<UidRow>,
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

/// Rows waiting for the next commit.
#[derive(Default)]
pub(crate) struct IntentQueue(Mutex<Waiting>);

#[derive(Default)]
struct Waiting {
    intents: Vec<Intent>,
    /// Id of the next intent queued.
    next_id: u64,
}

/// A writer's place in the queue. Dropped before anyone took its rows (the writer was
/// cancelled), it takes them out again: committed later, they would overwrite rows confirmed
/// meanwhile with pending ones.
pub(crate) struct Queued<'a> {
    queue: &'a IntentQueue,
    id: u64,
    /// Says whether the rows were committed (closed: taken by a writer that was cancelled
    /// before its commit, so they must be queued again).
    pub(crate) committed: oneshot::Receiver<Result<(), String>>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.queue.lock().intents.retain(|i| i.id != self.id);
    }
}

impl IntentQueue {
    /// Queues `rows` until the next commit.
    pub(crate) fn push(
        &self,
        fresh: Option<&FolderState>,
        email: &str,
        folder: &str,
        rows: &[UidRow],
    ) -> Queued<'_> {
        let (done, committed) = oneshot::channel();
        let mut waiting = self.lock();
        let id = waiting.next_id;
        waiting.next_id += 1;
        waiting.intents.push(Intent {
            id,
            fresh: fresh.cloned(),
            email: email.to_string(),
            folder: folder.to_string(),
            rows: rows.to_vec(),
            done,
        });
        Queued {
            queue: self,
            id,
            committed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A panic elsewhere while holding the lock leaves a queue that is still whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything queued so far, for one transaction.
    pub(crate) fn take(&self) -> Vec<Intent> {
        std::mem::take(&mut self.lock().intents)
    }

    /// Intents waiting (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().intents.len()
    }
}
