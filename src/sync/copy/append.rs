//! The appender stage: messages from the fetcher go to new as pipelined APPENDs (a few
//! commands in flight): a batch of whole messages as one MULTIAPPEND with LITERAL+ where
//! offered, else as pipelined single APPENDs; a large body still arriving as an APPEND of its
//! own, cut through as it comes; on a target without LITERAL+, one message at a time with
//! synchronizing literals. New always has the next command queued behind the one it stores.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::confirm::Completions;
use super::held::{hold_back, send_body, HELD_BACK};
use super::intents::waited_for;
use super::msg::{append_command, Msg, Out};
use super::{answered, Pending, APPEND_BYTES, APPEND_IN_FLIGHT, APPEND_MESSAGES};
use crate::backend::error::BackendError;
use crate::store::sync::FolderState;
use crate::sync::client::Client;
use crate::sync::pace::{Limiter, ServiceClock};
use crate::sync::proto::{Response, Status, StatusText};
use crate::sync::throttle::Throttle;

/// An APPEND command sent and not answered yet.
pub(super) struct InFlight {
    pub tag: String,
    pub msgs: Vec<Msg>,
    /// When the command was written (for the latency sample).
    pub sent: Instant,
}

impl Pending for InFlight {
    fn tag(&self) -> &str {
        &self.tag
    }
}

impl InFlight {
    pub fn bytes(&self) -> u64 {
        self.msgs.iter().map(|m| m.size).sum()
    }
}

/// What the fetcher's channel has given the appender.
enum Feed {
    /// Open, nothing taken ahead.
    Open,
    /// A message that arrived while the appender waited for a reply: it starts the next batch.
    Held(Msg),
    /// The fetcher is done (or stopped).
    Closed,
}

/// The messages of the next command or commands.
enum Batch {
    /// From the fetcher.
    Fresh(Vec<Msg>),
    /// A message of a refused MULTIAPPEND, sent alone to find which one the server refuses.
    Retry(Msg),
}

impl Batch {
    fn msgs(&self) -> &[Msg] {
        match self {
            Batch::Fresh(v) => v,
            Batch::Retry(m) => std::slice::from_ref(m),
        }
    }

    fn into_msgs(self) -> Vec<Msg> {
        match self {
            Batch::Fresh(v) => v,
            Batch::Retry(m) => vec![m],
        }
    }
}

/// Whether the appender goes on after sending: it stops when the intents will never be
/// committed or legacy stopped mid-body (both stages report why).
#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// The appender's state.
pub(super) struct Appender<'a> {
    pub tgt: &'a mut Client,
    pub state: &'a mut FolderState,
    pub rx: mpsc::Receiver<Msg>,
    /// Highest legacy UID whose intent is committed.
    pub committed: watch::Receiver<u32>,
    pub done: Completions<'a>,
    pub pace: Arc<Limiter>,
    pub throttle: &'a Throttle,
}

impl Appender<'_> {
    /// Runs until every message is appended (or the copy stops); returns whether APPENDs
    /// were acknowledged without a usable APPENDUID (matched by content afterwards).
    pub(super) async fn run(self) -> Result<bool, BackendError> {
        let mut a = Appending {
            mbox: crate::sync::proto::quote(&self.state.target_name),
            multi: self.tgt.has("MULTIAPPEND"),
            literal_plus: self.tgt.has("LITERAL+"),
            stage: self,
            feed: Feed::Open,
            in_flight: VecDeque::new(),
            clock: ServiceClock::new(),
        };
        loop {
            // Dropping the channel stops the fetcher; `copy_new` reports the store's error.
            if a.stage.done.store_failed || a.fill_pipeline().await? == Flow::Stop {
                return Ok(a.stage.done.needs_recovery);
            }
            if a.in_flight.is_empty() {
                if a.finished() {
                    return Ok(a.stage.done.needs_recovery);
                }
                continue;
            }
            a.await_reply().await?;
        }
    }
}

/// A running appender.
struct Appending<'a> {
    stage: Appender<'a>,
    feed: Feed,
    in_flight: VecDeque<InFlight>,
    /// Service time of the front command: time spent here (store, throttle, pause, waiting
    /// for the fetcher) while a command was outstanding is not new's latency.
    clock: ServiceClock,
    /// The target mailbox, quoted.
    mbox: String,
    multi: bool,
    literal_plus: bool,
}

impl Appending<'_> {
    fn room(&self) -> bool {
        self.in_flight.len() < self.stage.pace.depth(APPEND_IN_FLIGHT)
    }

    fn finished(&self) -> bool {
        matches!(self.feed, Feed::Closed) && self.stage.done.singles.is_empty()
    }

    /// Sends commands until the pace's pipeline depth is reached or nothing is ready.
    async fn fill_pipeline(&mut self) -> Result<Flow, BackendError> {
        while self.room() {
            let ours = Instant::now();
            let Some(batch) = self.next_batch().await else {
                break;
            };
            let bytes: u64 = batch.msgs().iter().map(|m| m.size).sum();
            self.stage.pace.wait_pause().await;
            self.stage.throttle.acquire(bytes).await;
            if !self.in_flight.is_empty() {
                self.clock.block(ours.elapsed());
            }
            let flow = match batch.msgs() {
                _ if !self.literal_plus => self.send_synchronizing(batch).await?,
                [m] if m.arriving() => self.cut_through(batch).await?,
                _ => self.send_batch(batch).await?,
            };
            if flow == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Go)
    }

    /// The next messages to send: a retry alone, else what the fetcher has ready (waiting for
    /// it only when nothing is in flight), bounded in count and bytes. A body still arriving
    /// goes alone: its command ends with its last byte.
    async fn next_batch(&mut self) -> Option<Batch> {
        if let Some(m) = self.stage.done.singles.pop_front() {
            return Some(Batch::Retry(m));
        }
        let mut batch: Vec<Msg> = Vec::new();
        match std::mem::replace(&mut self.feed, Feed::Open) {
            Feed::Held(m) => batch.push(m),
            Feed::Closed => {
                self.feed = Feed::Closed;
                return None;
            }
            Feed::Open if self.in_flight.is_empty() => match self.stage.rx.recv().await {
                Some(m) => batch.push(m),
                None => self.feed = Feed::Closed,
            },
            Feed::Open => {}
        }
        let mut bytes: u64 = batch.iter().map(|m| m.size).sum();
        while matches!(self.feed, Feed::Open)
            && batch.len() < APPEND_MESSAGES
            && bytes < APPEND_BYTES
            && !batch.last().is_some_and(Msg::arriving)
        {
            match self.stage.rx.try_recv() {
                Ok(m) if m.arriving() && !batch.is_empty() => {
                    self.feed = Feed::Held(m);
                    break;
                }
                Ok(m) => {
                    bytes += m.size;
                    batch.push(m);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.feed = Feed::Closed,
            }
        }
        (!batch.is_empty()).then_some(Batch::Fresh(batch))
    }

    /// Synchronizing literals: one message at a time, waiting for each continuation and then
    /// for its reply.
    async fn send_synchronizing(&mut self, batch: Batch) -> Result<Flow, BackendError> {
        for mut m in batch.into_msgs() {
            let tgt = &mut *self.stage.tgt;
            let tag = tgt.tag();
            let mut head = Vec::new();
            append_command(&mut head, &tag, &self.mbox);
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
            let Some(waited) = send_body(tgt, &mut m, &mut self.stage.committed).await? else {
                return Ok(Flow::Stop);
            };
            // The wait for the intent is ours, not the server's.
            let one = InFlight {
                tag,
                msgs: vec![m],
                sent: sent + waited,
            };
            self.complete_alone(one).await?;
        }
        Ok(Flow::Go)
    }

    /// Cut through: new stores the message while legacy still sends it.
    async fn cut_through(&mut self, batch: Batch) -> Result<Flow, BackendError> {
        let Some(mut m) = batch.into_msgs().pop() else {
            return Ok(Flow::Go);
        };
        let tgt = &mut *self.stage.tgt;
        let tag = tgt.tag();
        let mut head = Vec::new();
        append_command(&mut head, &tag, &self.mbox);
        m.encode(&mut head, true);
        tgt.write(&head).await?;
        let streaming = Instant::now();
        if send_body(tgt, &mut m, &mut self.stage.committed)
            .await?
            .is_none()
        {
            return Ok(Flow::Stop);
        }
        if !self.in_flight.is_empty() {
            self.clock.block(streaming.elapsed());
        }
        self.in_flight.push_back(InFlight {
            tag,
            msgs: vec![m],
            sent: Instant::now(),
        });
        Ok(Flow::Go)
    }

    /// Whole messages with LITERAL+: one MULTIAPPEND, or pipelined single APPENDs. Nothing
    /// reaches new whole before its intent is recorded: one command keeps its end back until
    /// then (`HELD_BACK`); pipelined APPENDs of one message each would each be whole, so all
    /// of them wait.
    async fn send_batch(&mut self, batch: Batch) -> Result<Flow, BackendError> {
        let top = batch.msgs().iter().map(|m| m.uid).max().unwrap_or(0);
        let (mut parts, commands) = self.encode(batch);
        let pipelined = commands.len() > 1;
        let held = if pipelined {
            std::mem::take(&mut parts)
        } else {
            hold_back(&mut parts, HELD_BACK)
        };
        let tgt = &mut *self.stage.tgt;
        // A session that fails before the last byte is out is dropped, not logged out.
        tgt.set_literal_open(!parts.is_empty());
        let mut sent = Instant::now();
        tgt.write_parts(&parts).await?;
        let Some(waited) = waited_for(&mut self.stage.committed, top).await else {
            return Ok(Flow::Stop);
        };
        if !self.in_flight.is_empty() {
            self.clock.block(waited);
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
            self.in_flight.push_back(InFlight { tag, msgs, sent });
        }
        Ok(Flow::Go)
    }

    /// The bytes of a batch and its commands (tag and messages): one MULTIAPPEND for several
    /// fresh messages where offered, else one APPEND each.
    fn encode(&mut self, batch: Batch) -> (Vec<Bytes>, Vec<(String, Vec<Msg>)>) {
        let mut out = Out::default();
        let mut commands = Vec::new();
        let tgt = &mut *self.stage.tgt;
        match batch {
            Batch::Fresh(msgs) if self.multi && msgs.len() > 1 => {
                let tag = tgt.tag();
                append_command(&mut out.head, &tag, &self.mbox);
                for m in &msgs {
                    out.message(m);
                }
                out.head.extend_from_slice(b"\r\n");
                commands.push((tag, msgs));
            }
            batch => {
                for m in batch.into_msgs() {
                    let tag = tgt.tag();
                    append_command(&mut out.head, &tag, &self.mbox);
                    out.message(&m);
                    out.head.extend_from_slice(b"\r\n");
                    commands.push((tag, vec![m]));
                }
            }
        }
        (out.finish(), commands)
    }

    /// Reads one response while commands are in flight; with room in the pipeline, a message
    /// from the fetcher is taken meanwhile instead (`Client::read` is cancel-safe).
    async fn await_reply(&mut self) -> Result<(), BackendError> {
        let waiting =
            self.room() && matches!(self.feed, Feed::Open) && self.stage.done.singles.is_empty();
        let tgt = &mut *self.stage.tgt;
        let resp = if waiting {
            let rx = &mut self.stage.rx;
            tokio::select! {
                biased;
                r = tgt.read() => r?,
                m = rx.recv() => {
                    self.feed = m.map_or(Feed::Closed, Feed::Held);
                    return Ok(());
                }
            }
        } else {
            tgt.read().await?
        };
        match resp {
            Response::Tagged { tag, status, info } => self.complete_front(&tag, status, &info),
            Response::Condition {
                status: Status::Bye,
                info,
            } => Err(self.stage.tgt.refused("APPEND", Status::Bye, &info)),
            _ => Ok(()),
        }
    }

    /// The front command's reply: its service time goes to the pace, its outcome to the
    /// completions.
    fn complete_front(
        &mut self,
        tag: &[u8],
        status: Status,
        info: &StatusText,
    ) -> Result<(), BackendError> {
        let s = &mut self.stage;
        let front = answered(&mut self.in_flight, tag, s.tgt)?;
        let service = self.clock.done(front.sent);
        if status == Status::Ok {
            s.pace.sample(service, front.bytes());
        }
        s.done.complete(s.tgt, s.state, front, status, info)
    }

    /// Waits for the reply to `one` (a synchronizing-literal APPEND) and completes it.
    async fn complete_alone(&mut self, one: InFlight) -> Result<(), BackendError> {
        let s = &mut self.stage;
        loop {
            match s.tgt.read().await? {
                Response::Tagged { tag, status, info } if tag.as_ref() == one.tag.as_bytes() => {
                    if status == Status::Ok {
                        s.pace.sample(one.sent.elapsed(), one.bytes());
                    }
                    return s.done.complete(s.tgt, s.state, one, status, &info);
                }
                Response::Condition {
                    status: Status::Bye,
                    info,
                } => return Err(s.tgt.refused("APPEND", Status::Bye, &info)),
                _ => {}
            }
        }
    }
}
