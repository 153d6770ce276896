//! The sync engine's IMAP client: logs in through `backend::login` (TLS none / STARTTLS /
//! implicit with certificate checks, STARTTLS-stripping and injection refused, SASL PLAIN with
//! authzid = user), then drives pipelined commands over the same connection.
//!
//! One `Client` owns one connection. Commands are written by the caller as bytes (so APPEND can
//! stream literals and several commands can be in flight); `read()` returns one parsed response.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use super::bodies::BodyPool;
use super::proto::{self, Response, Status, StatusText, Value};
use super::SyncError;
use crate::backend::conn::Conn;
use crate::backend::error::{within, BackendError};
use crate::backend::login::{self, PlainLogin};
use crate::backend::target::BackendTarget;
use crate::config::Config;
use crate::limits::Limits;
use crate::route::Route;
use crate::secret::Secret;
use crate::wire::framer::Framer;

/// Largest message the sync engine copies (literal cap); bigger ones are reported, not copied.
pub const MAX_MESSAGE: u64 = 100 * 1024 * 1024;
/// Longest response line between literals (a `UID SEARCH` over 100k messages is ~700 KiB).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// How to reach and authenticate to one backend as any user.
#[derive(Clone)]
pub struct Endpoint {
    /// Address, TLS mode, TLS client configuration and master user.
    pub target: BackendTarget,
    /// Connect and reply timeouts.
    pub limits: Limits,
    /// Longest silence while a reply is awaited after login (`[sync] reply_timeout_secs`).
    pub reply_timeout: Duration,
}

impl Endpoint {
    /// Builds the endpoint of `route` from the config; the sync engine logs in through the
    /// backend's master user where one is configured (users' own passwords are never stored).
    pub fn from_config(cfg: &Config, route: Route) -> Result<Endpoint, SyncError> {
        let target =
            BackendTarget::from_config(cfg, route).map_err(|e| SyncError::Config(e.to_string()))?;
        Ok(Endpoint {
            target,
            limits: cfg.limits.clone(),
            // A big APPEND batch or FETCH of a large message can take a while to be answered,
            // but any silence longer than this is a dead or overloaded backend.
            reply_timeout: match cfg.sync.reply_timeout_secs {
                Some(secs) => Duration::from_secs(secs.max(1)),
                None => cfg.limits.backend_reply().max(Duration::from_secs(60)),
            },
        })
    }

    /// Which backend this is.
    pub fn route(&self) -> Route {
        self.target.route
    }

    /// Whether the engine logs in through a master user here.
    pub fn has_master(&self) -> bool {
        self.target.master.is_some()
    }
}

/// Capabilities announced after login, upper-cased.
#[derive(Debug, Clone, Default)]
pub struct Caps(HashSet<String>);

impl Caps {
    /// Parses a space-separated capability list.
    pub fn parse(list: &str) -> Caps {
        Caps(
            list.split_ascii_whitespace()
                .map(str::to_ascii_uppercase)
                .collect(),
        )
    }

    /// Whether `name` was announced.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains(&name.to_ascii_uppercase())
    }
}

/// One logged-in IMAP connection.
pub struct Client {
    conn: Conn,
    framer: Framer,
    next_tag: u64,
    caps: Caps,
    route: Route,
    reply_timeout: Duration,
    /// How long LOGOUT may take (`[limits] logout_secs`).
    logout_timeout: Duration,
    /// Where large literals are read into while a copy runs (`set_body_pool`).
    bodies: Option<Arc<BodyPool>>,
    /// Where the reader stands in the response being read.
    reading: Reading,
    /// Whether a literal announced to the server is still being sent.
    writing: Writing,
}

/// Where the reader stands in the response being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Framing a response; a large `BODY[]` in it may still be taken as it arrives.
    Frame,
    /// Framing a response that was looked at (`take_arriving`) and is read whole.
    Whole,
    /// An announced body (`read_fetch`) is being read: its bytes not read yet (at 0, the rest
    /// of its response is still to be read).
    Body { left: u64 },
}

/// What the server takes the next bytes written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// A command.
    Commands,
    /// The rest of a literal it was announced: whatever is written next becomes message
    /// data, so the session can only be dropped.
    InLiteral,
}

/// What [`Client::read_fetch`] read.
pub enum Incoming {
    /// A whole response.
    Response(Response),
    /// A FETCH response up to its body, which is still arriving.
    Body(Arriving),
}

/// A FETCH response whose body is still arriving.
pub struct Arriving {
    /// The items before the body (`body` is `None`).
    pub fetched: Fetched,
    /// The body's length.
    pub len: u64,
}

/// What [`Client::read_body`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyRead {
    /// Read more of the body.
    More,
    /// The body and the rest of its response are read.
    Done,
}

/// One step of reading a command's responses (`Client::next_of`).
pub enum Next {
    /// An untagged response (data of the command, or unsolicited).
    Untagged(Response),
    /// The command's tagged OK.
    Done(StatusText),
}

/// At trace level, the timeline of a session: the tag and verb of the first command of each
/// write (pipelined APPENDs show as one) and of each tagged reply (`<`: the status word).
/// Never arguments, which may hold credentials.
fn trace_command(route: Route, dir: &str, bytes: &[u8]) {
    if !tracing::enabled!(tracing::Level::TRACE) {
        return;
    }
    let line = bytes.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.splitn(4, |&b| b == b' ');
    let tag = words.next().unwrap_or_default();
    if dir == "<" && (tag == b"*" || tag == b"+") {
        return;
    }
    let verb = words.next().unwrap_or_default();
    // `UID FETCH`, `UID STORE`: the verb is the second word.
    let second = if verb.eq_ignore_ascii_case(b"UID") {
        words.next().unwrap_or_default()
    } else {
        b""
    };
    tracing::trace!(
        ?route,
        "{dir} {} {} {}",
        String::from_utf8_lossy(tag),
        String::from_utf8_lossy(verb),
        String::from_utf8_lossy(second)
    );
}

/// The UID, FLAGS and other items of a FETCH response's head, which ends with `BODY[] {n}`
/// and a line end; `None` unless it holds UID and FLAGS and the literal is `BODY[]`'s.
fn head_fetch(head: &[u8]) -> Option<Fetched> {
    let brace = memchr::memrchr(b'{', head)?;
    let items = &head[..brace];
    let trimmed = items.strip_suffix(b" ")?;
    if !trimmed.to_ascii_uppercase().ends_with(b" BODY[]") {
        return None;
    }
    let mut whole = items.to_vec();
    whole.extend_from_slice(b"NIL)\r\n");
    let f = Fetched::parse(&proto::parse(Bytes::from(whole)).ok()?)?;
    (f.flags.is_some() && f.body.is_some()).then_some(Fetched { body: None, ..f })
}

impl Client {
    /// Connects to `ep` and logs in as `user`: through the backend's master user when one is
    /// configured, else with `own`, the user's password captured at a proxy login.
    pub async fn login(
        ep: &Endpoint,
        user: &str,
        own: Option<&Secret<Vec<u8>>>,
    ) -> Result<Client, SyncError> {
        let creds = match (&ep.target.master, own) {
            (Some(master), _) => PlainLogin {
                authzid: Some(user),
                authcid: master.user.as_bytes(),
                password: master.password.expose().as_bytes(),
            },
            (None, Some(password)) => PlainLogin {
                authzid: None,
                authcid: user.as_bytes(),
                password: password.expose(),
            },
            (None, None) => {
                return Err(SyncError::NoCredentials {
                    backend: ep.route(),
                })
            }
        };
        let logged = login::login(&ep.target, &ep.limits, None, creds)
            .await
            .map_err(login_error)?;
        Ok(Client {
            conn: logged.conn,
            framer: Framer::default(),
            next_tag: 1,
            caps: Caps::parse(&logged.capabilities),
            route: ep.route(),
            reply_timeout: ep.reply_timeout,
            logout_timeout: ep.limits.logout(),
            bodies: None,
            reading: Reading::Frame,
            writing: Writing::Commands,
        })
    }

    /// The backend this client talks to.
    pub fn route(&self) -> Route {
        self.route
    }

    /// Whether the server announced `cap`.
    pub fn has(&self, cap: &str) -> bool {
        self.caps.has(cap)
    }

    /// A fresh command tag.
    pub fn tag(&mut self) -> String {
        let t = format!("s{}", self.next_tag);
        self.next_tag += 1;
        t
    }

    /// Writes bytes (one or more commands) and flushes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        trace_command(self.route, ">", bytes);
        self.write_literal(bytes).await
    }

    /// Writes message data (the literal after a continuation), which is never traced.
    pub async fn write_literal(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        let write = self.conn.write_all(bytes);
        within(self.route, "write", self.reply_timeout, write).await
    }

    /// Writes `parts` back to back and flushes: large message bodies go out from their own
    /// buffers instead of being copied into one.
    pub async fn write_parts(&mut self, parts: &[Bytes]) -> Result<(), BackendError> {
        if let Some(first) = parts.first() {
            trace_command(self.route, ">", first);
        }
        let conn = &mut self.conn;
        let all = async {
            for p in parts {
                conn.write_all(p).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        within(self.route, "write", self.reply_timeout, all).await
    }

    /// Marks a literal announced to the server as open (until closed): if the session ends
    /// before, it is dropped without a word, so the server discards the partial message.
    pub fn set_literal_open(&mut self, open: bool) {
        self.writing = if open {
            Writing::InLiteral
        } else {
            Writing::Commands
        };
    }

    /// Whether a literal announced to the server was left unfinished.
    pub fn literal_open(&self) -> bool {
        self.writing == Writing::InLiteral
    }

    /// Reads large literals into buffers of `pool` (None: allocate as usual).
    pub fn set_body_pool(&mut self, pool: Option<Arc<BodyPool>>) {
        self.bodies = pool;
    }

    /// Reads the next complete response. Cancel-safe (the appender races it against its
    /// queue): whatever was read before a cancellation stays buffered for the next call.
    pub async fn read(&mut self) -> Result<Response, BackendError> {
        loop {
            if let Some(r) = self.take_frame()? {
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// Like [`read`](Self::read), but a FETCH response whose `BODY[]` is a literal of at least
    /// `stream_from` bytes, not all arrived yet, comes back as soon as the items before it are
    /// here: the caller then takes the body with [`read_body`](Self::read_body) as it arrives
    /// (and must, before anything else is read). Not cancel-safe once a body is announced.
    pub async fn read_fetch(&mut self, stream_from: u64) -> Result<Incoming, BackendError> {
        loop {
            if let Some(r) = self.take_frame()? {
                return Ok(Incoming::Response(r));
            }
            if let Some(a) = self.take_arriving(stream_from) {
                return Ok(Incoming::Body(a));
            }
            self.fill().await?;
        }
    }

    /// Reads more of the body announced by [`read_fetch`](Self::read_fetch) into `into`
    /// (which must have room for it all); once it is all there, reads the rest of its
    /// response and says so.
    pub async fn read_body(&mut self, into: &mut BytesMut) -> Result<BodyRead, BackendError> {
        let Reading::Body { left } = self.reading else {
            return Err(self.protocol("no message body is being read"));
        };
        if left > 0 {
            let buf = self.conn.buffer();
            let n = if buf.is_empty() {
                let read = self.conn.read_into(into, left as usize);
                match within(self.route, "reply", self.reply_timeout, read).await? {
                    0 => return Err(BackendError::eof(self.route, "reply")),
                    n => n,
                }
            } else {
                let k = buf.len().min(left as usize);
                into.extend_from_slice(&buf[..k]);
                buf.advance(k);
                k
            };
            self.reading = Reading::Body {
                left: left - n as u64,
            };
            return Ok(BodyRead::More);
        }
        loop {
            if let Some(n) = self
                .framer
                .frame(self.conn.buffer(), MAX_MESSAGE, MAX_LINE)
                .map_err(|e| self.protocol(e.to_string()))?
            {
                // The rest of the FETCH items after the body: checked for form, not used.
                let rest = self.conn.buffer().split_to(n);
                let mut whole = b"* 0 FETCH (BODY[] NIL".to_vec();
                whole.extend_from_slice(&rest);
                proto::parse(Bytes::from(whole)).map_err(|e| self.protocol(e.to_string()))?;
                self.reading = Reading::Frame;
                return Ok(BodyRead::Done);
            }
            self.fill().await?;
        }
    }

    /// Takes the first complete response off the buffer, if there is one.
    fn take_frame(&mut self) -> Result<Option<Response>, BackendError> {
        if matches!(self.reading, Reading::Body { .. }) {
            return Err(self.protocol("a message body is still being read"));
        }
        let framed = self
            .framer
            .frame(self.conn.buffer(), MAX_MESSAGE, MAX_LINE)
            .map_err(|e| self.protocol(e.to_string()))?;
        let Some(n) = framed else {
            return Ok(None);
        };
        self.reading = Reading::Frame;
        let buf = self.conn.buffer();
        let frame: Bytes = buf.split_to(n).freeze();
        trace_command(self.route, "<", &frame);
        if self.bodies.is_some() && n >= BodyPool::MIN {
            // A frame this large was most likely read into a buffer of the pool (`fill`): the
            // bytes after it move out, so the buffer is the frame's alone and can come back.
            *buf = BytesMut::from(&buf[..]);
        }
        proto::parse(frame)
            .map(Some)
            .map_err(|e| self.protocol(e.to_string()))
    }

    /// The FETCH response being read, if its first literal is a large `BODY[]` still arriving
    /// after a head that holds its UID and FLAGS: the head is taken off the buffer.
    fn take_arriving(&mut self, stream_from: u64) -> Option<Arriving> {
        if self.reading == Reading::Whole {
            return None;
        }
        let buf_len = self.conn.buffer().len();
        let (start, len) = self.framer.open_literal(buf_len)?;
        if len < stream_from {
            return None;
        }
        let Some(fetched) = head_fetch(&self.conn.buffer()[..start]) else {
            // Read whole, as any other response.
            self.reading = Reading::Whole;
            return None;
        };
        self.conn.buffer().advance(start);
        self.framer = Framer::default();
        self.reading = Reading::Body { left: len };
        Some(Arriving { fetched, len })
    }

    /// Reads more from the server into the buffer.
    async fn fill(&mut self) -> Result<(), BackendError> {
        // Large reads while a literal streams in. The rest of a known literal is reserved
        // at once: growing an 8 MB buffer 256 KiB at a time copies it over and over.
        let want = 256 * 1024;
        let missing = self.framer.literal_missing(self.conn.buffer().len());
        let buf = self.conn.buffer();
        if let Some(pool) = &self.bodies {
            if missing >= BodyPool::MIN && buf.capacity() - buf.len() < missing {
                // Room for the frame and one more read past its end.
                let mut recycled = pool.take(buf.len() + missing + want);
                recycled.extend_from_slice(buf);
                *buf = recycled;
            }
        }
        buf.reserve(want.max(missing));
        let read = self.conn.read_some(want);
        if within(self.route, "reply", self.reply_timeout, read).await? == 0 {
            return Err(BackendError::eof(self.route, "reply"));
        }
        Ok(())
    }

    /// Sends `cmd` (without tag and CRLF) and collects untagged responses until its completion.
    /// `verb` names the command in errors (never arguments: they may hold folder names only,
    /// but keep logs uniform).
    pub async fn command(
        &mut self,
        verb: &'static str,
        cmd: &str,
    ) -> Result<Vec<Response>, BackendError> {
        let tag = self.tag();
        self.write(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        self.collect(verb, &tag).await.map(|(u, _)| u)
    }

    /// Reads until the tagged response `tag`; errors on NO/BAD.
    pub async fn collect(
        &mut self,
        verb: &'static str,
        tag: &str,
    ) -> Result<(Vec<Response>, StatusText), BackendError> {
        let mut untagged = Vec::new();
        loop {
            match self.next_of(verb, tag).await? {
                Next::Untagged(r) => untagged.push(r),
                Next::Done(info) => return Ok((untagged, info)),
            }
        }
    }

    /// The next response of the command `tag`: an untagged one, or its tagged OK. Errors on
    /// NO/BAD and on BYE. Lets a large FETCH be handled one message at a time.
    pub async fn next_of(&mut self, verb: &'static str, tag: &str) -> Result<Next, BackendError> {
        match self.read().await? {
            Response::Tagged {
                tag: t,
                status,
                info,
            } if t.as_ref() == tag.as_bytes() => match status {
                Status::Ok => Ok(Next::Done(info)),
                _ => Err(self.refused(verb, status, &info)),
            },
            Response::Condition {
                status: Status::Bye,
                info,
            } => Err(self.refused(verb, Status::Bye, &info)),
            other => Ok(Next::Untagged(other)),
        }
    }

    /// The error for a NO/BAD completion of `verb`, or a BYE while it ran.
    pub fn refused(&self, verb: &'static str, status: Status, info: &StatusText) -> BackendError {
        let word = match status {
            Status::Bad => "BAD",
            Status::Bye => "BYE",
            _ => "NO",
        };
        BackendError::Refused {
            backend: self.route,
            command: verb,
            code: info.code_name(),
            text: format!("{word} {}", info.text),
        }
    }

    /// A protocol violation of this backend.
    pub fn protocol(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            backend: self.route,
            detail: detail.into(),
        }
    }

    /// Ends the session politely; errors do not matter any more.
    pub async fn logout(mut self) {
        if self.literal_open() || matches!(self.reading, Reading::Body { .. }) {
            // Mid-message: the server would take LOGOUT for message data (or its reply would
            // be lost in the literal). Closing the connection makes it drop the message.
            return;
        }
        let tag = self.tag();
        if self
            .write(format!("{tag} LOGOUT\r\n").as_bytes())
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(self.logout_timeout, self.collect("LOGOUT", &tag)).await;
        }
    }

    /// All mailboxes with their attributes and subscription state.
    pub async fn list(&mut self) -> Result<Vec<ListEntry>, BackendError> {
        let extended = self.has("LIST-EXTENDED");
        let cmd = if extended {
            if self.has("SPECIAL-USE") {
                "LIST \"\" \"*\" RETURN (SUBSCRIBED SPECIAL-USE)"
            } else {
                "LIST \"\" \"*\" RETURN (SUBSCRIBED)"
            }
        } else {
            "LIST \"\" \"*\""
        };
        let mut entries: Vec<ListEntry> = Vec::new();
        for r in self.command("LIST", cmd).await? {
            if let Response::Data { kind, items } = &r {
                if kind == "LIST" {
                    if let Some(e) = ListEntry::parse(items) {
                        entries.push(e);
                    }
                }
            }
        }
        if !extended {
            let mut subscribed = HashSet::new();
            for r in self.command("LSUB", "LSUB \"\" \"*\"").await? {
                if let Response::Data { kind, items } = &r {
                    if kind == "LSUB" {
                        if let Some(e) = ListEntry::parse(items) {
                            subscribed.insert(e.name);
                        }
                    }
                }
            }
            for e in &mut entries {
                e.subscribed = subscribed.remove(&e.name);
            }
            // Subscriptions of folders that do not exist are kept as such.
            for name in subscribed {
                entries.push(ListEntry {
                    name,
                    delimiter: None,
                    attributes: vec!["\\NONEXISTENT".into()],
                    subscribed: true,
                });
            }
        }
        Ok(entries)
    }

    /// STATUS of several mailboxes, pipelined; a mailbox that vanished meanwhile is `None`.
    pub async fn status_many(
        &mut self,
        names: &[String],
    ) -> Result<Vec<Option<MailboxStatus>>, BackendError> {
        let items = if self.has("CONDSTORE") {
            "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
        } else {
            "(MESSAGES UIDNEXT UIDVALIDITY)"
        };
        let mut out = Vec::with_capacity(names.len());
        // Bounded pipelining: the server answers in order and we never hold more than a chunk.
        for chunk in names.chunks(64) {
            let mut tags = Vec::with_capacity(chunk.len());
            let mut bytes = Vec::new();
            for name in chunk {
                let tag = self.tag();
                bytes.extend_from_slice(
                    format!("{tag} STATUS {} {items}\r\n", proto::quote(name)).as_bytes(),
                );
                tags.push(tag);
            }
            self.write(&bytes).await?;
            for tag in &tags {
                let mut found = None;
                loop {
                    match self.read().await? {
                        Response::Tagged {
                            tag: t,
                            status,
                            info,
                        } if t.as_ref() == tag.as_bytes() => {
                            if status != Status::Ok
                                && !matches!(info.code_name().as_str(), "NONEXISTENT" | "TRYCREATE")
                            {
                                return Err(self.refused("STATUS", status, &info));
                            }
                            break;
                        }
                        Response::Data { kind, items } if kind == "STATUS" => {
                            found = MailboxStatus::parse(&items);
                        }
                        _ => {}
                    }
                }
                out.push(found);
            }
        }
        Ok(out)
    }

    /// SELECT (or EXAMINE when `read_only`), enabling CONDSTORE where offered.
    pub async fn select(&mut self, name: &str, read_only: bool) -> Result<Selected, BackendError> {
        let verb = if read_only { "EXAMINE" } else { "SELECT" };
        let condstore = if self.has("CONDSTORE") {
            " (CONDSTORE)"
        } else {
            ""
        };
        let untagged = self
            .command(verb, &format!("{verb} {}{condstore}", proto::quote(name)))
            .await?;
        let mut s = Selected::default();
        for r in untagged {
            match r {
                Response::Numbered { n, kind, .. } if kind == "EXISTS" => s.exists = n,
                Response::Condition { info, .. } => match info.code_name().as_str() {
                    "UIDVALIDITY" => s.uidvalidity = to_u32(info.code_number(0)),
                    "UIDNEXT" => s.uidnext = to_u32(info.code_number(0)),
                    "HIGHESTMODSEQ" => s.highestmodseq = info.code_number(0),
                    _ => {}
                },
                _ => {}
            }
        }
        Ok(s)
    }

    /// `UID SEARCH` for all UIDs in `range` (e.g. `1:500`); ESEARCH is not needed.
    pub async fn uid_search(&mut self, range: &str) -> Result<Vec<u32>, BackendError> {
        let mut out = Vec::new();
        for r in self
            .command("UID SEARCH", &format!("UID SEARCH UID {range}"))
            .await?
        {
            if let Response::Data { kind, items } = r {
                if kind == "SEARCH" {
                    out.extend(
                        items
                            .iter()
                            .filter_map(|v| v.number())
                            .filter_map(|n| u32::try_from(n).ok()),
                    );
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// A login refusal that says the backend is overloaded (Dovecot answers
/// `NO [LIMIT] Maximum number of connections from user+IP exceeded` to the login when
/// `mail_max_userip_connections` is reached; others `NO [UNAVAILABLE]`, or `* BYE [...]` as the
/// greeting) counts as the backend's failure, not the login's, so the backend's pace backs off
/// before the retry. Other login errors stay login errors.
fn login_error(e: BackendError) -> SyncError {
    match &e {
        BackendError::Refused { code, .. } if is_overload(code) => SyncError::Backend(e),
        _ => SyncError::Login(e),
    }
}

/// Response codes by which a backend says it is overloaded.
pub fn is_overload(code: &str) -> bool {
    matches!(code, "LIMIT" | "INUSE" | "UNAVAILABLE")
}

/// A 32-bit protocol number, 0 (unknown) when absent or out of range.
fn to_u32(n: Option<u64>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// One `* LIST` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// Name as on the wire (modified UTF-7).
    pub name: String,
    /// Hierarchy separator, if any.
    pub delimiter: Option<char>,
    /// Attributes, upper-cased (`\NOSELECT`, `\SENT`, `\SUBSCRIBED`...).
    pub attributes: Vec<String>,
    /// Whether the user subscribed to it.
    pub subscribed: bool,
}

impl ListEntry {
    fn parse(items: &[Value]) -> Option<ListEntry> {
        let attributes: Vec<String> = items
            .first()?
            .list()?
            .iter()
            .filter_map(|v| v.text().map(str::to_ascii_uppercase))
            .collect();
        let delimiter = items.get(1)?.text().and_then(|d| d.chars().next());
        let name = String::from_utf8_lossy(items.get(2)?.bytes()?).into_owned();
        let subscribed = attributes.iter().any(|a| a == "\\SUBSCRIBED");
        Some(ListEntry {
            name,
            delimiter,
            attributes,
            subscribed,
        })
    }

    /// Whether it can hold messages.
    pub fn selectable(&self) -> bool {
        !self
            .attributes
            .iter()
            .any(|a| a == "\\NOSELECT" || a == "\\NONEXISTENT")
    }
}

/// What STATUS says of a mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Number of messages.
    pub messages: u32,
    /// Next UID.
    pub uidnext: u32,
    /// UIDVALIDITY.
    pub uidvalidity: u32,
    /// HIGHESTMODSEQ (CONDSTORE).
    pub highestmodseq: Option<u64>,
}

impl MailboxStatus {
    fn parse(items: &[Value]) -> Option<MailboxStatus> {
        let list = items.get(1)?.list()?;
        let mut s = MailboxStatus::default();
        for pair in list.chunks(2) {
            let [k, v] = pair else { continue };
            let v = v.number();
            match k.text().map(str::to_ascii_uppercase).as_deref() {
                Some("MESSAGES") => s.messages = u32::try_from(v?).ok()?,
                Some("UIDNEXT") => s.uidnext = u32::try_from(v?).ok()?,
                Some("UIDVALIDITY") => s.uidvalidity = u32::try_from(v?).ok()?,
                Some("HIGHESTMODSEQ") => s.highestmodseq = v,
                _ => {}
            }
        }
        Some(s)
    }
}

/// What SELECT says of a mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Selected {
    /// Number of messages.
    pub exists: u32,
    /// UIDVALIDITY.
    pub uidvalidity: u32,
    /// Next UID.
    pub uidnext: u32,
    /// HIGHESTMODSEQ, when CONDSTORE is on.
    pub highestmodseq: Option<u64>,
}

/// The items of one `* n FETCH (...)` response the engine uses.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// UID.
    pub uid: u32,
    /// Flags and keywords, as sent (without `\Recent`).
    pub flags: Option<Vec<String>>,
    /// INTERNALDATE as sent (`dd-Mon-yyyy hh:mm:ss +zzzz`).
    pub internaldate: Option<String>,
    /// RFC822.SIZE.
    pub size: Option<u64>,
    /// BODY[] (the whole message).
    pub body: Option<Bytes>,
    /// MODSEQ.
    pub modseq: Option<u64>,
}

impl Fetched {
    /// Reads a FETCH response's item list; `None` if it is not a FETCH with a UID.
    pub fn parse(resp: &Response) -> Option<Fetched> {
        let Response::Numbered { kind, items, .. } = resp else {
            return None;
        };
        if kind != "FETCH" {
            return None;
        }
        let list = items.first()?.list()?;
        let mut f = Fetched::default();
        let mut i = 0;
        while i + 1 < list.len() {
            let key = list[i].bytes().unwrap_or_default().to_ascii_uppercase();
            let v = &list[i + 1];
            match key.as_slice() {
                // A UID beyond 32 bits is not a UID (RFC 3501 nz-number): no such message.
                b"UID" => f.uid = u32::try_from(v.number()?).ok()?,
                b"FLAGS" => {
                    f.flags = Some(
                        v.list()?
                            .iter()
                            .filter_map(|x| x.text())
                            .filter(|x| !x.eq_ignore_ascii_case("\\Recent"))
                            .map(str::to_owned)
                            .collect(),
                    )
                }
                b"INTERNALDATE" => f.internaldate = v.text().map(str::to_owned),
                b"RFC822.SIZE" => f.size = v.number(),
                b"BODY[]" => {
                    f.body = match v {
                        Value::Nil => Some(Bytes::new()),
                        other => other.to_bytes(),
                    }
                }
                b"MODSEQ" => f.modseq = v.list().and_then(|l| l.first()).and_then(Value::number),
                _ => {}
            }
            i += 2;
        }
        (f.uid != 0).then_some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::error::refusal_code;

    fn refused(text: &str) -> SyncError {
        login_error(BackendError::Refused {
            backend: Route::New,
            command: "LOGIN",
            code: refusal_code(text),
            text: text.into(),
        })
    }

    #[test]
    fn a_body_is_taken_as_it_arrives_only_after_uid_and_flags() {
        let f = head_fetch(
            b"* 3 FETCH (UID 17 FLAGS (\\Seen $Work) INTERNALDATE \"01-Feb-2020 10:00:00 +0000\" \
              RFC822.SIZE 900000 BODY[] {900000}\r\n",
        )
        .expect("a streamable head");
        assert_eq!(f.uid, 17);
        assert_eq!(
            f.flags.as_deref(),
            Some(&["\\Seen".to_owned(), "$Work".to_owned()][..])
        );
        assert_eq!(
            f.internaldate.as_deref(),
            Some("01-Feb-2020 10:00:00 +0000")
        );
        assert!(f.body.is_none());
        for head in [
            // FLAGS would come after the body: read whole.
            &b"* 3 FETCH (UID 17 BODY[] {900000}\r\n"[..],
            // Another item's literal.
            b"* 3 FETCH (UID 17 FLAGS () BODY[HEADER] {900000}\r\n",
            b"* 3 FETCH (UID 17 FLAGS () XBODY[] {900000}\r\n",
            // No UID.
            b"* 3 FETCH (FLAGS () BODY[] {900000}\r\n",
            b"* 3 FETCH (UID 17 FLAGS ( BODY[] {900000}\r\n",
            b"{900000}\r\n",
        ] {
            assert!(
                head_fetch(head).is_none(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn overloaded_logins_back_off_and_retry() {
        // What Dovecot 2.3.19 answers to a login past mail_max_userip_connections.
        let e = refused(
            "NO [LIMIT] Maximum number of connections from user+IP exceeded \
             (mail_max_userip_connections=1)",
        );
        assert_eq!(e.overload(), Some((Route::New, "LIMIT")));
        assert!(e.retryable());
        assert!(e.to_string().contains("LOGIN refused"), "{e}");
        let e = refused("* BYE [UNAVAILABLE] Server shutting down");
        assert_eq!(e.overload(), Some((Route::New, "UNAVAILABLE")));
        assert_eq!(
            refused("no [inuse] mailbox locked").overload(),
            Some((Route::New, "INUSE"))
        );
    }

    #[test]
    fn other_login_refusals_stay_login_errors() {
        for text in [
            "NO [AUTHORIZATIONFAILED] not allowed",
            "NO [LIMITED] no such code",
            "* BYE Too many connections",
        ] {
            let e = refused(text);
            assert!(matches!(e, SyncError::Login(_)), "{text}: {e:?}");
            assert_eq!(e.overload(), None, "{text}");
        }
        let e = login_error(BackendError::AuthFailed {
            backend: Route::Legacy,
        });
        assert!(matches!(
            e,
            SyncError::Login(BackendError::AuthFailed { .. })
        ));
    }
}
