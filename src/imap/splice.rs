//! After login: bytes flow both ways, unchanged but for what the proxy cannot honour.
//! Leftovers are forwarded first. Client→server bytes go through the command framer, which
//! answers a `COMPRESS` itself; server→client bytes go through the response filter, which
//! takes `COMPRESS=` out of capability lists and knows where responses end, so that a kick,
//! a shutdown `* BYE` or the proxy's own reply lands only between responses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::command::CommandFramer;
use super::filter::ResponseFilter;
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

/// Bytes of replies the proxy may owe the client before the upstream direction waits for
/// them to be written (a client sending COMPRESS after COMPRESS during one long response).
const OWED_MAX: usize = 4096;

/// Replies the proxy owes the client (a refused COMPRESS), from the upstream direction to
/// the downstream one, which writes them between responses. Kept inline rather than in a
/// channel: an idle session must not pay an allocation for what is almost never used.
#[derive(Default)]
struct Owed {
    bytes: std::sync::Mutex<Vec<u8>>,
    /// Bytes were added.
    ready: Notify,
    /// Bytes were taken.
    taken: Notify,
}

impl Owed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic elsewhere cannot leave a Vec half-written: its contents stay usable.
        self.bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds replies, then waits while too many are owed.
    async fn add(&self, reply: &[u8]) {
        self.lock().extend_from_slice(reply);
        self.ready.notify_one();
        while self.lock().len() > OWED_MAX {
            self.taken.notified().await;
        }
    }

    /// Takes what is owed, if anything.
    fn take(&self) -> Option<Vec<u8>> {
        let bytes = std::mem::take(&mut *self.lock());
        self.taken.notify_one();
        (!bytes.is_empty()).then_some(bytes)
    }
}

/// Counters both directions share (they run in one task).
#[derive(Default)]
struct Counts {
    /// Bytes client → backend.
    up: AtomicU64,
    /// Bytes backend → client.
    down: AtomicU64,
    /// Continuation requests the backend has sent, counted before the client can see them:
    /// tells the command framer whether a synchronizing literal follows.
    continuations: AtomicU64,
}

impl Counts {
    fn outcome(&self, ending: Ending) -> Outcome {
        Outcome {
            ending,
            up: self.up.load(Relaxed),
            down: self.down.load(Relaxed),
        }
    }
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
    let counts = Counts::default();
    counts.up.store(client_left.len() as u64, Relaxed);
    let mut commands = CommandFramer::new();
    let mut down = Down {
        w: &mut cw,
        filter: ResponseFilter::new(),
        counts: &counts,
    };
    let first = leftovers(
        &client_left,
        &backend_left,
        &mut commands,
        &mut bw,
        &mut down,
    );
    if let Err(e) = first.await {
        return counts.outcome(Ending::Error(e));
    }
    // Free the pre-auth buffers: an idle session must cost only what the splice itself holds.
    drop(client_left);
    drop(backend_left);

    let owed = Owed::default();
    let ending = {
        let upstream = copy_up(
            &mut cr,
            &mut bw,
            &mut commands,
            &owed,
            p.buffer,
            &clock,
            &counts,
        );
        let downstream = copy_down(&mut br, &mut down, &owed, &p, &clock);
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
    let _ = down.w.shutdown().await;
    counts.outcome(ending)
}

/// Bytes read before the splice began: the client's pipelined after its login go to the
/// backend through the command framer, the backend's after its reply to the client.
async fn leftovers<B, C>(
    client_left: &[u8],
    backend_left: &[u8],
    commands: &mut CommandFramer,
    bw: &mut B,
    down: &mut Down<'_, C>,
) -> Result<(), SpliceError>
where
    B: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    if !client_left.is_empty() {
        let out = commands.forward(client_left, 0);
        bw.write_all(out)
            .await
            .map_err(SpliceError::on(Side::Backend, Op::Write))?;
        // The client has seen only the login reply so far: a boundary.
        if let Some(reply) = commands.take_replies() {
            down.say(&reply).await?;
        }
    }
    if !backend_left.is_empty() {
        down.forward(backend_left, false).await?;
    }
    Ok(())
}

async fn copy_up<R, W>(
    r: &mut R,
    w: &mut W,
    commands: &mut CommandFramer,
    owed: &Owed,
    size: usize,
    last: &Activity,
    counts: &Counts,
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
        counts.up.fetch_add(n as u64, Relaxed);
        let continuations = counts.continuations.load(Relaxed);
        let out = commands.forward(buf.filled(n), continuations);
        if !out.is_empty() {
            w.write_all(out)
                .await
                .map_err(SpliceError::on(Side::Backend, Op::Write))?;
        }
        if let Some(reply) = commands.take_replies() {
            // Waits while replies are owed already: a client cannot queue them without bound.
            owed.add(&reply).await;
        }
    }
}

/// The backend→client writer and the filter that decides what the client sees.
struct Down<'a, W> {
    w: &'a mut W,
    filter: ResponseFilter,
    counts: &'a Counts,
}

impl<W: AsyncWrite + Unpin> Down<'_, W> {
    /// Forwards `chunk`, only up to the first response boundary in it when `to_boundary`;
    /// returns the bytes of `chunk` consumed.
    async fn forward(&mut self, chunk: &[u8], to_boundary: bool) -> Result<usize, SpliceError> {
        let used = self.filter.advance(chunk, to_boundary);
        // Stored before the client can see a `+` and answer it with a literal.
        let continuations = self.filter.continuations();
        self.counts.continuations.store(continuations, Relaxed);
        let out = self.filter.output(chunk, used);
        self.counts.down.fetch_add(out.len() as u64, Relaxed);
        if !out.is_empty() {
            self.w
                .write_all(out)
                .await
                .map_err(SpliceError::on(Side::Client, Op::Write))?;
        }
        Ok(used)
    }

    /// Writes a reply of the proxy's own (at a boundary).
    async fn say(&mut self, bytes: &[u8]) -> Result<(), SpliceError> {
        self.w
            .write_all(bytes)
            .await
            .map_err(SpliceError::on(Side::Client, Op::Write))
    }
}

async fn copy_down<R, W>(
    r: &mut R,
    down: &mut Down<'_, W>,
    owed: &Owed,
    p: &SpliceParams<'_>,
    last: &Activity,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Reader::<SMALL_DOWN>::new(p.buffer);
    // A stop waiting for the current response to end.
    let mut pending: Option<Stop> = None;
    // A reply of the proxy's own waiting for the current response to end.
    let mut reply: Option<Vec<u8>> = None;
    loop {
        if down.filter.at_boundary() {
            if pending.is_some() {
                return say_bye(down.w, pending.take()).await;
            }
            if let Some(bytes) = reply.take() {
                if let Err(e) = down.say(&bytes).await {
                    return Ending::Error(e);
                }
            }
        }
        let read = tokio::select! {
            biased;
            reason = p.kick.kicked(), if pending.is_none() => {
                if !down.filter.at_boundary() {
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
            _ = owed.ready.notified(), if reply.is_none() && pending.is_none() => {
                reply = owed.take();
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
        let waiting = pending.is_some() || reply.is_some();
        let used = match down.forward(chunk, waiting).await {
            Ok(used) => used,
            Err(e) => return Ending::Error(e),
        };
        // A boundary inside the read: a stop ends the session at the top of the loop (the
        // rest is never sent); a reply goes between the responses, then the rest of the read.
        if used < n && pending.is_none() {
            if let Some(bytes) = reply.take() {
                let said = down.say(&bytes).await;
                if let Err(e) = said.and(down.forward(&chunk[used..], false).await.map(|_| ())) {
                    return Ending::Error(e);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::control::sessions::SessionRegistry;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// A COMPRESS sent while the backend is inside a response is answered after that
    /// response, whether its end closes a read or comes with more, and never reaches the
    /// backend.
    #[tokio::test]
    async fn a_refused_compress_waits_for_the_end_of_the_current_response() {
        for rest in [&b"56789)\r\n"[..], b"56789)\r\n* 2 EXISTS\r\n"] {
            let (mut client, client_side) = pair().await;
            let (backend_side, mut backend) = pair().await;
            let registration = Arc::new(SessionRegistry::default()).register("u@example.org");
            let kick = registration.kick.clone();
            let spliced = tokio::spawn(async move {
                let p = SpliceParams {
                    kick: &kick,
                    shutdown: CancellationToken::new(),
                    idle: Duration::from_secs(60),
                    buffer: 64 * 1024,
                    half_close: Duration::from_secs(1),
                };
                let client = (Stream::Plain(client_side), BytesMut::new());
                splice(client, (Stream::Plain(backend_side), BytesMut::new()), p).await
            });
            backend
                .write_all(b"* 1 FETCH (BODY[] {10}\r\n01234")
                .await
                .unwrap();
            let head = b"* 1 FETCH (BODY[] {10}\r\n01234";
            let mut got = vec![0; head.len()];
            client.read_exact(&mut got).await.unwrap();
            client.write_all(b"c1 COMPRESS DEFLATE\r\n").await.unwrap();
            // Let the proxy take the command in while the response is still open.
            tokio::time::sleep(Duration::from_millis(100)).await;
            backend.write_all(rest).await.unwrap();
            // Apart, so that the first case's read ends exactly at the boundary.
            tokio::time::sleep(Duration::from_millis(100)).await;
            backend.write_all(b"* 3 EXISTS\r\n").await.unwrap();
            let no = "c1 NO [CANNOT] COMPRESS is not supported through this proxy\r\n";
            let backend_said = [rest, b"* 3 EXISTS\r\n"].concat();
            let mut got = vec![0; no.len() + backend_said.len()];
            let read = tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got));
            read.await.expect("all of it in time").unwrap();
            let got = String::from_utf8_lossy(&got).into_owned();
            // The FETCH response ends first; the reply comes between two later responses
            // (which two depends on when the proxy read the command); the rest is unchanged.
            assert!(got.starts_with("56789)\r\n"), "{got:?}");
            assert_eq!(got.matches(no).count(), 1, "{got:?}");
            assert!(got
                .split("\r\n")
                .all(|l| l.is_empty() || !l[1..].contains("c1 NO")));
            let without = got.replacen(no, "", 1);
            assert_eq!(without.as_bytes(), &backend_said[..], "{got:?}");
            drop(client);
            let mut upstream = Vec::new();
            backend.read_to_end(&mut upstream).await.unwrap();
            assert!(
                upstream.is_empty(),
                "{:?}",
                String::from_utf8_lossy(&upstream)
            );
            let outcome = spliced.await.unwrap();
            assert!(
                matches!(outcome.ending, Ending::ClientClosed),
                "{:?}",
                outcome.ending
            );
        }
    }
}
