//! The LMTP server side as a pure state machine (RFC 2033): bytes in, events out. It parses
//! commands, keeps the transaction (sender, accepted recipients) and receives DATA; the
//! driver (`session.rs`) owns the socket, decides each recipient and delivers messages.
//!
//! The session is one `State`: reading commands (before LHLO, ready, or in a transaction),
//! skipping an over-long line, or receiving DATA for a transaction with recipients.
//!
//! Pipelining (RFC 2920) needs nothing special here: `poll` takes one command at a time from
//! the buffer and leaves the rest for the next call, so replies come out in command order.

use std::collections::VecDeque;

use bytes::{Buf, BytesMut};

use super::data::DataReceiver;
use super::reply::Reply;
use crate::config::LmtpConfig;

/// Bounds and names of the server side.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Name in the greeting and the LHLO reply.
    pub hostname: String,
    /// Largest message accepted (advertised as SIZE); larger gets `552 5.3.4`.
    pub max_message_size: u64,
    /// Longest command line, CRLF included.
    pub max_line: usize,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Failed commands before the server says `421` and closes.
    pub max_errors: u32,
}

impl ServerLimits {
    /// The configured name and message size, with the fixed bounds below.
    pub fn from_config(cfg: &LmtpConfig) -> Self {
        ServerLimits {
            hostname: cfg.hostname.clone(),
            max_message_size: cfg.max_message_size,
            // RFC 5321 §4.5.3.1.4 allows 512 octets plus extension parameters; Postfix's
            // line_length_limit is 2048. Generous, still small.
            max_line: 4096,
            // RFC 5321 §4.5.3.1.8: at least 100; Postfix's smtpd_recipient_limit is 1000.
            max_recipients: 1000,
            // Postfix's smtpd_hard_error_limit.
            max_errors: 20,
        }
    }
}

impl Default for ServerLimits {
    /// `[lmtp]`'s defaults.
    fn default() -> Self {
        ServerLimits::from_config(&LmtpConfig::default())
    }
}

/// The `BODY` parameter of MAIL (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// A parsed `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path without angle brackets; empty for the null sender `<>`.
    pub reverse_path: String,
    /// Declared size (RFC 1870), if given.
    pub size: Option<u64>,
    /// Declared body type, if given.
    pub body: Option<BodyType>,
}

/// One command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `LHLO domain`.
    Lhlo(String),
    /// `HELO`/`EHLO`: SMTP greetings, not valid in LMTP.
    SmtpGreeting,
    /// `MAIL FROM:<path> [params]`.
    Mail(MailFrom),
    /// `RCPT TO:<path>`; the address without brackets.
    Rcpt(String),
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY`: answered 252 without looking anything up.
    Vrfy,
    /// A known SMTP command this server does not offer.
    NotImplemented,
}

/// RFC 5321 §4.5.3.1.3: a path is at most 256 octets.
const MAX_PATH: usize = 256;

fn syntax(code: u16, text: &str) -> Reply {
    Reply::new(code, text)
}

/// Parses one command line (without its line end). Errors are the reply to send.
pub fn parse_command(line: &[u8]) -> Result<Command, Reply> {
    let (verb, arg) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let verb = verb.to_ascii_uppercase();
    let no_arg = |cmd: Command, name: &str| {
        if arg.iter().all(|&b| b == b' ') {
            Ok(cmd)
        } else {
            Err(syntax(501, &format!("5.5.4 Syntax: {name}")))
        }
    };
    match verb.as_slice() {
        b"LHLO" => parse_lhlo(arg),
        b"HELO" | b"EHLO" => Ok(Command::SmtpGreeting),
        b"MAIL" => parse_mail(arg),
        b"RCPT" => parse_rcpt(arg),
        b"DATA" => no_arg(Command::Data, "DATA"),
        b"RSET" => no_arg(Command::Rset, "RSET"),
        b"QUIT" => no_arg(Command::Quit, "QUIT"),
        b"NOOP" => Ok(Command::Noop),
        b"VRFY" => Ok(Command::Vrfy),
        b"EXPN" | b"HELP" | b"TURN" | b"ETRN" | b"BDAT" | b"STARTTLS" | b"AUTH" | b"XCLIENT"
        | b"XFORWARD" | b"SEND" | b"SOML" | b"SAML" => Ok(Command::NotImplemented),
        _ => Err(syntax(500, "5.5.2 Command unrecognized")),
    }
}

/// `LHLO domain`: the first word, printable ASCII.
fn parse_lhlo(arg: &[u8]) -> Result<Command, Reply> {
    let host = trim(arg).split(|&b| b == b' ').next().unwrap_or(b"");
    if host.is_empty() || !host.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(syntax(501, "5.5.4 Syntax: LHLO hostname"));
    }
    Ok(Command::Lhlo(String::from_utf8_lossy(host).into_owned()))
}

/// `MAIL FROM:<path>` with the SIZE and BODY parameters, each at most once.
fn parse_mail(arg: &[u8]) -> Result<Command, Reply> {
    let rest = strip_prefix_ci(arg, b"FROM:")
        .ok_or_else(|| syntax(501, "5.5.4 Syntax: MAIL FROM:<address>"))?;
    let (path, params) =
        parse_path(rest).ok_or_else(|| syntax(501, "5.1.7 Bad sender address syntax"))?;
    let mut mail = MailFrom {
        reverse_path: path,
        size: None,
        body: None,
    };
    for param in params.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
        mail_param(&mut mail, param)?;
    }
    Ok(Command::Mail(mail))
}

/// One `KEY[=VALUE]` parameter of MAIL, set in `mail`.
fn mail_param(mail: &mut MailFrom, param: &[u8]) -> Result<(), Reply> {
    let (key, value) = match param.iter().position(|&b| b == b'=') {
        Some(i) => (&param[..i], Some(&param[i + 1..])),
        None => (param, None),
    };
    let key = key.to_ascii_uppercase();
    match (key.as_slice(), value) {
        (b"SIZE", Some(v)) if mail.size.is_none() => {
            if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
                return Err(syntax(501, "5.5.4 Bad SIZE parameter"));
            }
            // 20 digits may overflow: such a size is too large in any case.
            let n = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            mail.size = Some(n.unwrap_or(u64::MAX));
        }
        (b"BODY", Some(v)) if mail.body.is_none() => {
            mail.body = Some(match v.to_ascii_uppercase().as_slice() {
                b"7BIT" => BodyType::SevenBit,
                b"8BITMIME" => BodyType::EightBitMime,
                _ => return Err(syntax(501, "5.5.4 Bad BODY parameter")),
            });
        }
        (b"SIZE" | b"BODY", _) => {
            return Err(syntax(501, "5.5.4 Bad or repeated parameter"));
        }
        _ => return Err(syntax(555, "5.5.4 Unsupported MAIL parameter")),
    }
    Ok(())
}

/// `RCPT TO:<path>`: a non-empty path and no parameters.
fn parse_rcpt(arg: &[u8]) -> Result<Command, Reply> {
    let rest = strip_prefix_ci(arg, b"TO:")
        .ok_or_else(|| syntax(501, "5.5.4 Syntax: RCPT TO:<address>"))?;
    let (path, params) =
        parse_path(rest).ok_or_else(|| syntax(501, "5.1.3 Bad recipient address syntax"))?;
    if path.is_empty() {
        return Err(syntax(501, "5.1.3 Bad recipient address syntax"));
    }
    if params.iter().any(|&b| b != b' ') {
        // No extension with RCPT parameters is advertised (no DSN).
        return Err(syntax(555, "5.5.4 Unsupported RCPT parameter"));
    }
    Ok(Command::Rcpt(path))
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Parses `<path>` (or a bare address, as lenient MTAs send) and returns the address and the
/// rest of the line (the parameters). A source route (`<@a,@b:user@c>`) is dropped.
/// `None` for anything that is not printable ASCII, too long or unterminated.
pub fn parse_path(s: &[u8]) -> Option<(String, &[u8])> {
    let s = &s[s.iter().position(|&b| b != b' ').unwrap_or(s.len())..];
    let (inner, rest) = if s.first() == Some(&b'<') {
        let mut in_quote = false;
        let mut escaped = false;
        let mut close = None;
        for (i, &b) in s.iter().enumerate().skip(1) {
            if escaped {
                escaped = false;
            } else if in_quote && b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quote = !in_quote;
            } else if b == b'>' && !in_quote {
                close = Some(i);
                break;
            } else if b == b' ' && !in_quote {
                return None;
            }
        }
        let close = close?;
        (&s[1..close], &s[close + 1..])
    } else {
        let end = s.iter().position(|&b| b == b' ').unwrap_or(s.len());
        (&s[..end], &s[end..])
    };
    if !rest.is_empty() && rest[0] != b' ' {
        return None;
    }
    let inner = if inner.first() == Some(&b'@') {
        &inner[inner.iter().position(|&b| b == b':')? + 1..]
    } else {
        inner
    };
    if inner.len() > MAX_PATH || !inner.iter().all(|b| (0x20..0x7f).contains(b)) {
        return None;
    }
    if s.first() != Some(&b'<') && inner.is_empty() {
        return None;
    }
    Some((String::from_utf8_lossy(inner).into_owned(), rest))
}

/// A transaction in progress: after MAIL, with the recipients accepted so far.
#[derive(Debug)]
struct Transaction<R> {
    mail: MailFrom,
    rcpts: Vec<(String, R)>,
}

/// Where a session stands between commands (RFC 5321 §4.1.4: LHLO, then MAIL, then RCPT).
#[derive(Debug)]
enum Envelope<R> {
    /// Before LHLO: MAIL is refused.
    Greeted,
    /// After LHLO, RSET or a finished message: ready for MAIL.
    Ready,
    /// After MAIL: collecting recipients.
    Mail(Transaction<R>),
}

/// The session's state machine. DATA owns the transaction it completes, so a message never
/// lacks a sender; skipping an over-long line keeps the envelope it interrupted.
#[derive(Debug)]
enum State<R> {
    /// Reading command lines.
    Commands(Envelope<R>),
    /// Skipping the rest of an over-long line, so it is not read as commands.
    Discarding(Envelope<R>),
    /// After DATA's 354: receiving the message of `tx`, which has at least one recipient.
    Data {
        tx: Transaction<R>,
        receiver: DataReceiver,
    },
}

impl<R> State<R> {
    /// The open transaction, whichever state holds it.
    fn transaction(&self) -> Option<&Transaction<R>> {
        match self {
            State::Commands(Envelope::Mail(tx))
            | State::Discarding(Envelope::Mail(tx))
            | State::Data { tx, .. } => Some(tx),
            _ => None,
        }
    }

    fn transaction_mut(&mut self) -> Option<&mut Transaction<R>> {
        match self {
            State::Commands(Envelope::Mail(tx))
            | State::Discarding(Envelope::Mail(tx))
            | State::Data { tx, .. } => Some(tx),
            _ => None,
        }
    }
}

/// A complete message with its envelope, ready for delivery.
#[derive(Debug)]
pub struct Message<R> {
    /// The sender.
    pub mail: MailFrom,
    /// Accepted recipients in RCPT order (duplicates included) with the driver's data.
    pub rcpts: Vec<(String, R)>,
    /// The message: unstuffed, CRLF line ends only (see `data.rs`).
    pub body: Vec<u8>,
    /// Bare CRs and LFs that were turned into CRLF.
    pub normalised: u64,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Event<R> {
    /// Send this reply.
    Reply(Reply),
    /// A RCPT for this address: decide, then send `accept_rcpt`'s reply or a refusal.
    Rcpt(String),
    /// DATA is complete: deliver and send exactly one reply per recipient, in order.
    Deliver(Message<R>),
    /// Send this reply and close the connection.
    Close(Reply),
    /// Everything buffered is processed: send pending replies, then read more input.
    NeedMore,
}

/// One LMTP session's protocol state. `R` is what the driver keeps per accepted recipient.
#[derive(Debug)]
pub struct Server<R> {
    limits: ServerLimits,
    state: State<R>,
    errors: u32,
    /// Replies owed before anything else (one per recipient of a refused message).
    pending: VecDeque<Reply>,
}

/// What a step of the state machine yields: the next state and the driver's event.
type Step<R> = (State<R>, Event<R>);

impl<R> Server<R> {
    /// A session before the greeting.
    pub fn new(limits: ServerLimits) -> Self {
        Server {
            limits,
            state: State::Commands(Envelope::Greeted),
            errors: 0,
            pending: VecDeque::new(),
        }
    }

    /// The 220 greeting.
    pub fn greeting(&self) -> Reply {
        Reply::new(
            220,
            format!("{} LMTP mailferry ready", self.limits.hostname),
        )
    }

    /// Whether a transaction (MAIL given) is open.
    pub fn in_transaction(&self) -> bool {
        self.state.transaction().is_some()
    }

    /// Whether message data is being received.
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data { .. })
    }

    /// The open transaction's sender and accepted recipients (for starting backend
    /// transactions while the message is still arriving).
    pub fn envelope(&self) -> Option<(&MailFrom, &[(String, R)])> {
        let tx = self.state.transaction()?;
        Some((&tx.mail, tx.rcpts.as_slice()))
    }

    /// Records an accepted recipient; returns the reply for it. Meant right after
    /// `Event::Rcpt`; a driver calling it without a transaction gets a 503.
    pub fn accept_rcpt(&mut self, address: String, data: R) -> Reply {
        match self.state.transaction_mut() {
            Some(tx) => {
                let reply = Reply::new(250, format!("2.1.5 <{address}> Recipient OK"));
                tx.rcpts.push((address, data));
                reply
            }
            None => Reply::new(503, "5.5.1 Need MAIL command first"),
        }
    }

    /// Processes buffered input up to the next thing the driver must do; consumes what it used.
    pub fn poll(&mut self, input: &mut BytesMut) -> Event<R> {
        if let Some(r) = self.pending.pop_front() {
            return Event::Reply(r);
        }
        // Each step takes the state by value and returns the next one, so a transaction moves
        // from state to state instead of being looked up again. The placeholder never stays.
        let state = std::mem::replace(&mut self.state, State::Commands(Envelope::Greeted));
        let (next, event) = match state {
            State::Data { tx, receiver } => self.receive(tx, receiver, input),
            State::Discarding(envelope) => match memchr::memchr(b'\n', input) {
                None => {
                    input.clear();
                    (State::Discarding(envelope), Event::NeedMore)
                }
                Some(k) => {
                    input.advance(k + 1);
                    self.read_command(envelope, input)
                }
            },
            State::Commands(envelope) => self.read_command(envelope, input),
        };
        self.state = next;
        event
    }

    /// Feeds message data; at its end the transaction is over, delivered or refused.
    fn receive(
        &mut self,
        tx: Transaction<R>,
        mut receiver: DataReceiver,
        input: &mut BytesMut,
    ) -> Step<R> {
        let (n, done) = receiver.feed(input);
        input.advance(n);
        if !done {
            return (State::Data { tx, receiver }, Event::NeedMore);
        }
        let received = receiver.finish();
        let next = State::Commands(Envelope::Ready);
        if received.oversize {
            // One 552 per recipient: this one now, the others queued (DATA needs recipients).
            let too_big = || Reply::new(552, "5.3.4 Message too big");
            self.pending
                .extend(tx.rcpts.iter().skip(1).map(|_| too_big()));
            return (next, Event::Reply(too_big()));
        }
        let message = Message {
            mail: tx.mail,
            rcpts: tx.rcpts,
            body: received.body,
            normalised: received.normalised,
        };
        (next, Event::Deliver(message))
    }

    /// Takes one command line from the input, refusing (and skipping) over-long ones.
    fn read_command(&mut self, envelope: Envelope<R>, input: &mut BytesMut) -> Step<R> {
        match memchr::memchr(b'\n', input) {
            None if input.len() >= self.limits.max_line => {
                input.clear();
                let event = self.error(Reply::new(500, "5.5.2 Line too long"));
                (State::Discarding(envelope), event)
            }
            None => (State::Commands(envelope), Event::NeedMore),
            Some(k) if k + 1 > self.limits.max_line => {
                input.advance(k + 1);
                let event = self.error(Reply::new(500, "5.5.2 Line too long"));
                (State::Commands(envelope), event)
            }
            Some(k) => {
                let raw = input.split_to(k + 1);
                let line = &raw[..k];
                // Commands may end in a bare LF (lenient MTAs); only DATA's end is strict.
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                self.command(envelope, line)
            }
        }
    }

    fn error(&mut self, reply: Reply) -> Event<R> {
        self.errors += 1;
        if self.errors >= self.limits.max_errors {
            return Event::Close(Reply::new(
                421,
                format!(
                    "4.7.0 {} Too many errors, closing connection",
                    self.limits.hostname
                ),
            ));
        }
        Event::Reply(reply)
    }

    fn command(&mut self, envelope: Envelope<R>, line: &[u8]) -> Step<R> {
        let event = match parse_command(line) {
            Err(reply) => self.error(reply),
            // LHLO starts over: any transaction is dropped.
            Ok(Command::Lhlo(_)) => return (State::Commands(Envelope::Ready), self.lhlo_reply()),
            Ok(Command::SmtpGreeting) => {
                self.error(Reply::new(500, "5.5.1 This is LMTP: use LHLO"))
            }
            Ok(Command::Mail(mail)) => return self.mail(envelope, mail),
            Ok(Command::Rcpt(address)) => self.rcpt(&envelope, address),
            Ok(Command::Data) => return self.data(envelope),
            Ok(Command::Rset) => {
                // RSET ends a transaction; it is no substitute for LHLO.
                let envelope = match envelope {
                    Envelope::Mail(_) => Envelope::Ready,
                    other => other,
                };
                return (
                    State::Commands(envelope),
                    Event::Reply(Reply::new(250, "2.0.0 OK")),
                );
            }
            Ok(Command::Noop) => Event::Reply(Reply::new(250, "2.0.0 OK")),
            Ok(Command::Quit) => Event::Close(Reply::new(
                221,
                format!("2.0.0 {} closing connection", self.limits.hostname),
            )),
            Ok(Command::Vrfy) => Event::Reply(Reply::new(
                252,
                "2.5.2 Cannot VRFY user, but will accept message",
            )),
            Ok(Command::NotImplemented) => {
                self.error(Reply::new(502, "5.5.1 Command not implemented"))
            }
        };
        (State::Commands(envelope), event)
    }

    fn lhlo_reply(&self) -> Event<R> {
        Event::Reply(Reply {
            code: 250,
            lines: vec![
                self.limits.hostname.clone(),
                "PIPELINING".into(),
                "ENHANCEDSTATUSCODES".into(),
                "8BITMIME".into(),
                format!("SIZE {}", self.limits.max_message_size),
            ],
        })
    }

    fn mail(&mut self, envelope: Envelope<R>, mail: MailFrom) -> Step<R> {
        let refusal = match &envelope {
            Envelope::Greeted => Reply::new(503, "5.5.1 Send LHLO first"),
            Envelope::Mail(_) => Reply::new(503, "5.5.1 Sender already specified"),
            Envelope::Ready if mail.size.is_some_and(|s| s > self.limits.max_message_size) => {
                Reply::new(552, "5.3.4 Message size exceeds fixed limit")
            }
            Envelope::Ready => {
                let tx = Transaction {
                    mail,
                    rcpts: Vec::new(),
                };
                let ok = Event::Reply(Reply::new(250, "2.1.0 Sender OK"));
                return (State::Commands(Envelope::Mail(tx)), ok);
            }
        };
        let event = self.error(refusal);
        (State::Commands(envelope), event)
    }

    fn rcpt(&mut self, envelope: &Envelope<R>, address: String) -> Event<R> {
        match envelope {
            Envelope::Mail(tx) if tx.rcpts.len() >= self.limits.max_recipients => {
                Event::Reply(Reply::new(452, "4.5.3 Too many recipients"))
            }
            Envelope::Mail(_) => Event::Rcpt(address),
            _ => self.error(Reply::new(503, "5.5.1 Need MAIL command first")),
        }
    }

    fn data(&mut self, envelope: Envelope<R>) -> Step<R> {
        match envelope {
            // RFC 2033 §4.2: DATA without a successful RCPT must fail with 503. Not counted
            // as an error: with PIPELINING it is what follows deferred recipients.
            Envelope::Mail(tx) if tx.rcpts.is_empty() => (
                State::Commands(Envelope::Mail(tx)),
                Event::Reply(Reply::new(503, "5.5.1 No valid recipients")),
            ),
            Envelope::Mail(tx) => {
                let receiver = DataReceiver::new(self.limits.max_message_size);
                let go = Reply::new(354, "Start mail input; end with <CRLF>.<CRLF>");
                (State::Data { tx, receiver }, Event::Reply(go))
            }
            other => {
                let event = self.error(Reply::new(503, "5.5.1 Need MAIL command first"));
                (State::Commands(other), event)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a server over `input` accepting every recipient; returns the transcript of
    /// replies and the delivered messages' bodies.
    fn run(input: &[u8], limits: ServerLimits) -> (String, Vec<Message<()>>, bool) {
        let mut s = Server::<()>::new(limits);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        let mut msgs = Vec::new();
        loop {
            match s.poll(&mut buf) {
                Event::Reply(r) => r.encode_into(&mut out),
                Event::Rcpt(a) => s.accept_rcpt(a, ()).encode_into(&mut out),
                Event::Deliver(m) => {
                    for _ in &m.rcpts {
                        out.extend_from_slice(b"250 delivered\r\n");
                    }
                    msgs.push(m);
                }
                Event::Close(r) => {
                    r.encode_into(&mut out);
                    return (String::from_utf8(out).unwrap(), msgs, true);
                }
                Event::NeedMore => return (String::from_utf8(out).unwrap(), msgs, false),
            }
        }
    }

    #[test]
    fn pipelined_transaction_replies_in_order() {
        let (out, msgs, closed) = run(
            b"LHLO mta\r\nMAIL FROM:<a@x> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
            ServerLimits::default(),
        );
        assert_eq!(
            out,
            "250-mailferry\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n\
             250 2.1.0 Sender OK\r\n250 2.1.5 <b@y> Recipient OK\r\n250 2.1.5 <c@y> Recipient OK\r\n\
             354 Start mail input; end with <CRLF>.<CRLF>\r\n250 delivered\r\n250 delivered\r\n\
             221 2.0.0 mailferry closing connection\r\n"
        );
        assert!(closed);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body, b"hi\r\n");
        assert_eq!(msgs[0].mail.size, Some(10));
        assert_eq!(msgs[0].mail.body, Some(BodyType::EightBitMime));
    }

    #[test]
    fn sequence_errors() {
        let (out, _, _) = run(
            b"MAIL FROM:<a@x>\r\nLHLO m\r\nDATA\r\nRCPT TO:<b@y>\r\nMAIL FROM:<>\r\nDATA\r\nMAIL FROM:<>\r\nRSET\r\nEHLO x\r\n",
            ServerLimits::default(),
        );
        let codes: Vec<&str> = out
            .lines()
            .filter(|l| l.as_bytes()[3] == b' ')
            .map(|l| &l[..3])
            .collect();
        assert_eq!(
            codes,
            ["503", "250", "503", "503", "250", "503", "503", "250", "500"]
        );
        assert!(out.contains("503 5.5.1 No valid recipients"), "{out}");
    }

    #[test]
    fn size_limits() {
        let limits = ServerLimits {
            max_message_size: 8,
            ..ServerLimits::default()
        };
        let (out, msgs, _) = run(
            b"LHLO m\r\nMAIL FROM:<a@x> SIZE=9\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<b@y>\r\nDATA\r\n0123456789\r\n.\r\nNOOP\r\n",
            limits,
        );
        assert!(
            out.contains("552 5.3.4 Message size exceeds fixed limit\r\n"),
            "{out}"
        );
        assert_eq!(
            out.matches("552 5.3.4 Message too big\r\n").count(),
            2,
            "{out}"
        );
        assert!(out.ends_with("250 2.0.0 OK\r\n"), "{out}");
        assert!(msgs.is_empty());
    }

    #[test]
    fn long_lines_are_refused_and_skipped() {
        let limits = ServerLimits {
            max_line: 64,
            ..ServerLimits::default()
        };
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 500));
        input.extend_from_slice(b" QUIT\r\nNOOP\r\n");
        // Fed in pieces, as from a socket: memory stays bounded by the limit.
        let mut s = Server::<()>::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in input.chunks(50) {
            buf.extend_from_slice(chunk);
            loop {
                match s.poll(&mut buf) {
                    Event::Reply(r) => r.encode_into(&mut out),
                    Event::NeedMore => break,
                    other => panic!("{other:?}"),
                }
            }
            assert!(buf.len() <= 64 + 50);
        }
        assert_eq!(out, b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n");
    }

    #[test]
    fn too_many_errors_close() {
        let limits = ServerLimits {
            max_errors: 3,
            ..ServerLimits::default()
        };
        let (out, _, closed) = run(b"X\r\nY\r\nZ\r\nNOOP\r\n", limits);
        assert!(closed);
        assert!(
            out.ends_with("421 4.7.0 mailferry Too many errors, closing connection\r\n"),
            "{out}"
        );
    }

    #[test]
    fn paths() {
        assert_eq!(parse_path(b"<a@b>"), Some(("a@b".into(), &b""[..])));
        assert_eq!(
            parse_path(b" <a@b> SIZE=1"),
            Some(("a@b".into(), &b" SIZE=1"[..]))
        );
        assert_eq!(parse_path(b"<>"), Some(("".into(), &b""[..])));
        assert_eq!(parse_path(b"<@r1,@r2:a@b>"), Some(("a@b".into(), &b""[..])));
        assert_eq!(
            parse_path(b"<\"x > y\"@b>"),
            Some(("\"x > y\"@b".into(), &b""[..]))
        );
        assert_eq!(parse_path(b"a@b"), Some(("a@b".into(), &b""[..])));
        for bad in [
            &b"<a@b"[..],
            b"<a b@c>",
            b"<a@b>x",
            b"<a\x01@b>",
            b"<\xc3\xa9@b>",
            b"",
        ] {
            assert_eq!(parse_path(bad), None, "{bad:?}");
        }
        let long = format!("<{}@b>", "a".repeat(300));
        assert_eq!(parse_path(long.as_bytes()), None);
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command(b"lhlo mx.example"),
            Ok(Command::Lhlo("mx.example".into()))
        );
        assert_eq!(
            parse_command(b"rcpt to:<A@B>"),
            Ok(Command::Rcpt("A@B".into()))
        );
        assert_eq!(
            parse_command(b"RCPT TO: <a@b>"),
            Ok(Command::Rcpt("a@b".into()))
        );
        assert_eq!(
            parse_command(b"RCPT TO:<a@b> NOTIFY=NEVER")
                .unwrap_err()
                .code,
            555
        );
        assert_eq!(parse_command(b"RCPT TO:<>").unwrap_err().code, 501);
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b> SMTPUTF8").unwrap_err().code,
            555
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b> SIZE=1 SIZE=2")
                .unwrap_err()
                .code,
            501
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b> BODY=BINARYMIME")
                .unwrap_err()
                .code,
            501
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b> SIZE=99999999999999999999"),
            Ok(Command::Mail(MailFrom {
                reverse_path: "a@b".into(),
                size: Some(u64::MAX),
                body: None
            }))
        );
        assert_eq!(parse_command(b"DATA x").unwrap_err().code, 501);
        assert_eq!(parse_command(b"LHLO").unwrap_err().code, 501);
        assert_eq!(parse_command(b"FOO").unwrap_err().code, 500);
        assert_eq!(parse_command(b"BDAT 10 LAST"), Ok(Command::NotImplemented));
    }
}
