//! A fault-injecting TCP relay: put it between mailferry and a real backend to make that backend
//! look slow or hung while traffic flows.
//!
//! [`Relay::start`] listens on `127.0.0.1:0` and forwards every accepted connection to `target`
//! (one thread per direction, plain std I/O). Faults are switched at run time and apply to every
//! connection, open or future:
//! - [`Relay::set_delay`]: each chunk the server sends is held that long before it is forwarded
//!   (a backend that answers ever more slowly; per read chunk, so a long reply read in several
//!   chunks is delayed several times);
//! - [`Relay::stall`]: nothing is forwarded in either direction until it is switched off (a hung
//!   backend or network path: bytes are accepted into socket buffers and the relay's hands, then
//!   delivered on resume);
//! - [`Relay::stall_after`] / [`Relay::stall_replies_after`]: the same from the moment the
//!   client has sent that many bytes in total (exactly there: a chunk crossing the point is
//!   split), at a point of the transfer the test chooses; the second stops only the server's
//!   replies (the server still receives and executes commands, its answers never arrive).
//!   [`Relay::stall`]`(false)` ends these too;
//! - [`Relay::cut_replies_after`]: once the server has sent that many bytes in total (exactly
//!   there), the connection carrying them is closed both ways, as when a backend dies in the
//!   middle of a response; so is any connection that gets server bytes afterwards, until the
//!   cut is switched off; [`Relay::cut_after`] does the same at a count of client bytes.
//!
//! Counters: connections accepted, bytes forwarded each way, whether a stall is on.
//! Bounded: at most [`MAX_CONNECTIONS`] open at once (more are closed at once) and one
//! [`CHUNK`] buffer per direction. Dropping the relay closes the listener and every connection
//! and joins all its threads.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Most connections relayed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Read buffer per direction of a connection.
pub const CHUNK: usize = 64 * 1024;
/// How often blocked threads look at the controls.
const TICK: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Shared {
    delay_ms: AtomicU64,
    stall: AtomicBool,
    /// Client bytes after which a stall starts (0 = off) ...
    stall_at: AtomicU64,
    /// ... in both directions (else replies only).
    stall_at_both: AtomicBool,
    /// Bytes after which connections are closed (0 = off) ...
    cut_at: AtomicU64,
    /// ... counted client→server (else server→client).
    cut_up: AtomicBool,
    stop: AtomicBool,
    accepted: AtomicUsize,
    open: AtomicUsize,
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    /// Both sockets of every open connection (with its count of live directions), to shut
    /// them down on drop.
    sockets: Mutex<Vec<(Arc<AtomicUsize>, TcpStream, TcpStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Whether the direction (`down`: server→client) holds its bytes now.
    fn holds(&self, down: bool) -> bool {
        let at = self.stall_at.load(SeqCst);
        self.stall.load(SeqCst)
            || (at > 0
                && self.up_bytes.load(SeqCst) >= at
                && (down || self.stall_at_both.load(SeqCst)))
    }

    /// How many of `len` client bytes may go before a stall point.
    fn allowance(&self, len: usize) -> usize {
        let at = self.stall_at.load(SeqCst);
        if at == 0 || !self.stall_at_both.load(SeqCst) {
            return len;
        }
        let left = at.saturating_sub(self.up_bytes.load(SeqCst));
        len.min(usize::try_from(left).unwrap_or(usize::MAX))
    }

    /// How many of `len` bytes going `down` (or up) may go before a cut, and whether the cut
    /// comes then.
    fn cut_allowance(&self, down: bool, len: usize) -> (usize, bool) {
        let at = self.cut_at.load(SeqCst);
        if at == 0 || self.cut_up.load(SeqCst) == down {
            return (len, false);
        }
        let sent = if down {
            &self.down_bytes
        } else {
            &self.up_bytes
        };
        let left = at.saturating_sub(sent.load(SeqCst));
        let k = len.min(usize::try_from(left).unwrap_or(usize::MAX));
        (k, k < len)
    }
}

/// A running relay; see the module documentation.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where the relay forwards to.
    pub target: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying `127.0.0.1:<free port>` to `target`, without faults.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        listener.set_nonblocking(true).expect("relay nonblocking");
        let addr = listener.local_addr().expect("relay addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let acceptor = thread::spawn(move || accept_loop(listener, target, s));
        Relay {
            addr,
            target,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Holds each server→client chunk for `d` before forwarding it (zero: no delay).
    pub fn set_delay(&self, d: Duration) {
        self.shared.delay_ms.store(d.as_millis() as u64, SeqCst);
    }

    /// Stops (`true`) or resumes (`false`) forwarding in both directions. Resuming also ends a
    /// stall of [`Relay::stall_after`] or [`Relay::stall_replies_after`].
    pub fn stall(&self, on: bool) {
        if !on {
            self.shared.stall_at.store(0, SeqCst);
        }
        self.shared.stall.store(on, SeqCst);
    }

    /// Stops forwarding in both directions once the client has sent `bytes` in total (counted
    /// over all connections since the start).
    pub fn stall_after(&self, bytes: u64) {
        self.shared.stall_at_both.store(true, SeqCst);
        self.shared.stall_at.store(bytes.max(1), SeqCst);
    }

    /// Stops forwarding server→client bytes once the client has sent `bytes` in total.
    pub fn stall_replies_after(&self, bytes: u64) {
        self.shared.stall_at_both.store(false, SeqCst);
        self.shared.stall_at.store(bytes.max(1), SeqCst);
    }

    /// Closes connections once the server has sent `bytes` in total (0: no more cuts).
    pub fn cut_replies_after(&self, bytes: u64) {
        self.shared.cut_up.store(false, SeqCst);
        self.shared.cut_at.store(bytes, SeqCst);
    }

    /// Closes connections once the client has sent `bytes` in total (0: no more cuts).
    pub fn cut_after(&self, bytes: u64) {
        self.shared.cut_up.store(true, SeqCst);
        self.shared.cut_at.store(bytes, SeqCst);
    }

    /// Whether the server's replies are held now (by any of the stalls).
    pub fn stalled(&self) -> bool {
        self.shared.holds(true)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(SeqCst)
    }

    /// Bytes relayed client→server so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up_bytes.load(SeqCst)
    }

    /// Bytes relayed server→client so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down_bytes.load(SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for (_, a, b) in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        let threads: Vec<JoinHandle<()>> = self
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while !shared.stop.load(SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(TICK);
                continue;
            }
            Err(_) => {
                thread::sleep(TICK);
                continue;
            }
        };
        shared.accepted.fetch_add(1, SeqCst);
        if shared.open.load(SeqCst) >= MAX_CONNECTIONS {
            continue; // dropped: closed at once
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            continue;
        };
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        for s in [&client, &server] {
            let _ = s.set_nonblocking(false);
            let _ = s.set_nodelay(true);
            // Reads wake up regularly so that stop is noticed.
            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        }
        // Both directions count as one open connection until the second one ends.
        let live = Arc::new(AtomicUsize::new(2));
        {
            let mut sockets = shared.sockets.lock().unwrap_or_else(|e| e.into_inner());
            sockets.retain(|(l, _, _)| l.load(SeqCst) > 0);
            if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                sockets.push((live.clone(), a, b));
            }
        }
        shared.open.fetch_add(1, SeqCst);
        let up = {
            let (sh, live) = (shared.clone(), live.clone());
            thread::spawn(move || {
                pump(client, server, &sh, false);
                if live.fetch_sub(1, SeqCst) == 1 {
                    sh.open.fetch_sub(1, SeqCst);
                }
            })
        };
        let down = {
            let sh = shared.clone();
            thread::spawn(move || {
                pump(s2, c2, &sh, true);
                if live.fetch_sub(1, SeqCst) == 1 {
                    sh.open.fetch_sub(1, SeqCst);
                }
            })
        };
        let mut threads = shared.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| !t.is_finished());
        threads.push(up);
        threads.push(down);
    }
}

/// Copies `from` → `to` applying the faults; `down` is the server→client direction.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, down: bool) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if shared.stop.load(SeqCst) {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if down {
            let delay = shared.delay_ms.load(SeqCst);
            if delay > 0 {
                thread::sleep(Duration::from_millis(delay));
            }
        }
        let counter = if down {
            &shared.down_bytes
        } else {
            &shared.up_bytes
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            // Held while stalled (the bytes stay in our hands and the sockets' buffers).
            while !shared.stop.load(SeqCst) && shared.holds(down) {
                thread::sleep(TICK);
            }
            if shared.stop.load(SeqCst) {
                return close(&from, &to);
            }
            let room = if down {
                data.len()
            } else {
                shared.allowance(data.len())
            };
            let (k, cut) = shared.cut_allowance(down, room);
            // Counted before the write: a reply to these bytes must see them counted.
            counter.fetch_add(k as u64, SeqCst);
            if to.write_all(&data[..k]).is_err() {
                return close(&from, &to);
            }
            if cut {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            data = &data[k..];
        }
    }
    close(&from, &to);
}

fn close(from: &TcpStream, to: &TcpStream) {
    // Pass the end on: a half-close lets the other side finish (LOGOUT replies).
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
