//! Sync engine state: per-folder progress, the legacy UID → new UID map with content hashes,
//! and per-user pass results. SQL valid for SQLite and PostgreSQL through sqlx `Any`.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{now, SqlStore, StoreError};

/// What the engine remembers of one legacy folder of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderState {
    /// User.
    pub email: String,
    /// Legacy folder name on the wire.
    pub source_name: String,
    /// New folder name on the wire.
    pub target_name: String,
    /// Legacy UIDVALIDITY the UID map refers to.
    pub source_uidvalidity: u32,
    /// New UIDVALIDITY the UID map refers to.
    pub target_uidvalidity: u32,
    /// Highest legacy UID copied (or recorded as not copyable).
    pub last_uid: u32,
    /// Legacy HIGHESTMODSEQ whose flag changes are applied (0: unknown).
    pub highest_modseq: u64,
    /// Legacy UIDNEXT seen at the end of the last pass (no change detection).
    pub source_uidnext: u32,
    /// Legacy message count at the end of the last pass.
    pub source_messages: u32,
    /// Legacy bytes at the end of the last pass (as far as known).
    pub source_bytes: u64,
    /// Whether the legacy folder was subscribed.
    pub subscribed: bool,
}

impl FolderState {
    /// The state of a folder no pass has copied from yet.
    pub fn fresh(
        email: &str,
        source_name: &str,
        target_name: &str,
        source_uidvalidity: u32,
        target_uidvalidity: u32,
        subscribed: bool,
    ) -> FolderState {
        FolderState {
            email: email.to_owned(),
            source_name: source_name.to_owned(),
            target_name: target_name.to_owned(),
            source_uidvalidity,
            target_uidvalidity,
            last_uid: 0,
            highest_modseq: 0,
            source_uidnext: 0,
            source_messages: 0,
            source_bytes: 0,
            subscribed,
        }
    }
}

/// One row of the UID map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidRow {
    /// Legacy UID.
    pub source_uid: u32,
    /// New UID; `None` while an APPEND is unacknowledged; `Some(0)` when not copyable.
    pub target_uid: Option<u32>,
    /// Content hash of the full message: `b3:` and hex BLAKE3 (bare hex SHA-256 when
    /// recorded by an older version).
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
    /// When the row was recorded as pending (seconds since the epoch).
    pub pending_at: Option<i64>,
}

impl UidRow {
    /// A pending row for a legacy message not yet fetched: no target UID, no hash yet.
    pub fn intent(source_uid: u32, size: u64) -> UidRow {
        UidRow {
            source_uid,
            target_uid: None,
            hash: String::new(),
            size,
            pending_at: None,
        }
    }
}

/// Per-user progress, as `user show` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncProgress {
    /// Folders known.
    pub folders: u64,
    /// Messages copied (mapped).
    pub messages_copied: u64,
    /// Messages on legacy at the last pass.
    pub messages_total: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Bytes on legacy at the last pass (as far as known).
    pub bytes_total: u64,
    /// Passes completed or failed.
    pub passes: u64,
    /// End of the last pass, seconds since the epoch.
    pub last_pass_at: Option<i64>,
    /// Duration of the last pass in milliseconds.
    pub last_pass_ms: Option<i64>,
    /// APPENDs performed by the last pass.
    pub last_appended: Option<i64>,
    /// Error of the last pass, if it failed.
    pub last_error: Option<String>,
    /// What passes left alone for the operator to look at (`folder: warning`).
    #[serde(default)]
    pub warnings: Vec<String>,
}

type MapRow = (i64, Option<i64>, String, i64, Option<i64>);
type PassRow = (i64, Option<i64>, Option<i64>, Option<i64>, Option<String>);
type FolderRow = (
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

impl SqlStore {
    /// All folder states of `email`.
    pub async fn sync_folders(&self, email: &str) -> Result<Vec<FolderState>, StoreError> {
        let rows: Vec<FolderRow> = sqlx::query_as(
            "SELECT email, source_name, target_name, source_uidvalidity, target_uidvalidity, last_uid, \
             highest_modseq, source_uidnext, source_messages, source_bytes, subscribed \
             FROM sync_folders WHERE email = $1",
        )
        .bind(email)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| FolderState {
                email: r.0,
                source_name: r.1,
                target_name: r.2,
                source_uidvalidity: r.3 as u32,
                target_uidvalidity: r.4 as u32,
                last_uid: r.5 as u32,
                highest_modseq: r.6 as u64,
                source_uidnext: r.7 as u32,
                source_messages: r.8 as u32,
                source_bytes: r.9 as u64,
                subscribed: r.10 != 0,
            })
            .collect())
    }

    /// Creates or replaces a folder state. Not fsynced on SQLite (`relaxed`): a lost update
    /// leaves the previous state, from which the next pass redoes the work.
    pub async fn put_sync_folder(&self, f: &FolderState) -> Result<(), StoreError> {
        self.put_sync_folders(std::slice::from_ref(f)).await
    }

    /// Creates or replaces folder states in one transaction (one turn at the writer's lock
    /// instead of one per folder).
    pub async fn put_sync_folders(&self, folders: &[FolderState]) -> Result<(), StoreError> {
        if folders.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.relaxed()).await?;
        for f in folders {
            upsert_folder(&mut tx, f).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets a folder and its UID map (the legacy folder is gone).
    pub async fn delete_sync_folder(
        &self,
        email: &str,
        source_name: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        sqlx::query("DELETE FROM sync_uids WHERE email = $1 AND source_name = $2")
            .bind(email)
            .bind(source_name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sync_folders WHERE email = $1 AND source_name = $2")
            .bind(email)
            .bind(source_name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves a folder's state and UID map to a new legacy name (renamed on legacy).
    pub async fn rename_sync_folder(
        &self,
        email: &str,
        from: &str,
        to: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        for table in ["sync_uids", "sync_folders"] {
            // The table name comes from the constant list above, never from input.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET source_name = $3 WHERE email = $1 AND source_name = $2"
            )))
            .bind(email)
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The UID map of a folder, in legacy UID order.
    pub async fn uid_map(&self, email: &str, source_name: &str) -> Result<Vec<UidRow>, StoreError> {
        let rows: Vec<MapRow> = sqlx::query_as(
            "SELECT source_uid, target_uid, hash, size, pending_at FROM sync_uids \
             WHERE email = $1 AND source_name = $2 ORDER BY source_uid",
        )
        .bind(email)
        .bind(source_name)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(s, t, hash, size, pending_at)| UidRow {
                source_uid: s as u32,
                target_uid: t.map(|t| t as u32),
                hash,
                size: size as u64,
                pending_at,
            })
            .collect())
    }

    /// Records messages about to be appended (target UID unknown), before new can hold them
    /// whole (the end of their APPEND waits for this): after a crash these rows say what to
    /// look for in the target. On SQLite, writers that queue meanwhile share one commit (see
    /// `intents`).
    pub async fn add_pending(
        &self,
        email: &str,
        source_name: &str,
        rows: &[UidRow],
    ) -> Result<(), StoreError> {
        self.intend(None, email, source_name, rows).await
    }

    /// Creates the state of a folder new to the sync together with its first pending rows:
    /// one commit, and never rows without their folder's state.
    pub async fn start_folder(&self, f: &FolderState, rows: &[UidRow]) -> Result<(), StoreError> {
        self.intend(Some(f), &f.email, &f.source_name, rows).await
    }

    async fn intend(
        &self,
        fresh: Option<&FolderState>,
        email: &str,
        source_name: &str,
        rows: &[UidRow],
    ) -> Result<(), StoreError> {
        let Some(queue) = self.intent_queue() else {
            let mut tx = self.begin_write(self.pool()).await?;
            write_intent(&mut tx, fresh, email, source_name, rows).await?;
            tx.commit().await?;
            return Ok(());
        };
        let mut queued = queue.push(fresh, email, source_name, rows);
        let _turn = self.write_turn().await;
        match queued.committed.try_recv() {
            Ok(result) => return result.map_err(StoreError::Grouped),
            Err(oneshot::error::TryRecvError::Empty) => {}
            // Taken by a writer that was cancelled before its commit: queued again.
            Err(oneshot::error::TryRecvError::Closed) => {
                queued = queue.push(fresh, email, source_name, rows);
            }
        }
        let batch = queue.take();
        let result = async {
            let mut tx = self.begin_write(self.pool()).await?;
            for i in &batch {
                write_intent(&mut tx, i.fresh.as_ref(), &i.email, &i.folder, &i.rows).await?;
            }
            tx.commit().await?;
            Ok::<(), StoreError>(())
        }
        .await;
        let shared = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
        for i in batch {
            let _ = i.done.send(shared.clone());
        }
        drop(queued);
        result
    }

    /// Records acknowledged APPENDs (legacy UID → new UID) and advances `last_uid`. Not fsynced
    /// on SQLite (`relaxed`): a lost confirmation leaves its rows pending, and the next pass
    /// matches them by content.
    pub async fn confirm_uids(
        &self,
        email: &str,
        source_name: &str,
        pairs: &[(u32, u32)],
    ) -> Result<(), StoreError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.relaxed()).await?;
        for (s, t) in pairs {
            sqlx::query("UPDATE sync_uids SET target_uid = $4 WHERE email = $1 AND source_name = $2 AND source_uid = $3")
                .bind(email)
                .bind(source_name)
                .bind(i64::from(*s))
                .bind(i64::from(*t))
                .execute(&mut *tx)
                .await?;
        }
        let max = pairs.iter().map(|p| p.0).max().unwrap_or(0);
        sqlx::query(
            "UPDATE sync_folders SET last_uid = $3, updated_at = $4 \
             WHERE email = $1 AND source_name = $2 AND last_uid < $3",
        )
        .bind(email)
        .bind(source_name)
        .bind(i64::from(max))
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets UID map rows (expunged on legacy, or never appended).
    pub async fn delete_uids(
        &self,
        email: &str,
        source_name: &str,
        uids: &[u32],
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        for u in uids {
            sqlx::query(
                "DELETE FROM sync_uids WHERE email = $1 AND source_name = $2 AND source_uid = $3",
            )
            .bind(email)
            .bind(source_name)
            .bind(i64::from(*u))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a folder's whole UID map (after a UIDVALIDITY change) in one transaction.
    pub async fn replace_uid_map(
        &self,
        state: &FolderState,
        rows: &[UidRow],
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        sqlx::query("DELETE FROM sync_uids WHERE email = $1 AND source_name = $2")
            .bind(&state.email)
            .bind(&state.source_name)
            .execute(&mut *tx)
            .await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO sync_uids (email, source_name, source_uid, target_uid, hash, size, pending_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&state.email)
            .bind(&state.source_name)
            .bind(i64::from(r.source_uid))
            .bind(r.target_uid.map(i64::from))
            .bind(&r.hash)
            .bind(r.size as i64)
            .bind(r.pending_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Count and bytes of the messages of `email` copied so far.
    async fn mapped_totals(&self, email: &str) -> Result<(i64, i64), StoreError> {
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT COUNT(*), CAST(SUM(size) AS BIGINT) FROM sync_uids WHERE email = $1 AND target_uid IS NOT NULL AND target_uid > 0",
        )
        .bind(email)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map_or((0, 0), |(c, s)| (c.unwrap_or(0), s.unwrap_or(0))))
    }

    /// Records the end of a pass (not fsynced on SQLite: statistics only).
    pub async fn record_pass(
        &self,
        email: &str,
        duration_ms: i64,
        appended: i64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let at = now();
        let _turn = self.write_turn().await;
        sqlx::query(
            "INSERT INTO sync_passes (email, passes, last_pass_at, last_pass_ms, last_appended, last_error, updated_at) \
             VALUES ($1, 1, $2, $3, $4, $5, $2) ON CONFLICT (email) DO UPDATE SET \
             passes = sync_passes.passes + 1, last_pass_at = excluded.last_pass_at, \
             last_pass_ms = excluded.last_pass_ms, last_appended = excluded.last_appended, \
             last_error = excluded.last_error, updated_at = excluded.updated_at",
        )
        .bind(email)
        .bind(at)
        .bind(duration_ms)
        .bind(appended)
        .bind(error)
        .execute(self.relaxed())
        .await?;
        Ok(())
    }

    /// Progress of `email` for `user show`.
    pub async fn sync_progress(&self, email: &str) -> Result<SyncProgress, StoreError> {
        let folders: Option<(i64, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT COUNT(*), CAST(SUM(source_messages) AS BIGINT), CAST(SUM(source_bytes) AS BIGINT) FROM sync_folders WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(self.pool())
        .await?;
        let (copied, copied_bytes) = self.mapped_totals(email).await?;
        let pass: Option<PassRow> = sqlx::query_as(
            "SELECT passes, last_pass_at, last_pass_ms, last_appended, last_error FROM sync_passes WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(self.pool())
        .await?;
        let (nf, total, total_bytes) =
            folders.map_or((0, 0, 0), |(a, b, c)| (a, b.unwrap_or(0), c.unwrap_or(0)));
        let mut p = SyncProgress {
            folders: nf as u64,
            messages_copied: copied as u64,
            messages_total: total.max(copied) as u64,
            bytes_copied: copied_bytes as u64,
            bytes_total: total_bytes.max(copied_bytes) as u64,
            ..SyncProgress::default()
        };
        if let Some((passes, at, ms, appended, err)) = pass {
            p.passes = passes as u64;
            p.last_pass_at = at;
            p.last_pass_ms = ms;
            p.last_appended = appended;
            p.last_error = err;
        }
        let warnings: Vec<(String, String)> = sqlx::query_as(
            "SELECT folder, warning FROM sync_warnings WHERE email = $1 ORDER BY at, folder",
        )
        .bind(email)
        .fetch_all(self.pool())
        .await?;
        p.warnings = warnings
            .into_iter()
            .map(|(f, w)| format!("{f}: {w}"))
            .collect();
        Ok(p)
    }

    /// Records (or replaces) a warning about one folder of `email`.
    pub async fn put_sync_warning(
        &self,
        email: &str,
        folder: &str,
        warning: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.relaxed()).await?;
        sqlx::query(
            "INSERT INTO sync_warnings (email, folder, warning, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (email, folder) DO UPDATE SET warning = excluded.warning, at = excluded.at",
        )
        .bind(email)
        .bind(folder)
        .bind(warning)
        .bind(super::now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Users in state `syncing`, for the scheduler.
    pub async fn syncing_users(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT email FROM users WHERE state = $1 ORDER BY email")
                .bind("syncing")
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}

/// Creates or replaces one folder state within `tx`.
async fn upsert_folder(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    f: &FolderState,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sync_folders (email, source_name, target_name, source_uidvalidity, \
         target_uidvalidity, last_uid, highest_modseq, source_uidnext, source_messages, source_bytes, \
         subscribed, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (email, source_name) DO UPDATE SET target_name = excluded.target_name, \
         source_uidvalidity = excluded.source_uidvalidity, target_uidvalidity = excluded.target_uidvalidity, \
         last_uid = excluded.last_uid, highest_modseq = excluded.highest_modseq, \
         source_uidnext = excluded.source_uidnext, source_messages = excluded.source_messages, \
         source_bytes = excluded.source_bytes, subscribed = excluded.subscribed, \
         updated_at = excluded.updated_at",
    )
    .bind(&f.email)
    .bind(&f.source_name)
    .bind(&f.target_name)
    .bind(i64::from(f.source_uidvalidity))
    .bind(i64::from(f.target_uidvalidity))
    .bind(i64::from(f.last_uid))
    .bind(f.highest_modseq as i64)
    .bind(i64::from(f.source_uidnext))
    .bind(i64::from(f.source_messages))
    .bind(f.source_bytes as i64)
    .bind(i64::from(f.subscribed))
    .bind(now())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes one intent within `tx`: its folder's state first when the folder is new.
async fn write_intent(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    fresh: Option<&FolderState>,
    email: &str,
    source_name: &str,
    rows: &[UidRow],
) -> Result<(), StoreError> {
    if let Some(f) = fresh {
        upsert_folder(tx, f).await?;
    }
    insert_rows(tx, email, source_name, rows).await
}

/// Inserts (or replaces) UID map rows of one folder within `tx`.
pub(super) async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    email: &str,
    source_name: &str,
    rows: &[UidRow],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(100) {
        let mut sql = String::from(
            "INSERT INTO sync_uids (email, source_name, source_uid, target_uid, hash, size, pending_at) \
             VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 7;
            if i > 0 {
                sql.push_str(", ");
            }
            let p: Vec<String> = (1..=7).map(|k| format!("${}", b + k)).collect();
            sql.push_str(&format!("({})", p.join(", ")));
        }
        sql.push_str(
            " ON CONFLICT (email, source_name, source_uid) DO UPDATE SET target_uid = excluded.target_uid, \
             hash = excluded.hash, size = excluded.size, pending_at = excluded.pending_at",
        );
        let at = now();
        // Only placeholders are generated; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(email)
                .bind(source_name)
                .bind(i64::from(r.source_uid))
                .bind(r.target_uid.map(i64::from))
                .bind(&r.hash)
                .bind(r.size as i64)
                .bind(at);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uid_map_life_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlStore::open(
            &format!("sqlite://{}/s.db", dir.path().display()),
            crate::store::Open::CreateIfMissing,
        )
        .await
        .unwrap();
        let mut f = FolderState {
            email: "a@x".into(),
            source_name: "INBOX".into(),
            target_name: "INBOX".into(),
            source_uidvalidity: 7,
            target_uidvalidity: 9,
            last_uid: 0,
            highest_modseq: 0,
            source_uidnext: 1,
            source_messages: 0,
            source_bytes: 0,
            subscribed: true,
        };
        store.put_sync_folder(&f).await.unwrap();
        let rows: Vec<UidRow> = (1..=3)
            .map(|u| UidRow {
                source_uid: u,
                target_uid: None,
                hash: format!("h{u}"),
                size: 10,
                pending_at: None,
            })
            .collect();
        store.add_pending("a@x", "INBOX", &rows).await.unwrap();
        store
            .confirm_uids("a@x", "INBOX", &[(1, 11), (2, 12)])
            .await
            .unwrap();
        let map = store.uid_map("a@x", "INBOX").await.unwrap();
        assert_eq!(map[0].target_uid, Some(11));
        assert_eq!(map[2].target_uid, None);
        f = store.sync_folders("a@x").await.unwrap().remove(0);
        assert_eq!(f.last_uid, 2);
        store
            .rename_sync_folder("a@x", "INBOX", "Other")
            .await
            .unwrap();
        assert_eq!(store.uid_map("a@x", "Other").await.unwrap().len(), 3);
        let p = store.sync_progress("a@x").await.unwrap();
        assert_eq!((p.folders, p.messages_copied, p.bytes_copied), (1, 2, 20));
        store.record_pass("a@x", 5, 2, None).await.unwrap();
        store.record_pass("a@x", 5, 0, Some("boom")).await.unwrap();
        let p = store.sync_progress("a@x").await.unwrap();
        assert_eq!((p.passes, p.last_error.as_deref()), (2, Some("boom")));
        store.delete_sync_folder("a@x", "Other").await.unwrap();
        assert!(store.sync_folders("a@x").await.unwrap().is_empty());
    }

    async fn file_store(dir: &tempfile::TempDir) -> SqlStore {
        SqlStore::open(
            &format!("sqlite://{}/s.db", dir.path().display()),
            crate::store::Open::CreateIfMissing,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_new_folder_gets_its_state_with_its_first_intents() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(&dir).await;
        let f = FolderState::fresh("a@x", "Sent", "Sent", 5, 6, true);
        store
            .start_folder(&f, &[UidRow::intent(1, 10), UidRow::intent(2, 20)])
            .await
            .unwrap();
        assert_eq!(store.sync_folders("a@x").await.unwrap(), vec![f]);
        assert_eq!(store.uid_map("a@x", "Sent").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn concurrent_intents_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(file_store(&dir).await);
        let writers: Vec<_> = (0..8u32)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for chunk in 0..3u32 {
                        let rows: Vec<UidRow> = (1..=5)
                            .map(|u| UidRow::intent(chunk * 5 + u, 100))
                            .collect();
                        store
                            .add_pending(&format!("u{w}@x"), "INBOX", &rows)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        for w in 0..8 {
            let map = store.uid_map(&format!("u{w}@x"), "INBOX").await.unwrap();
            let uids: Vec<u32> = map.iter().map(|r| r.source_uid).collect();
            assert_eq!(uids, (1..=15).collect::<Vec<u32>>(), "writer {w}");
        }
    }

    /// A writer of one intent (INBOX, UID 7), once it has queued its rows; the caller holds
    /// the write turn, so it then waits.
    async fn queued_writer(
        store: &std::sync::Arc<SqlStore>,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .add_pending("a@x", "INBOX", &[UidRow::intent(7, 10)])
                    .await
            })
        };
        let queue = store.intent_queue().unwrap();
        while queue.len() == 0 {
            tokio::task::yield_now().await;
        }
        writer
    }

    #[tokio::test]
    async fn a_writer_cancelled_while_queued_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(file_store(&dir).await);
        let turn = store.write_turn().await;
        let writer = queued_writer(&store).await;
        let queue = store.intent_queue().unwrap();
        writer.abort();
        assert!(writer.await.unwrap_err().is_cancelled());
        assert_eq!(queue.len(), 0, "its rows stayed queued");
        drop(turn);
        // The next writer commits only its own rows.
        store
            .add_pending("a@x", "Sent", &[UidRow::intent(1, 10)])
            .await
            .unwrap();
        assert!(store.uid_map("a@x", "INBOX").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn intents_taken_by_a_cancelled_writer_are_written_by_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(file_store(&dir).await);
        // Hold the turn, so the writer below queues its rows and waits.
        let turn = store.write_turn().await;
        let writer = queued_writer(&store).await;
        let queue = store.intent_queue().unwrap();
        // A writer that took the queue and was cancelled before its commit.
        drop(queue.take());
        drop(turn);
        writer.await.unwrap().unwrap();
        let map = store.uid_map("a@x", "INBOX").await.unwrap();
        assert_eq!(map.len(), 1);
        assert_eq!(map[0].source_uid, 7);
    }
}
