//! The state store: users' migration state, the audit log of transitions, the sync engine's
//! state, and the embedded directory's table. Consumers hold an `Arc<dyn StateStore>`;
//! [`SqlStore`] implements it with one SQL dialect through sqlx's `Any` driver: SQLite by
//! default, PostgreSQL when several nodes share the work.

mod intents;
pub mod leases;
mod migrations;
pub mod reverse;
pub mod sync;
pub mod users;
pub mod waves;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use self::leases::LeaseTaken;
use self::reverse::ReversePending;
use self::sync::{FolderState, SyncProgress, UidRow};
use self::waves::{Imported, WaveMark, WaveTimes};
pub use users::{Change, Event, StoreSummary, UserRecord, UserState};

/// Failures of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or a query failed.
    #[error("state store: {0}")]
    Db(#[from] sqlx::Error),
    /// The URL in `[state] url` is not usable.
    #[error("state store url {0:?}: {1}")]
    Url(String, String),
    /// A stored value is not one this version understands.
    #[error("state store holds an unknown value {0:?}")]
    BadValue(String),
    /// The grouped commit that carried this write failed (the error of the writer that ran it).
    #[error("state store: {0}")]
    Grouped(String),
    /// A command that must not create a store found none (only `serve` creates one).
    #[error(
        "state store {path} does not exist (or holds no mailferry schema); only `mailferry \
         serve` creates one (a relative sqlite:// path is relative to the config file)"
    )]
    Missing {
        /// The SQLite file, or the database URL without its password.
        path: String,
    },
    /// A state change found the user in a state it does not apply to (nothing was written).
    #[error("the user is in state {found}")]
    Conflict {
        /// The user's state.
        found: UserState,
    },
    /// The store was written by a newer mailferry: this binary must not touch it.
    #[error(
        "state store schema version {found} is newer than this mailferry knows ({known}); \
         use a newer mailferry"
    )]
    SchemaTooNew {
        /// The store's schema version.
        found: i64,
        /// The newest this binary knows.
        known: i64,
    },
}

/// Whether opening a store may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Create a missing store and its schema (`serve`; logged when it happens).
    CreateIfMissing,
    /// Only an existing mailferry store: a lost or mistyped path must not silently start an
    /// empty one, which would send every migrated user back to legacy and copy them again.
    Existing,
}

/// How many times a write transaction is retried while SQLite stays locked by another
/// process beyond its busy timeout.
const LOCKED_RETRIES: u32 = 8;
/// How long a SQLite connection waits for another process's write lock before a retry.
const BUSY_TIMEOUT_MS: u32 = 5_000;

/// What a [`StateStore`] operation returns: a boxed future, so the trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Everything the proxy, the control plane and the sync engine keep in the state store.
/// Held as `Arc<dyn StateStore>`; [`SqlStore`] is the implementation.
pub trait StateStore: Send + Sync + 'static {
    /// The record of `email`, if the store has one.
    fn user<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Option<UserRecord>>;

    /// The state of `email`; users the store does not know are `legacy`.
    fn user_state<'a>(&'a self, email: &'a str) -> StoreFuture<'a, UserState>;

    /// Records a transition and its audit event; refused (`Conflict`) when `change.from` is
    /// set and the user is in none of its states.
    fn change_state<'a>(&'a self, email: &'a str, change: &'a Change<'a>) -> StoreFuture<'a, ()>;

    /// Records an audit event that changes no state.
    fn add_event<'a>(&'a self, email: &'a str, change: &'a Change<'a>) -> StoreFuture<'a, ()>;

    /// `email`'s audit log, oldest first.
    fn events<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Vec<Event>>;

    /// Users in `state`, by address.
    fn users_in(&self, state: UserState) -> StoreFuture<'_, Vec<String>>;

    /// Keeps the evidence (JSON) of `email`'s last verification gate.
    fn put_evidence<'a>(
        &'a self,
        email: &'a str,
        clean: bool,
        evidence: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// The evidence (JSON) of `email`'s last verification gate, if any.
    fn evidence<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Option<String>>;

    /// Adds users (normalized address, wave) in one transaction (`waves.rs`).
    fn import_users<'a>(
        &'a self,
        users: &'a [(String, Option<String>)],
    ) -> StoreFuture<'a, Imported>;

    /// The users of `wave`, by address.
    fn wave_members<'a>(&'a self, wave: &'a str) -> StoreFuture<'a, Vec<UserRecord>>;

    /// Every wave with its number of users.
    fn waves(&self) -> StoreFuture<'_, Vec<(String, i64)>>;

    /// A wave's timestamps, if the wave exists.
    fn wave_times<'a>(&'a self, wave: &'a str) -> StoreFuture<'a, Option<WaveTimes>>;

    /// Records that `wave migrate` or `wave cutover` ran now.
    fn mark_wave<'a>(&'a self, wave: &'a str, mark: WaveMark) -> StoreFuture<'a, ()>;

    /// Users in state `syncing`, for the scheduler.
    fn syncing_users(&self) -> StoreFuture<'_, Vec<String>>;

    /// All folder states of `email`.
    fn sync_folders<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Vec<FolderState>>;

    /// Creates or replaces a folder state.
    fn put_sync_folder<'a>(&'a self, f: &'a FolderState) -> StoreFuture<'a, ()>;

    /// Creates or replaces several folder states in one transaction.
    fn put_sync_folders<'a>(&'a self, folders: &'a [FolderState]) -> StoreFuture<'a, ()>;

    /// Forgets a folder and its UID map (the legacy folder is gone).
    fn delete_sync_folder<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// Moves a folder's state and UID map to a new legacy name (renamed on legacy).
    fn rename_sync_folder<'a>(
        &'a self,
        email: &'a str,
        from: &'a str,
        to: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// The UID map of a folder, in legacy UID order.
    fn uid_map<'a>(&'a self, email: &'a str, source_name: &'a str) -> StoreFuture<'a, Vec<UidRow>>;

    /// Records messages about to be appended (target UID unknown), before new can hold them whole.
    fn add_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        rows: &'a [UidRow],
    ) -> StoreFuture<'a, ()>;

    /// Creates the state of a folder new to the sync and records its first pending rows, in
    /// one transaction.
    fn start_folder<'a>(&'a self, f: &'a FolderState, rows: &'a [UidRow]) -> StoreFuture<'a, ()>;

    /// Records acknowledged APPENDs (legacy UID → new UID) and advances `last_uid`.
    fn confirm_uids<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        pairs: &'a [(u32, u32)],
    ) -> StoreFuture<'a, ()>;

    /// Forgets UID map rows (expunged on legacy, or never appended).
    fn delete_uids<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        uids: &'a [u32],
    ) -> StoreFuture<'a, ()>;

    /// Replaces a folder's whole UID map (after a UIDVALIDITY change) in one transaction.
    fn replace_uid_map<'a>(
        &'a self,
        state: &'a FolderState,
        rows: &'a [UidRow],
    ) -> StoreFuture<'a, ()>;

    /// Records the end of a sync pass of `email`.
    fn record_pass<'a>(
        &'a self,
        email: &'a str,
        duration_ms: i64,
        appended: i64,
        error: Option<&'a str>,
    ) -> StoreFuture<'a, ()>;

    /// Sync progress of `email`, for `user show`.
    fn sync_progress<'a>(&'a self, email: &'a str) -> StoreFuture<'a, SyncProgress>;

    /// The schema version and the number of users per state, for `check-config`.
    fn summary(&self) -> StoreFuture<'_, StoreSummary>;

    /// Takes `email`'s sync lease for `holder` for `secs` (see `leases.rs`).
    fn take_lease<'a>(
        &'a self,
        email: &'a str,
        holder: &'a str,
        secs: i64,
    ) -> StoreFuture<'a, LeaseTaken>;

    /// Extends `holder`'s lease of `email`; false if it is no longer theirs.
    fn renew_lease<'a>(
        &'a self,
        email: &'a str,
        holder: &'a str,
        secs: i64,
    ) -> StoreFuture<'a, bool>;

    /// Gives `holder`'s lease of `email` up.
    fn release_lease<'a>(&'a self, email: &'a str, holder: &'a str) -> StoreFuture<'a, ()>;

    /// The leases whose holder starts with `prefix`, as (user, holder).
    fn leases_held_by<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, String)>>;

    /// Records (or replaces) a warning about one folder of `email`, shown by `user show`.
    fn put_sync_warning<'a>(
        &'a self,
        email: &'a str,
        folder: &'a str,
        warning: &'a str,
    ) -> StoreFuture<'a, ()>;
    /// The rollback intents of one folder of `email` (see `reverse.rs`), in new UID order.
    fn reverse_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
    ) -> StoreFuture<'a, Vec<ReversePending>>;

    /// Records messages of new (new UID, content hash) about to be appended to legacy.
    fn add_reverse_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        rows: &'a [(u32, String)],
    ) -> StoreFuture<'a, ()>;

    /// Records the UID map rows of messages now on legacy and drops their rollback intents, in
    /// one transaction.
    fn confirm_reverse<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        rows: &'a [UidRow],
    ) -> StoreFuture<'a, ()>;

    /// Drops rollback intents whose message did not reach legacy.
    fn forget_reverse_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        target_uids: &'a [u32],
    ) -> StoreFuture<'a, ()>;
}

/// Opens and migrates the state store at `url` (`sqlite://` or `postgres://`), ready to
/// share; `mode` says whether a missing one may be created.
pub async fn open(url: &str, mode: Open) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(Arc::new(SqlStore::open(url, mode).await?))
}

/// The SQL state store: one sqlx `Any` implementation serving both SQLite (the default) and
/// PostgreSQL, over a migrated connection pool.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    /// SQLite: our own writers' turns and group commit (see `intents`). None for PostgreSQL
    /// (row locks suffice).
    writers: Option<Arc<intents::Writers>>,
    /// SQLite file: connections whose commits are not fsynced (`synchronous=NORMAL`), for the
    /// sync engine's progress records, which a lost commit only makes redo (a crash of the
    /// process loses nothing either way; a power loss may roll back the latest of these).
    /// Everything a copy's safety rests on (its intents) and all routing state stay on
    /// `pool`, fsynced at each commit; in WAL mode such a commit also makes every earlier
    /// one durable.
    relaxed: Option<AnyPool>,
}

impl SqlStore {
    /// Opens and migrates the database at `url`; `mode` says whether a missing one may be
    /// created.
    pub async fn open(url: &str, mode: Open) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let prepared = prepare_url(url, mode)?;
        let url = prepared.url;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 10 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        sqlite_pragmas(conn, "FULL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        migrations::run(&pool, !sqlite, mode, &redacted(&url)).await?;
        if prepared.created {
            tracing::info!(path = %redacted(&url), "created the state store");
        }
        // An in-memory database is one per connection: it has no second pool.
        let relaxed = if sqlite && !url.contains(":memory:") {
            let pool = AnyPoolOptions::new()
                .max_connections(2)
                .after_connect(|conn, _| Box::pin(sqlite_pragmas(conn, "NORMAL")))
                .connect(&url)
                .await?;
            Some(pool)
        } else {
            None
        };
        Ok(SqlStore {
            pool,
            writers: sqlite.then(Arc::default),
            relaxed,
        })
    }

    /// Where writes that may be lost in a power failure go (see `relaxed`).
    pub(crate) fn relaxed(&self) -> &AnyPool {
        self.relaxed.as_ref().unwrap_or(&self.pool)
    }

    /// Held for the length of a write transaction (see `writers`).
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.writers {
            Some(w) => Some(w.turn.lock().await),
            None => None,
        }
    }

    /// SQLite: where intents wait for a group commit.
    pub(crate) fn intent_queue(&self) -> Option<&intents::IntentQueue> {
        self.writers.as_ref().map(|w| &w.intents)
    }

    /// Begins a write transaction on `pool` (this store's `pool` or `relaxed`). On SQLite it
    /// is `BEGIN IMMEDIATE`, which takes the write lock up front: a deferred transaction that
    /// reads first gets `database is locked` at once, without waiting, when another process
    /// wrote meanwhile. A lock held beyond the busy timeout is waited for again, a few times.
    pub(crate) async fn begin_write(
        &self,
        pool: &AnyPool,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        if self.writers.is_none() {
            return Ok(pool.begin().await?);
        }
        let mut attempt = 0;
        loop {
            match pool.begin_with("BEGIN IMMEDIATE").await {
                Err(e) if is_locked(&e) && attempt < LOCKED_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, "state store locked by another process, waiting");
                }
                r => return Ok(r?),
            }
        }
    }

    /// Whether this is PostgreSQL (else SQLite).
    pub(crate) fn is_postgres(&self) -> bool {
        self.writers.is_none()
    }

    /// The pool, for modules that keep their own tables here (the embedded directory).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Each operation delegates to the inherent method of the same name (`users.rs`, `sync.rs`,
/// `leases.rs`, `reverse.rs`).
impl StateStore for SqlStore {
    fn user<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Option<UserRecord>> {
        Box::pin(SqlStore::user(self, email))
    }

    fn user_state<'a>(&'a self, email: &'a str) -> StoreFuture<'a, UserState> {
        Box::pin(SqlStore::user_state(self, email))
    }

    fn change_state<'a>(&'a self, email: &'a str, change: &'a Change<'a>) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::change_state(self, email, change))
    }

    fn add_event<'a>(&'a self, email: &'a str, change: &'a Change<'a>) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::add_event(self, email, change))
    }

    fn events<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Vec<Event>> {
        Box::pin(SqlStore::events(self, email))
    }

    fn users_in(&self, state: UserState) -> StoreFuture<'_, Vec<String>> {
        Box::pin(SqlStore::users_in(self, state))
    }

    fn put_evidence<'a>(
        &'a self,
        email: &'a str,
        clean: bool,
        evidence: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::put_evidence(self, email, clean, evidence))
    }

    fn evidence<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(SqlStore::evidence(self, email))
    }

    fn import_users<'a>(
        &'a self,
        users: &'a [(String, Option<String>)],
    ) -> StoreFuture<'a, Imported> {
        Box::pin(SqlStore::import_users(self, users))
    }

    fn wave_members<'a>(&'a self, wave: &'a str) -> StoreFuture<'a, Vec<UserRecord>> {
        Box::pin(SqlStore::wave_members(self, wave))
    }

    fn waves(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        Box::pin(SqlStore::waves(self))
    }

    fn wave_times<'a>(&'a self, wave: &'a str) -> StoreFuture<'a, Option<WaveTimes>> {
        Box::pin(SqlStore::wave_times(self, wave))
    }

    fn mark_wave<'a>(&'a self, wave: &'a str, mark: WaveMark) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::mark_wave(self, wave, mark))
    }

    fn syncing_users(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(SqlStore::syncing_users(self))
    }

    fn sync_folders<'a>(&'a self, email: &'a str) -> StoreFuture<'a, Vec<FolderState>> {
        Box::pin(SqlStore::sync_folders(self, email))
    }

    fn put_sync_folder<'a>(&'a self, f: &'a FolderState) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::put_sync_folder(self, f))
    }

    fn put_sync_folders<'a>(&'a self, folders: &'a [FolderState]) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::put_sync_folders(self, folders))
    }

    fn delete_sync_folder<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::delete_sync_folder(self, email, source_name))
    }

    fn rename_sync_folder<'a>(
        &'a self,
        email: &'a str,
        from: &'a str,
        to: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::rename_sync_folder(self, email, from, to))
    }

    fn uid_map<'a>(&'a self, email: &'a str, source_name: &'a str) -> StoreFuture<'a, Vec<UidRow>> {
        Box::pin(SqlStore::uid_map(self, email, source_name))
    }

    fn add_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        rows: &'a [UidRow],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::add_pending(self, email, source_name, rows))
    }

    fn start_folder<'a>(&'a self, f: &'a FolderState, rows: &'a [UidRow]) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::start_folder(self, f, rows))
    }

    fn confirm_uids<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        pairs: &'a [(u32, u32)],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::confirm_uids(self, email, source_name, pairs))
    }

    fn delete_uids<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        uids: &'a [u32],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::delete_uids(self, email, source_name, uids))
    }

    fn replace_uid_map<'a>(
        &'a self,
        state: &'a FolderState,
        rows: &'a [UidRow],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::replace_uid_map(self, state, rows))
    }

    fn record_pass<'a>(
        &'a self,
        email: &'a str,
        duration_ms: i64,
        appended: i64,
        error: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::record_pass(
            self,
            email,
            duration_ms,
            appended,
            error,
        ))
    }

    fn sync_progress<'a>(&'a self, email: &'a str) -> StoreFuture<'a, SyncProgress> {
        Box::pin(SqlStore::sync_progress(self, email))
    }

    fn summary(&self) -> StoreFuture<'_, StoreSummary> {
        Box::pin(SqlStore::summary(self))
    }

    fn take_lease<'a>(
        &'a self,
        email: &'a str,
        holder: &'a str,
        secs: i64,
    ) -> StoreFuture<'a, LeaseTaken> {
        Box::pin(SqlStore::take_lease(self, email, holder, secs))
    }

    fn renew_lease<'a>(
        &'a self,
        email: &'a str,
        holder: &'a str,
        secs: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(SqlStore::renew_lease(self, email, holder, secs))
    }

    fn leases_held_by<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, String)>> {
        Box::pin(SqlStore::leases_held_by(self, prefix))
    }

    fn release_lease<'a>(&'a self, email: &'a str, holder: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::release_lease(self, email, holder))
    }

    fn put_sync_warning<'a>(
        &'a self,
        email: &'a str,
        folder: &'a str,
        warning: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::put_sync_warning(self, email, folder, warning))
    }
    fn reverse_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
    ) -> StoreFuture<'a, Vec<ReversePending>> {
        Box::pin(SqlStore::reverse_pending(self, email, source_name))
    }

    fn add_reverse_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        rows: &'a [(u32, String)],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::add_reverse_pending(
            self,
            email,
            source_name,
            rows,
        ))
    }

    fn confirm_reverse<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        rows: &'a [UidRow],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::confirm_reverse(self, email, source_name, rows))
    }

    fn forget_reverse_pending<'a>(
        &'a self,
        email: &'a str,
        source_name: &'a str,
        target_uids: &'a [u32],
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::forget_reverse_pending(
            self,
            email,
            source_name,
            target_uids,
        ))
    }
}

/// Settings of every SQLite connection: WAL lets the proxy read routes while the CLI or sync
/// writes state; `synchronous` is FULL (fsync at each commit) or NORMAL (see `relaxed`).
async fn sqlite_pragmas(
    conn: &mut sqlx::AnyConnection,
    synchronous: &'static str,
) -> Result<(), sqlx::Error> {
    // The busy timeout first: switching to WAL itself needs the lock another process may hold.
    let busy = format!("PRAGMA busy_timeout={BUSY_TIMEOUT_MS}");
    sqlx::query(sqlx::AssertSqlSafe(busy))
        .execute(&mut *conn)
        .await?;
    sqlx::query("PRAGMA journal_mode=WAL")
        .execute(&mut *conn)
        .await?;
    let sync = format!("PRAGMA synchronous={synchronous}");
    sqlx::query(sqlx::AssertSqlSafe(sync))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether a database error says SQLite's lock is held by another connection.
fn is_locked(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code().as_deref() == Some("5") || d.message().contains("database is locked")
        }
        _ => false,
    }
}

/// A URL fit for logs and errors: a PostgreSQL password is hidden.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// A URL ready to connect, and whether opening it creates the SQLite file.
struct Prepared {
    url: String,
    created: bool,
}

/// A SQLite URL opens its file read-write, creating it (and its directory) only with
/// `Open::CreateIfMissing`; a PostgreSQL URL is used as it is.
fn prepare_url(url: &str, mode: Open) -> Result<Prepared, StoreError> {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Prepared {
                url: url.to_owned(),
                created: false,
            });
        }
        return Err(StoreError::Url(
            url.into(),
            "expected sqlite:// or postgres://".into(),
        ));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(StoreError::Url(url.into(), "missing database path".into()));
    }
    let memory = path == ":memory:";
    let missing = !memory && !Path::new(path).exists();
    if missing && mode == Open::Existing {
        return Err(StoreError::Missing { path: path.into() });
    }
    if missing {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Url(url.into(), format!("cannot create {}: {e}", dir.display()))
            })?;
        }
    }
    let open = if mode == Open::Existing { "rw" } else { "rwc" };
    let mut out = format!("sqlite://{path}?");
    if !query.is_empty() {
        out.push_str(query);
        out.push('&');
    }
    if !query.contains("mode=") {
        out.push_str("mode=");
        out.push_str(open);
    }
    Ok(Prepared {
        url: out.trim_end_matches(['?', '&']).to_owned(),
        created: missing,
    })
}

/// Seconds since the epoch, as stored in every timestamp column.
pub fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the epoch (audit events are ordered by it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_create_if_missing_creates_a_sqlite_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/x.db");
        let url = format!("sqlite://{}", path.display());
        assert!(matches!(
            prepare_url(&url, Open::Existing),
            Err(StoreError::Missing { .. })
        ));
        assert!(!path.parent().unwrap().exists(), "nothing created");
        let p = prepare_url(&url, Open::CreateIfMissing).unwrap();
        assert_eq!(p.url, format!("{url}?mode=rwc"));
        assert!(p.created);
        std::fs::write(&path, b"").unwrap();
        let p = prepare_url(&url, Open::Existing).unwrap();
        assert_eq!((p.url, p.created), (format!("{url}?mode=rw"), false));
        let p = prepare_url("sqlite://:memory:", Open::Existing).unwrap();
        assert_eq!(p.url, "sqlite://:memory:?mode=rw");
        assert!(prepare_url("mysql://x", Open::CreateIfMissing).is_err());
        assert_eq!(
            redacted("postgres://mf:secret@db:5432/mf"),
            "postgres://mf:***@db:5432/mf"
        );
    }

    #[tokio::test]
    async fn trait_object_round_trips_folder_state_and_uid_map() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let store: Arc<dyn StateStore> = open(&url, Open::CreateIfMissing).await.unwrap();
        let f = FolderState {
            email: "a@x".into(),
            source_name: "Archive".into(),
            target_name: "Archive".into(),
            source_uidvalidity: 3,
            target_uidvalidity: 4,
            last_uid: 0,
            highest_modseq: 17,
            source_uidnext: 6,
            source_messages: 2,
            source_bytes: 300,
            subscribed: false,
        };
        store.put_sync_folder(&f).await.unwrap();
        assert_eq!(store.sync_folders("a@x").await.unwrap(), vec![f.clone()]);
        let rows: Vec<UidRow> = [(2, Some(20)), (5, Some(0))]
            .into_iter()
            .map(|(u, t)| UidRow {
                source_uid: u,
                target_uid: t,
                hash: format!("h{u}"),
                size: 150,
                pending_at: Some(1),
            })
            .collect();
        store.replace_uid_map(&f, &rows).await.unwrap();
        assert_eq!(store.uid_map("a@x", "Archive").await.unwrap(), rows);
        assert_eq!(store.user_state("a@x").await.unwrap(), UserState::Legacy);
    }
}
