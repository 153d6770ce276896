//! Logging in to a backend: connect, greeting, STARTTLS, ID with the client's address, then
//! SASL PLAIN. The result is an authenticated `Conn` and the backend's capabilities.

use std::net::SocketAddr;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::conn::Conn;
use super::error::{refusal_code, within, BackendError};
use super::reply::{self, Greeting, LoginReply, Reply, ResponseReader, TooLarge};
use super::target::BackendTarget;
use crate::config::BackendTls;
use crate::limits::Limits;
use crate::net::Stream;
use crate::wire::sasl::plain_response;

/// The proxied client, announced to the backend with ID so its logs show the real peer.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The proxy address the client connected to.
    pub local: SocketAddr,
    /// Our session id.
    pub session_id: String,
}

/// What to authenticate as (SASL PLAIN fields).
pub struct PlainLogin<'a> {
    /// Authorization identity.
    pub authzid: Option<&'a str>,
    /// Authentication identity.
    pub authcid: &'a [u8],
    /// Password.
    pub password: &'a [u8],
}

/// An authenticated backend connection.
pub struct LoggedIn {
    /// The connection, positioned after the tagged login reply.
    pub conn: Conn,
    /// Capabilities the backend announced for the authenticated state.
    pub capabilities: String,
    /// The text after `OK [...]` of the login reply.
    pub text: String,
}

/// Connects, secures, identifies the client and logs in.
pub async fn login(
    target: &BackendTarget,
    limits: &Limits,
    client: Option<&ClientInfo>,
    creds: PlainLogin<'_>,
) -> Result<LoggedIn, BackendError> {
    let mut s = Session::connect(target, limits).await?;
    let mut sasl_ir = s.greeting().await?;
    if target.cfg.imap_tls == BackendTls::Starttls {
        s = s.starttls().await?;
        // Capabilities from before TLS are not trusted; SASL-IR only saves a round trip.
        sasl_ir = false;
    }
    s.authenticate(client, &creds, sasl_ir).await?;
    let (status, untagged) = s.tagged("m2", "login").await?;
    s.logged_in(&status, &untagged).await
}

/// A connection on its way to being logged in.
struct Session<'a> {
    target: &'a BackendTarget,
    limits: &'a Limits,
    conn: Conn,
    reader: ResponseReader,
}

impl<'a> Session<'a> {
    async fn connect(target: &'a BackendTarget, limits: &'a Limits) -> Result<Self, BackendError> {
        let addr = &target.cfg.imap;
        let tcp = match timeout(limits.backend_connect(), TcpStream::connect(addr.as_str())).await {
            Err(_) => {
                return Err(BackendError::Timeout {
                    backend: target.route,
                    phase: "connect",
                })
            }
            Ok(Err(source)) => {
                return Err(BackendError::Connect {
                    backend: target.route,
                    addr: addr.clone(),
                    source,
                })
            }
            Ok(Ok(s)) => s,
        };
        // Small request/response exchanges: never wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let stream = if target.cfg.imap_tls == BackendTls::Implicit {
            tls_handshake(target, limits, tcp).await?
        } else {
            Stream::Plain(tcp)
        };
        Ok(Session {
            target,
            limits,
            conn: Conn::new(stream),
            reader: ResponseReader::default(),
        })
    }

    /// Reads the greeting; returns whether it offers SASL-IR.
    async fn greeting(&mut self) -> Result<bool, BackendError> {
        match reply::greeting(&self.response("greeting").await?) {
            Greeting::Ready { sasl_ir } => Ok(sasl_ir),
            Greeting::Bye(text) => Err(self.refused(text)),
            Greeting::Unexpected => Err(self.protocol("greeting is not * OK")),
        }
    }

    async fn starttls(mut self) -> Result<Self, BackendError> {
        self.write(b"m0 STARTTLS\r\n", "starttls").await?;
        let (status, _) = self.tagged("m0", "starttls").await?;
        if !status.starts_with("OK") {
            return Err(self.protocol(format!("STARTTLS refused: {status}")));
        }
        let (stream, leftover) = self.conn.into_parts();
        if !leftover.is_empty() {
            // Bytes after the STARTTLS reply were sent in clear text before the handshake:
            // an injection attempt. Never send credentials on such a connection.
            self.conn = Conn::new(stream);
            return Err(self.protocol("data injected before the TLS handshake"));
        }
        let Stream::Plain(tcp) = stream else {
            self.conn = Conn::new(stream);
            return Err(self.protocol("STARTTLS on a TLS connection"));
        };
        self.conn = Conn::new(tls_handshake(self.target, self.limits, tcp).await?);
        Ok(self)
    }

    /// Sends ID (when proxying a client) and AUTHENTICATE PLAIN, in one write where SASL-IR
    /// allows; leaves the tagged reply of the login to be read.
    async fn authenticate(
        &mut self,
        client: Option<&ClientInfo>,
        creds: &PlainLogin<'_>,
        sasl_ir: bool,
    ) -> Result<(), BackendError> {
        let mut out = Vec::with_capacity(512);
        if let Some(c) = client {
            out.extend_from_slice(id_command(c).as_bytes());
        }
        let ir = plain_response(creds.authzid, creds.authcid, creds.password);
        if sasl_ir {
            out.extend_from_slice(format!("m2 AUTHENTICATE PLAIN {ir}\r\n").as_bytes());
        } else {
            out.extend_from_slice(b"m2 AUTHENTICATE PLAIN\r\n");
        }
        self.write(&out, "login").await?;
        if client.is_some() {
            self.tagged("m1", "id").await?;
        }
        if !sasl_ir {
            let resp = self.response("login").await?;
            if !resp.starts_with(b"+") {
                return Err(self.protocol("AUTHENTICATE PLAIN got no continuation"));
            }
            self.write(format!("{ir}\r\n").as_bytes(), "login").await?;
        }
        Ok(())
    }

    /// Turns the tagged reply of the login into a session or an error.
    async fn logged_in(
        mut self,
        status: &str,
        untagged: &[Vec<u8>],
    ) -> Result<LoggedIn, BackendError> {
        match reply::login_reply(status, untagged) {
            LoginReply::Ok { capabilities, text } => {
                let capabilities = match capabilities {
                    Some(c) => c,
                    None => self.capability().await?,
                };
                Ok(LoggedIn {
                    conn: self.conn,
                    capabilities,
                    text,
                })
            }
            LoginReply::AuthFailed => Err(BackendError::AuthFailed {
                backend: self.target.route,
            }),
            LoginReply::Refused => Err(self.refused(status.to_owned())),
            LoginReply::Unexpected(word) => Err(self.protocol(format!("login answered {word}"))),
        }
    }

    /// Asks for the capabilities a login reply did not carry.
    async fn capability(&mut self) -> Result<String, BackendError> {
        self.write(b"m3 CAPABILITY\r\n", "capability").await?;
        let (status, untagged) = self.tagged("m3", "capability").await?;
        if !status.starts_with("OK") {
            return Err(self.protocol("CAPABILITY failed after login"));
        }
        Ok(reply::untagged_capability(&untagged).unwrap_or_default())
    }

    async fn write(&mut self, bytes: &[u8], phase: &'static str) -> Result<(), BackendError> {
        let limit = self.limits.backend_reply();
        within(self.target.route, phase, limit, self.conn.write_all(bytes)).await
    }

    /// Reads one complete response (line plus any literals), without its final CRLF.
    async fn response(&mut self, phase: &'static str) -> Result<Vec<u8>, BackendError> {
        loop {
            match self.reader.next(self.conn.buffer()) {
                Ok(Some(resp)) => return Ok(resp),
                Ok(None) => {}
                Err(TooLarge) => return Err(self.protocol(format!("{phase}: response too large"))),
            }
            let limit = self.limits.backend_reply();
            let read = self.conn.read_some(16 * 1024);
            if within(self.target.route, phase, limit, read).await? == 0 {
                return Err(BackendError::eof(self.target.route, phase));
            }
        }
    }

    /// Reads until the tagged response of `tag`; returns it (after the tag) and the untagged ones.
    async fn tagged(
        &mut self,
        tag: &str,
        phase: &'static str,
    ) -> Result<(String, Vec<Vec<u8>>), BackendError> {
        let mut untagged = Vec::new();
        loop {
            let resp = self.response(phase).await?;
            match reply::reply(&resp, tag) {
                Reply::Tagged(rest) => return Ok((rest, untagged)),
                Reply::Continuation => {
                    return Err(self.protocol(format!("{phase}: unexpected continuation")))
                }
                Reply::Untagged => untagged.push(resp),
            }
        }
    }

    fn protocol(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            backend: self.target.route,
            detail: detail.into(),
        }
    }

    /// A refused login: `text` is the greeting's BYE or the status after the tag.
    fn refused(&self, text: String) -> BackendError {
        BackendError::Refused {
            backend: self.target.route,
            command: "LOGIN",
            code: refusal_code(&text),
            text,
        }
    }
}

/// Runs the client side of a TLS handshake with `target` over `tcp`.
async fn tls_handshake(
    target: &BackendTarget,
    limits: &Limits,
    tcp: TcpStream,
) -> Result<Stream, BackendError> {
    let name = target
        .cfg
        .tls_server_name
        .clone()
        .unwrap_or_else(|| target.cfg.imap_host().to_owned());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| BackendError::Protocol {
        backend: target.route,
        detail: format!("invalid TLS server name {name:?}"),
    })?;
    let connector = tokio_rustls::TlsConnector::from(target.tls.clone());
    let handshake = connector.connect(server_name, tcp);
    let tls = within(
        target.route,
        "tls handshake",
        limits.tls_handshake(),
        handshake,
    )
    .await?;
    Ok(Stream::ClientTls(Box::new(tls)))
}

/// `ID` with the proxied client's addresses (RFC 2971; Dovecot's `x-` fields).
fn id_command(c: &ClientInfo) -> String {
    format!(
        "m1 ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \"x-connected-ip\" \
         \"{}\" \"x-connected-port\" \"{}\" \"x-session-id\" \"{}\")\r\n",
        c.peer.ip(),
        c.peer.port(),
        c.local.ip(),
        c.local.port(),
        c.session_id
    )
}
