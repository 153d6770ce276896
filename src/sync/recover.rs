//! Matching messages by content: after a crash, the APPENDs a killed pass sent but did not
//! record (pending rows) are found on new instead of being appended twice; after a
//! UIDVALIDITY change, the UID map is rebuilt.

use std::collections::{HashMap, HashSet, VecDeque};

use tracing::{info, warn};

use super::client::{Client, Fetched, Next};
use super::incremental::expunge_target;
use super::pass::Pass;
use super::proto;
use super::{content_hash, sha256_hex, SyncError, HASH_PREFIX};
use crate::backend::error::BackendError;
use crate::store::sync::{FolderState, UidRow};

/// How long after a pending row was written an APPEND of a killed process may still be
/// committed by the server (it had received the whole command before the process died).
pub(super) const LATE_COMMIT_GRACE_SECS: i64 = 5;
/// The least time a recovery watches the target before it gives up on unmatched rows.
const LATE_COMMIT_RESCAN: std::time::Duration = std::time::Duration::from_secs(1);
/// Between two looks at the target while a late commit may still come.
const RESCAN_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Fetches `(UID, content hash, size)` of the messages in `range`, streaming (one body in
/// memory at a time). With `also_sha256`, each message is listed a second time under its bare
/// SHA-256, the hash older versions recorded.
pub(crate) async fn hashes(
    c: &mut Client,
    range: &str,
    min_uid: u32,
    also_sha256: bool,
) -> Result<Vec<(u32, String, u64)>, BackendError> {
    let tag = c.tag();
    c.write(format!("{tag} UID FETCH {range} (UID BODY.PEEK[])\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    while let Next::Untagged(r) = c.next_of("UID FETCH", &tag).await? {
        if let Some(f) = Fetched::parse(&r) {
            if let (true, Some(body)) = (f.uid >= min_uid, f.body) {
                out.push((f.uid, content_hash(&body), body.len() as u64));
                if also_sha256 {
                    out.push((f.uid, sha256_hex(&body), body.len() as u64));
                }
            }
        }
    }
    out.sort_unstable_by_key(|x| x.0);
    Ok(out)
}

/// After a crash: finds on new the messages whose APPEND was sent but not recorded, by
/// content hash, in order; records them, and forgets the pending rows not found once the
/// server cannot commit them any more. Those are copied again: the lowest of their UIDs is
/// returned, for the copy to start there.
pub(crate) async fn recover(
    pass: &mut Pass<'_>,
    st: &FolderState,
    map: &[UidRow],
) -> Result<Option<u32>, SyncError> {
    let rows: Vec<&UidRow> = map.iter().filter(|r| r.target_uid.is_none()).collect();
    let (pending, gone) = pending_hashes(pass.src, st, &rows).await?;
    let newest = rows.iter().filter_map(|r| r.pending_at).max().unwrap_or(0);
    let max_confirmed = map.iter().filter_map(|r| r.target_uid).max().unwrap_or(0);
    let watch = Watch {
        seen: max_confirmed,
        newest,
    };
    let (matched, unmatched) = watch.match_on_target(pass.tgt, pending).await?;
    let missing: Vec<u32> = unmatched.into_iter().chain(gone).collect();
    info!(
        user = %st.email, folder = %st.source_name, found = matched.len(), not_found = missing.len(),
        "recovered unacknowledged appends"
    );
    let store = &pass.engine.store;
    store
        .confirm_uids(&st.email, &st.source_name, &matched)
        .await?;
    store
        .delete_uids(&st.email, &st.source_name, &missing)
        .await?;
    pass.report.recovered += matched.len() as u64;
    Ok(missing.iter().copied().min())
}

/// The hash of each pending row: its own, or, for an intent written before its message was
/// fetched, that of the legacy message it names (messages are immutable, so it is the hash of
/// what was appended). Returns (legacy UID, hash) pairs, and the rows whose message legacy
/// no longer has, which can never be matched.
async fn pending_hashes(
    src: &mut Client,
    st: &FolderState,
    rows: &[&UidRow],
) -> Result<(Vec<(u32, String)>, Vec<u32>), SyncError> {
    let unhashed: Vec<u32> = rows
        .iter()
        .filter(|r| r.hash.is_empty())
        .map(|r| r.source_uid)
        .collect();
    let from_legacy: HashMap<u32, String> = if unhashed.is_empty() {
        HashMap::new()
    } else {
        let set = proto::format_uid_set(&unhashed);
        hashes(src, &set, 0, false)
            .await?
            .into_iter()
            .map(|(uid, h, _)| (uid, h))
            .collect()
    };
    let (mut pending, mut gone) = (Vec::new(), Vec::new());
    for r in rows {
        let hash = if r.hash.is_empty() {
            from_legacy.get(&r.source_uid).cloned()
        } else {
            Some(r.hash.clone())
        };
        match hash {
            Some(h) => pending.push((r.source_uid, h)),
            // If its APPEND had landed, that copy stays on new: never delete what may not be
            // ours.
            None => {
                warn!(
                    user = %st.email, folder = %st.source_name, uid = r.source_uid,
                    "pending message gone from legacy: a copy appended before the crash would stay"
                );
                gone.push(r.source_uid);
            }
        }
    }
    Ok((pending, gone))
}

/// Watching new's messages above the last confirmed one for pending APPENDs.
struct Watch {
    /// Highest target UID already looked at.
    seen: u32,
    /// When the newest pending row was written (store time, seconds).
    newest: i64,
}

impl Watch {
    /// Matches `pending` (legacy UID, hash) against new's messages, each target message
    /// answering one row; returns the (legacy, new) pairs and the legacy UIDs left unmatched.
    async fn match_on_target(
        mut self,
        tgt: &mut Client,
        mut pending: Vec<(u32, String)>,
    ) -> Result<(Vec<(u32, u32)>, Vec<u32>), SyncError> {
        let started = tokio::time::Instant::now();
        let mut by_hash: HashMap<String, VecDeque<u32>> = HashMap::new();
        // Rows recorded by a version that hashed with SHA-256 still match their message.
        let old_format = pending.iter().any(|(_, h)| !h.starts_with(HASH_PREFIX));
        let mut matched = Vec::new();
        // A target message is listed under two hashes when `old_format`.
        let mut taken: HashSet<u32> = HashSet::new();
        loop {
            // NOOP first: messages committed by another (dead) session become visible.
            tgt.command("NOOP", "NOOP").await?;
            let range = format!("{}:*", self.seen + 1);
            for (uid, h, _) in hashes(tgt, &range, self.seen + 1, old_format).await? {
                self.seen = self.seen.max(uid);
                by_hash.entry(h).or_default().push_back(uid);
            }
            pending.retain(|(source_uid, hash)| {
                let Some(q) = by_hash.get_mut(hash) else {
                    return true;
                };
                while let Some(t) = q.pop_front() {
                    if taken.insert(t) {
                        matched.push((*source_uid, t));
                        return false;
                    }
                }
                true
            });
            if pending.is_empty() || self.settled(started) {
                break;
            }
            tokio::time::sleep(RESCAN_EVERY).await;
        }
        matched.sort_unstable();
        Ok((matched, pending.into_iter().map(|(uid, _)| uid).collect()))
    }

    /// Intents are written ahead of their APPENDs, so a row's age says little about when its
    /// APPEND went out: the watch ends once the server has had time to commit whatever the
    /// dead process had fully sent.
    fn settled(&self, started: tokio::time::Instant) -> bool {
        crate::store::now() - self.newest > LATE_COMMIT_GRACE_SECS
            && started.elapsed() >= LATE_COMMIT_RESCAN
    }
}

/// After a UIDVALIDITY change on either side: rebuilds the UID map by content, so nothing is
/// appended twice; target messages that were ours but no longer exist on legacy are expunged.
pub(crate) async fn rematch(
    pass: &mut Pass<'_>,
    st: &mut FolderState,
    target_uidvalidity: u32,
) -> Result<(), SyncError> {
    let store = &pass.engine.store;
    let old = store.uid_map(&st.email, &st.source_name).await?;
    let target_same = st.target_uidvalidity == target_uidvalidity;
    let source_msgs = hashes(pass.src, "1:*", 1, false).await?;
    let target_msgs = hashes(pass.tgt, "1:*", 1, false).await?;
    let mut by_hash: HashMap<&str, VecDeque<u32>> = HashMap::new();
    for (uid, h, _) in &target_msgs {
        by_hash.entry(h.as_str()).or_default().push_back(*uid);
    }
    let mut rows = Vec::new();
    for (uid, h, size) in &source_msgs {
        if let Some(t) = by_hash.get_mut(h.as_str()).and_then(|q| q.pop_front()) {
            rows.push(UidRow {
                source_uid: *uid,
                target_uid: Some(t),
                hash: h.clone(),
                size: *size,
                pending_at: None,
            });
        }
    }
    pass.report.rematched += rows.len() as u64;
    // New's messages that no legacy message matches any more were expunged on legacy: the
    // sync's own copies go too. Only while new's UIDs still mean what the old map says.
    let leftover = if target_same {
        ours_among(&old, &by_hash)
    } else {
        Vec::new()
    };
    if !leftover.is_empty() {
        expunge_target(pass.tgt, &leftover).await?;
        pass.report.expunged += leftover.len() as u64;
    }
    store.replace_uid_map(st, &rows).await?;
    Ok(())
}

/// Of new's messages no legacy message matched (`unmatched`, by hash), those the sync put
/// there: confirmed in the old UID map, or (as many as there are such rows) matching the hash
/// of one of its pending rows. Anything else, delivered or appended on new directly, stays.
fn ours_among(old: &[UidRow], unmatched: &HashMap<&str, VecDeque<u32>>) -> Vec<u32> {
    let confirmed: HashSet<u32> = old
        .iter()
        .filter_map(|r| r.target_uid.filter(|&t| t > 0))
        .collect();
    let mut pending: HashMap<&str, usize> = HashMap::new();
    for r in old
        .iter()
        .filter(|r| r.target_uid.is_none() && !r.hash.is_empty())
    {
        *pending.entry(r.hash.as_str()).or_default() += 1;
    }
    let mut out = Vec::new();
    for (hash, uids) in unmatched {
        for &t in uids {
            if confirmed.contains(&t) {
                out.push(t);
            } else if let Some(n) = pending.get_mut(hash).filter(|n| **n > 0) {
                *n -= 1;
                out.push(t);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(source_uid: u32, target_uid: Option<u32>, hash: &str) -> UidRow {
        UidRow {
            source_uid,
            target_uid,
            hash: hash.into(),
            size: 1,
            pending_at: None,
        }
    }

    #[test]
    fn only_the_syncs_own_copies_are_expunged_after_a_rematch() {
        let old = [
            row(1, Some(10), "a"),
            row(2, Some(11), "b"),
            row(3, None, "c"),
            row(4, None, ""),
        ];
        let unmatched: HashMap<&str, VecDeque<u32>> = [
            // 10: ours, confirmed. 20: same content as ours but delivered on new: stays.
            ("a", VecDeque::from([10, 20])),
            // 12: appended by the crashed pass (pending "c"); 13: a second copy of it, not ours.
            ("c", VecDeque::from([12, 13])),
            // 30: delivered directly on new, after our last confirmed UID.
            ("z", VecDeque::from([30])),
        ]
        .into_iter()
        .collect();
        assert_eq!(ours_among(&old, &unmatched), vec![10, 12]);
    }
}
