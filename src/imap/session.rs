//! One client connection through its phases, each a type consumed by the next:
//! `Accepted → PreAuth → Routed → BackendAuthed → spliced`. Splicing needs a `BackendAuthed`,
//! which only a successful backend login creates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{info, info_span, warn, Instrument};

use super::authdelay::AuthDelay;
use super::preauth::{Event, LoginRequest, PreAuth};
use super::splice::{self, SpliceParams};
use crate::backend::conn::Conn;
use crate::backend::error::BackendError;
use crate::backend::login::{self, ClientInfo, LoggedIn, PlainLogin};
use crate::backend::reply::filter_capabilities;
use crate::backend::target::BackendTarget;
use crate::config::{BackendAuth, ProxyConfig};
use crate::control::holds::{Holds, Waited};
use crate::control::sessions::{Registration, SessionRegistry};
use crate::limits::Limits;
use crate::net::permits::AddressSlot;
use crate::net::tls::ReloadableServer;
use crate::net::Stream;
use crate::route::{Route, RouteCache};
use crate::shutdown::Shutdown;

/// Everything sessions share; built once by `serve`.
pub struct ImapContext {
    /// Limits and timeouts.
    pub limits: Limits,
    /// `[tls] allow_plaintext_auth`.
    pub allow_plaintext: bool,
    /// `[proxy]`.
    pub proxy: ProxyConfig,
    /// Server TLS configuration (swapped on SIGHUP).
    pub tls: Arc<ReloadableServer>,
    /// Route lookups.
    pub routes: Arc<RouteCache>,
    /// `[directory] reject_unknown`.
    pub reject_unknown: bool,
    /// The legacy backend.
    pub legacy: BackendTarget,
    /// The new backend.
    pub new: BackendTarget,
    /// Live sessions, for kicks.
    pub sessions: Arc<SessionRegistry>,
    /// Users whose logins wait while they are cut over or rolled back.
    pub holds: Arc<Holds>,
    /// `[cutover] hold_secs`.
    pub hold: Duration,
    /// Failed-login delays.
    pub auth_delay: AuthDelay,
    /// Server shutdown.
    pub shutdown: Shutdown,
    /// Called after each successful login (the sync scheduler's lazy bump, and the capture of
    /// the password when `[sync] capture_credentials` is on).
    pub on_login: Option<LoginHook>,
}

/// A callback run after a successful backend login with the user and, when the client proved
/// the user's own password (not a master user's), that password. It must not log it.
pub type LoginHook = Arc<dyn Fn(&str, Option<&[u8]>) + Send + Sync>;

/// The user's own password in `req`, if the client logged in as the user (not as a master
/// user acting for them).
fn own_password(req: &LoginRequest) -> Option<&[u8]> {
    let c = &req.credentials;
    let as_self = c.authcid.eq_ignore_ascii_case(&req.user)
        && c.authzid
            .as_deref()
            .is_none_or(|z| z.is_empty() || z.eq_ignore_ascii_case(&req.user));
    as_self.then(|| c.password.expose().as_slice())
}

impl ImapContext {
    fn backend(&self, route: Route) -> &BackendTarget {
        match route {
            Route::Legacy => &self.legacy,
            Route::New => &self.new,
        }
    }
}

/// Handles one accepted connection to the end; never panics on client input. `slot` is the
/// connection's pre-auth slot of its source address, given back at login or close.
pub async fn handle(
    ctx: Arc<ImapContext>,
    tcp: TcpStream,
    implicit_tls: bool,
    slot: Option<AddressSlot>,
) {
    let peer = tcp.peer_addr().ok();
    let local = tcp.local_addr().ok();
    let (Some(peer), Some(local)) = (peer, local) else {
        return;
    };
    let sid = session_id();
    let span = info_span!("imap", sid = %sid, peer = %peer, user = tracing::field::Empty);
    let accepted = Accepted {
        tcp,
        peer,
        local,
        sid,
        slot,
        deadline: Instant::now() + ctx.limits.preauth_deadline(),
    };
    let fut = async move {
        let _ = tcp_nodelay(&accepted.tcp);
        let Some(pre) = Box::pin(accepted.secure(&ctx, implicit_tls)).await else {
            return;
        };
        // The pre-auth phase is dropped before the splice starts: only the splice's own
        // state lives as long as the session.
        let authed = Box::pin(pre.run(&ctx)).await;
        if let Some(authed) = authed {
            Box::pin(authed.splice(&ctx)).await;
        }
    };
    fut.instrument(span).await
}

fn tcp_nodelay(tcp: &TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)
}

fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// How long a `* BYE` to a client that is being dropped may take to write: one that does not
/// read must not keep the connection.
const BYE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP connection, nothing said yet.
struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    sid: String,
    /// Held until login, so that one address cannot keep many connections before login.
    slot: Option<AddressSlot>,
    /// End of the whole pre-auth phase (`preauth_deadline_secs` after accept).
    deadline: Instant,
}

impl Accepted {
    /// Runs the implicit-TLS handshake where the listener requires it.
    async fn secure(self, ctx: &ImapContext, implicit_tls: bool) -> Option<PreAuthPhase> {
        let stream = if implicit_tls {
            let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.get());
            let until = self
                .deadline
                .min(Instant::now() + ctx.limits.tls_handshake());
            // Boxed here and below: a session's future is sized for its largest phase, and the
            // handshake and login states are far larger than what an idle splice needs.
            match timeout_at(until, Box::pin(acceptor.accept(self.tcp))).await {
                Ok(Ok(tls)) => Stream::ServerTls(Box::new(tls)),
                Ok(Err(e)) => {
                    info!(error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    info!("TLS handshake timed out");
                    return None;
                }
            }
        } else {
            Stream::Plain(self.tcp)
        };
        let preauth = PreAuth::new(
            implicit_tls,
            ctx.allow_plaintext,
            &ctx.proxy.master_user_separator,
            (&ctx.limits).into(),
        );
        Some(PreAuthPhase {
            conn: Conn::new(stream),
            preauth,
            info: ClientInfo {
                peer: self.peer,
                local: self.local,
                session_id: self.sid,
            },
            failures: 0,
            _slot: self.slot,
            deadline: self.deadline,
        })
    }
}

/// Talking to the client ourselves until a login succeeds.
struct PreAuthPhase {
    conn: Conn,
    preauth: PreAuth,
    info: ClientInfo,
    failures: u32,
    /// The address's pre-auth slot: dropped with this phase, at login or close.
    _slot: Option<AddressSlot>,
    /// End of the whole phase, however busy the client keeps it.
    deadline: Instant,
}

impl PreAuthPhase {
    /// Talks to the client until a login succeeds (`Some`) or the session ends (`None`).
    async fn run(mut self, ctx: &ImapContext) -> Option<BackendAuthed> {
        let greeting = self.preauth.greeting();
        if !self.send(&greeting).await {
            return None;
        }
        loop {
            while let Some(event) = self.preauth.next_event() {
                match event {
                    Event::Reply(bytes) => {
                        if !self.send(&bytes).await {
                            return None;
                        }
                    }
                    Event::Close(bytes) => {
                        self.send(&bytes).await;
                        return None;
                    }
                    Event::StartTls(bytes) => {
                        if !self.send(&bytes).await {
                            return None;
                        }
                        self.conn = start_tls(ctx, self.conn, self.deadline).await?;
                        self.preauth.tls_started();
                    }
                    // Not bounded by the deadline: the backend's own timeouts bound a login,
                    // and cutting one short would leave a backend session half made.
                    Event::Login(req) => match Box::pin(self.login(ctx, &req)).await {
                        Ok((routed, backend, registration)) => {
                            let logged_in = LoggedInParts {
                                backend,
                                registration,
                            };
                            return Some(routed.into_authed(ctx, self, &req, logged_in));
                        }
                        Err(refusal) => {
                            let reply = refusal.reply(&req.tag);
                            if !self.send(reply.as_bytes()).await || refusal.closes() {
                                return None;
                            }
                            self.preauth.login_failed();
                        }
                    },
                }
            }
            if !self.read_more(ctx).await {
                return None;
            }
        }
    }

    /// Writes to the client within the deadline; false when the session must end.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        matches!(
            timeout_at(self.deadline, self.conn.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Says a last `* BYE`, briefly: the client may be the kind that does not read.
    async fn bye(&mut self, line: &[u8]) {
        let _ = timeout(BYE_WRITE_TIMEOUT, self.conn.write_all(line)).await;
    }

    /// Reads what the client sends next and feeds it to the pre-auth state machine, within
    /// the idle limit per read and the deadline of the phase; false when the session ends
    /// (closed by the client, or a `* BYE` said).
    async fn read_more(&mut self, ctx: &ImapContext) -> bool {
        let idle_until = Instant::now() + ctx.limits.preauth_idle();
        let until = idle_until.min(self.deadline);
        let read = tokio::select! {
            r = timeout_at(until, self.conn.read_some(16 * 1024)) => r,
            _ = ctx.shutdown.forced() => {
                self.bye(b"* BYE Server shutting down.\r\n").await;
                return false;
            }
        };
        match read {
            Err(_) if until == self.deadline => {
                info!("pre-auth deadline reached");
                self.bye(b"* BYE Login took too long.\r\n").await;
                false
            }
            Err(_) => {
                self.bye(b"* BYE Disconnected for inactivity.\r\n").await;
                false
            }
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => {
                let bytes = self.conn.buffer().split();
                self.preauth.feed(&bytes);
                true
            }
        }
    }

    /// Routes and logs in; on failure says why, for the client's reply. The session is
    /// registered before the route is looked up, so that a route change from then on kicks
    /// this login too: a login kicked before its splice waits out the user's hold and routes
    /// again instead of going on to the backend the user is leaving.
    async fn login(
        &mut self,
        ctx: &ImapContext,
        req: &LoginRequest,
    ) -> Result<(Routed, LoggedIn, Registration), Refusal> {
        tracing::Span::current().record("user", req.user.as_str());
        // Routing, the session registry and holds use the user's key (`alice` with a
        // default domain is `alice@example.org`); the backend gets the login as sent.
        let key = ctx.routes.key(&req.user);
        let mut registration = ctx.sessions.register(&key);
        for _ in 0..MAX_ROUTINGS {
            if ctx.holds.wait(&key, ctx.hold).await == Waited::StillHeld {
                info!(
                    hold_secs = ctx.hold.as_secs(),
                    "login held too long: user still being moved"
                );
                return Err(Refusal::BeingMoved);
            }
            if registration.kick.is_kicked() {
                registration = ctx.sessions.register(&key);
            }
            let routed = Routed::lookup(ctx, req, &key).await?;
            registration.kick.routed(routed.route);
            let backend = self.authenticate(ctx, req, &routed).await?;
            if !registration.kick.is_kicked() {
                return Ok((routed, backend, registration));
            }
            info!(backend = %routed.route, "user moved during the login; routing again");
            logout(backend, &ctx.limits).await;
        }
        Err(Refusal::BeingMoved)
    }

    /// The backend login of a routed user, with the failed-login delay.
    async fn authenticate(
        &mut self,
        ctx: &ImapContext,
        req: &LoginRequest,
        routed: &Routed,
    ) -> Result<LoggedIn, Refusal> {
        match Box::pin(routed.authenticate(ctx, req, &self.info)).await {
            Ok(backend) => {
                ctx.auth_delay.succeeded(self.info.peer.ip());
                metrics::counter!("mailferry_logins_total", "result" => "ok", "backend" => routed.route.as_str()).increment(1);
                Ok(backend)
            }
            Err(BackendError::AuthFailed { .. }) => {
                self.failures += 1;
                metrics::counter!("mailferry_logins_total", "result" => "failed", "backend" => routed.route.as_str()).increment(1);
                let delay = ctx.auth_delay.failed(self.info.peer.ip());
                info!(backend = %routed.route, delay_ms = delay.as_millis() as u64, "authentication failed");
                tokio::time::sleep(delay).await;
                Err(Refusal::AuthFailed {
                    close: self.failures >= ctx.limits.max_auth_failures,
                })
            }
            Err(e) => Err(Refusal::backend(e)),
        }
    }
}

/// How many times one login is routed when the user keeps being moved while it logs in.
const MAX_ROUTINGS: usize = 3;

/// STARTTLS on a plain connection; bytes read before the handshake are dropped.
async fn start_tls(ctx: &ImapContext, conn: Conn, deadline: Instant) -> Option<Conn> {
    let (stream, _discarded) = conn.into_parts();
    let Stream::Plain(tcp) = stream else {
        return None;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.get());
    let until = deadline.min(Instant::now() + ctx.limits.tls_handshake());
    match timeout_at(until, Box::pin(acceptor.accept(tcp))).await {
        Ok(Ok(tls)) => Some(Conn::new(Stream::ServerTls(Box::new(tls)))),
        Ok(Err(e)) => {
            info!(error = %e, "STARTTLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

/// Why a login did not produce a session; `reply` renders it for the client.
enum Refusal {
    /// Wrong credentials; after too many the session closes.
    AuthFailed {
        /// Whether this was the last failure the session allows.
        close: bool,
    },
    /// The directory does not know the user and `reject_unknown` is set: answered as a
    /// wrong password, so that logins cannot probe which users exist.
    UnknownUser,
    /// The directory could not answer.
    DirectoryUnavailable,
    /// The backend could not be reached or broke the protocol (logged).
    BackendUnavailable,
    /// The user is being cut over or rolled back and was still held after `hold_secs`.
    BeingMoved,
    /// The backend refused the login with its own status (logged), e.g. `NO [UNAVAILABLE] ...`.
    BackendSaid(String),
}

impl Refusal {
    /// The refusal of a backend login that did not fail on the credentials; logs it.
    fn backend(e: BackendError) -> Refusal {
        if let BackendError::Refused { backend, text, .. } = e {
            warn!(%backend, reply = %text, "backend refused login");
            return Refusal::BackendSaid(text);
        }
        warn!(error = %e, "backend unavailable");
        metrics::counter!("mailferry_backend_errors_total", "backend" => e.backend().as_str())
            .increment(1);
        Refusal::BackendUnavailable
    }

    /// The client's reply: the tagged response, and a BYE when the session closes.
    fn reply(&self, tag: &str) -> String {
        match self {
            Refusal::AuthFailed { close: true } => format!(
                "{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\
                 * BYE Too many invalid authentication attempts.\r\n"
            ),
            Refusal::AuthFailed { close: false } | Refusal::UnknownUser => {
                format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            }
            Refusal::DirectoryUnavailable => {
                format!("{tag} NO [UNAVAILABLE] Directory temporarily unavailable.\r\n")
            }
            Refusal::BackendUnavailable => {
                format!("{tag} NO [UNAVAILABLE] Backend temporarily unavailable.\r\n")
            }
            Refusal::BeingMoved => {
                format!("{tag} NO [UNAVAILABLE] Mailbox is being moved, try again shortly.\r\n")
            }
            Refusal::BackendSaid(text) => format!("{tag} {text}\r\n"),
        }
    }

    /// Whether the session ends after the reply.
    fn closes(&self) -> bool {
        matches!(self, Refusal::AuthFailed { close: true })
    }
}

/// What a successful login hands the splice: the backend session and the registration made
/// before the route lookup.
struct LoggedInParts {
    backend: LoggedIn,
    registration: Registration,
}

/// A login whose backend is known.
struct Routed {
    /// The user as the client named them (what the backend gets).
    user: String,
    /// The user's key (what routing, sessions and the sync engine use).
    key: String,
    route: Route,
}

impl Routed {
    async fn lookup(ctx: &ImapContext, req: &LoginRequest, key: &str) -> Result<Routed, Refusal> {
        match ctx.routes.lookup(key).await {
            Ok(l) if !l.known && ctx.reject_unknown => Err(Refusal::UnknownUser),
            Ok(l) => Ok(Routed {
                user: req.user.clone(),
                key: key.to_owned(),
                route: l.route,
            }),
            Err(e) => {
                warn!(error = %e, "route lookup failed");
                metrics::counter!("mailferry_logins_total", "result" => "unavailable", "backend" => "none").increment(1);
                Err(Refusal::DirectoryUnavailable)
            }
        }
    }

    /// Logs in to the routed backend: with the client's credentials, or (`auth = "master"`)
    /// as the master user after the client's password was checked on `password_backend`.
    async fn authenticate(
        &self,
        ctx: &ImapContext,
        req: &LoginRequest,
        info: &ClientInfo,
    ) -> Result<LoggedIn, BackendError> {
        let backend = ctx.backend(self.route);
        let c = &req.credentials;
        let client = PlainLogin {
            authzid: c.authzid.as_deref(),
            authcid: c.authcid.as_bytes(),
            password: c.password.expose(),
        };
        let (BackendAuth::Master, Some(master)) = (&backend.cfg.auth, &backend.master) else {
            return login::login(backend, &ctx.limits, Some(info), client).await;
        };
        // The routed backend trusts us as master; the user's own password is checked where
        // passwords live (`proxy.password_backend`).
        let checker = ctx.backend(ctx.proxy.password_backend);
        let check = login::login(checker, &ctx.limits, Some(info), client).await?;
        logout(check, &ctx.limits).await;
        let as_master = PlainLogin {
            authzid: Some(&self.user),
            authcid: master.user.as_bytes(),
            password: master.password.expose().as_bytes(),
        };
        login::login(backend, &ctx.limits, Some(info), as_master).await
    }

    /// The session's next phase, once the backend has logged the user in.
    fn into_authed(
        self,
        ctx: &ImapContext,
        pre: PreAuthPhase,
        req: &LoginRequest,
        parts: LoggedInParts,
    ) -> BackendAuthed {
        let LoggedInParts {
            backend,
            registration,
        } = parts;
        if let Some(on_login) = &ctx.on_login {
            on_login(&self.key, own_password(req));
        }
        let caps = filter_capabilities(&backend.capabilities, &ctx.proxy.strip_capabilities);
        BackendAuthed {
            client: pre.conn,
            leftover: pre.preauth.into_leftover(),
            backend: backend.conn,
            route: self.route,
            reply: format!("{} OK [CAPABILITY {caps}] {}\r\n", req.tag, backend.text),
            registration,
            user: self.key,
        }
    }
}

/// Ends a login made only to check a password.
async fn logout(mut done: LoggedIn, limits: &Limits) {
    let _ = timeout(limits.logout(), done.conn.write_all(b"m9 LOGOUT\r\n")).await;
}

/// Logged in on both sides; only this phase can splice.
struct BackendAuthed {
    client: Conn,
    leftover: bytes::BytesMut,
    backend: Conn,
    route: Route,
    user: String,
    reply: String,
    registration: Registration,
}

impl BackendAuthed {
    async fn splice(mut self, ctx: &ImapContext) {
        let started = Instant::now();
        if self.client.write_all(self.reply.as_bytes()).await.is_err() {
            return;
        }
        // Idle sessions are counted in thousands: keep nothing the splice does not need.
        self.reply = String::new();
        let route = self.route.as_str();
        let gauge = metrics::gauge!("mailferry_sessions", "backend" => route);
        gauge.increment(1.0);
        let (client_stream, mut client_buf) = self.client.into_parts();
        client_buf.unsplit(self.leftover);
        let outcome = splice::splice(
            (client_stream, client_buf),
            self.backend.into_parts(),
            SpliceParams {
                kick: &self.registration.kick,
                shutdown: ctx.shutdown.force_token(),
                idle: ctx.limits.postauth_idle(),
                buffer: ctx.limits.splice_buffer,
                half_close: ctx.limits.half_close(),
            },
        )
        .await;
        gauge.decrement(1.0);
        if matches!(outcome.ending, splice::Ending::Kicked) {
            metrics::counter!("mailferry_kicks_total").increment(1);
        }
        let detail = match &outcome.ending {
            splice::Ending::Error(e) => e.to_string(),
            _ => String::new(),
        };
        info!(
            user = %self.user,
            backend = route,
            bytes_in = outcome.up,
            bytes_out = outcome.down,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome = outcome.ending.label(),
            detail,
            "session end"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::preauth::{AuthForm, Credentials};
    use crate::secret::Secret;

    fn req(user: &str, authzid: Option<&str>, authcid: &str) -> LoginRequest {
        LoginRequest {
            tag: "a".into(),
            user: user.into(),
            credentials: Credentials {
                authzid: authzid.map(str::to_owned),
                authcid: authcid.into(),
                password: Secret::new(b"pw".to_vec()),
                form: AuthForm::Plain,
            },
        }
    }

    #[test]
    fn only_the_users_own_password_is_offered_for_capture() {
        let own = |r: &LoginRequest| own_password(r).map(<[u8]>::to_vec);
        assert_eq!(own(&req("a@x", None, "a@x")), Some(b"pw".to_vec()));
        assert_eq!(own(&req("a@x", Some("A@X"), "a@x")), Some(b"pw".to_vec()));
        // Master logins: PLAIN with authzid, and `user*master`.
        assert_eq!(own(&req("a@x", Some("a@x"), "admin")), None);
        assert_eq!(own(&req("a@x", None, "a@x*admin")), None);
    }
}
