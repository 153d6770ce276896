//! Logging in to a backend: connect, greeting, STARTTLS, ID with the client's address, then
//! SASL PLAIN. The result is an authenticated `Conn` and the backend's capabilities.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::conn::Conn;
use super::framer::literal_at_end;
use super::preauth::plain_response;
use crate::config::{BackendConfig, BackendTls};
use crate::limits::Limits;
use crate::net::Stream;
use crate::route::Route;

/// Longest backend response accepted while logging in (a CAPABILITY line is ~1 KiB).
const MAX_RESPONSE: usize = 64 * 1024;

/// Why a backend login did not produce a session; each variant names the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP connect failed.
    #[error("backend {backend} ({addr}): connect: {source}")]
    Connect {
        /// Which backend.
        backend: Route,
        /// Its address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A phase took longer than its limit.
    #[error("backend {backend}: timeout during {phase}")]
    Timeout {
        /// Which backend.
        backend: Route,
        /// Phase name.
        phase: &'static str,
    },
    /// Reading or writing failed after connect.
    #[error("backend {backend}: {phase}: {source}")]
    Io {
        /// Which backend.
        backend: Route,
        /// Phase name.
        phase: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The backend said something a well-behaved IMAP server does not.
    #[error("backend {backend}: protocol error: {detail}")]
    Protocol {
        /// Which backend.
        backend: Route,
        /// What was wrong.
        detail: String,
    },
    /// The backend rejected the credentials.
    #[error("backend {backend}: authentication failed")]
    AuthFailed {
        /// Which backend.
        backend: Route,
    },
    /// The backend refused the login for another reason (its tagged NO, without the tag).
    #[error("backend {backend}: login refused: {text}")]
    Refused {
        /// Which backend.
        backend: Route,
        /// The response after the tag, e.g. `NO [UNAVAILABLE] ...`.
        text: String,
    },
}

/// Where and how to reach one backend.
#[derive(Clone)]
pub struct BackendTarget {
    /// Which backend this is.
    pub route: Route,
    /// Its configuration.
    pub cfg: BackendConfig,
    /// TLS client configuration (used for starttls and implicit).
    pub tls: Arc<ClientConfig>,
}

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

struct Ctx<'a> {
    route: Route,
    limits: &'a Limits,
}

impl Ctx<'_> {
    async fn within<T>(
        &self,
        phase: &'static str,
        d: Duration,
        f: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, BackendError> {
        match timeout(d, f).await {
            Err(_) => Err(BackendError::Timeout {
                backend: self.route,
                phase,
            }),
            Ok(Err(source)) => Err(BackendError::Io {
                backend: self.route,
                phase,
                source,
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn protocol(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            backend: self.route,
            detail: detail.into(),
        }
    }

    /// Reads one complete response (line plus any literals), without its final CRLF.
    async fn response(
        &self,
        conn: &mut Conn,
        phase: &'static str,
    ) -> Result<Vec<u8>, BackendError> {
        let mut out = Vec::new();
        let mut scan = 0;
        loop {
            let buf = conn.buffer();
            if let Some(i) = memchr::memchr(b'\n', &buf[scan..]) {
                let end = scan + i;
                match literal_at_end(&buf[..end]) {
                    Some((n, _)) => {
                        let n = usize::try_from(n).unwrap_or(usize::MAX);
                        if n > MAX_RESPONSE || end + 1 + n > MAX_RESPONSE {
                            return Err(self.protocol(format!("{phase}: response too large")));
                        }
                        if buf.len() >= end + 1 + n {
                            scan = end + 1 + n;
                            continue;
                        }
                    }
                    None => {
                        let line = buf.split_to(end + 1);
                        out.extend_from_slice(&line[..end]);
                        if out.last() == Some(&b'\r') {
                            out.pop();
                        }
                        return Ok(out);
                    }
                }
            } else {
                scan = buf.len();
            }
            if conn.buffer().len() > MAX_RESPONSE {
                return Err(self.protocol(format!("{phase}: response too large")));
            }
            let n = self
                .within(
                    phase,
                    self.limits.backend_reply(),
                    conn.read_some(16 * 1024),
                )
                .await?;
            if n == 0 {
                return Err(BackendError::Io {
                    backend: self.route,
                    phase,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    /// Reads until the tagged response of `tag`; returns it (after the tag) and the untagged ones.
    async fn tagged(
        &self,
        conn: &mut Conn,
        tag: &str,
        phase: &'static str,
    ) -> Result<(String, Vec<Vec<u8>>), BackendError> {
        let mut untagged = Vec::new();
        loop {
            let resp = self.response(conn, phase).await?;
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
}

/// Connects, secures, identifies the client and logs in.
pub async fn login(
    target: &BackendTarget,
    limits: &Limits,
    client: Option<&ClientInfo>,
    creds: PlainLogin<'_>,
) -> Result<LoggedIn, BackendError> {
    let ctx = Ctx {
        route: target.route,
        limits,
    };
    let mut conn = connect(target, &ctx).await?;

    let greeting = ctx.response(&mut conn, "greeting").await?;
    if greeting.starts_with(b"* BYE") {
        return Err(BackendError::Refused {
            backend: target.route,
            text: String::from_utf8_lossy(&greeting).into_owned(),
        });
    }
    if !greeting.starts_with(b"* OK") {
        return Err(ctx.protocol("greeting is not * OK"));
    }
    let mut sasl_ir =
        capability_code(&String::from_utf8_lossy(&greeting)).is_some_and(|c| has_cap(c, "SASL-IR"));

    if target.cfg.imap_tls == BackendTls::Starttls {
        conn.write_all(b"m0 STARTTLS\r\n")
            .await
            .map_err(|source| BackendError::Io {
                backend: target.route,
                phase: "starttls",
                source,
            })?;
        let (status, _) = ctx.tagged(&mut conn, "m0", "starttls").await?;
        if !status.starts_with("OK") {
            return Err(ctx.protocol(format!("STARTTLS refused: {status}")));
        }
        let (stream, leftover) = conn.into_parts();
        if !leftover.is_empty() {
            // Bytes after the STARTTLS reply were sent in clear text before the handshake:
            // an injection attempt. Never send credentials on such a connection.
            return Err(ctx.protocol("data injected before the TLS handshake"));
        }
        let Stream::Plain(tcp) = stream else {
            return Err(ctx.protocol("STARTTLS on a TLS connection"));
        };
        conn = Conn::new(tls_handshake(target, &ctx, tcp).await?);
        // Capabilities from before TLS are not trusted; SASL-IR only saves a round trip.
        sasl_ir = false;
    }

    let mut out = Vec::with_capacity(512);
    if let Some(c) = client {
        out.extend_from_slice(
            format!(
                "m1 ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\" \"x-session-id\" \"{}\")\r\n",
                c.peer.ip(),
                c.peer.port(),
                c.local.ip(),
                c.local.port(),
                c.session_id
            )
            .as_bytes(),
        );
    }
    let ir = plain_response(creds.authzid, creds.authcid, creds.password);
    if sasl_ir {
        out.extend_from_slice(b"m2 AUTHENTICATE PLAIN ");
        out.extend_from_slice(ir.as_bytes());
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(b"m2 AUTHENTICATE PLAIN\r\n");
    }
    write(&ctx, &mut conn, &out, "login").await?;
    if client.is_some() {
        ctx.tagged(&mut conn, "m1", "id").await?;
    }
    if !sasl_ir {
        let resp = ctx.response(&mut conn, "login").await?;
        if !resp.starts_with(b"+") {
            return Err(ctx.protocol("AUTHENTICATE PLAIN got no continuation"));
        }
        write(&ctx, &mut conn, format!("{ir}\r\n").as_bytes(), "login").await?;
    }
    let (status, untagged) = ctx.tagged(&mut conn, "m2", "login").await?;
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
        let caps = match caps.or_else(|| untagged_capability(&untagged)) {
            Some(c) => c,
            None => {
                write(&ctx, &mut conn, b"m3 CAPABILITY\r\n", "capability").await?;
                let (status, untagged) = ctx.tagged(&mut conn, "m3", "capability").await?;
                if !status.starts_with("OK") {
                    return Err(ctx.protocol("CAPABILITY failed after login"));
                }
                untagged_capability(&untagged).unwrap_or_default()
            }
        };
        return Ok(LoggedIn {
            conn,
            capabilities: caps,
            text,
        });
    }
    if let Some(code) = status.strip_prefix("NO") {
        let code = code.trim_start();
        if code.starts_with('[') && !code.starts_with("[AUTHENTICATIONFAILED]") {
            return Err(BackendError::Refused {
                backend: target.route,
                text: status,
            });
        }
        return Err(BackendError::AuthFailed {
            backend: target.route,
        });
    }
    Err(ctx.protocol(format!(
        "login answered {}",
        status.split(' ').next().unwrap_or("")
    )))
}

async fn write(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    bytes: &[u8],
    phase: &'static str,
) -> Result<(), BackendError> {
    ctx.within(phase, ctx.limits.backend_reply(), conn.write_all(bytes))
        .await
}

async fn connect(target: &BackendTarget, ctx: &Ctx<'_>) -> Result<Conn, BackendError> {
    let addr = &target.cfg.imap;
    let tcp = match timeout(
        ctx.limits.backend_connect(),
        TcpStream::connect(addr.as_str()),
    )
    .await
    {
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
        tls_handshake(target, ctx, tcp).await?
    } else {
        Stream::Plain(tcp)
    };
    Ok(Conn::new(stream))
}

async fn tls_handshake(
    target: &BackendTarget,
    ctx: &Ctx<'_>,
    tcp: TcpStream,
) -> Result<Stream, BackendError> {
    let name = target
        .cfg
        .tls_server_name
        .clone()
        .unwrap_or_else(|| target.cfg.imap_host().to_owned());
    let server_name = ServerName::try_from(name.clone())
        .map_err(|_| ctx.protocol(format!("invalid TLS server name {name:?}")))?;
    let connector = tokio_rustls::TlsConnector::from(target.tls.clone());
    let tls = ctx
        .within(
            "tls handshake",
            ctx.limits.tls_handshake(),
            connector.connect(server_name, tcp),
        )
        .await?;
    Ok(Stream::ClientTls(Box::new(tls)))
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
