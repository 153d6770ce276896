//! The intent stage: each FETCH chunk's messages are recorded as pending (UIDs only) before
//! new can hold any of them whole, so a crash at any point is resolved by matching pending
//! rows against new. The fetcher does not wait for these commits (a `BODY.PEEK` FETCH changes
//! nothing on legacy), nor does the appender but for the last bytes of each command
//! (`held::HELD_BACK`): an fsync, slow under new's write load, then overlaps the transfer
//! instead of delaying it.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Rows;
use crate::store::sync::{FolderState, UidRow};
use crate::sync::SyncError;

/// FETCH chunks whose intents may be committed before the fetcher has asked for them: enough
/// that a slow commit rarely holds up the appender, few enough that a failed pass leaves few
/// pending rows for the next one to resolve.
const INTENTS_AHEAD: usize = 2;

/// Records each chunk's messages as pending, in order, and raises `committed` past each chunk
/// once its commit is done. `fresh` is the folder's state when the store does not have it
/// yet: it is written with the first chunk.
pub(super) async fn record(
    rows: Rows<'_>,
    mut fresh: Option<FolderState>,
    chunks: Vec<Vec<(u32, u64)>>,
    mut requested: watch::Receiver<usize>,
    committed: watch::Sender<u32>,
) -> Result<(), SyncError> {
    for (k, chunk) in chunks.into_iter().enumerate() {
        if let Some(behind) = k.checked_sub(INTENTS_AHEAD) {
            if requested.wait_for(|&n| n > behind).await.is_err() {
                // The fetcher stopped early (it reports its own error).
                return Ok(());
            }
        }
        let intents: Vec<UidRow> = chunk
            .iter()
            .map(|&(uid, size)| UidRow::intent(uid, size))
            .collect();
        match fresh.take() {
            Some(state) => rows.store.start_folder(&state, &intents).await?,
            None => {
                rows.store
                    .add_pending(rows.user, rows.folder, &intents)
                    .await?
            }
        }
        if let Some(&(top, _)) = chunk.last() {
            committed.send_replace(top);
        }
        if committed.is_closed() {
            // The appender and the confirmer stopped (they report their own errors).
            return Ok(());
        }
    }
    Ok(())
}

/// Waits until the intents of every UID up to `uid` are committed; false if they never will
/// be: the intent stage failed (and reports why), as the fetcher hands on only UIDs of the
/// copy's chunks, whose intents all commit when it succeeds.
pub(super) async fn intended(committed: &mut watch::Receiver<u32>, uid: u32) -> bool {
    committed.wait_for(|&c| c >= uid).await.is_ok()
}

/// As [`intended`], returning how long the wait took (the appender's own time, not new's).
pub(super) async fn waited_for(committed: &mut watch::Receiver<u32>, uid: u32) -> Option<Duration> {
    let start = Instant::now();
    intended(committed, uid).await.then(|| start.elapsed())
}
