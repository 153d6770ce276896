//! The CLI's side of the admin API: one HTTP/1.1 request to the running server.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use crate::secret::Secret;

/// Failures talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server answered.
    #[error("cannot reach the mailferry server at {addr}: {reason}")]
    Connect {
        /// Admin address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The exchange failed midway.
    #[error("admin API: {0}")]
    Http(String),
}

/// An HTTP status and JSON body.
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// Parsed body (`null` when not JSON).
    pub body: serde_json::Value,
}

/// Sends one request with the bearer token and returns status and JSON body.
pub async fn call(
    addr: SocketAddr,
    token: &Secret<String>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<ApiResponse, ClientError> {
    let connect_err = |reason: String| ClientError::Connect { addr, reason };
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| connect_err("timeout".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {}", token.expose()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(120), sender.send_request(req))
        .await
        .map_err(|_| ClientError::Http("timeout waiting for the server".into()))?
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok(ApiResponse { status, body })
}

/// Percent-encodes a path segment (an e-mail address may hold `+`, `/` or `%`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
