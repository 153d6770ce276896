//! Copying new messages of one folder, in four stages that run at once: an intent recorder
//! writes each FETCH chunk's messages to the state store as pending (UIDs only, a little ahead
//! of the transfer); a fetcher streams `UID FETCH` results from legacy (a few commands in
//! flight) into a byte-bounded channel; an appender sends them to new as pipelined APPENDs
//! (MULTIAPPEND batches with LITERAL+ where offered), each only once its intent is committed; a
//! confirmer records each acknowledged batch's APPENDUID mapping. The intents commit while the
//! bytes come and the confirmations after they have gone, so once a copy is under way no store
//! commit (an fsync each) stands between a message's arrival from legacy and its APPEND; only
//! a folder's first chunk may wait for its own. A crash leaves pending rows, which the next
//! pass resolves by content hash (the hash of a pending row is taken from legacy then).
//!
//! Both sides report each command's service time to their backend's [`Limiter`], which may cut
//! the pipeline depth (and impose a pause) when the backend slows down.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::warn;

use super::bodies::BodyPool;
use super::client::{BodyRead, Client, Fetched, Incoming};
use super::pace::Limiter;
use super::proto::{self, Response, Status};
use super::{add, content_hash, hash_text, Engine, PassReport, Progress, SyncError};
use crate::store::sync::{FolderState, UidRow};

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
/// once they are whole: new then stores a large message while legacy still sends it, instead
/// of idling until it has arrived (up to 100 ms per 8 MB message with 4 users at once).
const STREAM_FROM: u64 = 512 * 1024;
/// Message bytes held between fetcher and appender (bounded memory whatever the sizes).
const BUFFER_BYTES: u64 = 48 * 1024 * 1024;

/// Idle body buffers an engine keeps for its copies (bytes): about one copy's buffer, so a
/// pass reuses what the previous one read into instead of faulting in fresh pages.
pub(crate) const IDLE_BODIES: usize = 64 * 1024 * 1024;

/// A fetched message on its way to the target.
pub struct Msg {
    uid: u32,
    flags: Vec<String>,
    date: Option<String>,
    /// Length of the body.
    size: u64,
    /// The body, or as much of it as has arrived: sent as one literal, in this order.
    parts: Vec<Bytes>,
    /// The rest of a body still arriving from legacy, up to its [`Part::End`].
    rest: Option<mpsc::UnboundedReceiver<Part>>,
    /// What is left of the buffer a body arriving in parts was read into, once all is here.
    tail: Option<BytesMut>,
    /// Content hash, taken only for a target without UIDPLUS (its pending rows are matched by
    /// hash right after the copy).
    hash: Option<String>,
    /// Where the body's buffer goes back once the message is done with.
    bodies: Arc<BodyPool>,
    _permit: OwnedSemaphorePermit,
}

/// A piece of a body that is still arriving from legacy.
enum Part {
    Data(Bytes),
    /// All of it is here: its content hash (when one is taken) and what is left of its buffer.
    End {
        hash: Option<String>,
        tail: BytesMut,
    },
}

impl Drop for Msg {
    fn drop(&mut self) {
        let parts = std::mem::take(&mut self.parts);
        match self.tail.take() {
            Some(tail) => {
                // The buffer comes back whole once no part of it is held.
                drop(parts);
                self.bodies.give_tail(tail, self.size as usize);
            }
            None => parts.into_iter().for_each(|p| self.bodies.give(p)),
        }
    }
}

impl Msg {
    fn row(&self) -> UidRow {
        UidRow {
            source_uid: self.uid,
            target_uid: None,
            hash: self.hash.clone().unwrap_or_default(),
            size: self.size,
            pending_at: None,
        }
    }

    /// Whether the body is still arriving: its APPEND is a command of its own, sent as it comes.
    fn arriving(&self) -> bool {
        self.rest.is_some()
    }

    /// `(flags) "date" {n+}\r\n<body>` (or a synchronizing literal header without the body).
    fn encode(&self, out: &mut Vec<u8>, literal_plus: bool) {
        out.push(b'(');
        out.extend_from_slice(self.flags.join(" ").as_bytes());
        out.extend_from_slice(b") ");
        if let Some(d) = &self.date {
            out.extend_from_slice(proto::quote(d).as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(
            format!(
                "{{{}{}}}\r\n",
                self.size,
                if literal_plus { "+" } else { "" }
            )
            .as_bytes(),
        );
    }
}

/// An APPEND batch on its way out: command text and small bodies gathered into one buffer,
/// large bodies sent from their own (shared) buffers without a copy.
#[derive(Default)]
struct Out {
    parts: Vec<Bytes>,
    head: Vec<u8>,
}

impl Out {
    /// Below this a body is copied into the command text: fewer, larger writes.
    const COPY_BELOW: usize = 64 * 1024;

    fn body(&mut self, parts: &[Bytes]) {
        for body in parts {
            if body.len() < Self::COPY_BELOW {
                self.head.extend_from_slice(body);
            } else {
                self.parts.push(Bytes::from(std::mem::take(&mut self.head)));
                self.parts.push(body.clone());
            }
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.head.is_empty() {
            self.parts.push(Bytes::from(self.head));
        }
        self.parts
    }
}

struct InFlight {
    tag: String,
    msgs: Vec<Msg>,
    /// When the command was written (for the latency sample).
    sent: Instant,
}

impl InFlight {
    fn bytes(&self) -> u64 {
        self.msgs.iter().map(|m| m.size).sum()
    }
}

/// Copies the legacy messages `todo` ((UID, size), ascending) of the selected folders; with
/// `fresh`, `state` is not in the store yet and is written with the first intents.
/// Returns whether unacknowledged appends are left for `recover` (server without APPENDUID).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy_new(
    engine: &Engine,
    email: &str,
    src: &mut Client,
    tgt: &mut Client,
    state: &mut FolderState,
    fresh: bool,
    todo: &[(u32, u64)],
    report: &mut PassReport,
    progress: &Progress,
) -> Result<bool, SyncError> {
    if todo.is_empty() {
        return Ok(false);
    }
    let mem = Arc::new(Semaphore::new(BUFFER_BYTES as usize));
    let (fetched_tx, fetched) = mpsc::channel::<Msg>(APPEND_MESSAGES * (APPEND_IN_FLIGHT + 1));
    // Highest legacy UID whose intent is committed: nothing above it may be appended.
    let (committed_tx, committed) = watch::channel(0u32);
    // FETCH commands sent: the intents keep at most `INTENTS_AHEAD` chunks ahead of them.
    let (requested_tx, requested) = watch::channel(0usize);
    let (confirm_tx, confirms) = mpsc::unbounded_channel::<Confirm>();
    let src_pace = engine.pace(src.route()).clone();
    let folder = state.source_name.clone();
    let bodies = engine.bodies().clone();
    let hash = !tgt.has("UIDPLUS");
    src.set_body_pool(Some(bodies.clone()));
    let fresh = fresh.then(|| state.clone());
    let chunks = chunks(todo);
    let to_fetch: VecDeque<Vec<u32>> = chunks
        .iter()
        .map(|c| c.iter().map(|m| m.0).collect())
        .collect();
    let intend = intend_all(
        engine,
        fresh,
        email,
        &folder,
        chunks,
        requested,
        committed_tx,
    );
    let holding = Holding { mem, bodies, hash };
    let fetch = fetch_all(
        src,
        to_fetch,
        requested_tx,
        fetched_tx,
        holding,
        &src_pace,
        confirm_tx.clone(),
    );
    let append = append_all(
        engine,
        email,
        tgt,
        state,
        fetched,
        committed.clone(),
        confirm_tx,
        report,
        progress,
    );
    let confirm = confirm_all(engine, email, &folder, confirms, committed);
    let (i, f, a, c) = tokio::join!(intend, fetch, append, confirm);
    src.set_body_pool(None);
    // The store's errors first (every stage stops when one fails), then the appender's; a fetch
    // error stops the others by closing the channel.
    c?;
    i?;
    let needs_recovery = a?;
    f?;
    if tgt.literal_open() {
        // The appender stops mid-message only when the fetcher failed, which says why.
        return Err(tgt
            .protocol("the copy stopped in the middle of a message")
            .into());
    }
    Ok(needs_recovery)
}

/// FETCH chunks whose intents may be committed before the fetcher has asked for them: enough
/// that a slow commit rarely holds up the appender, few enough that a failed pass leaves few
/// pending rows for the next one to resolve.
const INTENTS_AHEAD: usize = 2;

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

/// Records each chunk's messages as pending (no hash yet), in order, and raises `committed`
/// past each chunk once its commit is done: whatever reaches new is known to the store first,
/// so a crash at any point is resolved by matching pending rows against the target. The fetcher
/// does not wait for these commits (a `BODY.PEEK` FETCH changes nothing on legacy), nor does
/// the appender but for the last bytes of each command (`HELD_BACK`). Under new's own write
/// load an fsync can take 100 ms, which then overlaps the transfer instead of delaying it.
async fn intend_all(
    engine: &Engine,
    mut fresh: Option<FolderState>,
    email: &str,
    folder: &str,
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
        let rows: Vec<UidRow> = chunk
            .iter()
            .map(|&(uid, size)| UidRow::intent(uid, size))
            .collect();
        match fresh.take() {
            Some(state) => engine.store.start_folder(&state, &rows).await?,
            None => engine.store.add_pending(email, folder, &rows).await?,
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
async fn intended(committed: &mut watch::Receiver<u32>, uid: u32) -> bool {
    committed.wait_for(|&c| c >= uid).await.is_ok()
}

/// As [`intended`], returning how long the wait took (the appender's own time, not new's).
async fn waited_for(committed: &mut watch::Receiver<u32>, uid: u32) -> Option<std::time::Duration> {
    let start = Instant::now();
    intended(committed, uid).await.then(|| start.elapsed())
}

/// What the confirmer writes.
enum Confirm {
    /// Legacy → new UID pairs of acknowledged APPENDs (new UID 0: not copyable, skipped).
    Pairs(Vec<(u32, u32)>),
    /// Acknowledged without a usable APPENDUID: the rows stay pending, now with their hash.
    Hashed(Vec<UidRow>),
    /// Intents of messages legacy no longer had when they were fetched.
    Gone(Vec<u32>),
}

/// Records what the appender reports, all that is waiting in one transaction each. Until a
/// pair is recorded its row stays pending, which a crash only turns into a match by hash on
/// the next pass.
async fn confirm_all(
    engine: &Engine,
    email: &str,
    folder: &str,
    mut confirms: mpsc::UnboundedReceiver<Confirm>,
    mut committed: watch::Receiver<u32>,
) -> Result<(), SyncError> {
    while let Some(first) = confirms.recv().await {
        let (mut pairs, mut hashed, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(c) = next {
            match c {
                Confirm::Pairs(p) => pairs.extend(p),
                Confirm::Hashed(r) => hashed.extend(r),
                Confirm::Gone(u) => gone.extend(u),
            }
            next = confirms.try_recv().ok();
        }
        if !hashed.is_empty() {
            engine.store.add_pending(email, folder, &hashed).await?;
        }
        // An intent still committing would land after its deletion (and linger as pending).
        let top = gone.iter().copied().max().unwrap_or(0);
        if !gone.is_empty() && intended(&mut committed, top).await {
            engine.store.delete_uids(email, folder, &gone).await?;
        }
        engine.store.confirm_uids(email, folder, &pairs).await?;
    }
    Ok(())
}

/// How the fetcher holds the messages it reads.
struct Holding {
    /// Bytes the fetched messages may take until the appender is done with them.
    mem: Arc<Semaphore>,
    /// Where their bodies go back.
    bodies: Arc<BodyPool>,
    /// Whether to take each message's content hash (see [`Msg::hash`]).
    hash: bool,
}

async fn fetch_all(
    src: &mut Client,
    mut to_fetch: VecDeque<Vec<u32>>,
    requested: watch::Sender<usize>,
    tx: mpsc::Sender<Msg>,
    holding: Holding,
    pace: &Limiter,
    confirms: mpsc::UnboundedSender<Confirm>,
) -> Result<(), SyncError> {
    let Holding { mem, bodies, hash } = holding;
    // Tag, when sent, UIDs asked for.
    let mut in_flight: VecDeque<(String, Instant, Vec<u32>)> = VecDeque::new();
    // UIDs of the front command that came with a body.
    let mut got: HashSet<u32> = HashSet::new();
    // Service time of the front command: from when it was sent or the previous one finished
    // (whichever is later), minus the time spent waiting for the appender (backpressure is not
    // the backend's latency).
    let mut prev_done = Instant::now();
    let mut blocked = std::time::Duration::ZERO;
    let mut front_bytes = 0u64;
    loop {
        while in_flight.len() < pace.depth(FETCH_IN_FLIGHT) {
            let Some(chunk) = to_fetch.pop_front() else {
                break;
            };
            pace.wait_pause().await;
            let tag = src.tag();
            let cmd = format!(
                "{tag} UID FETCH {} (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])\r\n",
                proto::format_uid_set(&chunk)
            );
            src.write(cmd.as_bytes()).await?;
            requested.send_modify(|n| *n += 1);
            in_flight.push_back((tag, Instant::now(), chunk));
        }
        let Some((front, sent, _)) = in_flight.front() else {
            return Ok(());
        };
        let (f, arriving) = match src.read_fetch(STREAM_FROM).await? {
            Incoming::Body(a) => (a.fetched, Some(a.len)),
            Incoming::Response(resp) => match &resp {
                Response::Tagged { tag, status, info } => {
                    if tag.as_ref() != front.as_bytes() {
                        return Err(src.protocol("tagged response out of order").into());
                    }
                    if *status != Status::Ok {
                        return Err(src.refused("UID FETCH", *status, info).into());
                    }
                    let now = Instant::now();
                    let service = now
                        .saturating_duration_since((*sent).max(prev_done))
                        .saturating_sub(blocked);
                    pace.sample(service, front_bytes);
                    (prev_done, blocked, front_bytes) = (now, std::time::Duration::ZERO, 0);
                    if let Some((_, _, uids)) = in_flight.pop_front() {
                        // Expunged on legacy since the pass listed them: their intents go.
                        let gone: Vec<u32> =
                            uids.into_iter().filter(|u| !got.contains(u)).collect();
                        if !gone.is_empty() {
                            let _ = confirms.send(Confirm::Gone(gone));
                        }
                    }
                    got.clear();
                    continue;
                }
                Response::Condition {
                    status: Status::Bye,
                    info,
                } => {
                    return Err(src.refused("UID FETCH", Status::No, info).into());
                }
                _ => match Fetched::parse(&resp) {
                    Some(f) => (f, None),
                    None => continue,
                },
            },
        };
        // A flag-only FETCH (another session changed flags) carries no body: skip it.
        let size = match (&f.body, arriving) {
            (_, Some(len)) => len,
            (Some(body), None) => body.len() as u64,
            (None, None) => continue,
        };
        // Only what this copy asked for (and recorded intents of): a body for any other UID
        // would be appended without an intent, or a second time.
        let asked = in_flight
            .iter()
            .any(|(_, _, uids)| uids.binary_search(&f.uid).is_ok());
        if !asked {
            warn!(
                uid = f.uid,
                "legacy sent a message that was not asked for; ignored"
            );
            if arriving.is_some() {
                skip_body(src).await?;
            }
            continue;
        }
        got.insert(f.uid);
        front_bytes += size;
        let waiting = Instant::now();
        let permit = mem
            .clone()
            .acquire_many_owned(size.clamp(1, BUFFER_BYTES) as u32)
            .await
            .map_err(|_| src.protocol("buffer closed"))?;
        let mut msg = Msg {
            uid: f.uid,
            flags: f.flags.unwrap_or_default(),
            date: f.internaldate,
            size,
            parts: Vec::new(),
            rest: None,
            tail: None,
            hash: None,
            bodies: bodies.clone(),
            _permit: permit,
        };
        let mut pass_on = None;
        match f.body {
            Some(body) if arriving.is_none() => {
                msg.hash = hash.then(|| content_hash(&body));
                msg.parts.push(body);
            }
            _ => {
                let (parts, rest) = mpsc::unbounded_channel();
                msg.rest = Some(rest);
                pass_on = Some(parts);
            }
        }
        if tx.send(msg).await.is_err() {
            // The appender stopped (it reports its own error).
            return Ok(());
        }
        blocked += waiting.elapsed();
        if let Some(parts) = pass_on {
            if !pass_body(src, &bodies, size, hash, parts).await? {
                return Ok(());
            }
        }
    }
}

/// Reads a body announced by `read_fetch` into a buffer of `bodies`, handing each piece to
/// the appender as it arrives; false if the appender is gone (it reports why).
async fn pass_body(
    src: &mut Client,
    bodies: &BodyPool,
    len: u64,
    hash: bool,
    parts: mpsc::UnboundedSender<Part>,
) -> Result<bool, SyncError> {
    // The whole body fits: every piece is a view of this one buffer.
    let mut buf = bodies.take(len as usize);
    let mut hasher = hash.then(blake3::Hasher::new);
    while src.read_body(&mut buf).await? == BodyRead::More {
        let part = buf.split().freeze();
        if let Some(h) = &mut hasher {
            h.update(&part);
        }
        if parts.send(Part::Data(part)).is_err() {
            return Ok(false);
        }
    }
    let hash = hasher.map(|h| hash_text(&h.finalize()));
    Ok(parts.send(Part::End { hash, tail: buf }).is_ok())
}

/// Reads past a body announced by `read_fetch` that is not wanted.
async fn skip_body(src: &mut Client) -> Result<(), SyncError> {
    let mut scratch = BytesMut::with_capacity(256 * 1024);
    while src.read_body(&mut scratch).await? == BodyRead::More {
        scratch.clear();
    }
    Ok(())
}

/// Bytes at the end of an APPEND command held back until its messages' intents are committed:
/// the last byte of its last literal and the CRLF after it. Until they go, new cannot hold the
/// message whole (nor, for MULTIAPPEND, any of the command's messages), so a crash before the
/// commit leaves new a partial command, which it discards when the connection drops. Everything
/// else of the command goes out while the commit is being fsynced instead of after it.
const HELD_BACK: usize = 3;

/// Writes `m`'s body (taking the rest as it arrives from legacy) and the line end after it,
/// the last [`HELD_BACK`] bytes once `m`'s intent is committed; returns how long that took.
/// None if legacy stopped before all of it arrived (the fetcher reports why) or the intent
/// will never be committed (the intent stage reports why): the literal is then left open on
/// `tgt`, whose session can only be dropped, which makes new discard it.
async fn send_body(
    tgt: &mut Client,
    m: &mut Msg,
    committed: &mut watch::Receiver<u32>,
) -> Result<Option<std::time::Duration>, SyncError> {
    tgt.set_literal_open(true);
    let mut end = Tail::new(m.size);
    for p in &m.parts {
        end.write(tgt, p).await?;
    }
    if let Some(mut rest) = m.rest.take() {
        loop {
            match rest.recv().await {
                Some(Part::Data(p)) => {
                    end.write(tgt, &p).await?;
                    m.parts.push(p);
                }
                Some(Part::End { hash, tail }) => {
                    m.hash = hash;
                    m.tail = Some(tail);
                    break;
                }
                None => return Ok(None),
            }
        }
    }
    let end = end.end(tgt)?;
    let Some(waited) = waited_for(committed, m.uid).await else {
        return Ok(None);
    };
    tgt.write_literal(&end).await?;
    tgt.set_literal_open(false);
    Ok(Some(waited))
}

/// The end of one literal and its command's CRLF, kept from the pieces written before it.
struct Tail {
    /// Body bytes not written yet.
    left: u64,
    /// The held-back end, once the body's last byte has come.
    held: Option<Vec<u8>>,
}

impl Tail {
    fn new(size: u64) -> Tail {
        Tail {
            left: size,
            // An empty body holds no byte back: the CRLF alone keeps the command open.
            held: (size == 0).then(|| b"\r\n".to_vec()),
        }
    }

    /// Writes `piece` of the body but what belongs to the held-back end.
    async fn write(&mut self, tgt: &mut Client, piece: &[u8]) -> Result<(), SyncError> {
        if piece.is_empty() {
            return Ok(());
        }
        let n = piece.len() as u64;
        if n > self.left {
            return Err(tgt
                .protocol("message body longer than its announced size")
                .into());
        }
        self.left -= n;
        // The last byte of the body stays back with the CRLF after it.
        let keep = if self.left == 0 { HELD_BACK - 2 } else { 0 };
        let (now, later) = piece.split_at(piece.len() - keep);
        if !now.is_empty() {
            tgt.write_literal(now).await?;
        }
        if self.left == 0 {
            self.held = Some([later, b"\r\n"].concat());
        }
        Ok(())
    }

    /// The held-back end; an error if the body fell short of its announced size (the literal
    /// stays open, so the session is dropped).
    fn end(self, tgt: &Client) -> Result<Vec<u8>, SyncError> {
        self.held.ok_or_else(|| {
            tgt.protocol("message body shorter than its announced size")
                .into()
        })
    }
}

/// Splits the last `n` bytes off `parts` (fewer if they hold fewer).
fn hold_back(parts: &mut Vec<Bytes>, mut n: usize) -> Vec<Bytes> {
    let mut held = Vec::new();
    while n > 0 {
        let Some(last) = parts.last_mut() else { break };
        if last.len() <= n {
            n -= last.len();
            if let Some(p) = parts.pop() {
                held.push(p);
            }
        } else {
            held.push(last.split_off(last.len() - n));
            n = 0;
        }
    }
    held.reverse();
    held
}

/// Where completed APPENDs go: UID pairs to the confirmer, counts to the report and progress,
/// refused MULTIAPPEND batches back to be retried one message at a time.
struct Completions<'a> {
    email: &'a str,
    confirms: mpsc::UnboundedSender<Confirm>,
    singles: VecDeque<Msg>,
    /// Acknowledged without usable APPENDUID: `recover` matches them by hash afterwards.
    needs_recovery: bool,
    /// The confirmer has stopped (the store failed): the copy stops and reports its error.
    store_failed: bool,
    report: &'a mut PassReport,
    progress: &'a Progress,
}

#[allow(clippy::too_many_arguments)]
async fn append_all(
    engine: &Engine,
    email: &str,
    tgt: &mut Client,
    state: &mut FolderState,
    mut rx: mpsc::Receiver<Msg>,
    mut committed: watch::Receiver<u32>,
    confirms: mpsc::UnboundedSender<Confirm>,
    report: &mut PassReport,
    progress: &Progress,
) -> Result<bool, SyncError> {
    let multi = tgt.has("MULTIAPPEND");
    let literal_plus = tgt.has("LITERAL+");
    let mbox = proto::quote(&state.target_name);
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut done = Completions {
        email,
        confirms,
        singles: VecDeque::new(),
        needs_recovery: false,
        store_failed: false,
        report,
        progress,
    };
    let mut closed = false;
    // A message that arrived while the appender was waiting for a reply: it starts the next
    // batch, so new always has the next command queued behind the one it is storing.
    let mut waiting: Option<Msg> = None;
    let pace = engine.pace(tgt.route()).clone();
    // End of the previous command: with several in flight, a command's service time starts
    // when the server finished the one before it.
    let mut prev_done = Instant::now();
    // Time spent here (store, throttle, pause, waiting for the fetcher) while a command was
    // outstanding: its reply waited on us, not on the server.
    let mut blocked = std::time::Duration::ZERO;
    loop {
        if done.store_failed {
            // Dropping the channel stops the fetcher; `copy_new` reports the store's error.
            return Ok(done.needs_recovery);
        }
        // Fill the pipeline.
        while in_flight.len() < pace.depth(APPEND_IN_FLIGHT) {
            let ours = Instant::now();
            let mut batch: Vec<Msg> = Vec::new();
            let mut single = false;
            if let Some(m) = done.singles.pop_front() {
                batch.push(m);
                single = true;
            } else if !closed || waiting.is_some() {
                let mut bytes = 0u64;
                if let Some(m) = waiting.take() {
                    bytes += m.size;
                    batch.push(m);
                } else if in_flight.is_empty() {
                    match rx.recv().await {
                        Some(m) => {
                            bytes += m.size;
                            batch.push(m);
                        }
                        None => closed = true,
                    }
                }
                // A body still arriving goes alone: its command ends with its last byte.
                while !closed
                    && batch.len() < APPEND_MESSAGES
                    && bytes < APPEND_BYTES
                    && !batch.last().is_some_and(Msg::arriving)
                {
                    match rx.try_recv() {
                        Ok(m) if m.arriving() && !batch.is_empty() => {
                            waiting = Some(m);
                            break;
                        }
                        Ok(m) => {
                            bytes += m.size;
                            batch.push(m);
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            let top = batch.iter().map(|m| m.uid).max().unwrap_or(0);
            let bytes: u64 = batch.iter().map(|m| m.size).sum();
            pace.wait_pause().await;
            engine.throttle.acquire(bytes).await;
            if !in_flight.is_empty() {
                blocked += ours.elapsed();
            }
            if !literal_plus {
                // Synchronizing literals: one message at a time, waiting for each continuation.
                for mut m in batch {
                    let tag = tgt.tag();
                    let mut head = format!("{tag} APPEND {mbox} ").into_bytes();
                    m.encode(&mut head, false);
                    let sent = Instant::now();
                    tgt.write(&head).await?;
                    loop {
                        match tgt.read().await? {
                            Response::Continue => break,
                            Response::Tagged { status, info, .. } => {
                                return Err(tgt.refused("APPEND", status, &info).into())
                            }
                            _ => {}
                        }
                    }
                    let Some(waited) = send_body(tgt, &mut m, &mut committed).await? else {
                        return Ok(done.needs_recovery);
                    };
                    // The wait for the intent is ours, not the server's.
                    let one = InFlight {
                        tag,
                        msgs: vec![m],
                        sent: sent + waited,
                    };
                    complete(&pace, tgt, state, one, &mut done).await?;
                }
                continue;
            }
            if batch.len() == 1 && batch[0].arriving() {
                // Cut through: new stores the message while legacy still sends it.
                let Some(mut m) = batch.pop() else { break };
                let tag = tgt.tag();
                let mut head = format!("{tag} APPEND {mbox} ").into_bytes();
                m.encode(&mut head, true);
                tgt.write(&head).await?;
                let streaming = Instant::now();
                if send_body(tgt, &mut m, &mut committed).await?.is_none() {
                    return Ok(done.needs_recovery);
                }
                if !in_flight.is_empty() {
                    blocked += streaming.elapsed();
                }
                in_flight.push_back(InFlight {
                    tag,
                    msgs: vec![m],
                    sent: Instant::now(),
                });
                continue;
            }
            let mut out = Out::default();
            let mut commands: Vec<(String, Vec<Msg>)> = Vec::new();
            if multi && !single && batch.len() > 1 {
                let tag = tgt.tag();
                out.head
                    .extend_from_slice(format!("{tag} APPEND {mbox}").as_bytes());
                for m in &batch {
                    out.head.push(b' ');
                    m.encode(&mut out.head, true);
                    out.body(&m.parts);
                }
                out.head.extend_from_slice(b"\r\n");
                commands.push((tag, batch));
            } else {
                for m in batch {
                    let tag = tgt.tag();
                    out.head
                        .extend_from_slice(format!("{tag} APPEND {mbox} ").as_bytes());
                    m.encode(&mut out.head, true);
                    out.body(&m.parts);
                    out.head.extend_from_slice(b"\r\n");
                    commands.push((tag, vec![m]));
                }
            }
            // Nothing reaches new whole before `intend_all` has recorded it as pending: one
            // command keeps its end back until then (`HELD_BACK`); pipelined APPENDs of one
            // message each would each be whole, so all of them wait.
            let mut parts = out.finish();
            let pipelined = commands.len() > 1;
            let held = if pipelined {
                std::mem::take(&mut parts)
            } else {
                hold_back(&mut parts, HELD_BACK)
            };
            // A session that fails before the last byte is out is dropped, not logged out.
            tgt.set_literal_open(!parts.is_empty());
            let mut sent = Instant::now();
            tgt.write_parts(&parts).await?;
            let Some(waited) = waited_for(&mut committed, top).await else {
                // Dropping the channel stops the fetcher; `copy_new` reports the store's error.
                return Ok(done.needs_recovery);
            };
            if !in_flight.is_empty() {
                blocked += waited;
            }
            // The wait for the intent is ours, not the server's.
            sent += waited;
            if pipelined {
                tgt.set_literal_open(true);
                tgt.write_parts(&held).await?;
            } else {
                for h in &held {
                    tgt.write_literal(h).await?;
                }
            }
            tgt.set_literal_open(false);
            for (tag, msgs) in commands {
                in_flight.push_back(InFlight { tag, msgs, sent });
            }
        }
        if in_flight.is_empty() {
            if closed && done.singles.is_empty() && waiting.is_none() {
                return Ok(done.needs_recovery);
            }
            continue;
        }
        let room = in_flight.len() < pace.depth(APPEND_IN_FLIGHT);
        let resp = if room && !closed && waiting.is_none() && done.singles.is_empty() {
            // `Client::read` is cancel-safe: what it has read stays buffered.
            tokio::select! {
                biased;
                r = tgt.read() => r?,
                m = rx.recv() => {
                    match m {
                        Some(m) => waiting = Some(m),
                        None => closed = true,
                    }
                    continue;
                }
            }
        } else {
            tgt.read().await?
        };
        match resp {
            Response::Tagged { tag, status, info } => {
                let Some(front) = in_flight.pop_front() else {
                    return Err(tgt.protocol("unexpected tagged response").into());
                };
                if tag.as_ref() != front.tag.as_bytes() {
                    return Err(tgt.protocol("tagged response out of order").into());
                }
                let now = Instant::now();
                if status == Status::Ok {
                    let service = now
                        .saturating_duration_since(front.sent.max(prev_done))
                        .saturating_sub(blocked);
                    pace.sample(service, front.bytes());
                }
                (prev_done, blocked) = (now, std::time::Duration::ZERO);
                done.complete(tgt, state, front, status, &info)?;
            }
            Response::Condition {
                status: Status::Bye,
                info,
            } => {
                return Err(tgt.refused("APPEND", Status::No, &info).into());
            }
            _ => {}
        }
    }
}

/// Waits for the reply to `one` (a synchronizing-literal APPEND) and completes it.
async fn complete(
    pace: &Limiter,
    tgt: &mut Client,
    state: &mut FolderState,
    one: InFlight,
    done: &mut Completions<'_>,
) -> Result<(), SyncError> {
    loop {
        match tgt.read().await? {
            Response::Tagged { tag, status, info } if tag.as_ref() == one.tag.as_bytes() => {
                if status == Status::Ok {
                    pace.sample(one.sent.elapsed(), one.bytes());
                }
                return done.complete(tgt, state, one, status, &info);
            }
            Response::Condition {
                status: Status::Bye,
                info,
            } => return Err(tgt.refused("APPEND", Status::No, &info).into()),
            _ => {}
        }
    }
}

impl Completions<'_> {
    /// Hands `c` to the confirmer, noting if it has stopped.
    fn confirm(&mut self, c: Confirm) {
        if self.confirms.send(c).is_err() {
            self.store_failed = true;
        }
    }

    /// Handles the reply to one APPEND command. Confirmations go to the confirmer: if the store
    /// has failed, the copy stops, with the store's error.
    fn complete(
        &mut self,
        tgt: &Client,
        state: &mut FolderState,
        cmd: InFlight,
        status: Status,
        info: &proto::StatusText,
    ) -> Result<(), SyncError> {
        if status == Status::Ok {
            let n = cmd.msgs.len() as u64;
            let bytes = cmd.bytes();
            let uids = (info.code_name() == "APPENDUID")
                .then(|| {
                    info.code
                        .get(2)
                        .and_then(|v| v.bytes())
                        .and_then(|b| proto::parse_uid_set(b, cmd.msgs.len() + 1))
                })
                .flatten();
            match uids {
                Some(uids)
                    if uids.len() == cmd.msgs.len()
                        && info.code_number(0) == Some(u64::from(state.target_uidvalidity)) =>
                {
                    let pairs: Vec<(u32, u32)> = cmd.msgs.iter().map(|m| m.uid).zip(uids).collect();
                    if let Some(max) = pairs.iter().map(|p| p.0).max() {
                        state.last_uid = state.last_uid.max(max);
                    }
                    self.confirm(Confirm::Pairs(pairs));
                }
                // No UIDPLUS (or a target folder recreated meanwhile): the pending rows stay and
                // are matched by content hash right after the copy.
                _ => {
                    self.needs_recovery = true;
                    let rows: Vec<UidRow> = cmd
                        .msgs
                        .iter()
                        .filter(|m| m.hash.is_some())
                        .map(Msg::row)
                        .collect();
                    if !rows.is_empty() {
                        self.confirm(Confirm::Hashed(rows));
                    }
                }
            }
            self.report.appended += n;
            self.report.appended_bytes += bytes;
            add(&self.progress.messages_done, n);
            add(&self.progress.bytes_done, bytes);
            metrics::counter!("mailferry_sync_appended_messages_total").increment(n);
            metrics::counter!("mailferry_sync_appended_bytes_total").increment(bytes);
            return Ok(());
        }
        if cmd.msgs.len() > 1 {
            // MULTIAPPEND is atomic (RFC 3502): nothing was stored; retry one by one to find
            // which message the server refuses.
            self.singles.extend(cmd.msgs);
            return Ok(());
        }
        let err = tgt.refused("APPEND", status, info);
        let code = info.code_name();
        if status == Status::Bad || matches!(code.as_str(), "" | "PARSE" | "CANNOT") {
            for m in &cmd.msgs {
                warn!(user = %self.email, folder = %state.source_name, uid = m.uid, error = %err, "message not copyable");
                state.last_uid = state.last_uid.max(m.uid);
                self.report.failed += 1;
            }
            let none: Vec<(u32, u32)> = cmd.msgs.iter().map(|m| (m.uid, 0)).collect();
            self.confirm(Confirm::Pairs(none));
            return Ok(());
        }
        Err(err.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(parts: &[Bytes]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn the_end_held_back_spans_parts_and_leaves_the_rest_in_order() {
        let whole = b"a1 APPEND INBOX () {5+}\r\nhello\r\n";
        // The end split across a large body's buffer and the command text after it.
        let mut parts = vec![
            Bytes::from_static(b"a1 APPEND INBOX () {5+}\r\n"),
            Bytes::from_static(b"hello"),
            Bytes::from_static(b"\r\n"),
        ];
        let held = hold_back(&mut parts, HELD_BACK);
        assert_eq!(joined(&held), b"o\r\n");
        assert_eq!(joined(&parts), &whole[..whole.len() - HELD_BACK]);
        // All in one buffer.
        let mut parts = vec![Bytes::from_static(whole)];
        let held = hold_back(&mut parts, HELD_BACK);
        assert_eq!(joined(&held), b"o\r\n");
        assert_eq!([joined(&parts), joined(&held)].concat(), whole);
        // Fewer bytes than asked for: all of them.
        let mut parts = vec![Bytes::from_static(b"\r\n")];
        assert_eq!(joined(&hold_back(&mut parts, HELD_BACK)), b"\r\n");
        assert!(parts.is_empty());
    }
}
