//! Copying new messages of one folder, in four stages that run at once (one file each):
//! - `intents`: writes each FETCH chunk's messages to the state store as pending (UIDs only,
//!   a little ahead of the transfer);
//! - `fetch`: streams `UID FETCH` results from legacy (a few commands in flight) into a
//!   byte-bounded channel;
//! - `append`: sends them to new as pipelined APPENDs (MULTIAPPEND batches with LITERAL+
//!   where offered), the last bytes of each only once its intent is committed (`held`);
//! - `confirm`: records each acknowledged batch's APPENDUID mapping.
//!
//! The intents commit while the bytes come and the confirmations after they have gone, so no
//! store commit (an fsync each) stands between a message's arrival from legacy and its
//! APPEND. A crash leaves pending rows, which the next pass resolves by content hash
//! (`recover`). Both sides report each command's service time to their backend's `Limiter`,
//! which may cut the pipeline depth (and impose a pause) when the backend slows down.
//! docs/sync.md walks through it.

mod append;
mod confirm;
mod fetch;
mod held;
mod intents;
mod msg;

use std::collections::VecDeque;

use tokio::sync::{mpsc, watch};

use super::client::Client;
use super::pass::Pass;
use super::SyncError;
use crate::backend::error::BackendError;
use crate::store::sync::FolderState;
use crate::store::StateStore;
use append::Appender;
use confirm::{Completions, Confirm};
use fetch::{Fetcher, Holding};
use msg::Msg;
pub(crate) use msg::{append_command, message_head};

/// Messages per FETCH command.
const FETCH_MESSAGES: usize = 200;
/// Bytes per FETCH command (by RFC822.SIZE).
const FETCH_BYTES: u64 = 16 * 1024 * 1024;
/// FETCH commands in flight on the legacy connection.
const FETCH_IN_FLIGHT: usize = 2;
/// Messages per APPEND batch (one MULTIAPPEND command, or that many pipelined APPENDs).
const APPEND_MESSAGES: usize = 64;
/// Bytes per APPEND batch.
const APPEND_BYTES: u64 = 8 * 1024 * 1024;
/// APPEND batches in flight on the new connection.
const APPEND_IN_FLIGHT: usize = 2;
/// Bodies from this size on are appended as they arrive from legacy (cut through) instead of
/// once they are whole, so that new stores a large message while legacy still sends it.
const STREAM_FROM: u64 = 512 * 1024;

/// Where one copy's rows live in the state store.
#[derive(Clone, Copy)]
struct Rows<'a> {
    store: &'a dyn StateStore,
    user: &'a str,
    folder: &'a str,
}

/// Copies the legacy messages `todo` ((UID, size), ascending) of the selected folders; with
/// `fresh`, `state` is not in the store yet and is written with the first intents.
/// Returns whether unacknowledged appends are left for `recover` (server without APPENDUID).
pub(crate) async fn copy_new(
    pass: &mut Pass<'_>,
    state: &mut FolderState,
    fresh: bool,
    todo: &[(u32, u64)],
) -> Result<bool, SyncError> {
    if todo.is_empty() {
        return Ok(false);
    }
    let fresh = fresh.then(|| state.clone());
    pass.src.set_body_pool(Some(pass.engine.bodies().clone()));
    let result = run_stages(pass, state, fresh, chunks(todo)).await;
    pass.src.set_body_pool(None);
    let needs_recovery = result?;
    if pass.tgt.literal_open() {
        // The appender stops mid-message only when the fetcher failed, which says why.
        let e = pass
            .tgt
            .protocol("the copy stopped in the middle of a message");
        return Err(e.into());
    }
    Ok(needs_recovery)
}

/// Runs the four stages until all are done; the first error by the order below.
async fn run_stages(
    pass: &mut Pass<'_>,
    state: &mut FolderState,
    fresh: Option<FolderState>,
    chunks: Vec<Vec<(u32, u64)>>,
) -> Result<bool, SyncError> {
    let Pass {
        engine,
        user,
        src,
        tgt,
        report,
        progress,
    } = pass;
    let (fetched_tx, fetched) = mpsc::channel::<Msg>(APPEND_MESSAGES * (APPEND_IN_FLIGHT + 1));
    // Highest legacy UID whose intent is committed: nothing above it may be appended.
    let (committed_tx, committed) = watch::channel(0u32);
    // FETCH commands sent: the intents keep a little ahead of them.
    let (requested_tx, requested) = watch::channel(0usize);
    let (confirm_tx, confirms) = mpsc::unbounded_channel::<Confirm>();
    let src_pace = engine.pace(src.route()).clone();
    let folder = state.source_name.clone();
    let rows = Rows {
        store: &*engine.store,
        user,
        folder: &folder,
    };
    let fetch = Fetcher {
        holding: Holding {
            memory: engine.memory().clone(),
            bodies: engine.bodies().clone(),
            hash: !tgt.has("UIDPLUS"),
        },
        src,
        to_fetch: chunks
            .iter()
            .map(|c| c.iter().map(|m| m.0).collect())
            .collect(),
        requested: requested_tx,
        tx: fetched_tx,
        pace: &src_pace,
        confirms: confirm_tx.clone(),
    };
    let intend = intents::record(rows, fresh, chunks, requested, committed_tx);
    let append = Appender {
        pace: engine.pace(tgt.route()).clone(),
        tgt,
        state,
        rx: fetched,
        committed: committed.clone(),
        done: Completions::new(user, confirm_tx, report, progress),
        throttle: &engine.throttle,
    };
    let confirm = confirm::record(rows, confirms, committed);
    let (i, f, a, c) = tokio::join!(intend, fetch.run(), append.run(), confirm);
    // The store's errors first (every stage stops when one fails), then the appender's; a fetch
    // error stops the others by closing the channel.
    c?;
    i?;
    let needs_recovery = a?;
    f?;
    Ok(needs_recovery)
}

/// A pipelined command sent and not answered yet.
trait Pending {
    fn tag(&self) -> &str;
}

/// The oldest command in flight, taken off as answered by the tagged reply `tag`: a server
/// answers pipelined commands in the order they were sent.
fn answered<C: Pending>(
    in_flight: &mut VecDeque<C>,
    tag: &[u8],
    conn: &Client,
) -> Result<C, BackendError> {
    match in_flight.pop_front() {
        None => Err(conn.protocol("unexpected tagged response")),
        Some(c) if c.tag().as_bytes() != tag => Err(conn.protocol("tagged response out of order")),
        Some(c) => Ok(c),
    }
}

/// Splits `todo` into FETCH commands: UIDs in order, bounded in count and bytes.
fn chunks(todo: &[(u32, u64)]) -> Vec<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    let (mut cur, mut cur_bytes) = (Vec::new(), 0u64);
    for &(uid, size) in todo {
        if !cur.is_empty() && (cur.len() >= FETCH_MESSAGES || cur_bytes + size > FETCH_BYTES) {
            out.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.push((uid, size));
        cur_bytes += size;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
