//! The fetcher stage: `UID FETCH` commands to legacy (a few in flight), each message handed to
//! the appender as it arrives; a large body is handed on in pieces while it still arrives, so
//! that new stores it while legacy sends it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

use super::confirm::Confirm;
use super::msg::{Msg, Part};
use super::{answered, Pending, FETCH_IN_FLIGHT, STREAM_FROM};
use crate::backend::error::BackendError;
use crate::sync::bodies::{BodyPool, MemoryBudget};
use crate::sync::client::{BodyRead, Client, Fetched, Incoming};
use crate::sync::pace::{Limiter, ServiceClock};
use crate::sync::proto::{self, Response, Status, StatusText};
use crate::sync::{content_hash, hash_text};

/// How the fetcher holds the messages it reads.
pub(super) struct Holding {
    /// The engine's budget for the bodies fetched and not yet acknowledged (all copies).
    pub memory: Arc<MemoryBudget>,
    /// Where their bodies go back.
    pub bodies: Arc<BodyPool>,
    /// Whether to take each message's content hash (see [`Msg::hash`]).
    pub hash: bool,
}

/// A FETCH command sent to legacy.
struct Fetch {
    tag: String,
    sent: Instant,
    /// The UIDs asked for, ascending.
    uids: Vec<u32>,
}

impl Pending for Fetch {
    fn tag(&self) -> &str {
        &self.tag
    }
}

/// The fetcher's state.
pub(super) struct Fetcher<'a> {
    pub src: &'a mut Client,
    /// UIDs of the FETCH commands still to send.
    pub to_fetch: VecDeque<Vec<u32>>,
    /// FETCH commands sent so far (the intent stage keeps a little ahead of it).
    pub requested: watch::Sender<usize>,
    /// To the appender.
    pub tx: mpsc::Sender<Msg>,
    pub holding: Holding,
    pub pace: &'a Limiter,
    /// UIDs that legacy no longer had go to the confirmer, which forgets their intents.
    pub confirms: mpsc::UnboundedSender<Confirm>,
}

impl Fetcher<'_> {
    /// Runs until every chunk is fetched, or the appender stops (it reports its own error).
    pub(super) async fn run(self) -> Result<(), BackendError> {
        let mut f = Fetching {
            stage: self,
            in_flight: VecDeque::new(),
            got: HashSet::new(),
            clock: ServiceClock::new(),
            front_bytes: 0,
        };
        loop {
            f.fill_pipeline().await?;
            if f.in_flight.is_empty() {
                return Ok(());
            }
            let (fetched, arriving) = match f.stage.src.read_fetch(STREAM_FROM).await? {
                Incoming::Body(a) => (a.fetched, Some(a.len)),
                Incoming::Response(resp) => match f.response(resp)? {
                    Some(fetched) => (fetched, None),
                    None => continue,
                },
            };
            if !f.hand_on(fetched, arriving).await? {
                return Ok(());
            }
        }
    }
}

/// A running fetcher: its commands in flight and the front command's accounting.
struct Fetching<'a> {
    stage: Fetcher<'a>,
    in_flight: VecDeque<Fetch>,
    /// UIDs of the front command that came with a body.
    got: HashSet<u32>,
    /// Service time of the front command: waiting for the appender (backpressure) is not
    /// legacy's latency.
    clock: ServiceClock,
    /// Body bytes of the front command so far.
    front_bytes: u64,
}

impl Fetching<'_> {
    /// Sends FETCH commands until the pace's pipeline depth is reached.
    async fn fill_pipeline(&mut self) -> Result<(), BackendError> {
        let s = &mut self.stage;
        while self.in_flight.len() < s.pace.depth(FETCH_IN_FLIGHT) {
            let Some(uids) = s.to_fetch.pop_front() else {
                break;
            };
            s.pace.wait_pause().await;
            let tag = s.src.tag();
            let cmd = format!(
                "{tag} UID FETCH {} (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])\r\n",
                proto::format_uid_set(&uids)
            );
            s.src.write(cmd.as_bytes()).await?;
            s.requested.send_modify(|n| *n += 1);
            self.in_flight.push_back(Fetch {
                tag,
                sent: Instant::now(),
                uids,
            });
        }
        Ok(())
    }

    /// A whole response: a FETCH with its body (returned), the front command's completion,
    /// a BYE (an error), or anything else (ignored).
    fn response(&mut self, resp: Response) -> Result<Option<Fetched>, BackendError> {
        match &resp {
            Response::Tagged { tag, status, info } => {
                self.complete_front(tag, *status, info)?;
                Ok(None)
            }
            Response::Condition {
                status: Status::Bye,
                info,
            } => Err(self.stage.src.refused("UID FETCH", Status::Bye, info)),
            _ => Ok(Fetched::parse(&resp)),
        }
    }

    /// The front command is done: its service time goes to the pace, and the UIDs it asked
    /// for that came without a body (expunged on legacy since the pass listed them) have
    /// their intents forgotten.
    fn complete_front(
        &mut self,
        tag: &[u8],
        status: Status,
        info: &StatusText,
    ) -> Result<(), BackendError> {
        let src = &self.stage.src;
        let front = answered(&mut self.in_flight, tag, src)?;
        if status != Status::Ok {
            return Err(src.refused("UID FETCH", status, info));
        }
        let service = self.clock.done(front.sent);
        self.stage.pace.sample(service, self.front_bytes);
        self.front_bytes = 0;
        let gone: Vec<u32> = front
            .uids
            .into_iter()
            .filter(|u| !self.got.contains(u))
            .collect();
        if !gone.is_empty() {
            let _ = self.stage.confirms.send(Confirm::Gone(gone));
        }
        self.got.clear();
        Ok(())
    }

    /// Hands a fetched message on to the appender (a body still `arriving` in pieces as they
    /// come); false if the appender is gone.
    async fn hand_on(&mut self, f: Fetched, arriving: Option<u64>) -> Result<bool, BackendError> {
        // A flag-only FETCH (another session changed flags) carries no body: skip it.
        let size = match (&f.body, arriving) {
            (_, Some(len)) => len,
            (Some(body), None) => body.len() as u64,
            (None, None) => return Ok(true),
        };
        // Only what this copy asked for (and recorded intents of): a body for any other UID
        // would be appended without an intent, or a second time.
        let asked = self
            .in_flight
            .iter()
            .any(|c| c.uids.binary_search(&f.uid).is_ok());
        if !asked {
            warn!(
                uid = f.uid,
                "legacy sent a message that was not asked for; ignored"
            );
            if arriving.is_some() {
                skip_body(self.stage.src).await?;
            }
            return Ok(true);
        }
        self.got.insert(f.uid);
        self.front_bytes += size;
        let waiting = Instant::now();
        let (msg, pieces) = self.message(f, size, arriving.is_some()).await?;
        if self.stage.tx.send(msg).await.is_err() {
            return Ok(false);
        }
        self.clock.block(waiting.elapsed());
        match pieces {
            Some(pieces) => {
                let Holding { bodies, hash, .. } = &self.stage.holding;
                pass_body(self.stage.src, bodies, size, *hash, pieces).await
            }
            None => Ok(true),
        }
    }

    /// The message for `f` once its bytes fit in the fetcher's budget, and where the pieces
    /// of a body still arriving go.
    async fn message(
        &mut self,
        f: Fetched,
        size: u64,
        arriving: bool,
    ) -> Result<(Msg, Option<mpsc::UnboundedSender<Part>>), BackendError> {
        let h = &self.stage.holding;
        let permit = h
            .memory
            .hold(size)
            .await
            .map_err(|_| self.stage.src.protocol("memory budget closed"))?;
        let mut msg = Msg {
            uid: f.uid,
            flags: f.flags.unwrap_or_default(),
            date: f.internaldate,
            size,
            parts: Vec::new(),
            rest: None,
            tail: None,
            hash: None,
            bodies: h.bodies.clone(),
            _permit: permit,
        };
        match f.body {
            Some(body) if !arriving => {
                msg.hash = h.hash.then(|| content_hash(&body));
                msg.parts.push(body);
                Ok((msg, None))
            }
            _ => {
                let (pieces, rest) = mpsc::unbounded_channel();
                msg.rest = Some(rest);
                Ok((msg, Some(pieces)))
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
) -> Result<bool, BackendError> {
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
async fn skip_body(src: &mut Client) -> Result<(), BackendError> {
    let mut scratch = BytesMut::with_capacity(256 * 1024);
    while src.read_body(&mut scratch).await? == BodyRead::More {
        scratch.clear();
    }
    Ok(())
}
