//! Schema versions, applied in order once each; SQL valid for both SQLite and PostgreSQL.

use sqlx::AnyPool;

use super::{Open, StoreError};

/// Each entry is one schema version; never edit a released entry, append a new one.
const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE IF NOT EXISTS directory_routes (
        email TEXT PRIMARY KEY,
        route TEXT NOT NULL,
        updated_at BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS users (
        email TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        wave TEXT,
        last_error TEXT,
        updated_at BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS events (
        at BIGINT NOT NULL,
        email TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        detail TEXT)",
        "CREATE INDEX IF NOT EXISTS events_email ON events (email, at)",
    ],
    &[
        // Sync engine: one row per legacy folder of a user (keyed by its wire name).
        "CREATE TABLE IF NOT EXISTS sync_folders (
        email TEXT NOT NULL,
        source_name TEXT NOT NULL,
        target_name TEXT NOT NULL,
        source_uidvalidity BIGINT NOT NULL,
        target_uidvalidity BIGINT NOT NULL,
        last_uid BIGINT NOT NULL,
        highest_modseq BIGINT NOT NULL,
        source_uidnext BIGINT NOT NULL,
        source_messages BIGINT NOT NULL,
        source_bytes BIGINT NOT NULL,
        subscribed BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (email, source_name))",
        // Legacy UID -> new UID; target_uid NULL: APPEND sent but not yet acknowledged
        // (crash recovery matches these by content hash); 0: not copyable (recorded error).
        "CREATE TABLE IF NOT EXISTS sync_uids (
        email TEXT NOT NULL,
        source_name TEXT NOT NULL,
        source_uid BIGINT NOT NULL,
        target_uid BIGINT,
        hash TEXT NOT NULL,
        size BIGINT NOT NULL,
        PRIMARY KEY (email, source_name, source_uid))",
        "CREATE TABLE IF NOT EXISTS sync_passes (
        email TEXT PRIMARY KEY,
        passes BIGINT NOT NULL,
        last_pass_at BIGINT,
        last_pass_ms BIGINT,
        last_appended BIGINT,
        last_error TEXT,
        updated_at BIGINT NOT NULL)",
    ],
    &[
        // When a pending row was written: an APPEND sent by a process that was killed can still be
        // committed by the server a moment later, so recovery waits this long before giving up.
        "ALTER TABLE sync_uids ADD COLUMN pending_at BIGINT",
    ],
    &[
        // One pass per user at a time, across processes and nodes (`leases.rs`).
        "CREATE TABLE IF NOT EXISTS sync_leases (
        email TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL)",
        // What a pass left alone and the operator should look at, per folder (`user show`).
        "CREATE TABLE IF NOT EXISTS sync_warnings (
        email TEXT NOT NULL,
        folder TEXT NOT NULL,
        warning TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (email, folder))",
    ],
    &[
        // The audit log: who asked, what came of it, and a clock fine enough to order one
        // cutover's events.
        "ALTER TABLE events ADD COLUMN at_ms BIGINT",
        "ALTER TABLE events ADD COLUMN actor TEXT",
        "ALTER TABLE events ADD COLUMN outcome TEXT",
        // The verification gate's evidence of each user's last cutover (JSON).
        "CREATE TABLE IF NOT EXISTS cutover_evidence (
        email TEXT PRIMARY KEY,
        at BIGINT NOT NULL,
        clean BIGINT NOT NULL,
        evidence TEXT NOT NULL)",
        // Rollback: a message of new being appended to legacy, not yet acknowledged (a retry
        // matches it on legacy by content hash instead of appending it twice).
        "CREATE TABLE IF NOT EXISTS reverse_pending (
        email TEXT NOT NULL,
        source_name TEXT NOT NULL,
        target_uid BIGINT NOT NULL,
        hash TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (email, source_name, target_uid))",
        "CREATE INDEX IF NOT EXISTS users_wave ON users (wave, state)",
        // Waves: when each was imported, migrated and cut over (throughput and ETA).
        "CREATE TABLE IF NOT EXISTS waves (
        name TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        migrate_at BIGINT,
        cutover_at BIGINT)",
    ],
];

/// Key of the PostgreSQL advisory lock serialising migrations (any constant unique to us).
const MIGRATION_LOCK: i64 = 0x6d66_7273_6368_656d; // "mfrschem"

/// Brings the schema up to date. Safe when several processes start at once on one database:
/// each version is applied in a write transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL:
/// under an advisory transaction lock) that re-reads the current version, so a version is
/// applied once and concurrent `CREATE TABLE IF NOT EXISTS` cannot collide in the catalog.
/// With `Open::Existing` a database without our schema is refused, as is, always, a schema
/// newer than this binary knows.
pub async fn run(pool: &AnyPool, postgres: bool, mode: Open, name: &str) -> Result<(), StoreError> {
    // A read first: a store that is up to date needs no write lock, which another process
    // (a sync pass, an operator's query) may be holding.
    let current = version(&mut *pool.acquire().await?, postgres).await?;
    check(current, mode, name)?;
    if current == KNOWN {
        return Ok(());
    }
    loop {
        let mut tx = if postgres {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await?;
            tx
        } else {
            pool.begin_with("BEGIN IMMEDIATE").await?
        };
        // Again under the lock: another process may have upgraded meanwhile.
        let current = version(&mut tx, postgres).await?;
        check(current, mode, name)?;
        let Some(steps) = MIGRATIONS.get(current as usize) else {
            tx.commit().await?;
            return Ok(());
        };
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        for step in *steps {
            sqlx::query(*step).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
            .bind(current + 1)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
}

/// Refuses a database without our schema where one must exist, and always one newer than
/// this binary knows.
fn check(current: i64, mode: Open, name: &str) -> Result<(), StoreError> {
    if current == 0 && mode == Open::Existing {
        return Err(StoreError::Missing { path: name.into() });
    }
    if current > KNOWN {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: KNOWN,
        });
    }
    Ok(())
}

/// The schema version of the database (0: none of ours).
pub async fn version(conn: &mut sqlx::AnyConnection, postgres: bool) -> Result<i64, StoreError> {
    let table = if postgres {
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_name = 'schema_version' AND table_schema = current_schema()"
    } else {
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    };
    let (tables,): (i64,) = sqlx::query_as(table).fetch_one(&mut *conn).await?;
    if tables == 0 {
        return Ok(0);
    }
    let (v,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *conn)
        .await?;
    Ok(v)
}

/// The newest schema version this binary knows.
pub const KNOWN: i64 = MIGRATIONS.len() as i64;
