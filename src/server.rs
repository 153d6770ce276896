//! `mailferry serve`: builds the shared pieces from the config, binds listeners, and runs
//! until SIGTERM/SIGINT (drain) while SIGHUP reloads certificates and the route cache.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{error, info};

use crate::backend::target::{BackendTarget, TargetError};
use crate::config::{BackendAuth, Config, DirectoryKind};
use crate::control::sessions::SessionRegistry;
use crate::control::Control;
use crate::imap::authdelay::AuthDelay;
use crate::imap::session::{self, ImapContext};
use crate::net::listener::{accept_loop, Admission};
use crate::net::permits::AddressSlots;
use crate::net::tls::{self, ReloadableServer};
use crate::route::embedded::EmbeddedDirectory;
use crate::route::ldap::{LdapDirectory, LdapSetupError};
use crate::route::{Directory, Route, RouteCache};
use crate::shutdown::Shutdown;
use crate::store::{Open, SqlStore, StateStore};
use crate::sync::credentials::Captured;
use crate::sync::scheduler::{Schedule, SyncQueue};
use crate::sync::Engine;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A file named in the config is unusable.
    #[error("{what} {path}: {source}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// Path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A backend's TLS client configuration or master password is unusable.
    #[error(transparent)]
    Backend(#[from] TargetError),
    /// The state store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The admin token file is missing, empty or too short.
    #[error(transparent)]
    AdminToken(#[from] crate::admin::TokenError),
    /// A configured feature is not available in this build.
    #[error("{0}")]
    Unsupported(String),
    /// The LDAP directory's settings or files are unusable.
    #[error(transparent)]
    Directory(#[from] LdapSetupError),
}

/// The admin token, when the admin API listens: checked before anything binds, so that a
/// placeholder token stops `serve` instead of guarding a live API.
pub fn admin_token(cfg: &Config) -> Result<Option<crate::secret::Secret<String>>, ServeError> {
    if cfg.listen.admin.is_none() {
        return Ok(None);
    }
    Ok(Some(crate::admin::load_token(
        &cfg.resolve(&cfg.admin.token_file),
    )?))
}

/// Opens the state store and the directory named by the config; `mode` says whether a
/// missing store may be created (only `serve` does). The embedded directory keeps its table
/// in the same SQL database as the state store; the LDAP directory checks its settings and
/// files here and connects at its first lookup (a directory down at start-up answers
/// `NO [UNAVAILABLE]` until it is back, without a restart).
pub async fn open_directory(
    cfg: &Config,
    mode: Open,
) -> Result<(Arc<dyn StateStore>, Arc<RouteCache>), ServeError> {
    let store = SqlStore::open(&cfg.state_url(), mode).await?;
    let directory: Arc<dyn Directory> = match cfg.directory.kind {
        DirectoryKind::Embedded => Arc::new(EmbeddedDirectory::new(store.pool().clone())),
        DirectoryKind::Ldap(_) => Arc::new(LdapDirectory::from_config(cfg)?),
    };
    let cache = Arc::new(
        RouteCache::new(
            directory,
            cfg.directory.default_route,
            Duration::from_secs(cfg.directory.cache_ttl_secs),
        )
        .with_identity(cfg.directory.identity()),
    );
    Ok((Arc::new(store), cache))
}

/// A backend as the proxy uses it: `auth = "master"` needs the master user.
fn proxy_backend(cfg: &Config, route: Route) -> Result<BackendTarget, ServeError> {
    let target = BackendTarget::from_config(cfg, route)?;
    if target.cfg.auth == BackendAuth::Master && target.master.is_none() {
        return Err(ServeError::Unsupported(format!(
            "backends.{route}: master auth without master credentials"
        )));
    }
    Ok(target)
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// How often the Prometheus exporter's histograms are compacted.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Runs the server until a termination signal; returns after draining.
pub async fn serve(
    cfg: Config,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Result<(), ServeError> {
    let mut signals = Signals::install()?;
    let admin_token = admin_token(&cfg)?;
    let shared = Shared::build(cfg, metrics).await?;
    // Before any listener: a cutover or rollback a stopped server left half done is
    // finished from the route (`control::cutover`).
    match shared.control.recover().await {
        Ok(0) => {}
        Ok(n) => info!(users = n, "finished sequences a stopped server left"),
        Err(e) => tracing::warn!(error = %e, "cannot finish the sequences a stopped server left"),
    }
    if let Err(e) = crate::sync::free_dead_local(&*shared.store).await {
        tracing::warn!(error = %e, "cannot free the sync leases of dead local processes");
    }
    let captured = shared.engine.as_ref().ok().map(|e| e.captured.clone());
    let mut tasks = tokio::task::JoinSet::new();
    shared.start_imap(&mut tasks, captured).await?;
    shared.start_lmtp(&mut tasks).await?;
    shared.start_admin(&mut tasks, admin_token).await?;
    shared.start_sync(&mut tasks);
    shared.start_directory_watch(&mut tasks);
    let (upkeep, control) = (shared.metrics.clone(), shared.control.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
            if let Err(e) = control.publish_gauges().await {
                tracing::debug!(error = %e, "user gauges not updated");
            }
        }
    });

    wait_for_signals(
        &mut signals,
        &shared.cfg,
        &shared.server_tls,
        &shared.routes,
    )
    .await;
    let limits = &shared.cfg.limits;
    info!(
        grace_secs = limits.shutdown_grace_secs,
        sessions = shared.sessions.total(),
        "shutting down"
    );
    shared.shutdown.drain(limits.shutdown_grace()).await;
    tasks.abort_all();
    info!("stopped");
    Ok(())
}

/// What `serve` builds once and its listeners and workers share.
struct Shared {
    cfg: Arc<Config>,
    store: Arc<dyn StateStore>,
    routes: Arc<RouteCache>,
    server_tls: Arc<ReloadableServer>,
    sessions: Arc<SessionRegistry>,
    shutdown: Shutdown,
    sync_queue: Arc<SyncQueue>,
    control: Arc<Control>,
    /// Built before the proxy so that logins can hand it captured passwords. Passes log in
    /// through master users or those passwords; without either the engine is off and says why.
    engine: Result<Arc<Engine>, String>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

type Tasks = tokio::task::JoinSet<()>;

impl Shared {
    async fn build(
        cfg: Config,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Result<Shared, ServeError> {
        let cfg = Arc::new(cfg);
        let (store, routes) = open_directory(&cfg, Open::CreateIfMissing).await?;
        let server_tls = Arc::new(ReloadableServer::new(tls::server_config(
            &cfg.resolve(&cfg.tls.cert),
            &cfg.resolve(&cfg.tls.key),
        )?));
        let sessions = Arc::new(SessionRegistry::default());
        let sync_queue = Arc::new(SyncQueue::default());
        let engine = Engine::from_config(&cfg, store.clone(), routes.clone())
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let control = Arc::new(
            Control::new(routes.clone(), store.clone(), sessions.clone())
                .with_sync_queue(sync_queue.clone())
                .with_engine(engine.as_ref().ok().cloned(), cfg.cutover.clone()),
        );
        Ok(Shared {
            cfg,
            store,
            routes,
            server_tls,
            sessions,
            shutdown: Shutdown::new(),
            sync_queue,
            control,
            engine,
            metrics,
        })
    }

    /// Follows route changes made in the directory by others (LDAP), if it reports them.
    fn start_directory_watch(&self, tasks: &mut Tasks) {
        let Some(mut changes) = self.routes.directory().clone().watch() else {
            return;
        };
        let control = self.control.clone();
        tasks.spawn(async move {
            while let Some(change) = changes.recv().await {
                control.directory_changed(&change);
            }
        });
    }

    /// The IMAP proxy's shared context; `captured` keeps users' passwords for the sync engine
    /// when `[sync] capture_credentials` is on.
    fn imap_context(&self, captured: Option<Arc<Captured>>) -> Result<ImapContext, ServeError> {
        let (cfg, limits) = (&self.cfg, &self.cfg.limits);
        let queue = self.sync_queue.clone();
        Ok(ImapContext {
            allow_plaintext: cfg.tls.allow_plaintext_auth,
            proxy: cfg.proxy.clone(),
            tls: self.server_tls.clone(),
            routes: self.routes.clone(),
            reject_unknown: cfg.directory.reject_unknown,
            legacy: proxy_backend(cfg, Route::Legacy)?,
            new: proxy_backend(cfg, Route::New)?,
            sessions: self.sessions.clone(),
            holds: self.control.holds().clone(),
            hold: cfg.cutover.hold(),
            auth_delay: AuthDelay::new(
                Duration::from_millis(limits.auth_failure_delay_ms),
                Duration::from_millis(limits.auth_failure_delay_max_ms),
            ),
            shutdown: self.shutdown.clone(),
            limits: limits.clone(),
            on_login: Some(Arc::new(move |user: &str, password: Option<&[u8]>| {
                if let (Some(c), Some(pw)) = (&captured, password) {
                    c.put(user, pw);
                }
                queue.bump(user)
            })),
        })
    }

    async fn start_imap(
        &self,
        tasks: &mut Tasks,
        captured: Option<Arc<Captured>>,
    ) -> Result<(), ServeError> {
        let imap = Arc::new(self.imap_context(captured)?);
        let limits = &self.cfg.limits;
        // Both IMAP listeners share one count of connections and one of slots per address.
        let mut admission = Admission::new(
            limits.max_connections,
            b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n",
        );
        admission.per_address = Some((
            AddressSlots::new(limits.max_preauth_per_ip),
            b"* BYE [UNAVAILABLE] Too many connections from your address\r\n",
        ));
        let listeners = [(self.cfg.listen.imap, false), (self.cfg.listen.imaps, true)];
        for (addr, implicit) in listeners {
            let Some(addr) = addr else { continue };
            let listener = bind(addr).await?;
            info!(%addr, tls = if implicit { "implicit" } else { "starttls" }, "IMAP listening");
            let ctx = imap.clone();
            tasks.spawn(accept_loop(
                listener,
                self.shutdown.clone(),
                admission.clone(),
                move |tcp, slot| session::handle(ctx.clone(), tcp, implicit, slot),
            ));
        }
        Ok(())
    }

    async fn start_lmtp(&self, tasks: &mut Tasks) -> Result<(), ServeError> {
        let Some(addr) = self.cfg.listen.lmtp else {
            return Ok(());
        };
        let listener = bind(addr).await?;
        info!(%addr, "LMTP listening");
        let ctx = Arc::new(crate::lmtp::LmtpContext::from_config(
            &self.cfg,
            self.routes.clone(),
            self.store.clone(),
            self.control.deliveries().clone(),
            self.shutdown.clone(),
        ));
        // LMTP's own count: IMAP clients, however many, cannot keep the MTA out.
        let admission = Admission::new(
            self.cfg.limits.max_lmtp_connections,
            b"421 4.3.2 Too many connections\r\n",
        );
        tasks.spawn(accept_loop(
            listener,
            self.shutdown.clone(),
            admission,
            move |tcp, _| crate::lmtp::session::handle(ctx.clone(), tcp),
        ));
        Ok(())
    }

    async fn start_admin(
        &self,
        tasks: &mut Tasks,
        token: Option<crate::secret::Secret<String>>,
    ) -> Result<(), ServeError> {
        let (Some(addr), Some(token)) = (self.cfg.listen.admin, token) else {
            return Ok(());
        };
        let cfg = &self.cfg;
        let state = Arc::new(crate::admin::AdminState {
            control: self.control.clone(),
            routes: self.routes.clone(),
            backends: vec![
                (Route::Legacy, cfg.backends.legacy.imap.clone()),
                (Route::New, cfg.backends.new.imap.clone()),
            ],
            token,
            metrics: self.metrics.clone(),
        });
        let listener = bind(addr).await?;
        info!(%addr, "admin API listening");
        let stop = self.shutdown.clone();
        tasks.spawn(async move {
            let app = crate::admin::router(state);
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.stopping().await })
                .await
            {
                error!(error = %e, "admin API failed");
            }
        });
        Ok(())
    }

    fn start_sync(&self, tasks: &mut Tasks) {
        let engine = match &self.engine {
            Ok(engine) => engine.clone(),
            Err(e) => return tracing::warn!(error = %e, "sync engine disabled"),
        };
        let schedule = Schedule {
            concurrency: self.cfg.sync.concurrency,
            interval: Duration::from_secs(self.cfg.sync.interval_secs),
        };
        info!(
            concurrency = schedule.concurrency,
            interval_secs = self.cfg.sync.interval_secs,
            "sync scheduler running"
        );
        tasks.spawn(crate::sync::scheduler::run(
            engine,
            self.sync_queue.clone(),
            schedule,
            self.shutdown.clone(),
        ));
    }
}

/// The signals `serve` reacts to, installed before any listener binds so that a SIGTERM
/// arriving during start-up drains instead of killing the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, ServeError> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| {
            signal(kind).map_err(|source| ServeError::File {
                what: "signal handler",
                path: format!("{kind:?}"),
                source,
            })
        };
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }
}

async fn wait_for_signals(
    signals: &mut Signals,
    cfg: &Config,
    server_tls: &ReloadableServer,
    routes: &RouteCache,
) {
    let Signals { term, int, hup } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                routes.clear();
                match tls::server_config(&cfg.resolve(&cfg.tls.cert), &cfg.resolve(&cfg.tls.key)) {
                    Ok(new) => {
                        server_tls.set(new);
                        info!("reloaded: TLS certificate, route cache cleared");
                    }
                    Err(e) => error!(error = %e, "reload failed, keeping the old certificate"),
                }
            }
        }
    }
}
