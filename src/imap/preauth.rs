//! The proxy's own side of the IMAP conversation before login. Pure: the driver feeds the
//! bytes it reads and performs the events this returns (write, start TLS, log in, close).
//!
//! Framing (lines and `{n}` literals, with caps) is done here so that the bytes a client
//! pipelined after its LOGIN stay available for the splice (`into_leftover`); complete
//! commands are decoded with imap-codec.

use bytes::{Buf, BytesMut};
use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::{IString, NString};
use imap_codec::{AuthenticateDataCodec, CommandCodec};

use crate::secret::Secret;
use crate::wire::framer::literal_at_end;
use crate::wire::sasl::plain_fields;

/// The limits pre-auth parsing enforces (a view of `Limits`).
#[derive(Debug, Clone)]
pub struct PreAuthLimits {
    /// Longest line.
    pub line: usize,
    /// Largest literal.
    pub literal: usize,
    /// ID: most pairs.
    pub id_pairs: usize,
    /// ID: longest field name.
    pub id_field: usize,
    /// ID: longest value.
    pub id_value: usize,
}

impl From<&crate::limits::Limits> for PreAuthLimits {
    fn from(l: &crate::limits::Limits) -> Self {
        PreAuthLimits {
            line: l.preauth_line,
            literal: l.preauth_literal,
            id_pairs: l.id_max_pairs,
            id_field: l.id_max_field,
            id_value: l.id_max_value,
        }
    }
}

/// How the client sent its credentials; passthrough mode repeats the same form to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthForm {
    /// `LOGIN user password`.
    Login,
    /// `AUTHENTICATE PLAIN`.
    Plain,
}

/// Credentials exactly as the client gave them.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Authorization identity (PLAIN authzid), when given.
    pub authzid: Option<String>,
    /// Authentication identity (LOGIN user name or PLAIN authcid), possibly `user*master`.
    pub authcid: String,
    /// Password.
    pub password: Secret<Vec<u8>>,
    /// Command form used.
    pub form: AuthForm,
}

/// A login the driver must route and perform.
#[derive(Debug, Clone)]
pub struct LoginRequest {
    /// The client's tag, for the final tagged reply.
    pub tag: String,
    /// The user the session acts for (routing key), never a master user's own name.
    pub user: String,
    /// What to authenticate with.
    pub credentials: Credentials,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Event {
    /// Send these bytes to the client.
    Reply(Vec<u8>),
    /// Send these bytes, then run the TLS handshake and call `PreAuth::tls_started`.
    StartTls(Vec<u8>),
    /// Authenticate; then call `login_failed` or hand over with `into_leftover`.
    Login(LoginRequest),
    /// Send these bytes, then close the connection.
    Close(Vec<u8>),
}

/// Where the conversation stands.
#[derive(Debug)]
enum State {
    /// Reading a command.
    Command(Partial),
    /// `AUTHENTICATE PLAIN` sent `+`; the next line is the base64 response.
    AuthData { tag: String },
    /// A StartTls, Login or Close was handed to the driver: no events until it reports back
    /// (`tls_started`, `login_failed`), as what comes next depends on how that went.
    Waiting,
}

impl State {
    fn new_command() -> Self {
        State::Command(Partial::default())
    }
}

/// A command being framed.
#[derive(Debug, Default)]
struct Partial {
    /// Complete lines and literals so far.
    msg: Vec<u8>,
    /// Octets of the literal still to come, once its announcing line is in.
    literal: Option<usize>,
}

/// What framing yields.
enum Framed {
    /// A complete command, literals included.
    Command(Vec<u8>),
    /// Something to send first: the go-ahead for a literal, or a close on a limit.
    Event(Event),
}

/// Pre-auth protocol state of one client connection.
#[derive(Debug)]
pub struct PreAuth {
    input: BytesMut,
    state: State,
    tls: bool,
    starttls_offered: bool,
    allow_plaintext: bool,
    master_separator: String,
    limits: PreAuthLimits,
}

const CMD_BAD: &str = "Error in IMAP command";

impl PreAuth {
    /// A session on a listener that is already TLS (`tls`) or offers STARTTLS.
    pub fn new(
        tls: bool,
        allow_plaintext: bool,
        master_separator: &str,
        limits: PreAuthLimits,
    ) -> Self {
        PreAuth {
            input: BytesMut::new(),
            state: State::new_command(),
            tls,
            starttls_offered: !tls,
            allow_plaintext,
            master_separator: master_separator.to_owned(),
            limits,
        }
    }

    /// The untagged greeting sent on connect.
    pub fn greeting(&self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] mailferry ready.\r\n",
            self.capabilities()
        )
        .into_bytes()
    }

    fn auth_allowed(&self) -> bool {
        self.tls || self.allow_plaintext
    }

    /// The pre-auth CAPABILITY list.
    pub fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR ID LITERAL+ ENABLE IDLE");
        if self.starttls_offered && !self.tls {
            caps.push_str(" STARTTLS");
        }
        if self.auth_allowed() {
            caps.push_str(" AUTH=PLAIN");
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }

    /// Adds bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet consumed; the driver stops reading while this is large.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// After `StartTls`: the handshake succeeded.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.resume();
    }

    /// After `Login`: the login did not happen; the session goes on.
    pub fn login_failed(&mut self) {
        self.resume();
    }

    /// Events flow again after `Waiting`; the command that paused them was complete, so
    /// reading starts afresh. In any other state there is nothing to resume.
    fn resume(&mut self) {
        if matches!(self.state, State::Waiting) {
            self.state = State::new_command();
        }
    }

    /// After a successful `Login`: bytes the client pipelined after its login command.
    pub fn into_leftover(self) -> BytesMut {
        self.input
    }

    /// The next event, or `None` when more input is needed.
    pub fn next_event(&mut self) -> Option<Event> {
        let event = match &mut self.state {
            State::Waiting => return None,
            State::AuthData { tag } => match take_line(&mut self.input, &self.limits)? {
                Ok(line) => {
                    let tag = std::mem::take(tag);
                    self.state = State::new_command();
                    self.auth_response(&tag, &line)
                }
                Err(close) => close,
            },
            State::Command(partial) => match partial.frame(&mut self.input, &self.limits)? {
                Framed::Command(msg) => self.dispatch(&msg),
                Framed::Event(event) => event,
            },
        };
        if matches!(
            event,
            Event::StartTls(_) | Event::Login(_) | Event::Close(_)
        ) {
            self.state = State::Waiting;
        }
        Some(event)
    }

    fn auth_response(&mut self, tag: &str, line: &[u8]) -> Event {
        match AuthenticateDataCodec::default().decode(line) {
            Ok((_, AuthenticateData::Continue(data))) => self.plain(tag, data.declassify()),
            Ok((_, AuthenticateData::Cancel)) => reply(tag, "BAD", "Authentication aborted"),
            Err(_) => reply(tag, "BAD", "Invalid base64 data"),
        }
    }

    fn dispatch(&mut self, msg: &[u8]) -> Event {
        let command = match CommandCodec::default().decode(msg) {
            Ok(([], command)) => command,
            _ => {
                let tag = tag_of(msg);
                return reply(&tag, "BAD", CMD_BAD);
            }
        };
        let Command { tag, body } = command;
        let tag = tag.inner().to_owned();
        match body {
            CommandBody::Capability => Event::Reply(
                format!(
                    "* CAPABILITY {}\r\n{tag} OK Capability completed.\r\n",
                    self.capabilities()
                )
                .into_bytes(),
            ),
            CommandBody::Noop => reply(&tag, "OK", "NOOP completed."),
            CommandBody::Logout => Event::Close(
                format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n").into_bytes(),
            ),
            CommandBody::StartTLS => {
                if self.tls || !self.starttls_offered {
                    return reply(&tag, "BAD", "TLS is already active.");
                }
                // Anything the client pipelined after STARTTLS is discarded: it was sent
                // in clear text and could have been injected (RFC 2595 §3.1).
                self.input.clear();
                Event::StartTls(format!("{tag} OK Begin TLS negotiation now.\r\n").into_bytes())
            }
            CommandBody::Id { parameters } => self.id(&tag, parameters.as_deref()),
            CommandBody::Login { username, password } => {
                if !self.auth_allowed() {
                    return privacy_required(&tag);
                }
                let authcid = String::from_utf8_lossy(username.as_ref()).into_owned();
                let user = self.acting_user(None, &authcid);
                Event::Login(LoginRequest {
                    tag,
                    user,
                    credentials: Credentials {
                        authzid: None,
                        authcid,
                        password: Secret::new(password.declassify().as_ref().to_vec()),
                        form: AuthForm::Login,
                    },
                })
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if !self.auth_allowed() {
                    return privacy_required(&tag);
                }
                if mechanism != AuthMechanism::Plain {
                    return reply(&tag, "NO", "[CANNOT] Unsupported authentication mechanism.");
                }
                match initial_response {
                    Some(ir) => self.plain(&tag, ir.declassify()),
                    None => {
                        self.state = State::AuthData { tag };
                        Event::Reply(b"+ \r\n".to_vec())
                    }
                }
            }
            other => reply(
                &tag,
                "BAD",
                &format!("{} is not allowed before login.", other.name()),
            ),
        }
    }

    fn plain(&mut self, tag: &str, data: &[u8]) -> Event {
        let Some((authzid, authcid, password)) = plain_fields(data) else {
            return reply(tag, "NO", "[AUTHENTICATIONFAILED] Invalid PLAIN response.");
        };
        let authzid = (!authzid.is_empty()).then(|| String::from_utf8_lossy(authzid).into_owned());
        let authcid = String::from_utf8_lossy(authcid).into_owned();
        let user = self.acting_user(authzid.as_deref(), &authcid);
        Event::Login(LoginRequest {
            tag: tag.to_owned(),
            user,
            credentials: Credentials {
                authzid,
                authcid,
                password: Secret::new(password.to_vec()),
                form: AuthForm::Plain,
            },
        })
    }

    /// The user a login acts for: the PLAIN authzid, else the part of `user*master`
    /// before the separator, else the login name itself.
    fn acting_user(&self, authzid: Option<&str>, authcid: &str) -> String {
        let user = match authzid {
            Some(z) => z,
            None => authcid
                .split_once(self.master_separator.as_str())
                .map_or(authcid, |(u, _)| u),
        };
        crate::route::normalize_user(user)
    }

    fn id(&self, tag: &str, params: Option<&[(IString<'_>, NString<'_>)]>) -> Event {
        let params = params.unwrap_or(&[]);
        let too_long = params.len() > self.limits.id_pairs
            || params.iter().any(|(k, v)| {
                k.as_ref().len() > self.limits.id_field
                    || v.0
                        .as_ref()
                        .is_some_and(|v| v.as_ref().len() > self.limits.id_value)
            });
        if too_long {
            return reply(tag, "BAD", "ID parameters exceed RFC 2971 limits.");
        }
        Event::Reply(
            format!("* ID (\"name\" \"mailferry\")\r\n{tag} OK ID completed.\r\n").into_bytes(),
        )
    }
}

impl Partial {
    /// Adds lines and literals from `input` until the command is complete; `None` when more
    /// input is needed.
    fn frame(&mut self, input: &mut BytesMut, limits: &PreAuthLimits) -> Option<Framed> {
        loop {
            if let Some(n) = self.literal {
                if input.len() < n {
                    return None;
                }
                self.msg.extend_from_slice(&input[..n]);
                input.advance(n);
                self.literal = None;
                continue;
            }
            let line = match take_line(input, limits)? {
                Ok(line) => line,
                Err(close) => return Some(Framed::Event(close)),
            };
            if self.msg.len() + line.len() > limits.line + 2 * limits.literal {
                return Some(Framed::Event(Event::Close(
                    b"* BAD [TOOBIG] Command too long\r\n".to_vec(),
                )));
            }
            self.msg.extend_from_slice(&line);
            let content = line.strip_suffix(b"\n").unwrap_or(&line);
            if let Some((n, non_sync)) = literal_at_end(content) {
                if n > limits.literal as u64 {
                    let tag = tag_of(&self.msg);
                    return Some(Framed::Event(Event::Close(
                        format!("{tag} BAD [TOOBIG] Literal too large\r\n").into_bytes(),
                    )));
                }
                self.literal = Some(n as usize);
                if !non_sync {
                    return Some(Framed::Event(Event::Reply(
                        b"+ Ready for literal data\r\n".to_vec(),
                    )));
                }
                continue;
            }
            return Some(Framed::Command(std::mem::take(&mut self.msg)));
        }
    }
}

/// Takes one line (with its LF) from `input`: `None` until it is complete, `Err` with the
/// closing event when it exceeds the line limit.
fn take_line(input: &mut BytesMut, limits: &PreAuthLimits) -> Option<Result<BytesMut, Event>> {
    match memchr::memchr(b'\n', input) {
        Some(i) if i < limits.line => Some(Ok(input.split_to(i + 1))),
        None if input.len() <= limits.line => None,
        _ => Some(Err(Event::Close(
            b"* BAD [TOOBIG] Line too long\r\n".to_vec(),
        ))),
    }
}

fn reply(tag: &str, status: &str, text: &str) -> Event {
    Event::Reply(format!("{tag} {status} {text}\r\n").into_bytes())
}

fn privacy_required(tag: &str) -> Event {
    reply(
        tag,
        "NO",
        "[PRIVACYREQUIRED] Plaintext authentication is not allowed before STARTTLS.",
    )
}

/// Best-effort tag of a (possibly malformed) command, for its BAD reply.
fn tag_of(msg: &[u8]) -> String {
    let tag: String = msg
        .iter()
        .take_while(|&&b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b))
        .take(64)
        .map(|&b| b as char)
        .collect();
    if tag.is_empty() {
        "*".into()
    } else {
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::sasl::plain_response;

    fn session(tls: bool) -> PreAuth {
        PreAuth::new(
            tls,
            false,
            "*",
            PreAuthLimits::from(&crate::limits::Limits::default()),
        )
    }

    fn replies(p: &mut PreAuth, input: &[u8]) -> Vec<Event> {
        p.feed(input);
        std::iter::from_fn(|| p.next_event()).collect()
    }

    fn text(e: &Event) -> String {
        match e {
            Event::Reply(b) | Event::StartTls(b) | Event::Close(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            Event::Login(l) => format!("LOGIN {}", l.user),
        }
    }

    #[test]
    fn plaintext_login_is_refused_before_tls() {
        let mut p = session(false);
        assert!(String::from_utf8_lossy(&p.greeting()).contains("LOGINDISABLED"));
        let ev = replies(&mut p, b"a LOGIN alice pw\r\n");
        assert_eq!(
            text(&ev[0]),
            "a NO [PRIVACYREQUIRED] Plaintext authentication is not allowed before STARTTLS.\r\n"
        );
    }

    #[test]
    fn bytes_after_starttls_are_discarded() {
        let mut p = session(false);
        let ev = replies(&mut p, b"a STARTTLS\r\nb NOOP\r\n");
        assert_eq!(ev.len(), 1);
        assert!(matches!(ev[0], Event::StartTls(_)));
        p.tls_started();
        assert!(p.next_event().is_none());
        assert!(p.capabilities().contains("AUTH=PLAIN"));
    }

    #[test]
    fn login_with_literals_and_pipelined_leftover() {
        let mut p = session(true);
        let ev = replies(&mut p, b"a LOGIN {17}\r\n");
        assert_eq!(text(&ev[0]), "+ Ready for literal data\r\n");
        let ev = replies(
            &mut p,
            b"Alice@Example.org {2+}\r\npw\r\nb SELECT INBOX\r\n",
        );
        let Event::Login(l) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(l.user, "alice@example.org");
        assert_eq!(l.credentials.password.expose(), b"pw");
        assert_eq!(&p.into_leftover()[..], b"b SELECT INBOX\r\n");
    }

    #[test]
    fn master_logins_route_by_the_target_user() {
        let mut p = session(true);
        let ev = replies(&mut p, b"a LOGIN \"bob@example.org*admin\" secret\r\n");
        let Event::Login(l) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(l.user, "bob@example.org");
        assert_eq!(l.credentials.authcid, "bob@example.org*admin");

        let mut p = session(true);
        let ir = plain_response(Some("carol@example.org"), b"admin", b"pw");
        let ev = replies(&mut p, format!("a AUTHENTICATE PLAIN {ir}\r\n").as_bytes());
        let Event::Login(l) = &ev[0] else { panic!() };
        assert_eq!(l.user, "carol@example.org");
        assert_eq!(l.credentials.authcid, "admin");
    }

    #[test]
    fn authenticate_with_continuation() {
        let mut p = session(true);
        let ev = replies(&mut p, b"x AUTHENTICATE PLAIN\r\n");
        assert_eq!(text(&ev[0]), "+ \r\n");
        let ir = plain_response(None, b"dave@example.org", b"pw");
        let ev = replies(&mut p, format!("{ir}\r\n").as_bytes());
        assert_eq!(text(&ev[0]), "LOGIN dave@example.org");
        p.login_failed();
        let ev = replies(&mut p, b"y AUTHENTICATE PLAIN\r\n*\r\n");
        assert_eq!(text(&ev[1]), "y BAD Authentication aborted\r\n");
    }

    #[test]
    fn oversized_input_is_refused_and_closed() {
        let mut p = session(true);
        let ev = replies(&mut p, &vec![b'a'; 100 * 1024]);
        assert!(matches!(ev[0], Event::Close(_)), "{ev:?}");
        let mut p = session(true);
        let ev = replies(&mut p, b"a LOGIN {4294967295}\r\n");
        assert_eq!(text(&ev[0]), "a BAD [TOOBIG] Literal too large\r\n");
        assert!(matches!(ev[0], Event::Close(_)));
    }

    #[test]
    fn other_commands_are_bad_and_garbage_is_answered() {
        let mut p = session(true);
        let ev = replies(
            &mut p,
            b"a SELECT INBOX\r\n\x00\x01garbage\r\nc ID (\"name\" \"x\")\r\n",
        );
        assert_eq!(
            text(&ev[0]),
            "a BAD SELECT is not allowed before login.\r\n"
        );
        assert!(text(&ev[1]).contains("BAD"));
        assert!(text(&ev[2]).starts_with("* ID"));
    }
}
