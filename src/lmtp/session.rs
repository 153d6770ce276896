//! One MTA connection: owns the socket and its buffers, feeds bytes to the `server` state
//! machine, decides each RCPT (cutover flag, directory, user state) and hands complete
//! messages to `fanout`. Replies are collected and written before the next read, so a
//! pipelined batch is answered in one write, in order.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, info_span, trace, warn, Instrument};

use super::fanout::{self, cutover_reply, directory_reply, no_backend_reply};
use super::reply::Reply;
use super::server::{Event, Message, Server};
use super::LmtpContext;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Handles one accepted connection to the end; never panics on client input.
pub async fn handle(ctx: Arc<LmtpContext>, tcp: TcpStream) {
    let peer = match tcp.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let sid = format!("{:016x}", rand::random::<u64>());
    let span = info_span!("lmtp", sid = %sid, peer = %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        let started = Instant::now();
        let mut session = Session {
            first_mail_by: Some(started + ctx.timeouts.first_mail),
            server: Server::new(ctx.server.clone()),
            ctx,
            tcp,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(1024),
            prepared: None,
            messages: 0,
            bytes_in: 0,
        };
        let end = session.run().await;
        metrics::counter!("mailferry_lmtp_sessions_total", "end" => end).increment(1);
        info!(
            messages = session.messages,
            bytes_in = session.bytes_in,
            ms = started.elapsed().as_millis() as u64,
            end,
            "LMTP session ended"
        );
    }
    .instrument(span)
    .await
}

struct Session {
    ctx: Arc<LmtpContext>,
    tcp: TcpStream,
    server: Server<String>,
    rbuf: BytesMut,
    /// Replies not yet written.
    wbuf: Vec<u8>,
    /// Backend transactions started at DATA, waiting for the message.
    prepared: Option<fanout::Prepared>,
    messages: u64,
    bytes_in: u64,
    /// Until the first `MAIL FROM`: when the session must have got there (then `None`).
    first_mail_by: Option<Instant>,
}

impl Session {
    /// Runs the conversation; returns how it ended (for the log and metrics).
    async fn run(&mut self) -> &'static str {
        self.server.greeting().encode_into(&mut self.wbuf);
        loop {
            match self.server.poll(&mut self.rbuf) {
                Event::Reply(r) => {
                    self.prepare_if_data_began().await;
                    r.encode_into(&mut self.wbuf);
                }
                Event::Rcpt(address) => {
                    let reply = self.rcpt(address).await;
                    reply.encode_into(&mut self.wbuf);
                }
                Event::Deliver(msg) => self.deliver(msg).await,
                Event::Close(r) => {
                    r.encode_into(&mut self.wbuf);
                    let _ = self.flush().await;
                    return if r.code == 221 { "quit" } else { "errors" };
                }
                Event::NeedMore => {
                    if let Err(end) = self.answer_and_read().await {
                        return end;
                    }
                }
            }
        }
    }

    /// After the reply that accepted DATA: starts the backend envelopes now, so their round
    /// trips overlap the upload of the message.
    async fn prepare_if_data_began(&mut self) {
        if self.server.in_data() && self.prepared.is_none() {
            if let Some((mail, rcpts)) = self.server.envelope() {
                self.prepared = Some(fanout::prepare(&self.ctx, mail, rcpts).await);
            }
        }
    }

    /// Delivers a complete message and queues its replies, one per RCPT.
    async fn deliver(&mut self, msg: Message<String>) {
        self.messages += 1;
        metrics::counter!("mailferry_lmtp_received_bytes_total").increment(msg.body.len() as u64);
        if msg.normalised > 0 {
            metrics::counter!("mailferry_lmtp_normalised_total").increment(msg.normalised);
            info!(
                count = msg.normalised,
                "bare CR/LF in message data normalised to CRLF"
            );
        }
        let prepared = self.prepared.take();
        for reply in fanout::deliver(&self.ctx, msg, prepared).await {
            reply.encode_into(&mut self.wbuf);
        }
    }

    /// Everything buffered is processed: writes the pending replies and reads more input.
    /// `Err(end)` when the session is over.
    async fn answer_and_read(&mut self) -> Result<(), &'static str> {
        if !self.server.in_data() {
            // The message was refused (too big) or never came: its backend transactions are
            // abandoned before any message byte.
            self.prepared = None;
        }
        if self.flush().await.is_err() {
            return Err("write_failed");
        }
        match self.read().await? {
            true => Ok(()),
            false if self.server.in_transaction() => Err("closed_mid_transaction"),
            false => Err("closed"),
        }
    }

    /// Writes pending replies, bounded by the command timeout (a client that does not read).
    async fn flush(&mut self) -> Result<(), ()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = timeout(
            self.ctx.timeouts.command_idle,
            self.tcp.write_all(&self.wbuf),
        )
        .await;
        self.wbuf.clear();
        match r {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Reads more input: `Ok(false)` on EOF, `Err(end)` when the session must end.
    async fn read(&mut self) -> Result<bool, &'static str> {
        let idle = if self.server.in_data() {
            self.ctx.timeouts.data_idle
        } else {
            self.ctx.timeouts.command_idle
        };
        self.rbuf.reserve(READ_CHUNK);
        let busy = self.server.in_transaction();
        if busy || self.messages > 0 {
            self.first_mail_by = None;
        }
        let idle_until = Instant::now() + idle;
        let until = self
            .first_mail_by
            .map_or(idle_until, |by| by.min(idle_until));
        let shutdown = self.ctx.shutdown.clone();
        let host = self.ctx.server.hostname.clone();
        let result = tokio::select! {
            r = timeout_at(until, self.tcp.read_buf(&mut self.rbuf)) => r,
            // Between transactions a draining server says goodbye at once; an MTA retries
            // elsewhere or later. Within one, it waits for the forced phase.
            _ = shutdown.stopping(), if !busy => {
                self.say(Reply::new(421, format!("4.3.2 {host} Service shutting down"))).await;
                return Err("shutdown");
            }
            _ = shutdown.forced() => {
                self.say(Reply::new(421, format!("4.3.2 {host} Service shutting down"))).await;
                return Err("shutdown");
            }
        };
        match result {
            Err(_) => {
                self.say(Reply::new(
                    421,
                    format!("4.4.2 {host} Timeout, closing connection"),
                ))
                .await;
                Err("timeout")
            }
            Ok(Err(e)) => {
                debug!(error = %e, "read failed");
                Err("read_failed")
            }
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.bytes_in += n as u64;
                Ok(true)
            }
        }
    }

    async fn say(&mut self, reply: Reply) {
        reply.encode_into(&mut self.wbuf);
        let _ = self.flush().await;
    }

    /// Decides one RCPT (DESIGN.md §2, §4): cutover defers, unknown users follow the
    /// directory's policy, an unreachable directory or state store defers.
    async fn rcpt(&mut self, address: String) -> Reply {
        let ctx = &self.ctx;
        let key = ctx.routes.key(&address);
        // The node-local flag first: it is set before anything else when a cutover starts.
        if ctx.deliveries.is_cutover(&key) {
            metrics::counter!("mailferry_lmtp_deferrals_total", "reason" => "cutover").increment(1);
            return cutover_reply(&address);
        }
        let lookup = match ctx.routes.lookup(&key).await {
            Ok(l) => l,
            Err(e) => {
                warn!(user = %key, error = %e, "directory lookup failed");
                metrics::counter!("mailferry_lmtp_deferrals_total", "reason" => "directory")
                    .increment(1);
                return directory_reply(&address);
            }
        };
        if !lookup.known && ctx.reject_unknown {
            metrics::counter!("mailferry_lmtp_rejections_total", "reason" => "unknown_user")
                .increment(1);
            return Reply::new(550, format!("5.1.1 <{address}> User unknown"));
        }
        // The shared state store: another node may be cutting this user over.
        match ctx.states.is_cutover(&*ctx.store, &key).await {
            Ok(true) => {
                metrics::counter!("mailferry_lmtp_deferrals_total", "reason" => "cutover")
                    .increment(1);
                return cutover_reply(&address);
            }
            Ok(false) => {}
            Err(e) => {
                warn!(user = %key, error = %e, "state store lookup failed");
                metrics::counter!("mailferry_lmtp_deferrals_total", "reason" => "directory")
                    .increment(1);
                return directory_reply(&address);
            }
        }
        if ctx.pool(lookup.route).is_none() {
            metrics::counter!("mailferry_lmtp_deferrals_total", "reason" => "no_backend")
                .increment(1);
            return no_backend_reply(&address, lookup.route);
        }
        trace!(user = %key, route = %lookup.route, "recipient accepted");
        self.server.accept_rcpt(address, key)
    }
}
