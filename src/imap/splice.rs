//! After login: bytes flow both ways unchanged. Leftovers are forwarded first; server→client
//! bytes go through the framer so a kick or shutdown `* BYE` lands only between responses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::framer::ResponseFramer;
use crate::control::sessions::Kick;
use crate::net::Stream;

/// Which side of a spliced session a socket error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The mail client.
    Client,
    /// The backend.
    Backend,
}

/// What was being done when a socket error came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reading.
    Read,
    /// Writing.
    Write,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// A socket error that ended a splice.
#[derive(Debug, thiserror::Error)]
#[error("{} {}: {source}", .side.name(), .op.name())]
pub struct SpliceError {
    /// Which side failed.
    pub side: Side,
    /// Reading or writing.
    pub op: Op,
    /// The error.
    pub source: std::io::Error,
}

impl SpliceError {
    fn on(side: Side, op: Op) -> impl FnOnce(std::io::Error) -> SpliceError {
        move |source| SpliceError { side, op, source }
    }
}

/// Why a splice ended.
#[derive(Debug)]
pub enum Ending {
    /// The client closed (normally after LOGOUT).
    ClientClosed,
    /// The backend closed.
    BackendClosed,
    /// Kicked by a route change; the reason was sent in a BYE.
    Kicked,
    /// Server shutdown; a BYE was sent.
    Shutdown,
    /// No traffic either way for the post-auth idle limit; a BYE was sent.
    Idle,
    /// A socket error.
    Error(SpliceError),
}

impl Ending {
    /// Short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Ending::ClientClosed => "client_closed",
            Ending::BackendClosed => "backend_closed",
            Ending::Kicked => "kicked",
            Ending::Shutdown => "shutdown",
            Ending::Idle => "idle",
            Ending::Error(_) => "error",
        }
    }
}

/// Totals of a finished splice.
#[derive(Debug)]
pub struct Outcome {
    /// Why it ended.
    pub ending: Ending,
    /// Bytes client → backend.
    pub up: u64,
    /// Bytes backend → client.
    pub down: u64,
}

/// What the splice needs besides the two connections.
pub struct SpliceParams<'a> {
    /// Signalled by a route change.
    pub kick: &'a Kick,
    /// Signalled on SIGTERM after the grace period.
    pub shutdown: CancellationToken,
    /// Post-auth idle limit.
    pub idle: Duration,
    /// Read buffer size per direction.
    pub buffer: usize,
    /// After the client half-closed, how long the backend may still answer.
    pub half_close: Duration,
}

/// Time of the last byte in either direction, shared by both copy loops.
struct Activity {
    start: Instant,
    millis: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.millis
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn get(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(Relaxed))
    }
}

/// Bytes a quiet session reads client commands into (NOOP, IDLE, DONE and most commands fit).
const SMALL_UP: usize = 256;
/// Bytes a quiet session reads backend responses into (tagged replies, IDLE keep-alives).
const SMALL_DOWN: usize = 512;
/// A large buffer is given back after this long without traffic.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// A read buffer that costs `S` bytes while a connection is quiet and grows to `max` only
/// while reads keep filling it, so thousands of idle sessions stay cheap and bulk transfers
/// (a 10 MB FETCH) still move in large reads.
struct Reader<const S: usize> {
    small: [u8; S],
    big: Option<Vec<u8>>,
    max: usize,
}

impl<const S: usize> Reader<S> {
    fn new(max: usize) -> Self {
        Reader {
            small: [0; S],
            big: None,
            max,
        }
    }

    /// Reads once; the bytes are `filled(n)`. Cancel-safe: nothing is consumed unless it returns.
    async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        if let Some(big) = self.big.as_mut() {
            big.clear();
            tokio::select! {
                biased;
                n = r.read_buf(big) => return n,
                _ = tokio::time::sleep(RELEASE_AFTER) => self.big = None,
            }
        }
        let n = r.read(&mut self.small).await?;
        if n == S {
            self.big = Some(Vec::with_capacity(self.max));
        }
        Ok(n)
    }

    fn filled(&self, n: usize) -> &[u8] {
        match &self.big {
            Some(big) if big.len() == n && n > 0 => &big[..n],
            _ => &self.small[..n],
        }
    }
}

enum Stop {
    Kick(String),
    Shutdown,
    Idle,
}

/// Runs until one side closes, a kick, shutdown or idle timeout.
pub async fn splice(
    client: (Stream, BytesMut),
    backend: (Stream, BytesMut),
    p: SpliceParams<'_>,
) -> Outcome {
    let (client, client_left) = client;
    let (backend, backend_left) = backend;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let clock = Activity::new();
    let last = &clock;
    let up = AtomicU64::new(client_left.len() as u64);
    let down = AtomicU64::new(0);
    let mut framer = ResponseFramer::new();

    if !client_left.is_empty() {
        if let Err(e) = bw.write_all(&client_left).await {
            return Outcome {
                ending: Ending::Error(SpliceError::on(Side::Backend, Op::Write)(e)),
                up: 0,
                down: 0,
            };
        }
    }
    if !backend_left.is_empty() {
        framer.feed(&backend_left);
        down.store(backend_left.len() as u64, Relaxed);
        if let Err(e) = cw.write_all(&backend_left).await {
            return Outcome {
                ending: Ending::Error(SpliceError::on(Side::Client, Op::Write)(e)),
                up: up.load(Relaxed),
                down: 0,
            };
        }
    }

    // Free the pre-auth buffers: an idle session must cost only what the splice itself holds.
    drop(client_left);
    drop(backend_left);

    let ending = {
        let upstream = copy_up(&mut cr, &mut bw, p.buffer, last, &up);
        let downstream = copy_down(&mut br, &mut cw, &mut framer, &p, last, &down);
        tokio::pin!(upstream, downstream);
        tokio::select! {
            r = &mut downstream => r,
            r = &mut upstream => match r {
                // Client half-closed (passed on to the backend): let the backend finish.
                Ok(()) => match tokio::time::timeout(p.half_close, &mut downstream).await {
                    Ok(Ending::BackendClosed) | Err(_) => Ending::ClientClosed,
                    Ok(other) => other,
                },
                Err(e) => Ending::Error(e),
            },
        }
    };
    let _ = cw.shutdown().await;
    Outcome {
        ending,
        up: up.load(Relaxed),
        down: down.load(Relaxed),
    }
}

async fn copy_up<R, W>(
    r: &mut R,
    w: &mut W,
    size: usize,
    last: &Activity,
    total: &AtomicU64,
) -> Result<(), SpliceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Reader::<SMALL_UP>::new(size);
    loop {
        let n = buf
            .read(r)
            .await
            .map_err(SpliceError::on(Side::Client, Op::Read))?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        last.touch();
        total.fetch_add(n as u64, Relaxed);
        w.write_all(buf.filled(n))
            .await
            .map_err(SpliceError::on(Side::Backend, Op::Write))?;
    }
}

async fn copy_down<R, W>(
    r: &mut R,
    w: &mut W,
    framer: &mut ResponseFramer,
    p: &SpliceParams<'_>,
    last: &Activity,
    total: &AtomicU64,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Reader::<SMALL_DOWN>::new(p.buffer);
    // A stop waiting for the current response to end.
    let mut pending: Option<Stop> = None;
    loop {
        if pending.is_some() && framer.at_boundary() {
            return say_bye(w, pending.take()).await;
        }
        let read = tokio::select! {
            biased;
            reason = p.kick.kicked(), if pending.is_none() => {
                if !framer.at_boundary() {
                    tracing::debug!("kick deferred until the current response ends");
                }
                pending = Some(Stop::Kick(reason.to_owned()));
                continue;
            }
            _ = p.shutdown.cancelled(), if pending.is_none() => {
                pending = Some(Stop::Shutdown);
                continue;
            }
            _ = tokio::time::sleep_until(last.get() + p.idle), if pending.is_none() => {
                if last.get().elapsed() >= p.idle {
                    pending = Some(Stop::Idle);
                }
                continue;
            }
            r = buf.read(r) => r,
        };
        let n = match read {
            Ok(0) => return Ending::BackendClosed,
            Ok(n) => n,
            Err(e) => return Ending::Error(SpliceError::on(Side::Backend, Op::Read)(e)),
        };
        last.touch();
        let chunk = buf.filled(n);
        let upto = if pending.is_some() {
            framer.feed_to_boundary(chunk).unwrap_or(n)
        } else {
            framer.feed(chunk);
            n
        };
        total.fetch_add(upto as u64, Relaxed);
        if let Err(e) = w.write_all(&chunk[..upto]).await {
            return Ending::Error(SpliceError::on(Side::Client, Op::Write)(e));
        }
    }
}

async fn say_bye<W: AsyncWrite + Unpin>(w: &mut W, stop: Option<Stop>) -> Ending {
    let (line, ending) = match stop {
        Some(Stop::Kick(reason)) => (format!("* BYE [UNAVAILABLE] {reason}\r\n"), Ending::Kicked),
        Some(Stop::Idle) => ("* BYE Idle for too long.\r\n".to_owned(), Ending::Idle),
        Some(Stop::Shutdown) | None => (
            "* BYE [UNAVAILABLE] Server shutting down, please reconnect.\r\n".to_owned(),
            Ending::Shutdown,
        ),
    };
    let _ = w.write_all(line.as_bytes()).await;
    let _ = w.flush().await;
    ending
}
