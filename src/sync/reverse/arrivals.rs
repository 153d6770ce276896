//! Mail that arrived on new since the cutover, appended to legacy in small batches. Each
//! batch: room in the engine's memory budget, its bodies fetched from new and hashed, any
//! found on legacy by content (a dead pass's appends) recorded instead, intents for the rest
//! made durable, the APPENDs (pipelined with LITERAL+, else one at a time), then each
//! APPENDUID recorded as a UID map row with its intent dropped, in one transaction.

use std::collections::HashSet;

use bytes::Bytes;
use tokio::time::Instant;

use super::folder::{pair, Meta, Visit};
use super::Reverse;
use crate::backend::error::BackendError;
use crate::route::Route;
use crate::sync::client::{Client, Fetched, Next, MAX_MESSAGE};
use crate::sync::copy::{append_command, message_head};
use crate::sync::proto::{self, Response, StatusText};
use crate::sync::{content_hash, SyncError};

/// Messages per batch: small, since a rollback's delta is usually small, and each batch's
/// bodies are held until legacy has answered for them.
const BATCH_MESSAGES: usize = 32;
/// Bytes per batch (a larger message goes alone).
const BATCH_BYTES: u64 = 8 * 1024 * 1024;

/// A message of new on its way to legacy.
struct Arrival {
    /// Its UID on new.
    uid: u32,
    meta: Meta,
    body: Bytes,
    hash: String,
}

/// What legacy answered to one APPEND: its tagged OK, or a refusal of that message alone.
type Reply = Result<StatusText, BackendError>;

/// Appends to legacy what new has and the UID map does not; returns whether legacy
/// acknowledged any APPEND without a usable APPENDUID (its intent is then left for a match by
/// content).
pub(super) async fn carry_arrivals(
    rev: &mut Reverse<'_>,
    v: &mut Visit,
) -> Result<bool, SyncError> {
    let todo = arrivals(rev, v);
    let mut unconfirmed = false;
    for batch in batches(&todo) {
        let bytes: u64 = batch.iter().map(|b| b.1).sum();
        let uids: Vec<u32> = batch.iter().map(|b| b.0).collect();
        let _room = rev
            .engine
            .memory()
            .hold(bytes)
            .await
            .map_err(|_| rev.new.protocol("memory budget closed"))?;
        let fetched = fetch_bodies(rev.new, v, &uids).await?;
        let to_append = found_on_legacy(rev, v, fetched).await?;
        unconfirmed |= append_batch(rev, v, to_append).await?;
    }
    Ok(unconfirmed)
}

/// New's messages that the map does not pair with a legacy message, (UID, size) in UID order;
/// those too large to copy are reported.
fn arrivals(rev: &mut Reverse<'_>, v: &Visit) -> Vec<(u32, u64)> {
    let mapped: HashSet<u32> = v
        .map
        .iter()
        .filter_map(|r| r.target_uid.filter(|&t| t > 0))
        .collect();
    let mut todo = Vec::new();
    for (&uid, meta) in &v.on_new {
        if mapped.contains(&uid) {
            continue;
        }
        if meta.size > MAX_MESSAGE {
            let why =
                format!("message {uid} of new is larger than the copy limit; not carried back");
            rev.warn(&v.st.source_name, why);
            continue;
        }
        todo.push((uid, meta.size));
    }
    todo
}

/// `todo` in batches bounded in count and bytes, UIDs in order.
fn batches(todo: &[(u32, u64)]) -> Vec<Vec<(u32, u64)>> {
    let mut out: Vec<Vec<(u32, u64)>> = Vec::new();
    let mut bytes = 0;
    for &(uid, size) in todo {
        match out.last_mut() {
            Some(b) if b.len() < BATCH_MESSAGES && bytes + size <= BATCH_BYTES => {
                b.push((uid, size))
            }
            _ => {
                out.push(vec![(uid, size)]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    out
}

/// The bodies of `uids` from new (those it still has), hashed.
async fn fetch_bodies(
    new: &mut Client,
    v: &Visit,
    uids: &[u32],
) -> Result<Vec<Arrival>, SyncError> {
    let cmd = format!(
        "UID FETCH {} (UID BODY.PEEK[])",
        proto::format_uid_set(uids)
    );
    let mut out: Vec<Arrival> = Vec::new();
    for r in new.command("UID FETCH", &cmd).await? {
        let Some(f) = Fetched::parse(&r) else {
            continue;
        };
        // Only what was asked for: anything else has no place in this batch's intents.
        let (Some(body), Some(meta)) = (f.body, v.on_new.get(&f.uid)) else {
            continue;
        };
        if uids.binary_search(&f.uid).is_ok() && !out.iter().any(|a| a.uid == f.uid) {
            out.push(Arrival {
                uid: f.uid,
                meta: meta.clone(),
                hash: content_hash(&body),
                body,
            });
        }
    }
    out.sort_unstable_by_key(|a| a.uid);
    Ok(out)
}

/// Records the messages legacy already holds (by content, among those the map does not
/// account for) instead of appending them; returns the others.
async fn found_on_legacy(
    rev: &mut Reverse<'_>,
    v: &mut Visit,
    fetched: Vec<Arrival>,
) -> Result<Vec<Arrival>, SyncError> {
    let pool = v.pool(rev.legacy).await?;
    let (mut found, mut rest) = (Vec::new(), Vec::new());
    for a in fetched {
        match pool.take(&a.hash) {
            Some((l, size)) => found.push(pair(l, a.uid, a.hash, size)),
            None => rest.push(a),
        }
    }
    if !found.is_empty() {
        rev.engine
            .store
            .confirm_reverse(rev.user, &v.st.source_name, &found)
            .await?;
        rev.report.matched += found.len() as u64;
        v.record(found);
    }
    Ok(rest)
}

/// Appends one batch to legacy once its intents are durable, and records the outcome;
/// returns whether any APPEND was acknowledged without a usable APPENDUID.
async fn append_batch(
    rev: &mut Reverse<'_>,
    v: &mut Visit,
    batch: Vec<Arrival>,
) -> Result<bool, SyncError> {
    if batch.is_empty() {
        return Ok(false);
    }
    let intents: Vec<(u32, String)> = batch.iter().map(|a| (a.uid, a.hash.clone())).collect();
    let store = &rev.engine.store;
    store
        .add_reverse_pending(rev.user, &v.st.source_name, &intents)
        .await?;
    let bytes: u64 = batch.iter().map(|a| a.body.len() as u64).sum();
    let pace = rev.engine.pace(Route::Legacy);
    pace.wait_pause().await;
    rev.engine.throttle.acquire(bytes).await;
    let sent = Instant::now();
    let replies = if rev.legacy.has("LITERAL+") {
        send_pipelined(rev.legacy, &v.st.source_name, &batch).await?
    } else {
        send_one_by_one(rev.legacy, &v.st.source_name, &batch).await?
    };
    pace.sample(sent.elapsed(), bytes);
    record_appended(rev, v, batch, replies).await
}

/// All APPENDs of a batch written at once (LITERAL+), then their replies read in order.
async fn send_pipelined(
    legacy: &mut Client,
    mbox: &str,
    batch: &[Arrival],
) -> Result<Vec<Reply>, BackendError> {
    let mbox = proto::quote(mbox);
    let (mut parts, mut head, mut tags) = (Vec::new(), Vec::new(), Vec::new());
    for a in batch {
        let tag = legacy.tag();
        append_command(&mut head, &tag, &mbox);
        let (flags, date) = (&a.meta.flags, a.meta.date.as_deref());
        message_head(&mut head, flags, date, a.body.len() as u64, true);
        parts.push(Bytes::from(std::mem::take(&mut head)));
        parts.push(a.body.clone());
        head.extend_from_slice(b"\r\n");
        tags.push(tag);
    }
    parts.push(Bytes::from(head));
    // A session that fails mid-literal is dropped, not logged out: legacy discards the message.
    legacy.set_literal_open(true);
    legacy.write_parts(&parts).await?;
    legacy.set_literal_open(false);
    let mut replies = Vec::with_capacity(tags.len());
    for tag in &tags {
        replies.push(reply(legacy, tag).await?);
    }
    Ok(replies)
}

/// One APPEND at a time with a synchronizing literal, sent after legacy's continuation.
async fn send_one_by_one(
    legacy: &mut Client,
    mbox: &str,
    batch: &[Arrival],
) -> Result<Vec<Reply>, BackendError> {
    let mbox = proto::quote(mbox);
    let mut replies = Vec::with_capacity(batch.len());
    for a in batch {
        let tag = legacy.tag();
        let mut head = Vec::new();
        append_command(&mut head, &tag, &mbox);
        let (flags, date) = (&a.meta.flags, a.meta.date.as_deref());
        message_head(&mut head, flags, date, a.body.len() as u64, false);
        legacy.write(&head).await?;
        if let Some(refused) = continuation(legacy, &tag).await? {
            replies.push(Err(refused));
            continue;
        }
        legacy.set_literal_open(true);
        legacy.write_literal(&a.body).await?;
        legacy.write_literal(b"\r\n").await?;
        legacy.set_literal_open(false);
        replies.push(reply(legacy, &tag).await?);
    }
    Ok(replies)
}

/// Waits for the continuation of the APPEND `tag`; a refusal before it is returned when it
/// concerns this message alone.
async fn continuation(
    legacy: &mut Client,
    tag: &str,
) -> Result<Option<BackendError>, BackendError> {
    loop {
        match legacy.read().await? {
            Response::Continue => return Ok(None),
            Response::Tagged {
                tag: t,
                status,
                info,
            } if t.as_ref() == tag.as_bytes() => {
                let e = legacy.refused("APPEND", status, &info);
                return if refused_alone(&e) {
                    Ok(Some(e))
                } else {
                    Err(e)
                };
            }
            _ => {}
        }
    }
}

/// The reply to the APPEND `tag`.
async fn reply(legacy: &mut Client, tag: &str) -> Result<Reply, BackendError> {
    loop {
        match legacy.next_of("APPEND", tag).await {
            Ok(Next::Untagged(_)) => {}
            Ok(Next::Done(info)) => return Ok(Ok(info)),
            Err(e) if refused_alone(&e) => return Ok(Err(e)),
            Err(e) => return Err(e),
        }
    }
}

/// Whether legacy refused one message for what it is (malformed, too large), rather than
/// failing (overloaded, over quota, shutting down): the others go on.
fn refused_alone(e: &BackendError) -> bool {
    match e {
        BackendError::Refused { code, text, .. } => {
            !text.starts_with("BYE")
                && (text.starts_with("BAD")
                    || matches!(code.as_str(), "" | "PARSE" | "CANNOT" | "TOOBIG"))
        }
        _ => false,
    }
}

/// Records each acknowledged APPEND's UID map row and drops its intent (one transaction);
/// drops the intents of refused messages (reported; the next rollback tries them again).
async fn record_appended(
    rev: &mut Reverse<'_>,
    v: &mut Visit,
    batch: Vec<Arrival>,
    replies: Vec<Reply>,
) -> Result<bool, SyncError> {
    let (mut rows, mut refused, mut unconfirmed) = (Vec::new(), Vec::new(), false);
    // APPENDUID is UIDPLUS's: a server that does not offer it may not mean it.
    let uidplus = rev.legacy.has("UIDPLUS");
    for (a, reply) in batch.into_iter().zip(replies) {
        let size = a.body.len() as u64;
        match reply {
            Ok(info) => {
                rev.report.appended += 1;
                rev.report.appended_bytes += size;
                match appended_uid(&info, v.legacy.uidvalidity).filter(|_| uidplus) {
                    Some(l) => rows.push(pair(l, a.uid, a.hash, size)),
                    None => unconfirmed = true,
                }
            }
            Err(e) => {
                let why = format!("message {} of new not appended: {e}", a.uid);
                rev.warn(&v.st.source_name, why);
                refused.push(a.uid);
            }
        }
    }
    let store = &rev.engine.store;
    let name = &v.st.source_name;
    store.confirm_reverse(rev.user, name, &rows).await?;
    store
        .forget_reverse_pending(rev.user, name, &refused)
        .await?;
    v.record(rows);
    Ok(unconfirmed)
}

/// The legacy UID an APPEND's `[APPENDUID uidvalidity uid]` names, if it names one in the
/// folder as selected.
fn appended_uid(info: &StatusText, uidvalidity: u32) -> Option<u32> {
    if info.code_name() != "APPENDUID" || info.code_number(0) != Some(u64::from(uidvalidity)) {
        return None;
    }
    match proto::parse_uid_set(info.code.get(2)?.bytes()?, 2)?.as_slice() {
        [uid] => Some(*uid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_in_count_and_bytes() {
        let small: Vec<(u32, u64)> = (1..=70).map(|u| (u, 100)).collect();
        let b = batches(&small);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [32, 32, 6]);
        let big = [(1, BATCH_BYTES), (2, 10), (3, BATCH_BYTES - 10), (4, 1)];
        let b = batches(&big);
        let uids: Vec<Vec<u32>> = b.iter().map(|c| c.iter().map(|m| m.0).collect()).collect();
        assert_eq!(uids, [vec![1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn only_a_single_appenduid_of_the_selected_folder_counts() {
        let info = |code: &str| match proto::parse(Bytes::from(format!("a1 OK [{code}] done\r\n")))
        {
            Ok(Response::Tagged { info, .. }) => info,
            other => panic!("{other:?}"),
        };
        assert_eq!(appended_uid(&info("APPENDUID 7 42"), 7), Some(42));
        assert_eq!(appended_uid(&info("APPENDUID 8 42"), 7), None);
        assert_eq!(appended_uid(&info("APPENDUID 7 42:43"), 7), None);
        assert_eq!(appended_uid(&info("READ-WRITE"), 7), None);
    }
}
