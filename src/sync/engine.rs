//! The engine: what every pass shares (both backends, the state store, folder rules, the
//! bytes/s budget, each backend's adaptive pace, the body buffer pool, the route lookup, the
//! leases), and a pass's life: the route check, the user's lease, both logins, the pass
//! itself (`pass::Pass`), its record in the store, retries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn, Instrument};

use super::bodies::{BodyPool, MemoryBudget};
use super::client::{Client, Endpoint};
use super::credentials::Captured;
use super::lease::Leases;
use super::mailboxes::Rules;
use super::pace::{self, Limiter};
use super::pass::Pass;
use super::throttle::Throttle;
use super::{PassReport, Progress, SyncError};
use crate::backend::error::BackendError;
use crate::config::Config;
use crate::route::{Route, RouteCache};
use crate::store::StateStore;

/// Everything a pass needs, built once and shared by all passes.
pub struct Engine {
    /// Legacy backend.
    pub legacy: Endpoint,
    /// New backend.
    pub new: Endpoint,
    /// State store.
    pub store: Arc<dyn StateStore>,
    /// Operator folder rules.
    pub rules: Rules,
    /// Bytes/s budget shared by all passes.
    pub throttle: Arc<Throttle>,
    /// Users' passwords captured at proxy login (`[sync] capture_credentials`), used where a
    /// backend has no master user.
    pub captured: Arc<Captured>,
    /// Connections per backend (each pass holds one on each side), adaptively limited.
    legacy_pace: Arc<Limiter>,
    new_pace: Arc<Limiter>,
    /// Buffers that large bodies are read into, shared by every copy of this engine.
    bodies: Arc<BodyPool>,
    /// The bytes of message bodies all copies may hold at once (`[sync] memory_mb`).
    memory: Arc<MemoryBudget>,
    /// Where users are routed: a user routed to new is not synced from legacy again.
    routes: Arc<RouteCache>,
    /// One pass per user in the cluster.
    leases: Leases,
}

impl Engine {
    /// Builds the engine from the config. Logging in as a user needs each backend's master
    /// user, or that user's password captured at a proxy login (`[sync] capture_credentials`).
    pub fn from_config(
        cfg: &Config,
        store: Arc<dyn StateStore>,
        routes: Arc<RouteCache>,
    ) -> Result<Engine, SyncError> {
        crate::net::tls::install_provider();
        let rules = Rules::from_config(&cfg.sync).map_err(|e| SyncError::Config(e.to_string()))?;
        Ok(Engine {
            legacy: Endpoint::from_config(cfg, Route::Legacy)?,
            new: Endpoint::from_config(cfg, Route::New)?,
            store,
            rules,
            throttle: Arc::new(Throttle::new(cfg.sync.bytes_per_second)),
            captured: Arc::new(Captured::new(
                cfg.sync.capture_credentials,
                Duration::from_secs(cfg.sync.credentials_ttl_secs),
            )),
            legacy_pace: Limiter::with_config(Route::Legacy, pace_config(cfg)),
            new_pace: Limiter::with_config(Route::New, pace_config(cfg)),
            bodies: Arc::new(BodyPool::new(idle_bodies(cfg.sync.memory_mb))),
            memory: Arc::new(MemoryBudget::new(cfg.sync.memory_mb)),
            routes,
            leases: Leases::new(cfg.sync.lease_secs),
        })
    }

    /// The adaptive pace of a backend.
    pub fn pace(&self, route: Route) -> &Arc<Limiter> {
        match route {
            Route::Legacy => &self.legacy_pace,
            Route::New => &self.new_pace,
        }
    }

    /// The budget of message bodies held at once.
    pub(crate) fn memory(&self) -> &Arc<MemoryBudget> {
        &self.memory
    }

    /// The pool large bodies are read into.
    pub(crate) fn bodies(&self) -> &Arc<BodyPool> {
        &self.bodies
    }

    /// Runs one pass for `email` and records its outcome in the store. A user routed to new
    /// is refused unless `force`; a user whose pass runs elsewhere is refused (not recorded:
    /// that pass records its own outcome).
    pub async fn pass(
        &self,
        email: &str,
        progress: Option<Arc<Progress>>,
        force: bool,
    ) -> Result<PassReport, SyncError> {
        let started = Instant::now();
        let progress = progress.unwrap_or_default();
        // Every line the pass logs (the trace-level command timeline too) names the user.
        let span = tracing::debug_span!("pass", user = %email);
        let result = self
            .leased_pass(email, &progress, force)
            .instrument(span)
            .await;
        let ms = started.elapsed().as_millis() as i64;
        match &result {
            Ok(r) => {
                self.store
                    .record_pass(email, ms, r.appended as i64, None)
                    .await?;
                info!(user = %email, appended = r.appended, changed = r.folders_changed, ms, "sync pass done");
            }
            Err(e @ SyncError::PassInProgress { .. }) => {
                info!(user = %email, error = %e, "sync pass not started");
            }
            Err(e) => {
                if let Some((backend, code)) = e.overload() {
                    self.pace(backend).overloaded(code);
                }
                let _ = self
                    .store
                    .record_pass(email, ms, 0, Some(&e.to_string()))
                    .await;
                warn!(user = %email, error = %e, "sync pass failed");
            }
        }
        result.map(|mut r| {
            r.duration_ms = ms as u64;
            r
        })
    }

    /// The pass under the user's lease, once the route says the user is still on legacy.
    async fn leased_pass(
        &self,
        email: &str,
        progress: &Progress,
        force: bool,
    ) -> Result<PassReport, SyncError> {
        if !force && self.routes.lookup(email).await?.route == Route::New {
            return Err(SyncError::RoutedToNew);
        }
        self.under_lease(email, self.pass_inner(email, progress))
            .await
    }

    /// Runs `work` (a pass of `email`, either way) under the user's lease, so that no other
    /// pass of the user runs meanwhile in the cluster; stops it if the lease is lost.
    pub(crate) async fn under_lease<T>(
        &self,
        email: &str,
        work: impl std::future::Future<Output = Result<T, SyncError>>,
    ) -> Result<T, SyncError> {
        let lease = self.leases.take(&*self.store, email).await?;
        let result = tokio::select! {
            r = work => r,
            // Dropping the pass mid-copy is what a crash does: the next pass resumes.
            lost = lease.keep(&*self.store, email) => Err(lost),
        };
        lease.release(&*self.store, email).await;
        result
    }

    async fn pass_inner(&self, email: &str, progress: &Progress) -> Result<PassReport, SyncError> {
        let _l = self.legacy_pace.acquire().await;
        let _n = self.new_pace.acquire().await;
        let (mut src, mut tgt) = self.logins(email).await?;
        let pass = Pass {
            engine: self,
            user: email,
            src: &mut src,
            tgt: &mut tgt,
            report: PassReport::default(),
            progress,
        };
        let result = pass.run().await;
        tokio::join!(src.logout(), tgt.logout());
        result
    }

    /// Logs in to legacy and new as `email`: through the master users, or where a backend has
    /// none with the password captured at the user's last proxy login.
    pub(crate) async fn logins(&self, email: &str) -> Result<(Client, Client), SyncError> {
        let own = (!self.legacy.has_master() || !self.new.has_master())
            .then(|| self.captured.get(email))
            .flatten();
        let logins = tokio::try_join!(
            Client::login(&self.legacy, email, own.as_ref()),
            Client::login(&self.new, email, own.as_ref())
        );
        if let Err(SyncError::Login(BackendError::AuthFailed { .. })) = &logins {
            if own.is_some() {
                // The password changed since it was captured; the next login brings the new one.
                self.captured.forget(email);
            }
        }
        logins
    }
}

/// Idle body buffers an engine keeps for its copies: an eighth of the memory budget, at most
/// 32 MiB, so that a pass reuses what the previous one read into instead of faulting in fresh
/// pages, while the budget and the idle buffers together stay within what operators set.
fn idle_bodies(memory_mb: u64) -> usize {
    usize::try_from((memory_mb * 1024 * 1024 / 8).min(32 * 1024 * 1024)).unwrap_or(usize::MAX)
}

/// Adaptive pacing of one backend from `[sync]`.
fn pace_config(cfg: &Config) -> pace::PaceConfig {
    pace::PaceConfig::new(cfg.sync.per_backend.max(1))
        .with_floor(Duration::from_millis(cfg.sync.latency_floor_ms))
}

/// Runs a pass, retrying transient failures (`NO [LIMIT]`, `[INUSE]`, `[UNAVAILABLE]`,
/// timeouts, network errors) with exponential backoff, at most `attempts` times.
pub async fn pass_with_retry(
    engine: &Engine,
    email: &str,
    progress: Option<Arc<Progress>>,
    force: bool,
    attempts: u32,
) -> Result<PassReport, SyncError> {
    let mut delay = Duration::from_millis(500);
    let mut n = 0;
    loop {
        n += 1;
        match engine.pass(email, progress.clone(), force).await {
            Err(e) if e.retryable() && n < attempts => {
                warn!(user = %email, error = %e, retry_in_ms = delay.as_millis() as u64, "sync pass will be retried");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            other => return other,
        }
    }
}
