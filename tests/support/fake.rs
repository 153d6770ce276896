//! A scripted IMAP backend for what a real server will not do on purpose: a response injected
//! after the `STARTTLS` OK, a `PREAUTH` greeting. Put its address in place of a backend's
//! (`Options::imap_at`); it plays the same [`Step`]s to every connection and records every
//! byte it receives, so a test can assert exactly what the proxy sent it (and that credentials
//! were not among it).
//!
//! After the script, a connection keeps reading (and recording) until the peer closes it.
//! Bounded: at most [`MAX_RECORDED`] bytes recorded per connection; dropping the fake closes
//! the listener and every connection and joins all its threads.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Most bytes recorded per connection (more are read and dropped).
pub const MAX_RECORDED: usize = 1024 * 1024;
/// How often blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(20);

/// One step of the script each connection gets.
#[derive(Clone, Debug)]
pub enum Step {
    /// Write these bytes, in one write call (so they arrive together).
    Send(Vec<u8>),
    /// Wait until the peer has sent one more complete line (up to LF).
    ReadLine,
    /// Close the connection both ways (the rest of the script is skipped).
    Close,
}

impl Step {
    /// `Send` of a text.
    pub fn send(text: &str) -> Step {
        Step::Send(text.as_bytes().to_vec())
    }
}

/// What one connection did.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// Every byte the peer sent, in order.
    pub received: Vec<u8>,
    /// Whether the connection has ended (peer closed, `Close`, or a socket error).
    pub ended: bool,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    conns: Mutex<Vec<Connection>>,
    changed: Condvar,
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A running scripted backend; see the module documentation.
pub struct FakeBackend {
    /// Where the proxy connects.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeBackend {
    /// Listens on `127.0.0.1:<free port>` and plays `script` to every connection.
    pub fn start(script: Vec<Step>) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake bind");
        listener.set_nonblocking(true).expect("fake nonblocking");
        let addr = listener.local_addr().expect("fake addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let acceptor = thread::spawn(move || accept_loop(listener, script, s));
        FakeBackend {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Connections accepted so far, ended or not, in order.
    pub fn connections(&self) -> Vec<Connection> {
        self.lock().clone()
    }

    /// Waits (up to `limit`) until at least `n` connections were accepted and all of them have
    /// ended; returns them. Panics with what was seen if that does not happen in time.
    pub fn ended(&self, n: usize, limit: Duration) -> Vec<Connection> {
        let deadline = Instant::now() + limit;
        let mut conns = self.lock();
        loop {
            if conns.len() >= n && conns.iter().all(|c| c.ended) {
                return conns.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "fake backend: wanted {n} ended connections, have {:?}",
                *conns
            );
            conns = self
                .shared
                .changed
                .wait_timeout(conns, left.min(TICK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
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

fn accept_loop(listener: TcpListener, script: Vec<Step>, shared: Arc<Shared>) {
    while !shared.stop.load(SeqCst) {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(TICK);
                continue;
            }
            Err(_) => {
                thread::sleep(TICK);
                continue;
            }
        };
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_nodelay(true);
        // Reads wake up regularly so that stop is noticed.
        let _ = sock.set_read_timeout(Some(TICK));
        if let Ok(s) = sock.try_clone() {
            shared
                .sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s);
        }
        let idx = {
            let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.push(Connection::default());
            conns.len() - 1
        };
        shared.changed.notify_all();
        let (sh, script) = (shared.clone(), script.clone());
        let t = thread::spawn(move || {
            play(sock, &script, &sh, idx);
            sh.conns.lock().unwrap_or_else(|e| e.into_inner())[idx].ended = true;
            sh.changed.notify_all();
        });
        shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
    }
}

/// Plays the script on one connection, then records what the peer sends until it closes.
fn play(mut sock: TcpStream, script: &[Step], shared: &Shared, idx: usize) {
    // Bytes received but not yet consumed by a `ReadLine`.
    let mut pending: Vec<u8> = Vec::new();
    for step in script {
        match step {
            Step::Send(bytes) => {
                if sock.write_all(bytes).is_err() {
                    return;
                }
            }
            Step::ReadLine => loop {
                if let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    pending.drain(..=i);
                    break;
                }
                match read_some(&mut sock, shared, idx) {
                    Some(bytes) => pending.extend_from_slice(&bytes),
                    None => return,
                }
            },
            Step::Close => {
                let _ = sock.shutdown(Shutdown::Both);
                return;
            }
        }
    }
    while read_some(&mut sock, shared, idx).is_some() {}
}

/// Reads and records the next bytes; `None` at end of stream, on error, or on stop.
fn read_some(sock: &mut TcpStream, shared: &Shared, idx: usize) -> Option<Vec<u8>> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if shared.stop.load(SeqCst) {
            return None;
        }
        match sock.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                let rec = &mut conns[idx].received;
                let room = MAX_RECORDED.saturating_sub(rec.len());
                rec.extend_from_slice(&buf[..n.min(room)]);
                drop(conns);
                shared.changed.notify_all();
                return Some(buf[..n].to_vec());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return None,
        }
    }
}
