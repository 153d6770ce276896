//! Schema versions, applied in order once each; SQL valid for both SQLite and PostgreSQL.

use sqlx::AnyPool;

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
];

/// Key of the PostgreSQL advisory lock serialising migrations (any constant unique to us).
const MIGRATION_LOCK: i64 = 0x6d66_7273_6368_656d; // "mfrschem"

/// Brings the schema up to date. Safe when several processes start at once on one database
/// (nodes sharing a PostgreSQL store): on PostgreSQL each version is applied under an advisory
/// transaction lock and the current version is re-read under it, so a version is applied once
/// and concurrent `CREATE TABLE IF NOT EXISTS` cannot collide in the catalog.
pub async fn run(pool: &AnyPool, postgres: bool) -> Result<(), sqlx::Error> {
    loop {
        let mut tx = pool.begin().await?;
        if postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        let (current,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                .fetch_one(&mut *tx)
                .await?;
        let current = usize::try_from(current).unwrap_or(0);
        let Some(steps) = MIGRATIONS.get(current) else {
            tx.commit().await?;
            return Ok(());
        };
        for step in *steps {
            sqlx::query(*step).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
            .bind((current + 1) as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
}
