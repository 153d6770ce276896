//! The CLI's side of the admin API: one HTTP/1.1 request to the running server, its JSON answer
//! read back into the view the server wrote (`control::UserView`, `RouteChange`, `StateChange`).

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::{ApiError, ImportBody, RouteBody, WaveCutoverBody};
use crate::control::waves::{WaveStarted, WaveView};
use crate::control::{RouteChange, StateChange, UserView};
use crate::route::Route;
use crate::secret::Secret;
use crate::store::waves::Imported;
use crate::store::Event;

/// How long the server may take to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server may take to answer (a route change kicks sessions first).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// The server answered with an error status.
    #[error("server answered {status}: {}", .error.as_deref().unwrap_or("request failed"))]
    Refused {
        /// HTTP status code.
        status: u16,
        /// The server's reason, when it gave one.
        error: Option<String>,
    },
    /// A success whose body is not the view asked for (a server of another version?).
    #[error("admin API: unexpected answer: {0}")]
    Body(String),
}

/// The admin API of one running server.
pub struct AdminClient {
    addr: SocketAddr,
    token: Secret<String>,
}

impl AdminClient {
    /// A client of the server listening on `addr`, authenticating with `token`.
    pub fn new(addr: SocketAddr, token: Secret<String>) -> Self {
        AdminClient { addr, token }
    }

    /// `GET /api/users/{email}`: route, state, sessions and sync progress.
    pub async fn show_user(&self, email: &str) -> Result<UserView, ClientError> {
        self.call(Method::GET, &user_path(email, ""), None).await
    }

    /// `PUT /api/users/{email}/route`: forces the route, kicking live sessions.
    pub async fn set_route(&self, email: &str, route: Route) -> Result<RouteChange, ClientError> {
        let body = serde_json::to_vec(&RouteBody { route })
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(Method::PUT, &user_path(email, "/route"), Some(body))
            .await
    }

    /// `POST /api/users/{email}/migrate`: state `syncing`.
    pub async fn migrate(&self, email: &str) -> Result<StateChange, ClientError> {
        self.call(Method::POST, &user_path(email, "/migrate"), None)
            .await
    }

    /// `POST /api/users/{email}/cutover` (or `/rollback`): the sequence begins; follow it
    /// with `show_user`.
    pub async fn start(&self, email: &str, rollback: bool) -> Result<StateChange, ClientError> {
        let rest = if rollback { "/rollback" } else { "/cutover" };
        self.call(Method::POST, &user_path(email, rest), None).await
    }

    /// `GET /api/users/{email}/events`: the user's audit log.
    pub async fn events(&self, email: &str) -> Result<Vec<Event>, ClientError> {
        self.call(Method::GET, &user_path(email, "/events"), None)
            .await
    }

    /// `POST /api/import`.
    pub async fn import(&self, body: &ImportBody) -> Result<Imported, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(Method::POST, "/api/import", Some(body)).await
    }

    /// `GET /api/waves`.
    pub async fn waves(&self) -> Result<Vec<WaveView>, ClientError> {
        self.call(Method::GET, "/api/waves", None).await
    }

    /// `GET /api/waves/{name}`.
    pub async fn wave(&self, name: &str) -> Result<WaveView, ClientError> {
        let path = format!("/api/waves/{}", segment(name));
        self.call(Method::GET, &path, None).await
    }

    /// `POST /api/waves/{name}/migrate` or `/cutover`.
    pub async fn wave_start(
        &self,
        name: &str,
        cutover: Option<bool>,
    ) -> Result<WaveStarted, ClientError> {
        let (rest, body) = match cutover {
            None => ("migrate", None),
            Some(all) => (
                "cutover",
                Some(
                    serde_json::to_vec(&WaveCutoverBody { all })
                        .map_err(|e| ClientError::Http(e.to_string()))?,
                ),
            ),
        };
        let path = format!("/api/waves/{}/{rest}", segment(name));
        self.call(Method::POST, &path, body).await
    }

    /// Sends one request with the bearer token; a 200 is read as `T`, anything else as the
    /// server's `ApiError` (or none, when its body is not one).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let addr = self.addr;
        let connect_err = |reason: String| ClientError::Connect { addr, reason };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("timeout".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {}", self.token.expose()))
            .header("content-type", "application/json")
            .header(super::ACTOR_HEADER, "cli")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = tokio::time::timeout(REPLY_TIMEOUT, sender.send_request(req))
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
        if status != 200 {
            let error = serde_json::from_slice::<ApiError>(&bytes)
                .ok()
                .map(|e| e.error);
            return Err(ClientError::Refused { status, error });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Body(e.to_string()))
    }
}

/// `/api/users/{email}` followed by `rest`.
fn user_path(email: &str, rest: &str) -> String {
    format!("/api/users/{}{rest}", segment(email))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sync::SyncProgress;
    use crate::store::UserState;

    /// The CLI reads back exactly what the admin handlers write.
    #[test]
    fn views_read_back_what_the_server_writes() {
        let view = UserView {
            email: "a@example.org".into(),
            route: Route::New,
            known: true,
            state: UserState::Syncing,
            last_error: None,
            updated_at: Some(1_700_000_000),
            wave: Some("w1".into()),
            evidence: None,
            sessions: 2,
            sync: SyncProgress {
                messages_copied: 3,
                last_pass_at: Some(1_700_000_000),
                last_error: Some("boom".into()),
                ..SyncProgress::default()
            },
        };
        let written = serde_json::to_string(&view).unwrap();
        let read: UserView = serde_json::from_str(&written).unwrap();
        assert_eq!(serde_json::to_string(&read).unwrap(), written);
        let change: RouteChange =
            serde_json::from_str(r#"{"email":"a@b","route":"legacy","kicked":1}"#).unwrap();
        assert_eq!((change.route, change.kicked), (Route::Legacy, 1));
        let change: StateChange =
            serde_json::from_str(r#"{"email":"a@b","state":"syncing","in_flight":0}"#).unwrap();
        assert_eq!(change.state, UserState::Syncing);
        let e: ApiError = serde_json::from_str(r#"{"error":"no"}"#).unwrap();
        assert_eq!(e.error, "no");
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("a+b/c@d.e"), "a%2Bb%2Fc@d.e");
        assert_eq!(user_path("a@b", "/route"), "/api/users/a@b/route");
    }
}
