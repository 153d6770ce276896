//! Logging in to a backend: connect, greeting, STARTTLS, ID with the client's address, then
//! SASL PLAIN. The result is an authenticated `Conn` and the backend's capabilities.

use std::net::SocketAddr;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::conn::Conn;
use super::error::{refusal_code, within, BackendError};
use super::target::BackendTarget;
use crate::config::BackendTls;
use crate::limits::Limits;
use crate::net::Stream;
use crate::wire::framer::Framer;
use crate::wire::sasl::plain_response;

/// Longest backend response accepted while logging in (a CAPABILITY line is ~1 KiB).
const MAX_RESPONSE: usize = 64 * 1024;

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
    framer: Framer,
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
            framer: Framer::default(),
        })
    }

    /// Reads the greeting; returns whether it offers SASL-IR.
    async fn greeting(&mut self) -> Result<bool, BackendError> {
        let greeting = self.response("greeting").await?;
        if greeting.starts_with(b"* BYE") {
            let text = String::from_utf8_lossy(&greeting).into_owned();
            return Err(self.refused(text));
        }
        if !greeting.starts_with(b"* OK") {
            return Err(self.protocol("greeting is not * OK"));
        }
        Ok(capability_code(&String::from_utf8_lossy(&greeting))
            .is_some_and(|c| has_cap(c, "SASL-IR")))
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
        if let Some(rest) = status.strip_prefix("OK") {
            let rest = rest.trim_start();
            let (caps, text) = match capability_code(rest) {
                Some(caps) => (
                    Some(caps.to_owned()),
                    rest.split_once(']')
                        .map_or("", |(_, t)| t)
                        .trim()
                        .to_owned(),
                ),
                None => (None, rest.to_owned()),
            };
            let capabilities = match caps.or_else(|| untagged_capability(untagged)) {
                Some(c) => c,
                None => self.capability().await?,
            };
            return Ok(LoggedIn {
                conn: self.conn,
                capabilities,
                text,
            });
        }
        if let Some(code) = status.strip_prefix("NO") {
            let code = code.trim_start();
            if code.starts_with('[') && !code.starts_with("[AUTHENTICATIONFAILED]") {
                return Err(self.refused(status.to_owned()));
            }
            return Err(BackendError::AuthFailed {
                backend: self.target.route,
            });
        }
        let word = status.split(' ').next().unwrap_or("");
        Err(self.protocol(format!("login answered {word}")))
    }

    /// Asks for the capabilities a login reply did not carry.
    async fn capability(&mut self) -> Result<String, BackendError> {
        self.write(b"m3 CAPABILITY\r\n", "capability").await?;
        let (status, untagged) = self.tagged("m3", "capability").await?;
        if !status.starts_with("OK") {
            return Err(self.protocol("CAPABILITY failed after login"));
        }
        Ok(untagged_capability(&untagged).unwrap_or_default())
    }

    async fn write(&mut self, bytes: &[u8], phase: &'static str) -> Result<(), BackendError> {
        let limit = self.limits.backend_reply();
        within(self.target.route, phase, limit, self.conn.write_all(bytes)).await
    }

    /// Reads one complete response (line plus any literals), without its final CRLF.
    async fn response(&mut self, phase: &'static str) -> Result<Vec<u8>, BackendError> {
        loop {
            let buf = self.conn.buffer();
            match self.framer.frame(buf, MAX_RESPONSE as u64, MAX_RESPONSE) {
                Ok(Some(n)) => {
                    let frame = buf.split_to(n);
                    let line = frame.strip_suffix(b"\n").unwrap_or(&frame);
                    return Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
                }
                Ok(None) if buf.len() <= MAX_RESPONSE => {}
                _ => return Err(self.protocol(format!("{phase}: response too large"))),
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
            if let Some(rest) = resp
                .strip_prefix(tag.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            {
                return Ok((String::from_utf8_lossy(rest).into_owned(), untagged));
            }
            if resp.starts_with(b"+") {
                return Err(self.protocol(format!("{phase}: unexpected continuation")));
            }
            untagged.push(resp);
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

/// The contents of a `[CAPABILITY ...]` response code at the start of `text`.
fn capability_code(text: &str) -> Option<&str> {
    let start = text.find("[CAPABILITY ")? + "[CAPABILITY ".len();
    let end = text[start..].find(']')? + start;
    Some(&text[start..end])
}

fn untagged_capability(untagged: &[Vec<u8>]) -> Option<String> {
    untagged.iter().find_map(|u| {
        u.strip_prefix(b"* CAPABILITY ")
            .map(|c| String::from_utf8_lossy(c).into_owned())
    })
}

fn has_cap(caps: &str, name: &str) -> bool {
    caps.split(' ').any(|c| c.eq_ignore_ascii_case(name))
}

/// Removes capabilities the splice cannot honour from a capability list.
pub fn filter_capabilities(caps: &str, strip: &[String]) -> String {
    caps.split(' ')
        .filter(|c| !c.is_empty() && !strip.iter().any(|s| s.eq_ignore_ascii_case(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_handling() {
        let t = "[CAPABILITY IMAP4rev1 SASL-IR COMPRESS=DEFLATE IDLE] Logged in";
        assert_eq!(
            capability_code(t),
            Some("IMAP4rev1 SASL-IR COMPRESS=DEFLATE IDLE")
        );
        assert_eq!(
            filter_capabilities(
                "IMAP4rev1 SASL-IR COMPRESS=DEFLATE IDLE",
                &["compress=deflate".into()]
            ),
            "IMAP4rev1 SASL-IR IDLE"
        );
    }
}
