//! One folder of a pass: crash recovery of unacknowledged APPENDs, re-matching after a
//! UIDVALIDITY change, expunges, flag and keyword changes, then the copy of new messages.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use tracing::{info, warn};

use super::client::{Client, Fetched, Next, MAX_MESSAGE};
use super::mailboxes::Folder;
use super::proto::{self, Response};
use super::{
    add, content_hash, copy, sha256_hex, Engine, PassReport, Progress, SyncError, HASH_PREFIX,
};
use crate::store::sync::{FolderState, UidRow};

/// Brings one mapped folder up to date.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn sync_folder(
    engine: &Engine,
    email: &str,
    src: &mut Client,
    tgt: &mut Client,
    folder: &Folder,
    target_name: &str,
    state: Option<FolderState>,
    report: &mut PassReport,
    progress: &Progress,
) -> Result<(), SyncError> {
    // Both run to completion, so neither connection is left in the middle of a response.
    let (s_sel, t_sel) = tokio::join!(
        src.select(&folder.raw, true),
        tgt.select(target_name, false)
    );
    let (s_sel, t_sel) = (s_sel?, t_sel?);
    // A folder new to the sync has its state written with the first intents of its copy (one
    // commit instead of two turns at the store before the first FETCH), or before anything
    // else that writes rows of it.
    let mut fresh = state.is_none();
    let mut st = state.unwrap_or_else(|| {
        FolderState::fresh(
            email,
            &folder.raw,
            target_name,
            s_sel.uidvalidity,
            t_sel.uidvalidity,
            folder.subscribed,
        )
    });
    st.target_name = target_name.to_owned();
    let condstore = s_sel.highestmodseq.is_some();
    let mut full_flags = !condstore || st.highest_modseq == 0;

    if st.source_uidvalidity != s_sel.uidvalidity || st.target_uidvalidity != t_sel.uidvalidity {
        warn!(
            user = %email, folder = %folder.raw,
            source_changed = st.source_uidvalidity != s_sel.uidvalidity,
            target_changed = st.target_uidvalidity != t_sel.uidvalidity,
            "UIDVALIDITY changed: re-matching by content"
        );
        rematch(engine, src, tgt, &mut st, t_sel.uidvalidity, report).await?;
        st.source_uidvalidity = s_sel.uidvalidity;
        st.target_uidvalidity = t_sel.uidvalidity;
        st.last_uid = 0;
        engine.store.put_sync_folder(&st).await?;
        full_flags = true;
    }

    let mut map = engine.store.uid_map(email, &st.source_name).await?;
    if map.iter().any(|r| r.target_uid.is_none()) {
        if let Some(uid) = recover(engine, src, tgt, &st, &map, report).await? {
            // A forgotten row may lie below `last_uid` (a later batch was confirmed first):
            // look from there again; the map keeps everything copied from being copied twice.
            st.last_uid = st.last_uid.min(uid.saturating_sub(1));
        }
        map = engine.store.uid_map(email, &st.source_name).await?;
    }

    // New messages: UIDs above last_uid that the map does not hold yet.
    let known: HashSet<u32> = map.iter().map(|r| r.source_uid).collect();
    let mut todo = Vec::new();
    let mut too_large = Vec::new();
    let first = st.last_uid.saturating_add(1);
    if s_sel.exists > 0 {
        for r in src
            .command(
                "UID FETCH",
                &format!("UID FETCH {first}:* (UID RFC822.SIZE)"),
            )
            .await?
        {
            if let Some(f) = Fetched::parse(&r) {
                if f.uid >= first && !known.contains(&f.uid) {
                    let size = f.size.unwrap_or(0);
                    if size > MAX_MESSAGE {
                        too_large.push(f.uid);
                    } else {
                        todo.push((f.uid, size));
                    }
                }
            }
        }
    }
    todo.sort_unstable();
    if fresh && !too_large.is_empty() {
        engine.store.put_sync_folder(&st).await?;
        fresh = false;
    }
    for uid in &too_large {
        warn!(user = %email, folder = %folder.raw, uid, "message larger than the copy limit, not copied");
        engine
            .store
            .add_pending(email, &st.source_name, &[UidRow::intent(*uid, 0)])
            .await?;
        engine
            .store
            .confirm_uids(email, &st.source_name, &[(*uid, 0)])
            .await?;
        report.failed += 1;
    }

    // Expunges: legacy holds fewer of the known messages than the map says.
    if s_sel.exists as usize != map.len() + todo.len() + too_large.len() && !map.is_empty() {
        expunge(engine, email, src, tgt, &st, &map, report).await?;
        map = engine.store.uid_map(email, &st.source_name).await?;
    }

    // Flags and keywords of messages copied earlier.
    if !map.is_empty() {
        let to_target: HashMap<u32, u32> = map
            .iter()
            .filter_map(|r| Some((r.source_uid, r.target_uid.filter(|t| *t > 0)?)))
            .collect();
        let changed = if full_flags {
            full_flag_compare(src, tgt, &to_target).await?
        } else {
            let max = map.iter().map(|r| r.source_uid).max().unwrap_or(1);
            let mut out = Vec::new();
            for r in src
                .command(
                    "UID FETCH",
                    &format!(
                        "UID FETCH 1:{max} (UID FLAGS) (CHANGEDSINCE {})",
                        st.highest_modseq
                    ),
                )
                .await?
            {
                if let Some(f) = Fetched::parse(&r) {
                    if let (Some(t), Some(flags)) = (to_target.get(&f.uid), f.flags) {
                        out.push((*t, flags));
                    }
                }
            }
            out
        };
        report.flag_updates += store_flags(tgt, changed).await?;
    }

    let total_new: u64 = todo.iter().map(|t| t.1).sum();
    add(&progress.messages_total, todo.len() as u64);
    add(&progress.bytes_total, total_new);
    let mut needs_recovery = copy::copy_new(
        engine, email, src, tgt, &mut st, fresh, &todo, report, progress,
    )
    .await?;
    // The lowest UID whose APPEND did not land: the next pass starts there.
    let mut redo = None;
    if needs_recovery {
        let map = engine.store.uid_map(email, &st.source_name).await?;
        redo = recover(engine, src, tgt, &st, &map, report).await?;
        needs_recovery = false;
    }
    debug_assert!(!needs_recovery);

    let map = engine.store.uid_map(email, &st.source_name).await?;
    st.last_uid = map
        .iter()
        .map(|r| r.source_uid)
        .max()
        .unwrap_or(0)
        .max(st.last_uid);
    st.highest_modseq = s_sel.highestmodseq.unwrap_or(0);
    st.source_uidnext = s_sel.uidnext;
    if let Some(uid) = redo {
        st.last_uid = st.last_uid.min(uid.saturating_sub(1));
        // Nor may STATUS call the folder unchanged next time: those messages are still to copy.
        st.source_uidnext = 0;
    }
    st.source_messages = s_sel.exists;
    st.source_bytes = map.iter().map(|r| r.size).sum();
    st.subscribed = folder.subscribed;
    engine.store.put_sync_folder(&st).await?;
    Ok(())
}

/// Fetches `(UID, content hash, size)` of the messages in `range`, streaming (one body in
/// memory at a time). With `also_sha256`, each message is listed a second time under its bare
/// SHA-256, the hash older versions recorded.
async fn hashes(
    c: &mut Client,
    range: &str,
    min_uid: u32,
    also_sha256: bool,
) -> Result<Vec<(u32, String, u64)>, SyncError> {
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

/// How long after a pending row was written an APPEND of a killed process may still be
/// committed by the server (it had received the whole command before the process died).
const LATE_COMMIT_GRACE_SECS: i64 = 5;
/// The least time a recovery watches the target before it gives up on unmatched rows.
const LATE_COMMIT_RESCAN: std::time::Duration = std::time::Duration::from_secs(1);

/// After a crash: finds in the target the messages whose APPEND was sent but not recorded,
/// by content hash, in order; records them, and forgets the pending rows not found once the
/// server cannot commit them any more. Those are copied again: the lowest of their UIDs is
/// returned, for the copy to start there. A pending row without a hash (an intent, written
/// before its message was fetched) takes the hash of the legacy message it names: messages
/// are immutable, so it is the hash of what was appended.
async fn recover(
    engine: &Engine,
    src: &mut Client,
    tgt: &mut Client,
    st: &FolderState,
    map: &[UidRow],
    report: &mut PassReport,
) -> Result<Option<u32>, SyncError> {
    let started = tokio::time::Instant::now();
    let max_confirmed = map.iter().filter_map(|r| r.target_uid).max().unwrap_or(0);
    let rows: Vec<&UidRow> = map.iter().filter(|r| r.target_uid.is_none()).collect();
    let newest = rows.iter().filter_map(|r| r.pending_at).max().unwrap_or(0);
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
    // (legacy UID, hash); a message expunged on legacy since has none and cannot be matched:
    // if its APPEND had landed, that copy stays on new (never delete what may not be ours).
    let mut pending: Vec<(u32, &str)> = Vec::new();
    // Rows that can never match: forgotten with the unmatched ones.
    let mut gone: Vec<u32> = Vec::new();
    for r in &rows {
        let hash = if r.hash.is_empty() {
            from_legacy.get(&r.source_uid).map(String::as_str)
        } else {
            Some(r.hash.as_str())
        };
        match hash {
            Some(h) => pending.push((r.source_uid, h)),
            None => {
                warn!(
                    user = %st.email, folder = %st.source_name, uid = r.source_uid,
                    "pending message gone from legacy: a copy appended before the crash would stay"
                );
                gone.push(r.source_uid);
            }
        }
    }
    let mut by_hash: HashMap<String, VecDeque<u32>> = HashMap::new();
    // Rows recorded by a version that hashed with SHA-256 still match their message.
    let old_format = pending.iter().any(|(_, h)| !h.starts_with(HASH_PREFIX));
    let mut seen = max_confirmed;
    let mut matched = Vec::new();
    // A target message is listed under two hashes when `old_format`: it answers one row only.
    let mut taken: HashSet<u32> = HashSet::new();
    loop {
        // NOOP first: messages committed by another (dead) session become visible.
        tgt.command("NOOP", "NOOP").await?;
        let range = format!("{}:*", seen + 1);
        for (uid, h, _) in hashes(tgt, &range, seen + 1, old_format).await? {
            seen = seen.max(uid);
            by_hash.entry(h).or_default().push_back(uid);
        }
        pending.retain(|(source_uid, hash)| {
            let Some(q) = by_hash.get_mut(*hash) else {
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
        // Intents are written ahead of their APPENDs, so a row's age says little about when
        // its APPEND went out: look again once the server has had time to commit whatever
        // the dead process had fully sent.
        let settled = crate::store::now() - newest > LATE_COMMIT_GRACE_SECS
            && started.elapsed() >= LATE_COMMIT_RESCAN;
        if pending.is_empty() || settled {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    matched.sort_unstable();
    let missing: Vec<u32> = pending.iter().map(|(uid, _)| *uid).chain(gone).collect();
    info!(
        user = %st.email, folder = %st.source_name, found = matched.len(), not_found = missing.len(),
        "recovered unacknowledged appends"
    );
    engine
        .store
        .confirm_uids(&st.email, &st.source_name, &matched)
        .await?;
    engine
        .store
        .delete_uids(&st.email, &st.source_name, &missing)
        .await?;
    report.recovered += matched.len() as u64;
    Ok(missing.iter().copied().min())
}

/// After a UIDVALIDITY change on either side: rebuilds the UID map by content, so nothing is
/// appended twice; target messages that were ours but no longer exist on legacy are expunged.
async fn rematch(
    engine: &Engine,
    src: &mut Client,
    tgt: &mut Client,
    st: &mut FolderState,
    target_uidvalidity: u32,
    report: &mut PassReport,
) -> Result<(), SyncError> {
    let old = engine.store.uid_map(&st.email, &st.source_name).await?;
    let target_same = st.target_uidvalidity == target_uidvalidity;
    let source_msgs = hashes(src, "1:*", 1, false).await?;
    let target_msgs = hashes(tgt, "1:*", 1, false).await?;
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
    report.rematched += rows.len() as u64;
    if target_same {
        // Ours: recorded in the old map, or appended after its last confirmed UID.
        let ours: HashSet<u32> = old.iter().filter_map(|r| r.target_uid).collect();
        let max_ours = ours.iter().copied().max().unwrap_or(0);
        let leftover: Vec<u32> = by_hash
            .values()
            .flatten()
            .copied()
            .filter(|t| ours.contains(t) || *t > max_ours)
            .collect();
        if !leftover.is_empty() {
            expunge_target(tgt, &leftover).await?;
            report.expunged += leftover.len() as u64;
        }
    }
    engine.store.replace_uid_map(st, &rows).await?;
    Ok(())
}

/// Propagates legacy expunges: map rows whose legacy UID is gone.
async fn expunge(
    engine: &Engine,
    email: &str,
    src: &mut Client,
    tgt: &mut Client,
    st: &FolderState,
    map: &[UidRow],
    report: &mut PassReport,
) -> Result<(), SyncError> {
    let max = map.iter().map(|r| r.source_uid).max().unwrap_or(0);
    let present: HashSet<u32> = src
        .uid_search(&format!("1:{max}"))
        .await?
        .into_iter()
        .collect();
    let gone: Vec<&UidRow> = map
        .iter()
        .filter(|r| !present.contains(&r.source_uid))
        .collect();
    if gone.is_empty() {
        return Ok(());
    }
    let targets: Vec<u32> = gone
        .iter()
        .filter_map(|r| r.target_uid.filter(|t| *t > 0))
        .collect();
    expunge_target(tgt, &targets).await?;
    let uids: Vec<u32> = gone.iter().map(|r| r.source_uid).collect();
    engine
        .store
        .delete_uids(email, &st.source_name, &uids)
        .await?;
    report.expunged += targets.len() as u64;
    Ok(())
}

async fn expunge_target(tgt: &mut Client, uids: &[u32]) -> Result<(), SyncError> {
    if uids.is_empty() {
        return Ok(());
    }
    let set = proto::format_uid_set(uids);
    tgt.command(
        "UID STORE",
        &format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"),
    )
    .await?;
    if tgt.has("UIDPLUS") {
        tgt.command("UID EXPUNGE", &format!("UID EXPUNGE {set}"))
            .await?;
    } else {
        // Without UIDPLUS, EXPUNGE also removes other \Deleted messages; those mirror
        // legacy's \Deleted flags, which legacy users expect to be expunged eventually.
        tgt.command("EXPUNGE", "EXPUNGE").await?;
    }
    Ok(())
}

/// Flags of both sides for every mapped pair; returns target UIDs whose flags differ.
async fn full_flag_compare(
    src: &mut Client,
    tgt: &mut Client,
    to_target: &HashMap<u32, u32>,
) -> Result<Vec<(u32, Vec<String>)>, SyncError> {
    let flags = |rs: Vec<Response>| -> HashMap<u32, Vec<String>> {
        rs.iter()
            .filter_map(Fetched::parse)
            .filter_map(|f| Some((f.uid, f.flags?)))
            .collect()
    };
    let (s, t) = tokio::try_join!(
        src.command("UID FETCH", "UID FETCH 1:* (UID FLAGS)"),
        tgt.command("UID FETCH", "UID FETCH 1:* (UID FLAGS)")
    )?;
    let (s, t) = (flags(s), flags(t));
    let mut out = Vec::new();
    for (su, tu) in to_target {
        if let (Some(sf), Some(tf)) = (s.get(su), t.get(tu)) {
            if normalized(sf) != normalized(tf) {
                out.push((*tu, sf.clone()));
            }
        }
    }
    Ok(out)
}

/// Flags compared case-insensitively and in any order (RFC 3501: flags are case-insensitive).
pub fn normalized(flags: &[String]) -> Vec<String> {
    let mut v: Vec<String> = flags
        .iter()
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
        .map(|f| f.to_ascii_lowercase())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Sets target flags (replacing), one `UID STORE` per distinct flag set, pipelined.
async fn store_flags(tgt: &mut Client, changes: Vec<(u32, Vec<String>)>) -> Result<u64, SyncError> {
    let n = changes.len() as u64;
    let mut groups: BTreeMap<Vec<String>, Vec<u32>> = BTreeMap::new();
    for (uid, flags) in changes {
        let mut f: Vec<String> = flags
            .into_iter()
            .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
            .collect();
        f.sort();
        groups.entry(f).or_default().push(uid);
    }
    let mut tags = Vec::new();
    let mut out = Vec::new();
    for (flags, uids) in &groups {
        let tag = tgt.tag();
        out.extend_from_slice(
            format!(
                "{tag} UID STORE {} FLAGS.SILENT ({})\r\n",
                proto::format_uid_set(uids),
                flags.join(" ")
            )
            .as_bytes(),
        );
        tags.push(tag);
    }
    if tags.is_empty() {
        return Ok(0);
    }
    tgt.write(&out).await?;
    for tag in tags {
        tgt.collect("UID STORE", &tag).await?;
    }
    Ok(n)
}
