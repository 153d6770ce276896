//! What changed on legacy since the last pass, carried to new for messages copied earlier:
//! expunges, flag and keyword changes.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::client::{Client, Fetched};
use super::pass::Pass;
use super::proto::{self, Response};
use super::SyncError;
use crate::backend::error::BackendError;
use crate::store::sync::{FolderState, UidRow};

/// Propagates legacy expunges: map rows whose legacy UID is gone.
pub(crate) async fn expunge(
    pass: &mut Pass<'_>,
    st: &FolderState,
    map: &[UidRow],
) -> Result<(), SyncError> {
    let max = map.iter().map(|r| r.source_uid).max().unwrap_or(0);
    let present: HashSet<u32> = pass
        .src
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
    expunge_target(pass.tgt, &targets).await?;
    let uids: Vec<u32> = gone.iter().map(|r| r.source_uid).collect();
    pass.engine
        .store
        .delete_uids(pass.user, &st.source_name, &uids)
        .await?;
    pass.report.expunged += targets.len() as u64;
    Ok(())
}

/// Expunges `uids` on new's selected folder.
pub(crate) async fn expunge_target(tgt: &mut Client, uids: &[u32]) -> Result<(), BackendError> {
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
pub(crate) async fn full_flag_compare(
    src: &mut Client,
    tgt: &mut Client,
    to_target: &HashMap<u32, u32>,
) -> Result<Vec<(u32, Vec<String>)>, BackendError> {
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

/// Legacy's flags of mapped messages (up to legacy UID `max`) that CONDSTORE says changed
/// since `modseq`, keyed by their target UID.
pub(crate) async fn changed_flags(
    src: &mut Client,
    to_target: &HashMap<u32, u32>,
    max: u32,
    modseq: u64,
) -> Result<Vec<(u32, Vec<String>)>, BackendError> {
    let cmd = format!("UID FETCH 1:{max} (UID FLAGS) (CHANGEDSINCE {modseq})");
    let mut out = Vec::new();
    for r in src.command("UID FETCH", &cmd).await? {
        if let Some(f) = Fetched::parse(&r) {
            if let (Some(t), Some(flags)) = (to_target.get(&f.uid), f.flags) {
                out.push((*t, flags));
            }
        }
    }
    Ok(out)
}

/// Sets target flags (replacing), one `UID STORE` per distinct flag set, pipelined.
pub(crate) async fn store_flags(
    tgt: &mut Client,
    changes: Vec<(u32, Vec<String>)>,
) -> Result<u64, BackendError> {
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
