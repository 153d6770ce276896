//! Copying new messages of one folder, in four stages that run at once: a fetcher streams
//! `UID FETCH` results from legacy (a few commands in flight) into a byte-bounded channel; a
//! recorder writes them to the state store as pending, several per transaction; an appender
//! sends only recorded messages to new as pipelined APPENDs (MULTIAPPEND batches with LITERAL+
//! where offered); a confirmer records each acknowledged batch's APPENDUID mapping. The store's
//! commits (an fsync each) thus overlap the transfer instead of stalling it.
//!
//! Both sides report each command's service time to their backend's [`Limiter`], which may cut
//! the pipeline depth (and impose a pause) when the backend slows down.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::warn;

use super::bodies::BodyPool;
use super::client::{Client, Fetched};
use super::pace::Limiter;
use super::proto::{self, Response, Status};
use super::{add, content_hash, Engine, PassReport, Progress, SyncError};
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
/// Message bytes held between fetcher and appender (bounded memory whatever the sizes).
const BUFFER_BYTES: u64 = 48 * 1024 * 1024;

/// A fetched message on its way to the target.
pub struct Msg {
    uid: u32,
    flags: Vec<String>,
    date: Option<String>,
    body: Bytes,
    hash: String,
    /// Where the body's buffer goes back once the message is done with.
    bodies: Arc<BodyPool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Msg {
    fn drop(&mut self) {
        self.bodies.give(std::mem::take(&mut self.body));
    }
}

impl Msg {
    fn row(&self) -> UidRow {
        UidRow {
            source_uid: self.uid,
            target_uid: None,
            hash: self.hash.clone(),
            size: self.body.len() as u64,
            pending_at: None,
        }
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
                self.body.len(),
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

    fn body(&mut self, body: &Bytes) {
        if body.len() < Self::COPY_BELOW {
            self.head.extend_from_slice(body);
        } else {
            self.parts.push(Bytes::from(std::mem::take(&mut self.head)));
            self.parts.push(body.clone());
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
        self.msgs.iter().map(|m| m.body.len() as u64).sum()
    }
}

/// Copies the legacy messages `todo` ((UID, size), ascending) of the selected folders.
/// Returns whether unacknowledged appends are left for `recover` (server without APPENDUID).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy_new(
    engine: &Engine,
    email: &str,
    src: &mut Client,
    tgt: &mut Client,
    state: &mut FolderState,
    todo: &[(u32, u64)],
    report: &mut PassReport,
    progress: &Progress,
) -> Result<bool, SyncError> {
    if todo.is_empty() {
        return Ok(false);
    }
    let mem = Arc::new(Semaphore::new(BUFFER_BYTES as usize));
    let (fetched_tx, fetched) = mpsc::channel::<Msg>(APPEND_MESSAGES * (APPEND_IN_FLIGHT + 1));
    let (recorded_tx, recorded) = mpsc::channel::<Msg>(APPEND_MESSAGES * (APPEND_IN_FLIGHT + 1));
    let (confirm_tx, confirms) = mpsc::unbounded_channel::<Vec<(u32, u32)>>();
    let src_pace = engine.pace(src.route()).clone();
    let folder = state.source_name.clone();
    // Idle bodies kept: about what the appender has in flight, so each one it finishes feeds
    // the next message read.
    let bodies = Arc::new(BodyPool::new(
        (APPEND_BYTES * APPEND_IN_FLIGHT as u64) as usize,
    ));
    src.set_body_pool(Some(bodies.clone()));
    let fetch = fetch_all(src, todo, fetched_tx, mem, bodies, &src_pace);
    let record = record_all(engine, email, &folder, fetched, recorded_tx);
    let append = append_all(
        engine, email, tgt, state, recorded, confirm_tx, report, progress,
    );
    let confirm = confirm_all(engine, email, &folder, confirms);
    let (f, r, a, c) = tokio::join!(fetch, record, append, confirm);
    src.set_body_pool(None);
    // The store's error first (every stage stops when it fails), then the appender's; a fetch
    // error stops the others by closing the channel.
    c?;
    r?;
    let needs_recovery = a?;
    f?;
    Ok(needs_recovery)
}

/// Most messages recorded as pending in one transaction.
const RECORD_MESSAGES: usize = 256;

/// Records fetched messages as pending before the appender may send them: a crash after this
/// point is resolved by matching their hashes against the target. Takes every message waiting,
/// so one commit covers many while the appender is busy.
async fn record_all(
    engine: &Engine,
    email: &str,
    folder: &str,
    mut fetched: mpsc::Receiver<Msg>,
    recorded: mpsc::Sender<Msg>,
) -> Result<(), SyncError> {
    while let Some(m) = fetched.recv().await {
        let mut batch = vec![m];
        while batch.len() < RECORD_MESSAGES {
            match fetched.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let rows: Vec<UidRow> = batch.iter().map(Msg::row).collect();
        engine.store.add_pending(email, folder, &rows).await?;
        for m in batch {
            if recorded.send(m).await.is_err() {
                // The appender stopped (it reports its own error).
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Records the legacy → new UID pairs of acknowledged APPENDs, all that are waiting in one
/// transaction. Until then a pair's row stays pending, which a crash only turns into a match
/// by hash on the next pass.
async fn confirm_all(
    engine: &Engine,
    email: &str,
    folder: &str,
    mut confirms: mpsc::UnboundedReceiver<Vec<(u32, u32)>>,
) -> Result<(), SyncError> {
    while let Some(mut pairs) = confirms.recv().await {
        while let Ok(more) = confirms.try_recv() {
            pairs.extend(more);
        }
        engine.store.confirm_uids(email, folder, &pairs).await?;
    }
    Ok(())
}

async fn fetch_all(
    src: &mut Client,
    todo: &[(u32, u64)],
    tx: mpsc::Sender<Msg>,
    mem: Arc<Semaphore>,
    bodies: Arc<BodyPool>,
    pace: &Limiter,
) -> Result<(), SyncError> {
    let mut chunks: VecDeque<Vec<u32>> = VecDeque::new();
    let (mut cur, mut cur_bytes) = (Vec::new(), 0u64);
    for &(uid, size) in todo {
        if !cur.is_empty() && (cur.len() >= FETCH_MESSAGES || cur_bytes + size > FETCH_BYTES) {
            chunks.push_back(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.push(uid);
        cur_bytes += size;
    }
    if !cur.is_empty() {
        chunks.push_back(cur);
    }
    let mut in_flight: VecDeque<(String, Instant)> = VecDeque::new();
    // Service time of the front command: from when it was sent or the previous one finished
    // (whichever is later), minus the time spent waiting for the appender (backpressure is not
    // the backend's latency).
    let mut prev_done = Instant::now();
    let mut blocked = std::time::Duration::ZERO;
    let mut front_bytes = 0u64;
    loop {
        while in_flight.len() < pace.depth(FETCH_IN_FLIGHT) {
            let Some(chunk) = chunks.pop_front() else {
                break;
            };
            pace.wait_pause().await;
            let tag = src.tag();
            let cmd = format!(
                "{tag} UID FETCH {} (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])\r\n",
                proto::format_uid_set(&chunk)
            );
            src.write(cmd.as_bytes()).await?;
            in_flight.push_back((tag, Instant::now()));
        }
        let Some((front, sent)) = in_flight.front() else {
            return Ok(());
        };
        let resp = src.read().await?;
        match &resp {
            Response::Tagged { tag, status, info } => {
                if tag.as_ref() != front.as_bytes() {
                    return Err(src.protocol("tagged response out of order"));
                }
                if *status != Status::Ok {
                    return Err(src.refused("UID FETCH", *status, info));
                }
                let now = Instant::now();
                let service = now
                    .saturating_duration_since((*sent).max(prev_done))
                    .saturating_sub(blocked);
                pace.sample(service, front_bytes);
                (prev_done, blocked, front_bytes) = (now, std::time::Duration::ZERO, 0);
                in_flight.pop_front();
            }
            Response::Condition {
                status: Status::Bye,
                info,
            } => {
                return Err(src.refused("UID FETCH", Status::No, info));
            }
            _ => {
                let Some(f) = Fetched::parse(&resp) else {
                    continue;
                };
                // A flag-only FETCH (another session changed flags) carries no body: skip it.
                let Some(body) = f.body else { continue };
                let size = body.len() as u64;
                front_bytes += size;
                let waiting = Instant::now();
                let permit = mem
                    .clone()
                    .acquire_many_owned(size.clamp(1, BUFFER_BYTES) as u32)
                    .await
                    .map_err(|_| src.protocol("buffer closed"))?;
                let msg = Msg {
                    uid: f.uid,
                    flags: f.flags.unwrap_or_default(),
                    date: f.internaldate,
                    hash: content_hash(&body),
                    body,
                    bodies: bodies.clone(),
                    _permit: permit,
                };
                if tx.send(msg).await.is_err() {
                    // The appender stopped (it reports its own error).
                    return Ok(());
                }
                blocked += waiting.elapsed();
            }
        }
    }
}

/// Where completed APPENDs go: UID pairs to the confirmer, counts to the report and progress,
/// refused MULTIAPPEND batches back to be retried one message at a time.
struct Completions<'a> {
    email: &'a str,
    confirms: mpsc::UnboundedSender<Vec<(u32, u32)>>,
    singles: VecDeque<Msg>,
    /// Acknowledged without usable APPENDUID: `recover` matches them by hash afterwards.
    needs_recovery: bool,
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
    confirms: mpsc::UnboundedSender<Vec<(u32, u32)>>,
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
        report,
        progress,
    };
    let mut closed = false;
    let pace = engine.pace(tgt.route()).clone();
    // End of the previous command: with several in flight, a command's service time starts
    // when the server finished the one before it.
    let mut prev_done = Instant::now();
    // Time spent here (store, throttle, pause, waiting for the fetcher) while a command was
    // outstanding: its reply waited on us, not on the server.
    let mut blocked = std::time::Duration::ZERO;
    loop {
        // Fill the pipeline.
        while in_flight.len() < pace.depth(APPEND_IN_FLIGHT) {
            let ours = Instant::now();
            let mut batch: Vec<Msg> = Vec::new();
            let mut single = false;
            if let Some(m) = done.singles.pop_front() {
                batch.push(m);
                single = true;
            } else if !closed {
                let mut bytes = 0u64;
                if in_flight.is_empty() {
                    match rx.recv().await {
                        Some(m) => {
                            bytes += m.body.len() as u64;
                            batch.push(m);
                        }
                        None => closed = true,
                    }
                }
                while !closed && batch.len() < APPEND_MESSAGES && bytes < APPEND_BYTES {
                    match rx.try_recv() {
                        Ok(m) => {
                            bytes += m.body.len() as u64;
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
            // Every message here was recorded as pending by `record_all`.
            let bytes: u64 = batch.iter().map(|m| m.body.len() as u64).sum();
            pace.wait_pause().await;
            engine.throttle.acquire(bytes).await;
            if !in_flight.is_empty() {
                blocked += ours.elapsed();
            }
            if !literal_plus {
                // Synchronizing literals: one message at a time, waiting for each continuation.
                for m in batch {
                    let tag = tgt.tag();
                    let mut head = format!("{tag} APPEND {mbox} ").into_bytes();
                    m.encode(&mut head, false);
                    let sent = Instant::now();
                    tgt.write(&head).await?;
                    loop {
                        match tgt.read().await? {
                            Response::Continue => break,
                            Response::Tagged { status, info, .. } => {
                                return Err(tgt.refused("APPEND", status, &info))
                            }
                            _ => {}
                        }
                    }
                    let mut body = m.body.to_vec();
                    body.extend_from_slice(b"\r\n");
                    tgt.write(&body).await?;
                    let one = InFlight {
                        tag,
                        msgs: vec![m],
                        sent,
                    };
                    complete(&pace, tgt, state, one, &mut done).await?;
                }
                continue;
            }
            let mut out = Out::default();
            if multi && !single && batch.len() > 1 {
                let tag = tgt.tag();
                out.head
                    .extend_from_slice(format!("{tag} APPEND {mbox}").as_bytes());
                for m in &batch {
                    out.head.push(b' ');
                    m.encode(&mut out.head, true);
                    out.body(&m.body);
                }
                out.head.extend_from_slice(b"\r\n");
                in_flight.push_back(InFlight {
                    tag,
                    msgs: batch,
                    sent: Instant::now(),
                });
            } else {
                for m in batch {
                    let tag = tgt.tag();
                    out.head
                        .extend_from_slice(format!("{tag} APPEND {mbox} ").as_bytes());
                    m.encode(&mut out.head, true);
                    out.body(&m.body);
                    out.head.extend_from_slice(b"\r\n");
                    in_flight.push_back(InFlight {
                        tag,
                        msgs: vec![m],
                        sent: Instant::now(),
                    });
                }
            }
            tgt.write_parts(&out.finish()).await?;
        }
        if in_flight.is_empty() {
            if closed && done.singles.is_empty() {
                return Ok(done.needs_recovery);
            }
            continue;
        }
        match tgt.read().await? {
            Response::Tagged { tag, status, info } => {
                let Some(front) = in_flight.pop_front() else {
                    return Err(tgt.protocol("unexpected tagged response"));
                };
                if tag.as_ref() != front.tag.as_bytes() {
                    return Err(tgt.protocol("tagged response out of order"));
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
                return Err(tgt.refused("APPEND", Status::No, &info));
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
            } => return Err(tgt.refused("APPEND", Status::No, &info)),
            _ => {}
        }
    }
}

impl Completions<'_> {
    /// Handles the reply to one APPEND command. Confirmations go to the confirmer: if the store
    /// has failed, the recorder fails too and the copy stops, with the store's error.
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
                    let _ = self.confirms.send(pairs);
                }
                // No UIDPLUS (or a target folder recreated meanwhile): the pending rows stay and
                // are matched by content hash right after the copy.
                _ => self.needs_recovery = true,
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
            let _ = self.confirms.send(none);
            return Ok(());
        }
        Err(err)
    }
}
