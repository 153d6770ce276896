//! One folder of a pass, in the order it runs: select both sides, re-match after a
//! UIDVALIDITY change, resolve APPENDs a crashed pass left unacknowledged, find the new
//! messages, propagate expunges and flag changes, copy, then record where the folder stands.

use std::collections::{HashMap, HashSet};

use tracing::warn;

use super::client::{Fetched, Selected, MAX_MESSAGE};
use super::mailboxes::Folder;
use super::pass::Pass;
use super::{add, copy, incremental, recover, SyncError};
use crate::store::sync::{FolderState, UidRow};

/// Brings one mapped folder up to date.
pub(crate) async fn sync_folder(
    pass: &mut Pass<'_>,
    folder: &Folder,
    target_name: &str,
    state: Option<FolderState>,
) -> Result<(), SyncError> {
    // Both run to completion, so neither connection is left in the middle of a response.
    let (legacy, new) = tokio::join!(
        pass.src.select(&folder.raw, true),
        pass.tgt.select(target_name, false)
    );
    let (legacy, new) = (legacy?, new?);
    let mut v = Visit::start(pass.user, folder, target_name, state, legacy, &new);
    if v.uidvalidity_changed(&new) {
        v.rematch(pass, &new).await?;
    }
    let mut map = v.resolve_pending(pass).await?;
    let (todo, too_large) = v.find_new(pass, &map).await?;
    v.record_too_large(pass, &too_large).await?;
    // Expunges: legacy holds fewer of the known messages than the map says.
    if legacy.exists as usize != map.len() + todo.len() + too_large.len() && !map.is_empty() {
        incremental::expunge(pass, &v.st, &map).await?;
        map = v.uid_map(pass).await?;
    }
    if !map.is_empty() {
        v.sync_flags(pass, &map).await?;
    }
    let redo = v.copy(pass, &todo).await?;
    v.finish(pass, redo).await
}

/// A folder being visited: its state as it will be recorded, and what legacy's SELECT said.
struct Visit<'f> {
    folder: &'f Folder,
    st: FolderState,
    /// Not in the store yet: written with the first intents of its copy (one commit instead
    /// of two turns at the store before the first FETCH), or before anything else that writes
    /// rows of it.
    fresh: bool,
    /// Flags of every copied message are compared, not only those CONDSTORE says changed.
    full_flags: bool,
    legacy: Selected,
}

impl<'f> Visit<'f> {
    fn start(
        user: &str,
        folder: &'f Folder,
        target_name: &str,
        state: Option<FolderState>,
        legacy: Selected,
        new: &Selected,
    ) -> Visit<'f> {
        let fresh = state.is_none();
        let mut st = state.unwrap_or_else(|| {
            FolderState::fresh(
                user,
                &folder.raw,
                target_name,
                legacy.uidvalidity,
                new.uidvalidity,
                folder.subscribed,
            )
        });
        st.target_name = target_name.to_owned();
        let condstore = legacy.highestmodseq.is_some();
        Visit {
            full_flags: !condstore || st.highest_modseq == 0,
            folder,
            st,
            fresh,
            legacy,
        }
    }

    fn uidvalidity_changed(&self, new: &Selected) -> bool {
        self.st.source_uidvalidity != self.legacy.uidvalidity
            || self.st.target_uidvalidity != new.uidvalidity
    }

    /// After a UIDVALIDITY change on either side: the UID map is rebuilt by content and the
    /// folder copied from the start, which the map keeps from appending anything twice.
    async fn rematch(&mut self, pass: &mut Pass<'_>, new: &Selected) -> Result<(), SyncError> {
        warn!(
            user = %pass.user, folder = %self.folder.raw,
            source_changed = self.st.source_uidvalidity != self.legacy.uidvalidity,
            target_changed = self.st.target_uidvalidity != new.uidvalidity,
            "UIDVALIDITY changed: re-matching by content"
        );
        recover::rematch(pass, &mut self.st, new.uidvalidity).await?;
        self.st.source_uidvalidity = self.legacy.uidvalidity;
        self.st.target_uidvalidity = new.uidvalidity;
        self.st.last_uid = 0;
        pass.engine.store.put_sync_folder(&self.st).await?;
        self.full_flags = true;
        Ok(())
    }

    async fn uid_map(&self, pass: &Pass<'_>) -> Result<Vec<UidRow>, SyncError> {
        Ok(pass
            .engine
            .store
            .uid_map(pass.user, &self.st.source_name)
            .await?)
    }

    /// The UID map, once pending rows a crashed pass left are matched on new or forgotten.
    async fn resolve_pending(&mut self, pass: &mut Pass<'_>) -> Result<Vec<UidRow>, SyncError> {
        let map = self.uid_map(pass).await?;
        if map.iter().all(|r| r.target_uid.is_some()) {
            return Ok(map);
        }
        if let Some(uid) = recover::recover(pass, &self.st, &map).await? {
            // A forgotten row may lie below `last_uid` (a later batch was confirmed first):
            // look from there again; the map keeps everything copied from being copied twice.
            self.st.last_uid = self.st.last_uid.min(uid.saturating_sub(1));
        }
        self.uid_map(pass).await
    }

    /// Legacy's messages above `last_uid` that the map does not hold: (UID, size) in UID order
    /// to copy, and the UIDs of those too large to copy.
    async fn find_new(
        &self,
        pass: &mut Pass<'_>,
        map: &[UidRow],
    ) -> Result<(Vec<(u32, u64)>, Vec<u32>), SyncError> {
        let known: HashSet<u32> = map.iter().map(|r| r.source_uid).collect();
        let (mut todo, mut too_large) = (Vec::new(), Vec::new());
        if self.legacy.exists == 0 {
            return Ok((todo, too_large));
        }
        let first = self.st.last_uid.saturating_add(1);
        let cmd = format!("UID FETCH {first}:* (UID RFC822.SIZE)");
        for r in pass.src.command("UID FETCH", &cmd).await? {
            let Some(f) = Fetched::parse(&r) else {
                continue;
            };
            if f.uid < first || known.contains(&f.uid) {
                continue;
            }
            match f.size.unwrap_or(0) {
                size if size > MAX_MESSAGE => too_large.push(f.uid),
                size => todo.push((f.uid, size)),
            }
        }
        todo.sort_unstable();
        Ok((todo, too_large))
    }

    /// Records messages too large to copy as done, so that no pass tries them again.
    async fn record_too_large(
        &mut self,
        pass: &mut Pass<'_>,
        too_large: &[u32],
    ) -> Result<(), SyncError> {
        if too_large.is_empty() {
            return Ok(());
        }
        let store = &pass.engine.store;
        if self.fresh {
            store.put_sync_folder(&self.st).await?;
            self.fresh = false;
        }
        for &uid in too_large {
            warn!(user = %pass.user, folder = %self.folder.raw, uid, "message larger than the copy limit, not copied");
            let name = &self.st.source_name;
            store
                .add_pending(pass.user, name, &[UidRow::intent(uid, 0)])
                .await?;
            store.confirm_uids(pass.user, name, &[(uid, 0)]).await?;
            pass.report.failed += 1;
        }
        Ok(())
    }

    /// Flags and keywords of messages copied earlier: all of them, or those CONDSTORE says
    /// changed since the last pass.
    async fn sync_flags(&self, pass: &mut Pass<'_>, map: &[UidRow]) -> Result<(), SyncError> {
        let to_target: HashMap<u32, u32> = map
            .iter()
            .filter_map(|r| Some((r.source_uid, r.target_uid.filter(|t| *t > 0)?)))
            .collect();
        let changed = if self.full_flags {
            incremental::full_flag_compare(pass.src, pass.tgt, &to_target).await?
        } else {
            let max = map.iter().map(|r| r.source_uid).max().unwrap_or(1);
            let since = self.st.highest_modseq;
            incremental::changed_flags(pass.src, &to_target, max, since).await?
        };
        pass.report.flag_updates += incremental::store_flags(pass.tgt, changed).await?;
        Ok(())
    }

    /// Copies `todo`; returns the lowest legacy UID whose APPEND did not land (matched by
    /// content afterwards, on a target without APPENDUID), for the next pass to start there.
    async fn copy(
        &mut self,
        pass: &mut Pass<'_>,
        todo: &[(u32, u64)],
    ) -> Result<Option<u32>, SyncError> {
        add(&pass.progress.messages_total, todo.len() as u64);
        add(&pass.progress.bytes_total, todo.iter().map(|t| t.1).sum());
        let needs_recovery = copy::copy_new(pass, &mut self.st, self.fresh, todo).await?;
        if !needs_recovery {
            return Ok(None);
        }
        let map = self.uid_map(pass).await?;
        recover::recover(pass, &self.st, &map).await
    }

    /// Records where the folder stands, so that the next pass starts from there.
    async fn finish(mut self, pass: &mut Pass<'_>, redo: Option<u32>) -> Result<(), SyncError> {
        let map = self.uid_map(pass).await?;
        let st = &mut self.st;
        let copied = map.iter().map(|r| r.source_uid).max().unwrap_or(0);
        st.last_uid = copied.max(st.last_uid);
        st.highest_modseq = self.legacy.highestmodseq.unwrap_or(0);
        st.source_uidnext = self.legacy.uidnext;
        if let Some(uid) = redo {
            st.last_uid = st.last_uid.min(uid.saturating_sub(1));
            // Nor may STATUS call the folder unchanged next time: those messages are still to copy.
            st.source_uidnext = 0;
        }
        st.source_messages = self.legacy.exists;
        st.source_bytes = map.iter().map(|r| r.size).sum();
        st.subscribed = self.folder.subscribed;
        pass.engine.store.put_sync_folder(st).await?;
        Ok(())
    }
}
