//! The sync engine: copies a user's mailboxes from legacy to new and keeps the copy current.
//!
//! A pass (`Engine::pass`) logs in to both backends as the user (master user), maps folders,
//! skips folders whose STATUS did not change since the last pass, and for the others: recovers
//! unacknowledged APPENDs, re-matches after a UIDVALIDITY change, propagates expunges and flag
//! changes, then copies new messages in UID order. All state lives in the state store, written
//! before new can hold an APPEND batch whole (pending) and after its acknowledgement (UID map),
//! so a pass killed anywhere is resumed by the next one without duplicates.

pub mod bodies;
pub mod client;
pub mod copy;
pub mod credentials;
pub mod incremental;
pub mod mailboxes;
pub mod pace;
pub mod proto;
pub mod scheduler;
pub mod throttle;
pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, info, warn, Instrument};

use crate::backend::error::BackendError;
use crate::config::Config;
use crate::route::Route;
use crate::store::sync::FolderState;
use crate::store::{StateStore, StoreError};
use client::{Client, Endpoint, ListEntry, MailboxStatus};
use mailboxes::{encode_path, Folder, Mapper, Rules};
use pace::Limiter;
use throttle::Throttle;

/// Why a pass (or part of it) failed; each variant names the backend where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Connecting or logging in failed.
    #[error(transparent)]
    Login(BackendError),
    /// A backend failed after login (or refused the login as overloaded).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration does not allow syncing.
    #[error("sync configuration: {0}")]
    Config(String),
    /// Neither a master user nor a captured password lets the engine log in as the user.
    #[error(
        "backend {backend}: no credentials for this user: set master_user and \
         master_password_file, or [sync] capture_credentials = true and wait for the user's \
         next login through the proxy"
    )]
    NoCredentials {
        /// Which backend.
        backend: Route,
    },
}

impl SyncError {
    /// The backend and reason when the error says that backend is overloaded (`NO [LIMIT]`,
    /// `[INUSE]`, `[UNAVAILABLE]`, or a reply timeout): the pace of that backend backs off.
    pub fn overload(&self) -> Option<(Route, &str)> {
        match self {
            SyncError::Backend(BackendError::Timeout { backend, .. }) => {
                Some((*backend, "TIMEOUT"))
            }
            SyncError::Backend(BackendError::Refused { backend, code, .. })
                if client::is_overload(code) =>
            {
                Some((*backend, code.as_str()))
            }
            _ => None,
        }
    }

    /// Whether a backend or the configuration could not be used at all (the CLI's exit 2),
    /// rather than the pass failing on the way.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            SyncError::Login(_)
                | SyncError::Config(_)
                | SyncError::Backend(BackendError::Io { .. } | BackendError::Timeout { .. })
        )
    }

    /// Whether retrying later may succeed (overload, lock contention, network trouble).
    pub fn retryable(&self) -> bool {
        match self {
            SyncError::Backend(e) => match e {
                BackendError::Connect { .. }
                | BackendError::Io { .. }
                | BackendError::Timeout { .. } => true,
                BackendError::Refused { code, .. } => {
                    client::is_overload(code) || code == "SERVERBUG"
                }
                BackendError::Protocol { .. } | BackendError::AuthFailed { .. } => false,
            },
            SyncError::Login(e) => matches!(
                e,
                BackendError::Connect { .. }
                    | BackendError::Timeout { .. }
                    | BackendError::Io { .. }
                    | BackendError::Refused { .. }
            ),
            SyncError::Store(_) => true,
            SyncError::Config(_) | SyncError::NoCredentials { .. } => false,
        }
    }
}

/// Live counters of a running pass, read by the CLI's progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages to copy in this pass (grows as folders are examined).
    pub messages_total: AtomicU64,
    /// Messages copied in this pass.
    pub messages_done: AtomicU64,
    /// Bytes to copy in this pass.
    pub bytes_total: AtomicU64,
    /// Bytes copied in this pass.
    pub bytes_done: AtomicU64,
    /// The folder being worked on.
    pub folder: Mutex<String>,
}

impl Progress {
    fn set_folder(&self, name: &str) {
        if let Ok(mut f) = self.folder.lock() {
            name.clone_into(&mut f);
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    /// Folders mapped.
    pub folders: usize,
    /// Folders examined because something changed.
    pub folders_changed: usize,
    /// Messages appended to the target.
    pub appended: u64,
    /// Bytes appended.
    pub appended_bytes: u64,
    /// Appends found in the target after a crash and recorded instead of repeated.
    pub recovered: u64,
    /// Messages matched by content after a UIDVALIDITY change.
    pub rematched: u64,
    /// Target messages whose flags were updated.
    pub flag_updates: u64,
    /// Target messages expunged because they were expunged on legacy.
    pub expunged: u64,
    /// Messages that could not be copied (too large, refused by the target).
    pub failed: u64,
    /// Target folders created.
    pub created: usize,
    /// Target folders renamed.
    pub renamed: usize,
    /// Target folders deleted.
    pub deleted: usize,
    /// Subscription changes on the target.
    pub subscriptions: usize,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

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
    pub captured: Arc<credentials::Captured>,
    /// Connections per backend (each pass holds one on each side), adaptively limited.
    legacy_pace: Arc<Limiter>,
    new_pace: Arc<Limiter>,
    /// Buffers that large bodies are read into, shared by every copy of this engine.
    bodies: Arc<bodies::BodyPool>,
}

impl Engine {
    /// Builds the engine from the config. Logging in as a user needs each backend's master
    /// user, or that user's password captured at a proxy login (`[sync] capture_credentials`).
    pub fn from_config(cfg: &Config, store: Arc<dyn StateStore>) -> Result<Engine, SyncError> {
        crate::net::tls::install_provider();
        let rules = Rules::from_config(&cfg.sync).map_err(|e| SyncError::Config(e.to_string()))?;
        Ok(Engine {
            legacy: Endpoint::from_config(cfg, Route::Legacy)?,
            new: Endpoint::from_config(cfg, Route::New)?,
            store,
            rules,
            throttle: Arc::new(Throttle::new(cfg.sync.bytes_per_second)),
            captured: Arc::new(credentials::Captured::new(
                cfg.sync.capture_credentials,
                Duration::from_secs(cfg.sync.credentials_ttl_secs),
            )),
            legacy_pace: Limiter::with_config(Route::Legacy, pace_config(cfg)),
            new_pace: Limiter::with_config(Route::New, pace_config(cfg)),
            bodies: Arc::new(bodies::BodyPool::new(copy::IDLE_BODIES)),
        })
    }

    /// The adaptive pace of a backend.
    pub fn pace(&self, route: Route) -> &Arc<Limiter> {
        match route {
            Route::Legacy => &self.legacy_pace,
            Route::New => &self.new_pace,
        }
    }

    /// The pool large bodies are read into.
    pub(crate) fn bodies(&self) -> &Arc<bodies::BodyPool> {
        &self.bodies
    }

    /// Runs one pass for `email` and records its outcome in the store.
    pub async fn pass(
        &self,
        email: &str,
        progress: Option<Arc<Progress>>,
    ) -> Result<PassReport, SyncError> {
        let started = Instant::now();
        let progress = progress.unwrap_or_default();
        // Every line the pass logs (the trace-level command timeline too) names the user.
        let span = tracing::debug_span!("pass", user = %email);
        let result = self.pass_inner(email, &progress).instrument(span).await;
        let ms = started.elapsed().as_millis() as i64;
        match &result {
            Ok(r) => {
                self.store
                    .record_pass(email, ms, r.appended as i64, None)
                    .await?;
                info!(user = %email, appended = r.appended, changed = r.folders_changed, ms, "sync pass done");
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

    async fn pass_inner(&self, email: &str, progress: &Progress) -> Result<PassReport, SyncError> {
        let _l = self.legacy_pace.acquire().await;
        let _n = self.new_pace.acquire().await;
        // Users' own passwords only where a backend has no master user.
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
        let (mut src, mut tgt) = logins?;
        let result = self.run(email, &mut src, &mut tgt, progress).await;
        tokio::join!(src.logout(), tgt.logout());
        result
    }

    async fn run(
        &self,
        email: &str,
        src: &mut Client,
        tgt: &mut Client,
        progress: &Progress,
    ) -> Result<PassReport, SyncError> {
        let mut report = PassReport::default();
        let (src_list, mut tgt_list) = tokio::try_join!(src.list(), tgt.list())?;
        let src_sep = separator(&src_list);
        let tgt_sep = separator(&tgt_list);
        let source: Vec<Folder> = src_list
            .iter()
            .map(|e| Folder::from_list(e, src_sep))
            .filter(|f| f.selectable)
            .collect();
        let mut target: Vec<Folder> = tgt_list
            .iter()
            .map(|e| Folder::from_list(e, tgt_sep))
            .collect();
        let mapper = Mapper::new(&source, &target, tgt_sep, self.rules.clone());
        let mapped: Vec<(&Folder, String)> = mapper
            .map_all(&source)
            .into_iter()
            .map(|(f, p)| (f, encode_path(&p, tgt_sep)))
            .collect();
        report.folders = mapped.len();
        let mut states: HashMap<String, FolderState> = self
            .store
            .sync_folders(email)
            .await?
            .into_iter()
            .map(|s| (s.source_name.clone(), s))
            .collect();

        // Folders gone from legacy: renamed (same UIDVALIDITY under a new name) or deleted.
        let gone: Vec<FolderState> = states
            .values()
            .filter(|s| !source.iter().any(|f| f.raw == s.source_name))
            .cloned()
            .collect();
        if !gone.is_empty() {
            let new_names: Vec<String> = mapped
                .iter()
                .filter(|(f, _)| !states.contains_key(&f.raw))
                .map(|(f, _)| f.raw.clone())
                .collect();
            let fresh = src.status_many(&new_names).await?;
            let mut gone = gone;
            // Parents first: renaming a parent on the target moves its children along.
            gone.sort_by_key(|s| s.target_name.len());
            for old in gone {
                let renamed_to = new_names
                    .iter()
                    .zip(&fresh)
                    .find(|(_, st)| st.is_some_and(|st| st.uidvalidity == old.source_uidvalidity))
                    .map(|(n, _)| n.clone());
                let target_exists =
                    |name: &str, list: &[ListEntry]| list.iter().any(|e| e.name == name);
                match renamed_to {
                    Some(new_src) => {
                        let Some((_, new_tgt)) = mapped.iter().find(|(f, _)| f.raw == new_src)
                        else {
                            continue;
                        };
                        if target_exists(&old.target_name, &tgt_list)
                            && !target_exists(new_tgt, &tgt_list)
                        {
                            tgt.command(
                                "RENAME",
                                &format!(
                                    "RENAME {} {}",
                                    proto::quote(&old.target_name),
                                    proto::quote(new_tgt)
                                ),
                            )
                            .await?;
                            tgt_list = tgt.list().await?;
                            report.renamed += 1;
                        }
                        info!(user = %email, from = %old.source_name, to = %new_src, "folder renamed on legacy");
                        self.store
                            .rename_sync_folder(email, &old.source_name, &new_src)
                            .await?;
                        let mut st = old.clone();
                        st.source_name = new_src.clone();
                        st.target_name = new_tgt.clone();
                        self.store.put_sync_folder(&st).await?;
                        states.remove(&old.source_name);
                        states.insert(new_src, st);
                    }
                    None => {
                        let protected = old.target_name.eq_ignore_ascii_case("INBOX")
                            || target
                                .iter()
                                .any(|t| t.raw == old.target_name && t.role.is_some());
                        if !protected && target_exists(&old.target_name, &tgt_list) {
                            tgt.command(
                                "DELETE",
                                &format!("DELETE {}", proto::quote(&old.target_name)),
                            )
                            .await?;
                            report.deleted += 1;
                        }
                        info!(user = %email, folder = %old.source_name, "folder deleted on legacy");
                        self.store
                            .delete_sync_folder(email, &old.source_name)
                            .await?;
                        states.remove(&old.source_name);
                    }
                }
            }
            target = tgt_list
                .iter()
                .map(|e| Folder::from_list(e, tgt_sep))
                .collect();
        }

        // Create what the target lacks.
        for (_, name) in &mapped {
            if !target.iter().any(|t| &t.raw == name && t.selectable) {
                let r = tgt
                    .command("CREATE", &format!("CREATE {}", proto::quote(name)))
                    .await;
                match r {
                    Ok(_) => report.created += 1,
                    // A parent created implicitly by an earlier CREATE, or a race: fine.
                    Err(BackendError::Refused { ref code, .. }) if code == "ALREADYEXISTS" => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }

        // Subscriptions follow legacy for every mapped folder. A server may subscribe what it
        // creates, so its list is read again after a CREATE.
        if report.created > 0 {
            tgt_list = tgt.list().await?;
        }
        // STATUS, pipelined, to find the folders that changed, on both sides at once; new's
        // subscriptions are set meanwhile. On new, folders new to the pass are asked for too:
        // their first STATUS (an index each for a fresh user) overlaps legacy's instead of
        // being a round of its own at the end, when new would have nothing else to do.
        let src_names: Vec<String> = mapped.iter().map(|(f, _)| f.raw.clone()).collect();
        let tgt_names: Vec<String> = mapped.iter().map(|(_, t)| t.clone()).collect();
        let (src_status, tgt_status) = tokio::try_join!(
            async { Ok::<_, SyncError>(src.status_many(&src_names).await?) },
            async {
                let st = tgt.status_many(&tgt_names).await?;
                report.subscriptions += follow_subscriptions(tgt, &mapped, &tgt_list).await?;
                Ok(st)
            }
        )?;
        let condstore = src.has("CONDSTORE");
        // Folders to visit, with the messages each may have to copy; folders new to the pass
        // and empty on legacy, whose state STATUS may give in full.
        let mut visits: Vec<(usize, u32)> = Vec::new();
        let mut empty_on_legacy: Vec<usize> = Vec::new();
        for (i, (folder, tname)) in mapped.iter().enumerate() {
            let Some(ss) = src_status[i] else {
                vanished(email, folder);
                continue;
            };
            match states.get(&folder.raw) {
                Some(s) => {
                    let Some(ts) = tgt_status[i] else {
                        vanished(email, folder);
                        continue;
                    };
                    if unchanged(s, &ss, &ts, tname, condstore) {
                        continue;
                    }
                    visits.push((i, ss.uidnext.saturating_sub(s.source_uidnext)));
                }
                // Counted once new's STATUS has answered for it.
                None if ss.messages == 0 => {
                    empty_on_legacy.push(i);
                    continue;
                }
                None => visits.push((i, ss.messages)),
            }
            report.folders_changed += 1;
        }
        // The largest copy first: the user's pass then ends with small folders instead of
        // one long copy started late, which keeps the target's connections evenly busy.
        visits.sort_by_key(|&(_, todo)| std::cmp::Reverse(todo));
        for (i, _) in visits {
            self.visit(
                email,
                src,
                tgt,
                &mapped[i],
                states.get(&mapped[i].0.raw),
                &mut report,
                progress,
            )
            .await?;
        }
        // Most special-use and archive folders of a fresh user are empty on both sides: their
        // state is written from STATUS, without SELECT round trips, in one transaction (one
        // at a time, before the copies, they queued at the store behind other users' commits).
        let mut empty: Vec<FolderState> = Vec::new();
        for &i in &empty_on_legacy {
            let (folder, tname) = &mapped[i];
            let (Some(ss), Some(ts)) = (src_status[i], tgt_status[i]) else {
                vanished(email, folder);
                continue;
            };
            report.folders_changed += 1;
            if ts.messages > 0 {
                // Mail on new already (delivered there, or an earlier run's copy).
                self.visit(email, src, tgt, &mapped[i], None, &mut report, progress)
                    .await?;
                continue;
            }
            empty.push(FolderState {
                highest_modseq: ss.highestmodseq.unwrap_or(0),
                source_uidnext: ss.uidnext,
                ..FolderState::fresh(
                    email,
                    &folder.raw,
                    tname,
                    ss.uidvalidity,
                    ts.uidvalidity,
                    folder.subscribed,
                )
            });
        }
        self.store.put_sync_folders(&empty).await?;

        Ok(report)
    }

    /// Brings one folder up to date (`incremental::sync_folder`), shown in the progress.
    #[allow(clippy::too_many_arguments)]
    async fn visit(
        &self,
        email: &str,
        src: &mut Client,
        tgt: &mut Client,
        (folder, tname): &(&Folder, String),
        state: Option<&FolderState>,
        report: &mut PassReport,
        progress: &Progress,
    ) -> Result<(), SyncError> {
        progress.set_folder(&folder.raw);
        let r = incremental::sync_folder(
            self,
            email,
            src,
            tgt,
            folder,
            tname,
            state.cloned(),
            report,
            progress,
        )
        .await;
        match r {
            // The target folder does not exist although CREATE did not fail (a `\Noselect`
            // name the server keeps, or one deleted meanwhile): the other folders go on, and
            // the next pass tries again.
            Err(SyncError::Backend(BackendError::Refused {
                backend: Route::New,
                command: "SELECT",
                ref code,
                ref text,
            })) if matches!(code.as_str(), "NONEXISTENT" | "TRYCREATE") => {
                warn!(user = %email, folder = %folder.raw, target = %tname, error = %text, "target folder missing, not copied this pass");
                Ok(())
            }
            r => r,
        }
    }
}

/// A folder listed at the start of the pass that STATUS no longer finds on one side.
fn vanished(email: &str, folder: &Folder) {
    debug!(user = %email, folder = %folder.raw, "folder vanished during the pass");
}

/// Subscribes or unsubscribes on new each mapped folder whose subscription differs from legacy's
/// (`tgt_list` is new's current list); returns how many were changed.
async fn follow_subscriptions(
    tgt: &mut Client,
    mapped: &[(&Folder, String)],
    tgt_list: &[ListEntry],
) -> Result<usize, SyncError> {
    let mut changed = 0;
    for (folder, tname) in mapped {
        let on_target = tgt_list.iter().any(|e| &e.name == tname && e.subscribed);
        if folder.subscribed != on_target {
            let verb = if folder.subscribed {
                "SUBSCRIBE"
            } else {
                "UNSUBSCRIBE"
            };
            tgt.command(verb, &format!("{verb} {}", proto::quote(tname)))
                .await?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Whether nothing changed on either side since the state was recorded.
fn unchanged(
    s: &FolderState,
    src: &MailboxStatus,
    tgt: &MailboxStatus,
    tname: &str,
    condstore: bool,
) -> bool {
    s.target_name == tname
        && s.source_uidvalidity == src.uidvalidity
        && s.source_uidnext == src.uidnext
        && s.source_messages == src.messages
        && s.target_uidvalidity == tgt.uidvalidity
        // Without CONDSTORE flag changes are invisible to STATUS: always compare.
        && condstore
        && src.highestmodseq.is_some_and(|m| m == s.highest_modseq)
}

/// Adaptive pacing of one backend from `[sync]`.
fn pace_config(cfg: &Config) -> pace::PaceConfig {
    pace::PaceConfig::new(cfg.sync.per_backend.max(1))
        .with_floor(Duration::from_millis(cfg.sync.latency_floor_ms))
}

fn separator(list: &[ListEntry]) -> char {
    list.iter().find_map(|e| e.delimiter).unwrap_or('/')
}

/// Prefix of the content hashes recorded in the state store (BLAKE3). Rows written before it
/// carry a bare hex SHA-256, which `recover` still matches.
pub const HASH_PREFIX: &str = "b3:";

/// The content hash recorded with each copied message, by which a crashed pass finds its
/// unacknowledged APPENDs and a UIDVALIDITY change is re-matched. BLAKE3, not SHA-256: it is
/// as collision-resistant (senders choose message content) and three times cheaper on large
/// messages, where hashing was half of the engine's own CPU.
pub fn content_hash(body: &[u8]) -> String {
    hash_text(&blake3::hash(body))
}

/// How a content hash (of a body taken whole or in pieces) is stored.
pub fn hash_text(hash: &blake3::Hash) -> String {
    let mut s = String::with_capacity(HASH_PREFIX.len() + 64);
    s.push_str(HASH_PREFIX);
    s.push_str(hash.to_hex().as_str());
    s
}

/// Hex SHA-256 of a message: what `verify` compares (and what the store held before BLAKE3).
pub fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    s
}

/// Runs a pass, retrying transient failures (`NO [LIMIT]`, `[INUSE]`, `[UNAVAILABLE]`,
/// timeouts, network errors) with exponential backoff, at most `attempts` times.
pub async fn pass_with_retry(
    engine: &Engine,
    email: &str,
    progress: Option<Arc<Progress>>,
    attempts: u32,
) -> Result<PassReport, SyncError> {
    let mut delay = Duration::from_millis(500);
    let mut n = 0;
    loop {
        n += 1;
        match engine.pass(email, progress.clone()).await {
            Err(e) if e.retryable() && n < attempts => {
                warn!(user = %email, error = %e, retry_in_ms = delay.as_millis() as u64, "sync pass will be retried");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            other => return other,
        }
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
