//! The backend side: an LMTP client connection (connect, greeting, LHLO, one transaction at a
//! time, pipelined when the backend offers it) and a small pool of idle connections per backend.
//!
//! Every outcome is per recipient. A reply a backend never gave becomes `RcptOutcome::Failed`,
//! which the caller turns into a 4xx: nothing is acknowledged that the backend has not.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};

use super::reply::{parse_reply, Reply, ReplyError};
use super::server::{BodyType, MailFrom};
use crate::route::Route;

/// Longest reply accepted from a backend (a multi-line LHLO reply included).
const MAX_REPLY: usize = 64 * 1024;

/// Per-phase timeouts towards a backend.
#[derive(Debug, Clone)]
pub struct ClientTimeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Greeting, LHLO, MAIL, RCPT and the DATA go-ahead.
    pub reply: Duration,
    /// Sending the message and getting every per-recipient reply after it.
    pub data: Duration,
}

/// Why a backend exchange failed (the backend side failed, never the client).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No TCP connection could be made.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// A phase took longer than its timeout.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The connection closed mid-exchange.
    #[error("connection closed by the backend")]
    Closed,
    /// Reading or writing failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend said something that is not a valid reply.
    #[error("protocol error: {0}")]
    Protocol(#[from] ReplyError),
    /// The greeting or LHLO was refused.
    #[error("refused the session: {0}")]
    Refused(Reply),
    /// A reply arrived that does not fit the exchange (e.g. 354 to RCPT).
    #[error("unexpected reply {0}")]
    Unexpected(Reply),
    /// The proxy gave up the transaction before sending the message (client gone, message
    /// refused, or the recipients changed); the backend stored nothing.
    #[error("transaction abandoned before the message")]
    Abandoned,
}

impl ClientError {
    /// Enhanced status code of the 451 given to recipients of a failed exchange:
    /// 4.4.1 no answer from the host, 4.4.2 bad connection (RFC 3463).
    pub fn status(&self) -> &'static str {
        match self {
            ClientError::Connect(_) => "4.4.1",
            _ => "4.4.2",
        }
    }
}

/// What the backend offered in its LHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 1870: SIZE offered (with its limit, 0 = none stated).
    pub size: Option<u64>,
}

impl Capabilities {
    /// Reads the keyword lines of a 250 LHLO reply (the first line is the host name).
    pub fn from_lhlo(reply: &Reply) -> Self {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("PIPELINING") => caps.pipelining = true,
                Some("8BITMIME") => caps.eight_bit_mime = true,
                Some("SIZE") => {
                    caps.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0))
                }
                _ => {}
            }
        }
        caps
    }
}

/// The result for one recipient of a backend transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The backend's own reply for this recipient (RCPT refusal, DATA refusal, or the final
    /// per-recipient reply after the message).
    Reply(Reply),
    /// The backend never answered for this recipient; `ClientError::status` and the text
    /// say why. Becomes a 451.
    Failed {
        /// Enhanced status code.
        status: &'static str,
        /// Why, for the reply text and the log.
        reason: String,
    },
}

impl RcptOutcome {
    fn failed(e: &ClientError) -> Self {
        RcptOutcome::Failed {
            status: e.status(),
            reason: e.to_string(),
        }
    }
}

/// A finished backend transaction.
#[derive(Debug)]
pub struct Transaction {
    /// One outcome per recipient given, in order.
    pub outcomes: Vec<RcptOutcome>,
    /// The error that ended the exchange early, if any.
    pub error: Option<ClientError>,
    /// Whether any reply was read (if not, nothing can have been stored: safe to retry).
    pub answered: bool,
}

impl Transaction {
    /// Every recipient failed with `e`.
    pub fn all_failed(n: usize, e: ClientError, answered: bool) -> Self {
        Transaction {
            outcomes: vec![RcptOutcome::failed(&e); n],
            error: Some(e),
            answered,
        }
    }
}

/// A transaction past its envelope: the backend said 354 and waits for the message.
#[derive(Debug)]
pub struct Envelope {
    /// Outcomes known so far (refused recipients).
    outcomes: Vec<Option<RcptOutcome>>,
    /// Indexes of the accepted recipients, in order.
    accepted: Vec<usize>,
}

/// A command of the envelope, which its reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvelopeCmd {
    Mail,
    /// The RCPT of the recipient at this index.
    Rcpt(usize),
    Data,
}

impl EnvelopeCmd {
    /// What a timeout waiting for its reply names.
    fn reply_name(self) -> &'static str {
        match self {
            EnvelopeCmd::Mail => "MAIL reply",
            EnvelopeCmd::Rcpt(_) => "RCPT reply",
            EnvelopeCmd::Data => "DATA reply",
        }
    }
}

/// The envelope replies read so far.
struct EnvelopeReplies {
    /// Per recipient: its refusal, if refused.
    outcomes: Vec<Option<RcptOutcome>>,
    /// Indexes of the accepted recipients, in order.
    accepted: Vec<usize>,
    /// Whether any reply was read.
    answered: bool,
}

impl EnvelopeReplies {
    fn new(n: usize) -> Self {
        EnvelopeReplies {
            outcomes: vec![None; n],
            accepted: Vec::with_capacity(n),
            answered: false,
        }
    }

    /// Ended by `e`: the recipients without a reply fail with it.
    fn fail(self, e: ClientError) -> Transaction {
        finish(self.outcomes, e, self.answered)
    }

    /// MAIL refused: every recipient gets that reply.
    fn sender_refused(self, reply: Reply) -> Transaction {
        Transaction {
            outcomes: vec![RcptOutcome::Reply(reply); self.outcomes.len()],
            error: None,
            answered: self.answered,
        }
    }

    /// DATA refused: the accepted recipients get that reply.
    fn data_refused(mut self, reply: Reply) -> Transaction {
        for &k in &self.accepted {
            self.outcomes[k] = Some(RcptOutcome::Reply(reply.clone()));
        }
        complete(self.outcomes, self.answered)
    }
}

/// One LMTP connection to a backend, past LHLO.
#[derive(Debug)]
pub struct BackendConn {
    stream: TcpStream,
    rbuf: BytesMut,
    caps: Capabilities,
    /// Set when the exchange ended cleanly, so the connection can carry another transaction.
    reusable: bool,
}

impl BackendConn {
    /// Connects to `addr`, reads the greeting and says `LHLO lhlo_name`.
    pub async fn connect(
        addr: &str,
        lhlo_name: &str,
        t: &ClientTimeouts,
    ) -> Result<Self, ClientError> {
        let stream = timeout(t.connect, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("connect"))?
            .map_err(ClientError::Connect)?;
        // Each transaction is a few small writes answered by the backend: no Nagle delays.
        let _ = stream.set_nodelay(true);
        let mut conn = BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            caps: Capabilities::default(),
            reusable: false,
        };
        let deadline = tokio::time::Instant::now() + t.reply;
        let greeting = conn.read_reply(deadline, "greeting").await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting));
        }
        conn.write(format!("LHLO {lhlo_name}\r\n").as_bytes(), deadline)
            .await?;
        let lhlo = conn
            .read_reply(tokio::time::Instant::now() + t.reply, "LHLO")
            .await?;
        if lhlo.code != 250 {
            return Err(ClientError::Refused(lhlo));
        }
        conn.caps = Capabilities::from_lhlo(&lhlo);
        conn.reusable = true;
        Ok(conn)
    }

    /// What the backend offered.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Whether the last exchange ended cleanly (the connection may go back to a pool).
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    async fn read_reply(
        &mut self,
        deadline: tokio::time::Instant,
        what: &'static str,
    ) -> Result<Reply, ClientError> {
        loop {
            if let Some(r) = parse_reply(&mut self.rbuf, MAX_REPLY)? {
                return Ok(r);
            }
            self.rbuf.reserve(4096);
            let n = timeout_at(deadline, self.stream.read_buf(&mut self.rbuf))
                .await
                .map_err(|_| ClientError::Timeout(what))??;
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<(), ClientError> {
        timeout_at(deadline, self.stream.write_all(bytes))
            .await
            .map_err(|_| ClientError::Timeout("write"))??;
        Ok(())
    }

    /// Whether the backend closed (or spoke unasked, e.g. an idle-timeout 421) while pooled.
    fn is_stale(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Runs one transaction: `envelope`, then `send_body` with `wire` (the message already
    /// dot-stuffed and terminated, see `data::stuff`). One outcome per recipient.
    pub async fn transaction(
        &mut self,
        mail: &MailFrom,
        rcpts: &[String],
        wire: &[u8],
        t: &ClientTimeouts,
    ) -> Transaction {
        match self.envelope(mail, rcpts, t).await {
            Ok(env) => self.send_body(env, wire, t).await,
            Err(done) => done,
        }
    }

    /// Sends MAIL, a RCPT per entry of `rcpts` and DATA (pipelined when offered) and reads
    /// their replies. `Ok` once the backend said 354 and waits for the message: follow with
    /// `send_body`, or drop the connection to abandon the transaction (the backend then
    /// stores nothing). `Err` when the transaction ended without a message (refusals or a
    /// failure): its outcomes are final.
    pub async fn envelope(
        &mut self,
        mail: &MailFrom,
        rcpts: &[String],
        t: &ClientTimeouts,
    ) -> Result<Envelope, Transaction> {
        self.reusable = false;
        let cmds = self.envelope_commands(mail, rcpts);
        let deadline = tokio::time::Instant::now() + t.reply;
        if self.caps.pipelining {
            let batch: Vec<&[u8]> = cmds.iter().map(|(_, line)| line.as_slice()).collect();
            if let Err(e) = self.write(&batch.concat(), deadline).await {
                return Err(Transaction::all_failed(rcpts.len(), e, false));
            }
        }
        let replies = self
            .envelope_replies(&cmds, EnvelopeReplies::new(rcpts.len()), deadline)
            .await?;
        if replies.accepted.is_empty() {
            // Without pipelining DATA was not sent: the connection is clean. With it, getting
            // here means a 354 although no recipient was accepted; the backend now waits for a
            // message, so the connection is dropped rather than reused.
            self.reusable = !self.caps.pipelining;
            return Err(complete(replies.outcomes, replies.answered));
        }
        Ok(Envelope {
            outcomes: replies.outcomes,
            accepted: replies.accepted,
        })
    }

    /// MAIL (with the parameters this backend offers), a RCPT per recipient, and DATA.
    fn envelope_commands(&self, mail: &MailFrom, rcpts: &[String]) -> Vec<(EnvelopeCmd, Vec<u8>)> {
        let mut mail_cmd = format!("MAIL FROM:<{}>", mail.reverse_path);
        if mail.body == Some(BodyType::EightBitMime) && self.caps.eight_bit_mime {
            mail_cmd.push_str(" BODY=8BITMIME");
        }
        // The size the client declared, passed on (the message is not complete yet).
        if let (Some(size), Some(_)) = (mail.size, self.caps.size) {
            mail_cmd.push_str(&format!(" SIZE={size}"));
        }
        mail_cmd.push_str("\r\n");
        let mut cmds = Vec::with_capacity(rcpts.len() + 2);
        cmds.push((EnvelopeCmd::Mail, mail_cmd.into_bytes()));
        for (k, r) in rcpts.iter().enumerate() {
            cmds.push((
                EnvelopeCmd::Rcpt(k),
                format!("RCPT TO:<{r}>\r\n").into_bytes(),
            ));
        }
        cmds.push((EnvelopeCmd::Data, b"DATA\r\n".to_vec()));
        cmds
    }

    /// Reads the replies to `cmds` in order, first writing each command unless they went out
    /// pipelined, and records them in `replies`. Ends after DATA's 354, or before DATA when
    /// no recipient was accepted and DATA is not sent yet. `Err` when a reply or a failure
    /// ended the transaction.
    async fn envelope_replies(
        &mut self,
        cmds: &[(EnvelopeCmd, Vec<u8>)],
        mut replies: EnvelopeReplies,
        deadline: tokio::time::Instant,
    ) -> Result<EnvelopeReplies, Transaction> {
        for &(cmd, ref line) in cmds {
            if !self.caps.pipelining {
                if cmd == EnvelopeCmd::Data && replies.accepted.is_empty() {
                    // Nothing to send the message to: end the transaction without DATA.
                    break;
                }
                if let Err(e) = self.write(line, deadline).await {
                    return Err(replies.fail(e));
                }
            }
            let reply = match self.read_reply(deadline, cmd.reply_name()).await {
                Ok(r) => r,
                Err(e) => return Err(replies.fail(e)),
            };
            replies.answered = true;
            match cmd {
                EnvelopeCmd::Mail if !reply.is_positive() => {
                    // The backend refused the sender: every recipient gets its answer. The
                    // pipelined RCPT/DATA replies are not read; the connection is dropped.
                    return Err(replies.sender_refused(reply));
                }
                EnvelopeCmd::Mail => {}
                EnvelopeCmd::Rcpt(_) if reply.code == 354 => {
                    return Err(replies.fail(ClientError::Unexpected(reply)));
                }
                EnvelopeCmd::Rcpt(k) if reply.is_positive() => replies.accepted.push(k),
                EnvelopeCmd::Rcpt(k) => replies.outcomes[k] = Some(RcptOutcome::Reply(reply)),
                EnvelopeCmd::Data if reply.code == 354 => {}
                EnvelopeCmd::Data if !replies.accepted.is_empty() && reply.is_positive() => {
                    return Err(replies.fail(ClientError::Unexpected(reply)));
                }
                EnvelopeCmd::Data => {
                    // DATA refused (or no recipient was accepted): the accepted ones get the
                    // refusal. Every reply was read, so the connection is clean.
                    self.reusable = true;
                    return Err(replies.data_refused(reply));
                }
            }
        }
        Ok(replies)
    }

    /// Sends the message after `envelope` and reads one reply per accepted recipient.
    pub async fn send_body(
        &mut self,
        env: Envelope,
        wire: &[u8],
        t: &ClientTimeouts,
    ) -> Transaction {
        let Envelope {
            mut outcomes,
            accepted,
        } = env;
        let answered = true;
        let deadline = tokio::time::Instant::now() + t.data;
        if let Err(e) = self.write(wire, deadline).await {
            return finish(outcomes, e, answered);
        }
        // RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
        for &k in &accepted {
            match self.read_reply(deadline, "per-recipient reply").await {
                Ok(r) if r.code == 354 => {
                    return finish(outcomes, ClientError::Unexpected(r), answered)
                }
                Ok(r) => outcomes[k] = Some(RcptOutcome::Reply(r)),
                Err(e) => return finish(outcomes, e, answered),
            }
        }
        self.reusable = true;
        complete(outcomes, answered)
    }

    /// Says QUIT without waiting long for the answer.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.write_all(b"QUIT\r\n")).await;
    }
}

/// A transaction that ended cleanly; every recipient has its reply.
fn complete(outcomes: Vec<Option<RcptOutcome>>, answered: bool) -> Transaction {
    Transaction {
        outcomes: outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| RcptOutcome::failed(&ClientError::Closed)))
            .collect(),
        error: None,
        answered,
    }
}

/// Recipients that got an answer keep it; the others fail with `e`.
fn finish(outcomes: Vec<Option<RcptOutcome>>, e: ClientError, answered: bool) -> Transaction {
    Transaction {
        outcomes: outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| RcptOutcome::failed(&e)))
            .collect(),
        error: Some(e),
        answered,
    }
}

/// Idle connections to one backend's LMTP, reused across transactions and sessions.
pub struct BackendPool {
    /// Which backend.
    pub route: Route,
    /// `host:port` of its LMTP listener.
    pub addr: String,
    lhlo_name: String,
    /// Idle connections, with when they went idle.
    idle: Mutex<Vec<(BackendConn, Instant)>>,
    max_idle: usize,
    idle_ttl: Duration,
}

impl BackendPool {
    /// A pool keeping at most `max_idle` connections, each for at most `idle_ttl` (less than
    /// the backend's own idle timeout, so a pooled connection is rarely found closed).
    pub fn new(
        route: Route,
        addr: String,
        lhlo_name: String,
        max_idle: usize,
        idle_ttl: Duration,
    ) -> Self {
        BackendPool {
            route,
            addr,
            lhlo_name,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_ttl,
        }
    }

    /// An idle connection that still looks alive (`true`: reused), or a new one.
    pub async fn checkout(&self, t: &ClientTimeouts) -> Result<(BackendConn, bool), ClientError> {
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match candidate {
                Some((mut conn, since)) => {
                    if since.elapsed() < self.idle_ttl && !conn.is_stale() {
                        return Ok((conn, true));
                    }
                }
                None => break,
            }
        }
        Ok((
            BackendConn::connect(&self.addr, &self.lhlo_name, t).await?,
            false,
        ))
    }

    /// Returns a connection whose last exchange ended cleanly; others are dropped.
    pub fn checkin(&self, conn: BackendConn) {
        if !conn.is_reusable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    /// Runs one transaction on a pooled or new connection. A pooled connection that fails
    /// before any reply (the backend closed it while idle) is replaced once: nothing can have
    /// been stored, so the retry cannot duplicate.
    pub async fn deliver(
        &self,
        mail: &MailFrom,
        rcpts: &[String],
        wire: &[u8],
        t: &ClientTimeouts,
    ) -> Transaction {
        self.deliver_when(mail, rcpts, async { Some(wire) }, t)
            .await
    }

    /// Like `deliver`, for a message that is still arriving: the envelope goes out now and
    /// the message when `body` resolves, so the backend's envelope round trip overlaps the
    /// client's upload. `body` resolving to `None` abandons the transaction before any
    /// message byte is sent; the connection is dropped and the backend stores nothing.
    pub async fn deliver_when<F, W>(
        &self,
        mail: &MailFrom,
        rcpts: &[String],
        body: F,
        t: &ClientTimeouts,
    ) -> Transaction
    where
        F: std::future::Future<Output = Option<W>>,
        W: AsRef<[u8]>,
    {
        let mut retried = false;
        loop {
            let (mut conn, reused) = match self.checkout(t).await {
                Ok(c) => c,
                Err(e) => return Transaction::all_failed(rcpts.len(), e, false),
            };
            match conn.envelope(mail, rcpts, t).await {
                Err(done) => {
                    if done.error.is_some() && !done.answered && reused && !retried {
                        retried = true;
                        continue;
                    }
                    self.checkin(conn);
                    return done;
                }
                Ok(env) => {
                    let Some(wire) = body.await else {
                        return Transaction::all_failed(rcpts.len(), ClientError::Abandoned, true);
                    };
                    let tx = conn.send_body(env, wire.as_ref(), t).await;
                    self.checkin(conn);
                    return tx;
                }
            }
        }
    }

    /// Number of idle connections (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    fn t() -> ClientTimeouts {
        ClientTimeouts {
            connect: Duration::from_secs(5),
            reply: Duration::from_secs(5),
            data: Duration::from_secs(5),
        }
    }

    fn mail() -> MailFrom {
        MailFrom {
            reverse_path: "s@x".into(),
            size: Some(4),
            body: Some(BodyType::EightBitMime),
        }
    }

    enum Step {
        Say(String),
        SayAndClose(String),
        Silence,
    }

    /// A scripted backend: answers each line it reads by `script(line, in_data)`.
    async fn fake<F>(script: F) -> String
    where
        F: Fn(&str, &mut bool) -> Step + Send + Sync + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let script = std::sync::Arc::new(script);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let script = script.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let _ = w.write_all(b"220 fake\r\n").await;
                    let mut in_data = false;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            break;
                        }
                        match script(line.trim_end(), &mut in_data) {
                            Step::Say(reply) => {
                                if w.write_all(reply.as_bytes()).await.is_err() {
                                    break;
                                }
                            }
                            Step::SayAndClose(reply) => {
                                let _ = w.write_all(reply.as_bytes()).await;
                                break;
                            }
                            Step::Silence => {}
                        }
                    }
                });
            }
        });
        addr
    }

    /// The envelope part of a fake backend that offers PIPELINING, 8BITMIME and SIZE and
    /// refuses `b@y`.
    fn envelope(line: &str, in_data: &mut bool) -> Step {
        Step::Say(match line {
            l if l.starts_with("LHLO") => {
                "250-fake\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n".into()
            }
            l if l.starts_with("MAIL") => {
                assert_eq!(l, "MAIL FROM:<s@x> BODY=8BITMIME SIZE=4");
                "250 2.1.0 OK\r\n".into()
            }
            "RCPT TO:<b@y>" => "550 5.1.1 <b@y> User doesn't exist\r\n".into(),
            l if l.starts_with("RCPT") => "250 2.1.5 OK\r\n".into(),
            "DATA" => {
                *in_data = true;
                "354 go\r\n".into()
            }
            _ => "500 what\r\n".into(),
        })
    }

    fn rcpts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn closed_mid_replies_fails_only_the_unanswered() {
        let addr = fake(|line, in_data| match (*in_data, line) {
            (true, ".") => Step::SayAndClose("250 2.0.0 <a@y> Saved\r\n".into()),
            (true, _) => Step::Silence,
            _ => envelope(line, in_data),
        })
        .await;
        let mut conn = BackendConn::connect(&addr, "proxy", &t()).await.unwrap();
        assert!(conn.capabilities().pipelining && conn.capabilities().eight_bit_mime);
        let tx = conn
            .transaction(
                &mail(),
                &rcpts(&["a@y", "b@y", "c@y"]),
                b"hi\r\n.\r\n",
                &t(),
            )
            .await;
        assert!(
            matches!(&tx.outcomes[0], RcptOutcome::Reply(r) if r.code == 250),
            "{tx:?}"
        );
        assert!(
            matches!(&tx.outcomes[1], RcptOutcome::Reply(r) if r.code == 550),
            "{tx:?}"
        );
        assert!(
            matches!(
                &tx.outcomes[2],
                RcptOutcome::Failed {
                    status: "4.4.2",
                    ..
                }
            ),
            "{tx:?}"
        );
        assert!(matches!(tx.error, Some(ClientError::Closed)));
        assert!(!conn.is_reusable());
    }

    #[tokio::test]
    async fn silent_backend_times_out_per_phase() {
        let addr = fake(|line, in_data| match (*in_data, line) {
            (true, _) => Step::Silence,
            _ => envelope(line, in_data),
        })
        .await;
        let short = ClientTimeouts {
            data: Duration::from_millis(200),
            ..t()
        };
        let mut conn = BackendConn::connect(&addr, "proxy", &short).await.unwrap();
        let tx = conn
            .transaction(&mail(), &rcpts(&["a@y"]), b"hi\r\n.\r\n", &short)
            .await;
        assert!(matches!(tx.error, Some(ClientError::Timeout(_))), "{tx:?}");
        assert!(matches!(
            &tx.outcomes[0],
            RcptOutcome::Failed {
                status: "4.4.2",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn unreachable_backend_is_4_4_1() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let pool = BackendPool::new(Route::New, addr, "proxy".into(), 4, Duration::from_secs(30));
        let tx = pool
            .deliver(&mail(), &rcpts(&["a@y", "c@y"]), b".\r\n", &t())
            .await;
        assert!(tx.outcomes.iter().all(|o| matches!(
            o,
            RcptOutcome::Failed {
                status: "4.4.1",
                ..
            }
        )));
    }

    #[tokio::test]
    async fn pooled_connection_closed_while_idle_is_replaced() {
        let addr = fake(|line, in_data| match (*in_data, line) {
            // Answer, then close: the pooled connection is dead before its next use.
            (true, ".") => Step::SayAndClose("250 2.0.0 <a@y> Saved\r\n".into()),
            (true, _) => Step::Silence,
            _ => envelope(line, in_data),
        })
        .await;
        let pool = BackendPool::new(
            Route::Legacy,
            addr,
            "proxy".into(),
            4,
            Duration::from_secs(30),
        );
        for _ in 0..3 {
            let tx = pool
                .deliver(&mail(), &rcpts(&["a@y"]), b"hi\r\n.\r\n", &t())
                .await;
            assert!(
                matches!(&tx.outcomes[0], RcptOutcome::Reply(r) if r.code == 250),
                "{tx:?}"
            );
        }
    }

    #[tokio::test]
    async fn go_ahead_without_recipients_drops_the_connection() {
        // A backend that says 354 although it refused every recipient.
        let addr = fake(|line, in_data| match (*in_data, line) {
            (true, _) => Step::Silence,
            (false, "DATA") => {
                *in_data = true;
                Step::Say("354 go\r\n".into())
            }
            _ => envelope(line, in_data),
        })
        .await;
        let mut conn = BackendConn::connect(&addr, "proxy", &t()).await.unwrap();
        let tx = conn
            .transaction(&mail(), &rcpts(&["b@y"]), b"hi\r\n.\r\n", &t())
            .await;
        assert!(matches!(&tx.outcomes[0], RcptOutcome::Reply(r) if r.code == 550));
        assert!(!conn.is_reusable(), "never pooled in the middle of a DATA");
    }

    #[tokio::test]
    async fn abandoned_transaction_sends_no_message_and_is_not_pooled() {
        let got_body = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = got_body.clone();
        let addr = fake(move |line, in_data| match *in_data {
            true => {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
                Step::Silence
            }
            false => envelope(line, in_data),
        })
        .await;
        let pool = BackendPool::new(
            Route::Legacy,
            addr,
            "proxy".into(),
            4,
            Duration::from_secs(30),
        );
        let tx = pool
            .deliver_when(&mail(), &rcpts(&["a@y"]), async { None::<Vec<u8>> }, &t())
            .await;
        assert!(matches!(&tx.outcomes[0], RcptOutcome::Failed { .. }));
        assert_eq!(pool.idle_count(), 0, "a connection in DATA is never pooled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!got_body.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn without_pipelining_data_waits_for_an_accepted_recipient() {
        let saw_data = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = saw_data.clone();
        let addr = fake(move |line, in_data| match (*in_data, line) {
            (true, ".") => {
                *in_data = false;
                Step::Say("250 2.0.0 <a@y> Saved\r\n".into())
            }
            (true, _) => Step::Silence,
            (false, l) if l.starts_with("LHLO") => {
                Step::Say("250-fake\r\n250-8BITMIME\r\n250 SIZE 1000\r\n".into())
            }
            (false, "DATA") => {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
                envelope(line, in_data)
            }
            _ => envelope(line, in_data),
        })
        .await;
        let mut conn = BackendConn::connect(&addr, "proxy", &t()).await.unwrap();
        assert!(!conn.capabilities().pipelining);
        // Every recipient refused: DATA is never sent and the connection stays clean.
        let tx = conn
            .transaction(&mail(), &rcpts(&["b@y"]), b"hi\r\n.\r\n", &t())
            .await;
        assert!(tx.error.is_none(), "{tx:?}");
        assert!(matches!(&tx.outcomes[0], RcptOutcome::Reply(r) if r.code == 550));
        assert!(!saw_data.load(std::sync::atomic::Ordering::SeqCst));
        assert!(conn.is_reusable());
        // The same connection then carries a transaction with one accepted recipient.
        let tx = conn
            .transaction(&mail(), &rcpts(&["a@y", "b@y"]), b"hi\r\n.\r\n", &t())
            .await;
        assert!(tx.error.is_none(), "{tx:?}");
        assert!(matches!(&tx.outcomes[0], RcptOutcome::Reply(r) if r.code == 250));
        assert!(matches!(&tx.outcomes[1], RcptOutcome::Reply(r) if r.code == 550));
        assert!(saw_data.load(std::sync::atomic::Ordering::SeqCst));
        assert!(conn.is_reusable());
    }

    #[tokio::test]
    async fn no_recipient_accepted_sends_no_message() {
        let addr = fake(|line, in_data| match (*in_data, line) {
            (true, _) => panic!("message sent although no recipient was accepted"),
            (false, "DATA") => Step::Say("503 5.5.1 No valid recipients\r\n".into()),
            _ => envelope(line, in_data),
        })
        .await;
        let mut conn = BackendConn::connect(&addr, "proxy", &t()).await.unwrap();
        let tx = conn
            .transaction(&mail(), &rcpts(&["b@y"]), b"hi\r\n.\r\n", &t())
            .await;
        assert!(tx.error.is_none());
        assert!(matches!(&tx.outcomes[0], RcptOutcome::Reply(r) if r.code == 550));
        assert!(conn.is_reusable());
    }
}
