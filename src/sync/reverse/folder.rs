//! One folder of a reverse pass, in the order it runs: wait out APPENDs a dead pass may still
//! have committed, select both sides (legacy read-write, new read-only), rebuild the UID map by
//! content after a UIDVALIDITY change, read both sides' messages, forget map rows whose legacy
//! message is gone, match leftover intents on legacy, append what arrived on new
//! (`arrivals.rs`), set legacy's flags to new's, expunge on legacy what the user expunged on new.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::{arrivals, Reverse};
use crate::store::reverse::ReversePending;
use crate::store::sync::{FolderState, UidRow};
use crate::sync::client::{Client, Fetched, Selected};
use crate::sync::incremental::{expunge_target, normalized, store_flags};
use crate::sync::recover::{hashes, LATE_COMMIT_GRACE_SECS};
use crate::sync::{proto, SyncError};

/// What new says of one of its messages.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    /// Flags and keywords (without `\Recent`).
    pub flags: Vec<String>,
    /// INTERNALDATE as sent.
    pub date: Option<String>,
    /// RFC822.SIZE.
    pub size: u64,
}

/// Legacy messages the UID map does not account for, by content hash: what a dead pass
/// appended without recording it is found here instead of being appended again.
#[derive(Debug, Default)]
pub(super) struct Pool(HashMap<String, VecDeque<(u32, u64)>>);

impl Pool {
    fn new(hashed: Vec<(u32, String, u64)>) -> Pool {
        let mut by_hash: HashMap<String, VecDeque<(u32, u64)>> = HashMap::new();
        for (uid, hash, size) in hashed {
            by_hash.entry(hash).or_default().push_back((uid, size));
        }
        Pool(by_hash)
    }

    /// A legacy message with this content, taken out (each answers one message of new).
    pub fn take(&mut self, hash: &str) -> Option<(u32, u64)> {
        self.0.get_mut(hash)?.pop_front()
    }
}

/// A folder being carried back.
pub(super) struct Visit {
    pub st: FolderState,
    /// Legacy's SELECT: an APPENDUID must name its UIDVALIDITY.
    pub legacy: Selected,
    new: Selected,
    /// The UID map was rebuilt by content after a UIDVALIDITY change: nothing is expunged.
    rebuilt: bool,
    /// New's messages.
    pub on_new: BTreeMap<u32, Meta>,
    /// Legacy's messages and their flags.
    pub on_legacy: HashMap<u32, Vec<String>>,
    /// The UID map, kept current as the visit changes it.
    pub map: Vec<UidRow>,
    /// Built when first needed.
    pool: Option<Pool>,
}

/// Carries one folder back; `fresh`: created on legacy by this pass, not in the store yet.
pub(super) async fn carry_back(
    rev: &mut Reverse<'_>,
    st: FolderState,
    fresh: bool,
) -> Result<(), SyncError> {
    let engine = rev.engine;
    let store = &engine.store;
    let pending = store.reverse_pending(rev.user, &st.source_name).await?;
    settle_late_commits(&pending).await;
    // Both run to completion, so neither connection is left in the middle of a response.
    let (legacy, new) = tokio::join!(
        rev.legacy.select(&st.source_name, false),
        rev.new.select(&st.target_name, true)
    );
    let mut v = Visit::start(rev, st, fresh, legacy?, new?).await?;
    rev.report.folders += 1;
    let pending = if v.uidvalidity_changed() {
        v.rebuild_by_content(rev, &pending).await?;
        Vec::new()
    } else {
        pending
    };
    v.read_sides(rev).await?;
    v.forget_gone_from_legacy(rev).await?;
    rev.report.matched += v.resolve_pending(rev, pending).await?;
    if arrivals::carry_arrivals(rev, &mut v).await? {
        // Appended without APPENDUID (counted as appended): their intents are matched by
        // content now.
        v.rescan_legacy(rev).await?;
        let left = store.reverse_pending(rev.user, &v.st.source_name).await?;
        v.resolve_pending(rev, left).await?;
    }
    v.carry_flags(rev).await?;
    v.carry_expunges(rev).await
}

/// An APPEND a killed pass had sent whole may still be committed by legacy a moment later:
/// the folder is looked at only once that moment has passed for its newest intent.
async fn settle_late_commits(pending: &[ReversePending]) {
    let Some(newest) = pending.iter().map(|p| p.at).max() else {
        return;
    };
    let wait = newest + LATE_COMMIT_GRACE_SECS + 1 - crate::store::now();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait.unsigned_abs())).await;
    }
}

impl Visit {
    async fn start(
        rev: &mut Reverse<'_>,
        mut st: FolderState,
        fresh: bool,
        legacy: Selected,
        new: Selected,
    ) -> Result<Visit, SyncError> {
        if fresh {
            st.source_uidvalidity = legacy.uidvalidity;
            st.target_uidvalidity = new.uidvalidity;
            // Before any intent or row of it: forward passes then know the folder.
            rev.engine.store.put_sync_folder(&st).await?;
        }
        Ok(Visit {
            st,
            legacy,
            new,
            rebuilt: false,
            on_new: BTreeMap::new(),
            on_legacy: HashMap::new(),
            map: Vec::new(),
            pool: None,
        })
    }

    fn uidvalidity_changed(&self) -> bool {
        self.st.source_uidvalidity != self.legacy.uidvalidity
            || self.st.target_uidvalidity != self.new.uidvalidity
    }

    /// After a UIDVALIDITY change on either side the map's UIDs mean nothing: it is rebuilt
    /// by content (which also finds a dead pass's appends, so its intents go), and the
    /// folder's state is reset so that a forward pass compares it from the start.
    async fn rebuild_by_content(
        &mut self,
        rev: &mut Reverse<'_>,
        pending: &[ReversePending],
    ) -> Result<(), SyncError> {
        let side = if self.st.source_uidvalidity != self.legacy.uidvalidity {
            "legacy"
        } else {
            "new"
        };
        let why = format!(
            "UIDVALIDITY changed on {side} since the cutover: matched by content, nothing expunged"
        );
        rev.warn(&self.st.source_name, why);
        let (on_legacy, on_new) = tokio::try_join!(
            hash_all(rev.legacy, self.legacy.exists),
            hash_all(rev.new, self.new.exists)
        )?;
        let mut pool = Pool::new(on_legacy);
        let rows: Vec<UidRow> = on_new
            .into_iter()
            .filter_map(|(t, hash, _)| {
                let (l, size) = pool.take(&hash)?;
                Some(pair(l, t, hash, size))
            })
            .collect();
        let st = &mut self.st;
        st.source_uidvalidity = self.legacy.uidvalidity;
        st.target_uidvalidity = self.new.uidvalidity;
        // Nothing of the old state holds: a forward pass looks at every message again.
        st.last_uid = 0;
        st.source_uidnext = 0;
        st.highest_modseq = 0;
        let store = &rev.engine.store;
        store.replace_uid_map(st, &rows).await?;
        store.put_sync_folder(st).await?;
        let dropped: Vec<u32> = pending.iter().map(|p| p.target_uid).collect();
        store
            .forget_reverse_pending(rev.user, &st.source_name, &dropped)
            .await?;
        self.rebuilt = true;
        self.pool = Some(pool);
        Ok(())
    }

    /// New's messages with their flags, dates and sizes; legacy's with their flags; the map.
    async fn read_sides(&mut self, rev: &mut Reverse<'_>) -> Result<(), SyncError> {
        let (new, legacy) = tokio::try_join!(
            fetch_all(
                rev.new,
                self.new.exists,
                "(UID FLAGS INTERNALDATE RFC822.SIZE)"
            ),
            fetch_all(rev.legacy, self.legacy.exists, "(UID FLAGS)")
        )?;
        self.on_new = new
            .into_iter()
            .map(|f| {
                let meta = Meta {
                    flags: f.flags.unwrap_or_default(),
                    date: f.internaldate,
                    size: f.size.unwrap_or(0),
                };
                (f.uid, meta)
            })
            .collect();
        self.on_legacy = legacy
            .into_iter()
            .map(|f| (f.uid, f.flags.unwrap_or_default()))
            .collect();
        self.map = rev
            .engine
            .store
            .uid_map(rev.user, &self.st.source_name)
            .await?;
        Ok(())
    }

    /// Map rows whose legacy message is gone say nothing any more (a forward pass would take
    /// them for expunges on legacy): forgotten, so that new's message, if it is still there,
    /// is carried back as an arrival.
    async fn forget_gone_from_legacy(&mut self, rev: &mut Reverse<'_>) -> Result<(), SyncError> {
        let gone: Vec<u32> = self
            .map
            .iter()
            .filter(|r| !self.on_legacy.contains_key(&r.source_uid))
            .map(|r| r.source_uid)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        rev.engine
            .store
            .delete_uids(rev.user, &self.st.source_name, &gone)
            .await?;
        self.map
            .retain(|r| self.on_legacy.contains_key(&r.source_uid));
        Ok(())
    }

    /// Intents a dead pass left: each found on legacy by content becomes a map row, the
    /// others are dropped (their message is appended again if new still has it). Returns how
    /// many were found.
    async fn resolve_pending(
        &mut self,
        rev: &mut Reverse<'_>,
        pending: Vec<ReversePending>,
    ) -> Result<u64, SyncError> {
        if pending.is_empty() {
            return Ok(0);
        }
        let pool = self.pool(rev.legacy).await?;
        let (mut found, mut lost) = (Vec::new(), Vec::new());
        for p in pending {
            match pool.take(&p.hash) {
                Some((l, size)) => found.push(pair(l, p.target_uid, p.hash, size)),
                None => lost.push(p.target_uid),
            }
        }
        let store = &rev.engine.store;
        let name = &self.st.source_name;
        store.confirm_reverse(rev.user, name, &found).await?;
        store.forget_reverse_pending(rev.user, name, &lost).await?;
        let n = found.len() as u64;
        self.record(found);
        Ok(n)
    }

    /// The legacy messages the map does not account for (no row, or a forward APPEND left
    /// unconfirmed), by content: hashed once per visit, and only when needed.
    pub async fn pool(&mut self, legacy: &mut Client) -> Result<&mut Pool, SyncError> {
        if self.pool.is_none() {
            let accounted: HashSet<u32> = self
                .map
                .iter()
                .filter(|r| r.target_uid.is_some())
                .map(|r| r.source_uid)
                .collect();
            let others: Vec<u32> = self
                .on_legacy
                .keys()
                .copied()
                .filter(|u| !accounted.contains(u))
                .collect();
            let hashed = if others.is_empty() {
                Vec::new()
            } else {
                hashes(legacy, &proto::format_uid_set(&others), 0, false).await?
            };
            self.pool = Some(Pool::new(hashed));
        }
        Ok(self.pool.get_or_insert_with(Pool::default))
    }

    /// Rows now in the store, into the visit's copy of the map (replacing any of the same
    /// legacy UID: a forward APPEND left unconfirmed).
    pub fn record(&mut self, rows: Vec<UidRow>) {
        let uids: HashSet<u32> = rows.iter().map(|r| r.source_uid).collect();
        self.map.retain(|r| !uids.contains(&r.source_uid));
        self.map.extend(rows);
    }

    /// After appends legacy acknowledged without APPENDUID: legacy's folder is selected and
    /// its messages read again, and the pool with them.
    async fn rescan_legacy(&mut self, rev: &mut Reverse<'_>) -> Result<(), SyncError> {
        self.legacy = rev.legacy.select(&self.st.source_name, false).await?;
        let all = fetch_all(rev.legacy, self.legacy.exists, "(UID FLAGS)").await?;
        self.on_legacy = all
            .into_iter()
            .map(|f| (f.uid, f.flags.unwrap_or_default()))
            .collect();
        self.pool = None;
        Ok(())
    }

    /// Legacy's flags and keywords of every pair present on both sides, set to new's where
    /// they differ (one `UID STORE` per distinct set).
    async fn carry_flags(&self, rev: &mut Reverse<'_>) -> Result<(), SyncError> {
        let mut changes = Vec::new();
        for r in &self.map {
            let Some(t) = r.target_uid.filter(|&t| t > 0) else {
                continue;
            };
            if let (Some(l), Some(n)) = (self.on_legacy.get(&r.source_uid), self.on_new.get(&t)) {
                if normalized(l) != normalized(&n.flags) {
                    changes.push((r.source_uid, n.flags.clone()));
                }
            }
        }
        rev.report.flag_updates += store_flags(rev.legacy, changes).await?;
        Ok(())
    }

    /// Pairs whose message the user expunged on new (its new UID is gone) while legacy still
    /// has it: expunged on legacy by `UID EXPUNGE` of exactly those UIDs, never a plain
    /// EXPUNGE, which would also take what the user flagged `\Deleted` on legacy. Nothing the
    /// map does not pair is ever expunged.
    async fn carry_expunges(&mut self, rev: &mut Reverse<'_>) -> Result<(), SyncError> {
        let gone: Vec<u32> = self
            .map
            .iter()
            .filter(|r| {
                r.target_uid
                    .is_some_and(|t| t > 0 && !self.on_new.contains_key(&t))
            })
            .map(|r| r.source_uid)
            .filter(|l| self.on_legacy.contains_key(l))
            .collect();
        if gone.is_empty() || self.rebuilt {
            return Ok(());
        }
        if !rev.legacy.has("UIDPLUS") {
            let why = format!(
                "{} message(s) expunged on new kept on legacy: it offers no UID EXPUNGE (UIDPLUS)",
                gone.len()
            );
            rev.warn(&self.st.source_name, why);
            return Ok(());
        }
        expunge_target(rev.legacy, &gone).await?;
        rev.engine
            .store
            .delete_uids(rev.user, &self.st.source_name, &gone)
            .await?;
        rev.report.expunged += gone.len() as u64;
        let gone: HashSet<u32> = gone.into_iter().collect();
        self.map.retain(|r| !gone.contains(&r.source_uid));
        Ok(())
    }
}

/// A UID map row: legacy UID `l` holds the message new has as UID `t`.
pub(super) fn pair(l: u32, t: u32, hash: String, size: u64) -> UidRow {
    UidRow {
        source_uid: l,
        target_uid: Some(t),
        hash,
        size,
        pending_at: None,
    }
}

/// `UID FETCH 1:* items` of the selected folder (none when it has no messages).
async fn fetch_all(c: &mut Client, exists: u32, items: &str) -> Result<Vec<Fetched>, SyncError> {
    if exists == 0 {
        return Ok(Vec::new());
    }
    let cmd = format!("UID FETCH 1:* {items}");
    let all = c.command("UID FETCH", &cmd).await?;
    Ok(all.iter().filter_map(Fetched::parse).collect())
}

/// (UID, content hash, size) of every message of the selected folder, one body at a time.
async fn hash_all(c: &mut Client, exists: u32) -> Result<Vec<(u32, String, u64)>, SyncError> {
    if exists == 0 {
        return Ok(Vec::new());
    }
    Ok(hashes(c, "1:*", 1, false).await?)
}
