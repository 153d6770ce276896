//! HTTP admin API (bearer token), Prometheus `/metrics`, `/healthz` and `/readyz`.

pub mod client;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::control::cutover::Direction;
use crate::control::machine::Actor;
use crate::control::{Control, ControlError};
use crate::route::{Route, RouteCache};
use crate::secret::Secret;

/// What the admin handlers need.
pub struct AdminState {
    /// Operator actions.
    pub control: Arc<Control>,
    /// For /readyz.
    pub routes: Arc<RouteCache>,
    /// Backend IMAP addresses probed by /readyz.
    pub backends: Vec<(Route, String)>,
    /// Bearer token.
    pub token: Secret<String>,
    /// Prometheus renderer.
    pub metrics: PrometheusHandle,
}

/// Shortest admin token accepted, in bytes (after the trailing newline is trimmed): 16 random
/// bytes are 128 bits, beyond guessing through an HTTP endpoint; anything shorter is a
/// placeholder someone forgot to replace.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the admin token file cannot be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("admin token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no token at all.
    #[error("admin token file {path} is empty")]
    Empty {
        /// The file.
        path: String,
    },
    /// The token is too short to resist guessing.
    #[error("admin token file {path} holds {len} bytes; at least {MIN_TOKEN_LEN} are required")]
    TooShort {
        /// The file.
        path: String,
        /// Its length after trimming the trailing newline.
        len: usize,
    },
}

/// Reads the admin bearer token from `path`, refusing an empty or short one.
pub fn load_token(path: &std::path::Path) -> Result<Secret<String>, TokenError> {
    let shown = || path.display().to_string();
    let token = crate::config::read_secret(path).map_err(|source| TokenError::Read {
        path: shown(),
        source,
    })?;
    match token.expose().len() {
        0 => Err(TokenError::Empty { path: shown() }),
        len if len < MIN_TOKEN_LEN => Err(TokenError::TooShort { path: shown(), len }),
        _ => Ok(token),
    }
}

/// The router; `/api/*` requires the token, health and metrics do not.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/api/users/{email}", get(show_user))
        .route("/api/users/{email}/route", put(set_route))
        .route("/api/users/{email}/state", put(set_state))
        .route("/api/users/{email}/migrate", post(migrate))
        .route("/api/users/{email}/cutover", post(cutover))
        .route("/api/users/{email}/rollback", post(rollback))
        .route("/api/users/{email}/events", get(events))
        .route("/api/import", post(import))
        .route("/api/waves", get(list_waves))
        .route("/api/waves/{name}", get(show_wave))
        .route("/api/waves/{name}/migrate", post(wave_migrate))
        .route("/api/waves/{name}/cutover", post(wave_cutover))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .merge(api)
        .with_state(state)
}

async fn require_token(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token_matches(given.as_bytes(), state.token.expose().as_bytes()) {
        next.run(req).await
    } else {
        refuse(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
    }
}

/// The body of every refusal of `/api/*`; the CLI reads it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for a human.
    pub error: String,
}

fn refuse(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

/// Compares fixed-size digests of both tokens, every byte, so that neither the position of
/// the first difference nor the token's length shows in the response time.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn error(e: ControlError) -> Response {
    let status = match e {
        ControlError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    refuse(status, e.to_string())
}

/// The header by which our CLI names itself in the audit log; other clients are `api`.
pub const ACTOR_HEADER: &str = "x-mailferry-actor";

fn actor(headers: &HeaderMap) -> Actor {
    Actor::from_header(headers.get(ACTOR_HEADER).and_then(|v| v.to_str().ok()))
}

fn answer<T: Serialize>(result: Result<T, ControlError>) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

async fn show_user(State(state): State<Arc<AdminState>>, Path(email): Path<String>) -> Response {
    match state.control.show(&email).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => error(e),
    }
}

/// Body of `PUT /api/users/{email}/route`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteBody {
    /// Where the user goes.
    pub route: Route,
}

async fn set_route(
    State(state): State<Arc<AdminState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
    Json(body): Json<RouteBody>,
) -> Response {
    answer(
        state
            .control
            .set_route(&email, body.route, &actor(&headers))
            .await,
    )
}

#[derive(Deserialize)]
struct StateBody {
    state: String,
}

/// Sets a user's migration state directly (operators and tests); `cutover` defers the user's
/// LMTP deliveries at once, any other state lets them through again.
async fn set_state(
    State(state): State<Arc<AdminState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
    Json(body): Json<StateBody>,
) -> Response {
    let Ok(new_state) = body.state.parse::<crate::store::UserState>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("unknown state {:?}", body.state),
        );
    };
    let actor = actor(&headers);
    answer(state.control.set_state(&email, new_state, &actor).await)
}

/// `user migrate`: state `syncing`, background sync starts.
async fn migrate(
    State(state): State<Arc<AdminState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer(state.control.migrate(&email, &actor(&headers)).await)
}

/// `user cutover`: step 1 before the answer, the rest in the background (`GET` the user to
/// follow it).
async fn cutover(
    State(state): State<Arc<AdminState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
) -> Response {
    start(&state, &email, &headers, Direction::Cutover).await
}

/// `user rollback`: as `cutover`, the other way.
async fn rollback(
    State(state): State<Arc<AdminState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
) -> Response {
    start(&state, &email, &headers, Direction::Rollback).await
}

async fn start(state: &AdminState, email: &str, headers: &HeaderMap, d: Direction) -> Response {
    answer(state.control.start(email, d, actor(headers)).await)
}

/// `user events`: the audit log.
async fn events(State(state): State<Arc<AdminState>>, Path(email): Path<String>) -> Response {
    answer(state.control.events(&email).await)
}

/// Body of `POST /api/import`: (address, wave) per user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportBody {
    /// The users, as read from the file.
    pub users: Vec<(String, Option<String>)>,
}

/// Body of `POST /api/waves/{name}/cutover`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaveCutoverBody {
    /// Also users whose sync has not caught up.
    #[serde(default)]
    pub all: bool,
}

/// `mailferry import`.
async fn import(State(state): State<Arc<AdminState>>, Json(body): Json<ImportBody>) -> Response {
    answer(state.control.import(body.users).await)
}

/// `wave list`.
async fn list_waves(State(state): State<Arc<AdminState>>) -> Response {
    answer(state.control.waves().await)
}

/// `wave show`.
async fn show_wave(State(state): State<Arc<AdminState>>, Path(name): Path<String>) -> Response {
    answer(state.control.wave(&name).await)
}

/// `wave migrate`.
async fn wave_migrate(State(state): State<Arc<AdminState>>, Path(name): Path<String>) -> Response {
    answer(state.control.wave_migrate(&name).await)
}

/// `wave cutover`: started in the background; `wave show` follows it.
async fn wave_cutover(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Json(body): Json<WaveCutoverBody>,
) -> Response {
    answer(state.control.wave_cutover(&name, body.all).await)
}

async fn render_metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// How long `/readyz` waits for a backend's TCP connect: a balancer polls it often.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let mut problems = Vec::new();
    if let Err(e) = state.routes.directory().ping().await {
        problems.push(format!("directory: {e}"));
    }
    for (route, addr) in &state.backends {
        let probe = tokio::time::timeout(
            READY_PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(addr.as_str()),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            problems.push(format!("backend {route} ({addr}) unreachable"));
        }
    }
    if problems.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "problems": problems})),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!token_matches(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!token_matches(b"", b"0123456789abcdef"));
        assert!(!token_matches(b"0123456789abcdef0", b"0123456789abcdef"));
    }

    #[test]
    fn short_and_empty_token_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "\n").unwrap();
        let e = load_token(&path).unwrap_err().to_string();
        assert!(e.contains("admin.token") && e.contains("empty"), "{e}");
        std::fs::write(&path, "fifteen-bytes-x\n").unwrap();
        let e = load_token(&path).unwrap_err().to_string();
        assert!(e.contains("admin.token") && e.contains("15 bytes"), "{e}");
        std::fs::write(&path, "sixteen-bytes-xx\n").unwrap();
        assert_eq!(load_token(&path).unwrap().expose(), "sixteen-bytes-xx");
        let e = load_token(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
